"""Small statistics helpers, metric look-ups and atomic file writes for run results.

Every write of results in this project goes through ``atomic_write_text``,
``atomic_write_json`` or ``atomic_path``: a reader (or a crash) never sees a
half-written file, only the old content or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "wilson_interval",
    "summarize_outcomes",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_dir",
    "is_temp_name",
    "json_default",
    "lookup",
    "as_number",
]

Z95 = 1.959964
"""Two-sided 95% normal quantile."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Returns ``(low, high)`` clamped to [0, 1]; with ``n == 0`` nothing is known
    and the interval is ``(0.0, 1.0)``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # The exact bounds at k=0 and k=n are 0 and 1; round-off can miss them
    # (e.g. 0.9999999999999999 for 10/10), which would exclude p itself.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def summarize_outcomes(
    successes: Sequence[bool] | Sequence[int],
    turns: Sequence[int],
    returns: Sequence[float],
) -> dict[str, Any]:
    """Summarize evaluation episodes.

    ``successes[i]`` is truthy when episode i reached the goal, ``turns[i]`` its
    number of agent turns and ``returns[i]`` its return. The three sequences
    must be equally long. Returns ``success_rate``, ``ci95`` (Wilson, as a
    2-element list), ``mean_turns``, ``mean_return`` and ``episodes``; means of
    zero episodes are 0.0.
    """
    n = len(successes)
    if len(turns) != n or len(returns) != n:
        raise ValueError(
            f"length mismatch: {n} successes, {len(turns)} turns, {len(returns)} returns"
        )
    k = sum(1 for s in successes if s)
    low, high = wilson_interval(k, n)
    return {
        "success_rate": k / n if n else 0.0,
        "ci95": [low, high],
        "mean_turns": _mean(turns),
        "mean_return": _mean(returns),
        "episodes": n,
    }


def lookup(record: dict | None, key: str) -> Any:
    """``record[key]``, where a dotted key (``"critic.val_auroc"``) walks nested dicts.

    Returns None when any part is missing.
    """
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def as_number(value: Any) -> float | None:
    """``value`` as a float (numpy / torch scalars included), or None if missing or NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def json_default(obj: Any) -> Any:
    """``json.dumps`` hook for values that commonly end up in metrics.

    Handles numpy/torch scalars and arrays (via ``.item()`` / ``.tolist()``),
    paths, sets and tuples; anything else raises ``TypeError`` as usual.
    """
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    # Duck typing keeps numpy and torch optional here; for their scalars
    # ``tolist()`` already returns a plain Python number.
    for name in ("tolist", "item"):
        method = getattr(obj, name, None)
        if callable(method):
            return method()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary file lives in the same folder (so ``os.replace`` is atomic)
    and keeps the suffix of ``path`` (so tools that pick a format from the
    name, like matplotlib's ``savefig``, still work). Whatever is written to it
    is fsynced and then replaces ``path``. On any exception the temporary file
    is removed, ``path`` is left untouched and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; results should be as readable as a normal write.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of the temporaries the atomic writers make (``.NAME.tmp...``, ``.NAME.old-...``)."""
    return name.startswith(".") and (".tmp" in name or ".old-" in name)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it becomes ``path``.

    Folders (a saved model, a dataset) cannot be renamed over a non-empty
    folder, so an existing ``path`` (``overwrite=True``) is first renamed aside
    and removed only after the new one is in place: at every instant either
    the old or the new complete folder is there (during the swap, under the
    ``.NAME.old-*`` name). On any exception the temporary folder is removed and
    ``path`` is untouched.
    """
    import shutil
    import uuid

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists and is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, so best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text``."""
    with atomic_path(path) as tmp:
        # atomic_path fsyncs the temporary file before the rename.
        tmp.write_text(text, encoding=encoding)


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, default: Any = json_default
) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON (plus a trailing newline).

    Serialization happens before anything touches the disk, so an object that
    cannot be serialized raises and leaves the old file as it was.
    """
    text = json.dumps(obj, indent=indent, default=default) + "\n"
    atomic_write_text(path, text)
