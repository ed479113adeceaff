"""Atomic file and folder writes: a reader (or a crash) never sees a half-written result.

Every write of results in this project goes through ``atomic_write_text``,
``atomic_write_json``, ``atomic_path`` (one file), ``atomic_dir`` (a folder:
a saved model, a dataset), ``replace_dir`` (a complete folder written elsewhere,
e.g. by several processes, moved into place) or ``atomic_symlink`` (a link):
only the old content or the new one is ever there. The temporaries they leave
after a crash are recognised by ``is_temp_name``; a folder swap cut between its
two renames leaves the old folder as ``.NAME.old-*``, which a resume puts back
(``loop.run_state.remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_dir",
    "replace_dir",
    "atomic_symlink",
    "atomic_write_text",
    "atomic_write_json",
    "is_temp_name",
    "fsync_dir",
    "json_default",
    "finite_json",
]


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


def finite_json(obj: Any, *, lenient: bool = False) -> Any:
    """``obj`` as plain, strictly valid JSON data: NaN and inf become None (null), numpy/torch values plain numbers.

    Strict JSON has no NaN: every JSON file of a run goes through this, so any JSON reader can read it; a reader
    of these files takes null where a number may be missing or undefined. ``lenient``: an object ``json_default``
    cannot convert becomes its ``repr`` instead of raising (a log line is not worth crashing a run for).
    """

    def default(value: Any) -> Any:
        try:
            return json_default(value)
        except TypeError:
            if lenient:
                return repr(value)
            raise

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [finite(v) for v in value]
        return value

    return finite(json.loads(json.dumps(obj, default=default)))


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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
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
    fsync_dir(path.parent)


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
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists and is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move the complete folder ``src`` onto ``dst`` (both in one parent folder), never leaving neither.

    An existing ``dst`` is first renamed aside to ``.NAME.old-*``, ``src`` is
    renamed in, and only then is the old one removed: at every instant either
    the old or the new complete folder is there (during the swap, under the
    ``.NAME.old-*`` name, which a resume puts back). For a folder that several
    processes write into under one agreed temporary name (a sharded
    checkpoint); a single writer uses ``atomic_dir``.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


def atomic_symlink(target: str | os.PathLike[str], link: str | os.PathLike[str]) -> None:
    """Make ``link`` a symlink to ``target`` (stored as given, e.g. relative), replacing any existing link.

    The new link is made under a temporary name next to ``link`` and renamed
    over it, so ``link`` always resolves to the old target or the new one.
    """
    link = Path(link)
    tmp = link.parent / f".{link.name}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(link.parent)


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename inside it survives a power loss (best effort)."""
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
    """Atomically replace ``path`` with ``obj`` as strict JSON (plus a trailing newline); NaN and inf are
    written as null (``finite_json``).

    Serialization happens before anything touches the disk, so an object that
    cannot be serialized raises and leaves the old file as it was.
    """
    plain = finite_json(json.loads(json.dumps(obj, default=default, allow_nan=True)))
    text = json.dumps(plain, indent=indent, allow_nan=False) + "\n"
    atomic_write_text(path, text)
