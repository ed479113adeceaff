"""One experiment logger for a whole run, across the fresh Trainer of every phase and iteration.

The loop fits each phase in a new Trainer (controller.py), and a Trainer counts its steps from 0: handed one
logger directly, every phase and iteration would log at steps 0, 1, 2, ... over each other. `RunLogger` owns
the run's loggers and a global step; each phase Trainer gets a `PhaseLogger`, a thin Lightning `Logger` that
adds the steps logged before it (its offset) and puts every metric under its phase's namespace:

    bc/...       behaviour cloning (pi_0's bootstrap, the filtered-BC baseline)
    critic/...   the critic fits (Q_k)
    ppo/...      the policy phase (PPO)
    loop/...     the outer loop, once per policy: success rate and its 95% CI, return, OPE, critic probe,
                 the iteration's KL, seconds per phase (callbacks.LoggerCallback)

The loggers, from `trainer.logger` (LightningCLI's usual key):

* unset, `true` (default): a CSV file, RUN/logs/csv/metrics.csv, and TensorBoard in RUN/logs/tensorboard when
  the `tensorboard` package is installed;
* one or more Logger objects (`class_path`/`init_args`: WandbLogger, MLFlowLogger, TensorBoardLogger, ...):
  those, and the CSV file;
* `false`: none.

The next global step is kept in run_state.json (`RunState.logger_step`) and, for the CSV, read back from the
file: `--resume` logs after the last step on disk, never over it (a phase that is redone logs at new steps).
"""

from __future__ import annotations

import csv
import io
import math
from argparse import Namespace
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

from iterppo_lightning.utils.atomic_io import atomic_write_text

LOGS_DIR = "logs"
CSV_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"

PHASE_NAMESPACES = {"bootstrap": "bc", "critic": "critic", "policy": "ppo"}
"""Trainer phase -> metric namespace (the filtered-BC baseline clones through the bootstrap phase: bc/)."""
RENAMED_PREFIXES = {"sft/": "bc/"}
"""Prefixes the modules log under -> the run's namespace (modules/sft.py logs sft/...: behaviour cloning)."""


def tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


class RunCSVLogger(Logger):
    """The run's metrics as one wide CSV (a `step` column, then one column per metric), like Lightning's CSVLogger,
    but with one row per step (Lightning logs a phase's last training step and its validation at the same step:
    they share a row), it continues an existing file on resume instead of deleting it, and a header change
    rewrites the file atomically (a row appended by a killed process may be cut; reading it back skips it).

    `save` writes every row but the newest, which metrics at the same step may still join; `finalize` (the end
    of each phase and of the run) writes it too."""

    def __init__(self, log_dir: str | Path):
        super().__init__()
        self._dir = Path(log_dir)
        self._rows: list[dict[str, Any]] = []
        self._keys: list[str] = []
        self.last_step = -1
        """The largest step in the file when it was opened (-1: no file)."""
        path = self.metrics_file
        if path.is_file():
            rows = read_metrics_csv(path)
            with path.open(encoding="utf-8", newline="") as f:
                self._keys = [key for key in next(csv.reader(f), []) if key != "step"]
            self.last_step = max((int(r["step"]) for r in rows), default=-1)
            self._drop_cut_row(rows)

    @rank_zero_only
    def _drop_cut_row(self, rows: list[dict[str, Any]]) -> None:
        """A last row cut short by a kill (no line end): rewrite the file without it, so appends start clean."""
        path = self.metrics_file
        if not path.read_bytes().endswith(b"\n"):
            atomic_write_text(path, _csv_text(["step", *self._keys], rows, header=True))

    @property
    def name(self) -> str:
        return LOGS_DIR

    @property
    def version(self) -> str:
        return "csv"

    @property
    def root_dir(self) -> str:
        return str(self._dir.parent)

    @property
    def log_dir(self) -> str:
        return str(self._dir)

    @property
    def save_dir(self) -> str:
        return str(self._dir)

    @property
    def metrics_file(self) -> Path:
        return self._dir / CSV_FILE

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        atomic_write_text(self._dir / HPARAMS_FILE, yaml.safe_dump(params, sort_keys=False))

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {key: _scalar(value) for key, value in metrics.items()}
        if self._rows and self._rows[-1]["step"] == step:
            self._rows[-1].update(values)
        else:
            self._rows.append({"step": step, **values})

    @rank_zero_only
    def save(self) -> None:
        self._write(keep_last=True)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._write(keep_last=False)

    def _write(self, keep_last: bool) -> None:
        rows, self._rows = (self._rows[:-1], self._rows[-1:]) if keep_last else (self._rows, [])
        if not rows:
            return
        new_keys = sorted({key for row in rows for key in row} - {"step", *self._keys})
        path = self.metrics_file
        path.parent.mkdir(parents=True, exist_ok=True)
        if new_keys or not path.is_file():
            old = read_metrics_csv(path) if path.is_file() else []
            self._keys = sorted([*self._keys, *new_keys])
            atomic_write_text(path, _csv_text(["step", *self._keys], old + rows, header=True))
        else:
            with path.open("a", encoding="utf-8", newline="") as f:
                f.write(_csv_text(["step", *self._keys], rows, header=False))


def _scalar(value: Any) -> float:
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


