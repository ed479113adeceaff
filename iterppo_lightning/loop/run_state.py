"""`run_state.json`: the commit record of a run, so `fit --resume` continues exactly where a crash left it.

Every durable step of a run ends by rewriting this file atomically (write,
then rename): pi_0 ready, pi_0 evaluated, and within iteration k the buffer
collected, Q_k fitted, pi_(k+1) fitted, and the iteration finished. Files a
step writes (buffer, critic.pt, policy/) are complete before the state names
them, so after a SIGKILL anywhere the state describes only finished work and
resume redoes at most the one interrupted step. Every step reseeds from (seed,
iteration, step), so a redone step computes what the lost one would have.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iterppo_lightning.utils.atomic_io import atomic_path, finite_json, is_temp_name
from iterppo_lightning.utils.failpoints import failpoint

STATE_FILE = "run_state.json"
VERSION = 1


class RunStateError(RuntimeError):
    """The run directory's state cannot be used as asked (nothing to resume, config changed, ...)."""


@dataclass
class IterationProgress:
    """Steps of the unfinished iteration that are on disk and need not be redone."""

    iteration: int
    source: dict[str, Any]
    """{"kind": "simulator"} or {"kind": "logs", "path", "sha256", "format", "policy_ids"}."""
    collected: bool = False
    critic_fitted: bool = False
    policy_fitted: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    """The iteration's record so far (collect / critic / ppo metrics and their seconds)."""


@dataclass
class RunState:
    seed: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    version: int = VERSION
    pi0_ready: bool = False
    initial_eval: dict[str, Any] | None = None
    completed_iterations: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    """Per finished iteration: which policy was trained on which data, and what it exported."""
    in_progress: IterationProgress | None = None
    policy_state: dict[str, Any] = field(default_factory=dict)
    """State of the policy module that is not in its weights (the KL controller)."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """`state_dict()` of callbacks that have one (early stopping), by class name, or `Name#i` for the i-th of
    several callbacks of one class (callbacks.callback_state_keys)."""
    finished: bool = False
    stopped_early: bool = False
    mode: str = "simulator"
    """"logs" once the run has trained on logs: it then only continues with the next batch of logs."""
    logger_step: int = 0
    """The next global step of the run's experiment loggers (loop/run_logger.py): a resume logs from here on."""

    def known_policy_ids(self) -> set[str]:
        """Policies of this run (pi_0 .. last exported) and every policy id already seen in its data."""
        known = {f"pi_{k}" for k in range(self.completed_iterations + 1)}
        for entry in self.lineage:
            known |= set(entry.get("source", {}).get("policy_ids", {}))
        return known

    def used_log_fingerprints(self) -> dict[str, int]:
        return {
            e["source"]["sha256"]: e["iteration"] for e in self.lineage if e.get("source", {}).get("kind") == "logs"
        }


def save_run_state(run_dir: Path, state: RunState) -> None:
    # Strict JSON: a NaN or inf metric is written as null (as in metrics.jsonl), which loading accepts.
    text = json.dumps(finite_json(asdict(state)), indent=2, allow_nan=False) + "\n"
    with atomic_path(run_dir / STATE_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
        failpoint("run_state.before_rename")


def load_run_state(run_dir: Path) -> RunState:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise RunStateError(f"{str(run_dir)!r} holds no run (no {STATE_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunStateError(f"{str(path)!r} is unreadable: {err}") from err
    if raw.get("version") != VERSION:
        raise RunStateError(
            f"{str(path)!r} has state version {raw.get('version')!r}; this trainer reads version {VERSION}"
        )
    progress = raw.pop("in_progress", None)
    state = RunState(**raw)
    state.in_progress = IterationProgress(**progress) if progress else None
    return state


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete what interrupted atomic writes left behind; returns the removed paths.

    A `.NAME.old-*` folder whose NAME is missing is the only complete copy left by
    a swap cut between its two renames: it is put back instead of removed.
    """
    removed = []
    for path in sorted(run_dir.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if not is_temp_name(path.name) or not (path.exists() or path.is_symlink()):
            continue
        if ".old-" in path.name:
            original = path.with_name(path.name[1:].rsplit(".old-", 1)[0])
            if not original.exists():
                os.replace(path, original)
                continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(str(path.relative_to(run_dir)))
    return removed


PRECISION_PHASES = ("bootstrap", "critic", "policy")
"""Phases with a precision key of their own (`critic_precision`, ...: distributed/phase_strategies.py)."""


def config_differences(
    saved_yaml: str, current_yaml: str, ignore: set[str], defaults_yaml: str | None = None
) -> list[str]:
    """Dotted keys whose values differ between two config dumps (seed_everything, model, data, trainer and the
    phases' precisions: what changes what is learned).

    defaults_yaml: the config with nothing set (commands/lightning_cli.default_fit_config). A key the saved config
    lacks altogether, because the run predates the key, counts as unchanged when its value now is that default:
    a new setting's default keeps the behaviour from before it existed. Without it, such a key is compared as None.
    """
    saved, current = yaml.safe_load(saved_yaml) or {}, yaml.safe_load(current_yaml) or {}
    defaults = (yaml.safe_load(defaults_yaml) or {}) if defaults_yaml is not None else None
    diffs: list[str] = []

    def walk(a: Any, b: Any, default: Any, prefix: str, in_saved: bool) -> None:
        if prefix in ignore:
            return
        if isinstance(b, dict) and (isinstance(a, dict) or (not in_saved and defaults is not None)):
            a, default = (a if isinstance(a, dict) else {}), (default if isinstance(default, dict) else {})
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), default.get(key), f"{prefix}.{key}" if prefix else key, key in a)
        elif not in_saved and defaults is not None:
            if b != default:
                diffs.append(f"{prefix}: not in the saved config (default {default!r}) -> {b!r}")
        elif a != b:
            diffs.append(f"{prefix}: {a!r} -> {b!r}")

    for section in ("seed_everything", "model", "data", "trainer", *(f"{p}_precision" for p in PRECISION_PHASES)):
        walk(saved.get(section), current.get(section), (defaults or {}).get(section), section, section in saved)
    return diffs
