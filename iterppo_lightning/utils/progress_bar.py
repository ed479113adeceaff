"""The progress bar of a phase Trainer: it names its phase and iteration ("ppo · iteration 2 · epoch 1/1").

Lightning's RichProgressBar says only "Epoch 0/3" (and "Epoch 0/-2" for a fit bounded by steps, where
max_epochs is -1); the loop fits every phase of every iteration in a fresh Trainer, so without a name one bar
looks like the next. The CLI gives every phase Trainer a `PhaseProgressBar` (commands/lightning_cli.py) and the
loop names it (`name_progress_bar`). A bar configured by the user (trainer.callbacks) is left as it is.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class PhaseProgressBar(RichProgressBar):
    def __init__(self, label: str = "", **kwargs):
        super().__init__(**kwargs)
        self.label = label
        """What the phase is, e.g. "critic · iteration 2"; empty = Lightning's own description."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            position = f"epoch {current_epoch + 1}/{trainer.max_epochs}"
        elif trainer.max_steps is not None and trainer.max_steps > 0:
            position = f"{trainer.max_steps} steps"  # the bar's total: the steps still to go
        else:
            position = f"epoch {current_epoch + 1}"
        return f"{self.label} · {position}" if self.label else position

    @property
    def validation_description(self) -> str:
        return f"{self.label} · validation" if self.label else "Validation"


def name_progress_bar(trainer: L.Trainer, label: str) -> None:
    """Name the phase Trainer's bar (a PhaseProgressBar; any other bar, or none, is left alone)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if isinstance(bar, PhaseProgressBar):
        bar.label = label
