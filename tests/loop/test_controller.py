"""OuterLoop's checks that need no training."""

from __future__ import annotations

import lightning as L
import pytest

from iterppo_lightning.commands.lightning_cli import IterPPOTrainer
from iterppo_lightning.loop import controller
from iterppo_lightning.loop.controller import check_trainer_saves_zero_state


def test_keep_optimizer_state_under_deepspeed_refuses_a_trainer_that_would_drop_the_sharded_state(monkeypatch):
    plain = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    ours = IterPPOTrainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    check_trainer_saves_zero_state(plain, "policy")  # no DeepSpeed: nothing sharded to save
    monkeypatch.setattr(controller, "zero_stage", lambda trainer: 3)  # as under a ZeRO-3 strategy
    check_trainer_saves_zero_state(ours, "policy")
    with pytest.raises(TypeError, match=r"model\.critic\.keep_optimizer_state.*IterPPOTrainer.*made a Trainer"):
        check_trainer_saves_zero_state(plain, "critic")
