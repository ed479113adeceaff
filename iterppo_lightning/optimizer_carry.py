"""Carry optimizer state (e.g. Adam moments) from one outer iteration's fit to the next.

Every phase runs in a fresh Trainer, which rebuilds the optimizer: by default
moments restart each iteration while the weights carry over. Modules mixing
this in expose `keep_optimizer_state` to make the choice explicit.
"""

from __future__ import annotations

import copy


class OptimizerCarryMixin:
    keep_optimizer_state: bool = False
    _carried_optimizer_state: dict | None = None

    def on_train_start(self) -> None:
        if self.keep_optimizer_state and self._carried_optimizer_state is not None:
            optimizer = self.trainer.optimizers[0]
            optimizer.load_state_dict(self._carried_optimizer_state)

    def on_train_end(self) -> None:
        if self.keep_optimizer_state:
            self._carried_optimizer_state = copy.deepcopy(self.trainer.optimizers[0].state_dict())
