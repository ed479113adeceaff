"""What the phase benchmarks share: quiet Lightning, a bare CPU Trainer, the stage table, the load warning, JSON.

The benchmarks run as scripts (`python benchmarks/<name>.py`), so this file is imported as `_common` from the
script's own folder; it is not part of the installed package.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
import warnings

import lightning as L
import torch

TABLE_HEADER = f"{'stage':<18}{'seconds':>10}{'share':>9}{'tokens/s':>12}"


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*num_workers.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" from save_pretrained
    except Exception:
        pass


def prepare_run(threads: int | None, seed: int) -> None:
    """What every benchmark does first: quiet logs, the torch thread count, and fixed seeds."""
    import random

    quiet_lightning()
    if threads is not None:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)


def make_trainer(callbacks=(), max_epochs: int = 1, **overrides) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary (their cost is not the phase's)."""
    settings = dict(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(overrides)
    return L.Trainer(**settings)


def fmt_rate(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f}"


def print_stage_table(
    rows: list[tuple[str, float, float | None]],
    total_s: float,
    total_label: str,
    sub_rows: list[tuple[str, float]] = (),
) -> None:
    """stage | seconds | share of `total_s` | tokens/s, then the total and its parts (e.g. the training loop alone)."""
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER))
    for name, secs, r in rows:
        print(f"{name:<18}{secs:>10.3f}{secs / total_s:>8.1%}{fmt_rate(r):>13}")
    print("-" * len(TABLE_HEADER))
    print(f"{total_label:<18}{total_s:>10.3f}{1:>8.0%}")
    for name, secs in sub_rows:
        print(f"{name:<18}{secs:>10.3f}{secs / total_s:>8.1%}")


def machine_info() -> dict:
    """Threads, cores and versions, for the JSON line."""
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def warn_if_busy(load_before: float, load_after: float) -> None:
    """Say so when other processes compete for the cores (1-min load average above half the CPUs)."""
    busy = max(load_before, load_after)
    if busy > 0.5 * (os.cpu_count() or 1):
        print(
            f"WARNING: 1-min load average {busy:.1f} on {os.cpu_count()} CPUs: other processes compete for the cores, "
            "numbers are noisy (and with torch threads = cores, OpenMP oversubscription can slow every stage "
            "several-fold; compare with --threads 1)"
        )


def print_json_line(result: dict) -> None:
    """The last line of stdout: one JSON object with every number."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True))


class LoopTimer(L.Callback):
    """Wall time of the training loop alone (first batch start to epoch end), without Trainer setup and teardown."""

    def __init__(self):
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start if self.start is not None and self.end is not None else float("nan")
