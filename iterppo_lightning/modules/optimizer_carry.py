"""Carry optimizer state (e.g. Adam moments) from one outer iteration's fit to the next.

Every phase runs in a fresh Trainer, which rebuilds the optimizer: by default
moments restart each iteration while the weights carry over. Modules mixing
this in expose `keep_optimizer_state` to make the choice explicit.

The loop reads and sets the carried state through `carried_optimizer_state`
(to save it with the iteration, and to give it back to a restarted process).
Under DeepSpeed the optimizer state is partitioned over the processes: it is
carried through the phase's sharded ZeRO checkpoint instead, which the loop
names with `resume_from_zero_checkpoint` before each fit.
"""

from __future__ import annotations

import copy
from pathlib import Path


class OptimizerCarryMixin:
    keep_optimizer_state: bool = False
    _carried_optimizer_state: dict | None = None
    _zero_checkpoint_in: str | None = None

    @property
    def carried_optimizer_state(self) -> dict | None:
        """The optimizer's `state_dict()` at the end of the last fit (None: none yet, or not kept)."""
        return self._carried_optimizer_state

    @carried_optimizer_state.setter
    def carried_optimizer_state(self, state: dict | None) -> None:
        """Give the next fit this optimizer state (e.g. read back from disk after a restart); None forgets it."""
        self._carried_optimizer_state = state

    def resume_from_zero_checkpoint(self, path: str | Path | None) -> None:
        """Under DeepSpeed: the next fit loads its optimizer partitions from this sharded checkpoint (None: none)."""
        self._zero_checkpoint_in = None if path is None else str(path)

    def on_train_start(self) -> None:
        from iterppo_lightning.distributed.zero import ZERO_CHECKPOINT_TAG, zero_stage

        if self.keep_optimizer_state and zero_stage(self.trainer) > 0:
            if self._zero_checkpoint_in is not None:
                # Weights, optimizer partitions and step counts of the previous fit
                # (the weights equal the current ones).
                self.trainer.strategy.deepspeed_engine.load_checkpoint(
                    self._zero_checkpoint_in,
                    tag=ZERO_CHECKPOINT_TAG,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    load_module_strict=False,  # saved without the frozen weights, which stay as they are
                )
            return
        if self.keep_optimizer_state and self._carried_optimizer_state is not None:
            optimizer = self.trainer.optimizers[0]
            optimizer.load_state_dict(self._carried_optimizer_state)

    def on_train_end(self) -> None:
        from iterppo_lightning.distributed.zero import zero_stage

        if self.keep_optimizer_state and zero_stage(self.trainer) == 0:
            self._carried_optimizer_state = copy.deepcopy(self.trainer.optimizers[0].state_dict())