def _csv_text(fields: list[str], rows: list[dict[str, Any]], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv (a run's, or Lightning's CSVLogger's): `step` as int, metrics as floats, empty
    cells left out. A row cut short by a killed process (fewer cells than the header, no step) is skipped."""
    with Path(path).open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return []
        at = header.index("step")
        rows = []
        for cells in reader:
            if len(cells) != len(header) or not cells[at].lstrip("-").isdigit():
                continue
            row: dict[str, Any] = {"step": int(cells[at])}
            row.update((key, float(cell)) for key, cell in zip(header, cells) if cell != "" and key != "step")
            rows.append(row)
    return rows


class RunLogger:
    """The run's loggers and its global step; `for_phase` makes the Logger a phase Trainer gets."""

    def __init__(
        self,
        run_dir: str | Path,
        setting: bool | Logger | Iterable[Logger] | None = None,
        state: Any = None,
        console: Console | None = None,
    ):
        """
        Args:
            run_dir: the run's folder; the default loggers write under RUN/logs.
            setting: `trainer.logger` (see the module docstring).
            state: the run's RunState: its `logger_step` is where the steps continue on resume, and follows
                `next_step` from then on (committed with the state).
            console: where the one note about TensorBoard goes.
        """
        self.run_dir = Path(run_dir)
        self.loggers: list[Logger] = []
        self.state = state
        self._next_step = 0 if state is None else int(state.logger_step)
        if setting is False:
            return
        user = [] if setting in (None, True) else [setting] if isinstance(setting, Logger) else list(setting)
        self.csv = RunCSVLogger(self.run_dir / LOGS_DIR / "csv")
        self.next_step = max(self.next_step, self.csv.last_step + 1)
        self.loggers = [self.csv, *user]
        if not user:
            if tensorboard_available():
                from lightning.pytorch.loggers import TensorBoardLogger

                self.loggers.append(TensorBoardLogger(self.run_dir, name=LOGS_DIR, version="tensorboard"))
            elif rank_zero_only.rank == 0:
                (console or Console(stderr=True)).print(
                    f"note: logging metrics to {self.run_dir / LOGS_DIR / 'csv' / CSV_FILE}; TensorBoard is not "
                    "installed (pip install tensorboard), so there is no TensorBoard log",
                    highlight=False,
                    soft_wrap=True,
                )

    @property
    def next_step(self) -> int:
        """The first global step no logger has seen yet."""
        return self._next_step

    @next_step.setter
    def next_step(self, step: int) -> None:
        self._next_step = step
        if self.state is not None:
            self.state.logger_step = step

    @property
    def enabled(self) -> bool:
        return bool(self.loggers)

    def for_phase(self, phase: str, namespace: str | None = None) -> PhaseLogger | bool:
        """The `logger=` of one phase Trainer (False when logging is off)."""
        if not self.enabled:
            return False
        return PhaseLogger(self, namespace or PHASE_NAMESPACES.get(phase, phase))

    def log_metrics(self, metrics: dict[str, float]) -> int:
        """Log metrics (already namespaced) at the next global step; returns that step. NaN and inf are left out."""
        step = self.next_step
        if self.enabled:
            self._forward(metrics, step)
            self.flush()
        self.next_step = step + 1
        return step

    def _forward(self, metrics: dict[str, float], step: int) -> None:
        """Metrics at a global step to every logger; NaN and inf are left out (an empty cell, not "nan")."""
        self.next_step = max(self.next_step, step + 1)
        finite = {key: value for key, value in metrics.items() if math.isfinite(value)}
        if finite:
            for logger in self.loggers:
                logger.log_metrics(finite, step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(params)
            logger.save()

    def save(self) -> None:
        for logger in self.loggers:
            logger.save()

    def flush(self) -> None:
        """Everything logged so far on disk (the end of a phase): the CSV's open row too."""
        if self.enabled:
            self.csv.finalize("flush")
        self.save()

    def finalize(self, status: str = "success") -> None:
        for logger in self.loggers:
            logger.finalize(status)


class PhaseLogger(Logger):
    """What one phase Trainer logs to: the run's loggers at global steps (offset + the Trainer's step), under the
    phase's namespace. The run's hyperparameters are logged once by the run, not per phase; finalizing a phase
    only saves (a W&B run ends with the whole run)."""

    def __init__(self, run: RunLogger, namespace: str):
        super().__init__()
        self.run = run
        self.namespace = namespace
        self.offset = run.next_step

    @property
    def name(self) -> str:
        return LOGS_DIR

    @property
    def version(self) -> str:
        return ""  # one run, one version: no "v_num" on the progress bars

    @property
    def save_dir(self) -> str:
        return str(self.run.run_dir / LOGS_DIR)

    @property
    def log_dir(self) -> str:
        return self.save_dir

    def metric_name(self, key: str) -> str:
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                return new + key[len(old) :]
        return key if "/" in key else f"{self.namespace}/{key}"  # Lightning's own "epoch", say

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.offset + (0 if step is None else int(step))
        self.run._forward({self.metric_name(k): _scalar(v) for k, v in metrics.items()}, step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass

    def log_graph(self, model, input_array=None) -> None:
        pass

    def save(self) -> None:
        self.run.save()

    def finalize(self, status: str) -> None:
        self.run.flush()


def flatten_record(record: dict[str, Any], prefix: str = "loop") -> dict[str, float]:
    """An iteration's record as `loop/...` metrics: every finite number, nested keys joined with "/", a
    [low, high] interval (`ci95`, `greedy_ci95`) as `..._low`/`..._high`; text, lists and booleans left out."""
    out: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, dict):
            for name, inner in value.items():
                walk(inner, f"{key}/{name}")
        elif isinstance(value, (list, tuple)):
            if key.endswith("ci95") and len(value) == 2:
                walk(value[0], f"{key}_low")
                walk(value[1], f"{key}_high")
        else:
            try:
                number = _scalar(value)
            except (TypeError, ValueError):
                return
            if math.isfinite(number):
                out[key] = number

    for name, value in record.items():
        walk(value, f"{prefix}/{name}")
    return out
