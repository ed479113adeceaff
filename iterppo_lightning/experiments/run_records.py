"""What a finished or interrupted `fit` run recorded, read back for `iterppo sweep` and `iterppo report`.

Only reads files (run_state.json, pi_0/bootstrap.json); imports nothing heavy, so `iterppo report` starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from iterppo_lightning.loop.run_state import STATE_FILE

__all__ = ["read_json", "read_run_state", "recorded_seconds"]

RUN_PI0_DIR = "pi_0"
"""Where `fit` keeps the pi_0 it bootstrapped itself, inside the run folder."""


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (a run may be mid-write or gone)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_run_state(run_dir: Path) -> dict | None:
    return read_json(run_dir / STATE_FILE)


def recorded_seconds(run_dir: Path) -> tuple[float | None, bool]:
    """(sum of the phase seconds the run recorded, whether that includes bootstrapping pi_0 in the run)."""
    state = read_run_state(run_dir)
    if state is None:
        return None, False
    records = list(state.get("history") or [])
    progress = state.get("in_progress") or {}
    if progress.get("record"):
        records.append(progress["record"])
    total = sum(float(v) for r in records for v in (r.get("seconds") or {}).values() if isinstance(v, (int, float)))
    bootstrap = read_json(run_dir / RUN_PI0_DIR / "bootstrap.json")
    if bootstrap and isinstance(bootstrap.get("seconds"), (int, float)):
        return total + bootstrap["seconds"], True
    return total, False
