"""`BehaviourCloningModule`: supervised fine-tuning of a causal LM on logged suggestions.

Builds pi_0 from imagined conversations, and is the filtered-BC baseline when
the DataModule keeps successful conversations only. Loss is next-token
cross-entropy on the suggestion tokens only (prompt tokens are masked), the mean
over the batch's reply tokens. A batch row may hold a whole conversation
(data/batching.py): its cloned turns' replies are labelled, the rest is context.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from iterppo_lightning.distributed.collectives import any_rank, global_share
from iterppo_lightning.models.fused_ops import adamw, cpu_bf16_kernels, restore_kernels
from iterppo_lightning.models.modeling import causal_lm_forward
from iterppo_lightning.utils.failpoints import failpoint, maybe_nan


def _turns(batch: dict) -> int:
    """Cloned turns in a batch (the weight of its loss in an epoch's mean): one per reply, or one per row."""
    rows = batch.get("read_rows")
    return int(rows.numel()) if rows is not None else int(batch["input_ids"].shape[0])


class BehaviourCloningModule(L.LightningModule):
    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant"):
        """
        Args:
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            lr_schedule: "constant", or "linear": decay from `lr` to 0 over the fit's optimizer steps.
        """
        super().__init__()
        if lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be constant or linear, got {lr_schedule!r}")
        self.save_hyperparameters()
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.model = None

    def attach(self, model) -> None:
        """Train this causal LM (weights are updated in place)."""
        self.model = model

    def setup(self, stage: str) -> None:
        self._bf16_changes = cpu_bf16_kernels(self, self._trainer)

    def teardown(self, stage: str) -> None:
        restore_kernels(getattr(self, "_bf16_changes", []))
        self._bf16_changes = []

    def token_losses(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of every next token, [B, T - 1] (entry t: the loss of token t + 1 given tokens <= t);
        0 where the token is not labelled."""
        logits, _ = causal_lm_forward(self.model, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        )
        return losses.view(labels.shape)

    def _loss(self, batch: dict) -> torch.Tensor:
        logits, _ = causal_lm_forward(self.model, batch["input_ids"], batch["attention_mask"])
        # Position t predicts token t+1.
        labels = batch["labels"][:, 1:].reshape(-1)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels, ignore_index=-100)
        # Several processes: the mean over every rank's tokens, not a mean of per-rank means.
        share = global_share((labels != -100).sum())
        return loss if share is None else loss * share

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = maybe_nan("sft.loss", self._loss(batch))  # crash tests only; a no-op otherwise
        if any_rank(not bool(torch.isfinite(loss))):  # every process stops together
            raise FloatingPointError(
                f"bootstrap phase (behaviour cloning of pi_0): non-finite loss at step {self.global_step}"
            )
        failpoint("sft.step")
        self.log("sft/train_loss", loss, prog_bar=True, batch_size=_turns(batch))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("sft/val_loss", self._loss(batch), prog_bar=True, batch_size=_turns(batch))

    def configure_optimizers(self):
        optimizer = adamw(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return optimizer
        # Linear decay to 0 at the fit's last step: the steps a constant rate leaves at its noise level are spent
        # at ever smaller steps instead.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}
