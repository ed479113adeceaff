"""`CriticModule`: the multi-turn Q-critic Q_k(state, suggestion) fit on Monte Carlo returns.

A sequence model over [state; suggestion] with a scalar head read at the last
token and a sigmoid output, so Q is a discounted success probability in
[0, 1]. BCE against the soft target G_i (its minimiser is E[G]) or MSE.
A training batch row may hold a whole conversation (data/batching.py): Q of each
turn is then read at that turn's reply's last token in the one causal pass, and
the loss and metrics are over turns, as with one row per turn.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MeanSquaredError, Metric
from torchmetrics.classification import BinaryAUROC
from transformers import AutoConfig, AutoModel

from iterppo_lightning.distributed.collectives import all_reduce_sum, any_rank, global_share
from iterppo_lightning.models.fused_ops import adamw, fuse_activations
from iterppo_lightning.models.lora import LoraSettings, add_lora_to_backbone
from iterppo_lightning.models.modeling import backbone_hidden, last_token_index
from iterppo_lightning.modules.optimizer_carry import OptimizerCarryMixin
from iterppo_lightning.rl import ppo_math as pm
from iterppo_lightning.utils.failpoints import failpoint, maybe_nan

CRITIC_TARGETS = ("mc", "td", "fqe", "myopic")


class SoftCalibrationError(Metric):
    """Expected calibration error against soft targets.

    Binned |mean prediction - mean target|, weighted by bin size. Targets are
    discounted returns in [0, 1], not labels, so the binary ECE would be
    biased by the discount; this compares Q with what it estimates.
    """

    full_state_update = False

    def __init__(self, n_bins: int = 10):
        super().__init__()
        self.n_bins = n_bins
        self.add_state("pred_sum", default=torch.zeros(n_bins), dist_reduce_fx="sum")
        self.add_state("target_sum", default=torch.zeros(n_bins), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n_bins), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        bins = (preds.detach().clamp(0, 1) * self.n_bins).long().clamp(max=self.n_bins - 1)
        self.pred_sum += torch.bincount(bins, weights=preds.detach().float(), minlength=self.n_bins)
        self.target_sum += torch.bincount(bins, weights=target.float(), minlength=self.n_bins)
        self.count += torch.bincount(bins, minlength=self.n_bins).float()

    def compute(self) -> torch.Tensor:
        total = self.count.sum().clamp(min=1)
        gap = (self.pred_sum - self.target_sum).abs()  # = count * |mean pred - mean target|
        return gap.sum() / total


class CriticModule(OptimizerCarryMixin, L.LightningModule):
    def __init__(
        self,
        loss: str = "bce",
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        init_from_policy: bool = True,
        warm_start: bool = True,
        keep_optimizer_state: bool = False,
        calibration_bins: int = 10,
        target: str = "mc",
        td_lambda: float = 0.8,
        td_rounds: int = 2,
        lora: LoraSettings | None = None,
        ensemble_size: int = 1,
        pessimism: float = 0.0,
    ):
        """
        Args:
            loss: "bce" (soft-target binary cross-entropy on the logit) or "mse" (on the probability).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            init_from_policy: start the backbone from pi_0's weights (else from its config, random).
            warm_start: Q_k starts from Q_(k-1)'s weights instead of being rebuilt each iteration.
            keep_optimizer_state: carry Adam moments across outer iterations.
            calibration_bins: bins of the validation calibration error.
            target: what Q_k regresses on. "mc": the Monte Carlo return (sound when the
                buffer comes from pi_k alone); "td": TD(lambda) targets bootstrapped on the
                logged next suggestion (evaluates the logging policies, SARSA-style);
                "fqe": fitted Q evaluation, bootstrapped on pi_k's own reply at the next
                state (evaluates pi_k even from mixed or pooled logs). See docs/data.md.
                "myopic": the reward of the current turn only (the outcome the next customer
                message brings: 1 if the conversation succeeds right there, else 0), the
                single-turn RLHF baseline (docs/variants.md).
            td_lambda: lambda of the "td" targets (1.0 = Monte Carlo; "fqe" uses 0).
            td_rounds: for "td"/"fqe": refits after the first Monte Carlo fit, each on
                targets recomputed with the previous round's critic.
            lora: train a LoRA adapter on the backbone (plus the head) instead of every weight.
            ensemble_size: N independently initialised critics (backbone + head each), each
                trained on its own Poisson bootstrap of the conversations (docs/variants.md).
            pessimism: c in PPO's reward mean - c * std over the members (needs ensemble_size >= 2).
        """
        super().__init__()
        if loss not in ("bce", "mse"):
            raise ValueError(f"critic loss must be 'bce' or 'mse', got {loss!r}")
        if target not in CRITIC_TARGETS:
            raise ValueError(f"critic.target must be one of {CRITIC_TARGETS}, got {target!r}")
        if not 0.0 <= td_lambda <= 1.0:
            raise ValueError(f"critic.td_lambda must be in [0, 1], got {td_lambda}")
        if td_rounds < 1:
            raise ValueError(f"critic.td_rounds must be >= 1, got {td_rounds}")
        if ensemble_size < 1:
            raise ValueError(f"model.critic.ensemble_size must be >= 1, got {ensemble_size}")
        if pessimism < 0:
            raise ValueError(f"model.critic.pessimism must be >= 0, got {pessimism}")
        if pessimism > 0 and ensemble_size < 2:
            raise ValueError(
                f"model.critic.pessimism {pessimism} needs model.critic.ensemble_size >= 2 (one critic has no spread "
                f"to be pessimistic about), got ensemble_size {ensemble_size}"
            )
        self.save_hyperparameters()
        self.loss_name = loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.init_from_policy = init_from_policy
        self.warm_start = warm_start
        self.keep_optimizer_state = keep_optimizer_state
        self.target = target
        self.td_lambda = td_lambda
        self.td_rounds = td_rounds
        self.lora = lora
        self.ensemble_size = ensemble_size
        self.pessimism = pessimism
        self._trainable: set[str] = set()
        self.backbone: nn.Module | None = None
        self.head: nn.Linear | None = None
        self.extra_members = nn.ModuleList()
        """Members 2..N of an ensemble, each a ModuleDict(backbone, head); member 1 is backbone/head."""
        self.val_loss = MeanMetric()
        self.val_brier = MeanSquaredError()
        self.val_auroc = BinaryAUROC()
        self.val_calibration = SoftCalibrationError(calibration_bins)

    @property
    def is_built(self) -> bool:
        return self.backbone is not None

    def build(self, base_model_dir: str | Path) -> None:
        """Create backbone + scalar head (one per ensemble member) from a saved causal LM folder.

        One critic starts with a zero head (Q = 0.5 everywhere). Ensemble members keep nn.Linear's
        random head initialisation, drawn one after the other from the step's seeded RNG (and,
        without init_from_policy, their random backbones too), so each starts differently.
        """
        self.backbone, self.head = self._build_member(base_model_dir)
        self.extra_members = nn.ModuleList(
            nn.ModuleDict(dict(zip(("backbone", "head"), self._build_member(base_model_dir))))
            for _ in range(self.ensemble_size - 1)
        )
        self.carried_optimizer_state = None
        self._trainable = {name for name, p in self.named_parameters() if p.requires_grad}

    def _build_member(self, base_model_dir: str | Path) -> tuple[nn.Module, nn.Linear]:
        if self.init_from_policy:
            backbone = AutoModel.from_pretrained(base_model_dir)
        else:
            backbone = AutoModel.from_config(AutoConfig.from_pretrained(base_model_dir))
        fuse_activations(backbone)
        hidden = backbone.config.hidden_size
        if self.lora is not None:
            backbone = add_lora_to_backbone(backbone, self.lora)
        head = nn.Linear(hidden, 1)
        if self.ensemble_size == 1:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return backbone, head

    def _thaw(self) -> list[nn.Parameter]:
        """The policy phase freezes Q_k (attach_critic); fitting Q_(k+1) thaws what trains
        (everything, or with LoRA only the adapter and the head) and returns it."""
        trainable = []
        for name, p in self.named_parameters():
            p.requires_grad_(name in self._trainable)
            if name in self._trainable:
                trainable.append(p)
        return trainable

    def setup(self, stage: str) -> None:
        # Before the strategy wraps the module: DDP refuses a module with nothing to train.
        self._thaw()

    def on_fit_start(self) -> None:
        self._thaw()

    # -- maths ----------------------------------------------------------------
    @staticmethod
    def _member_logits(
        backbone,
        head,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        read_rows: torch.Tensor | None = None,
        read_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = backbone_hidden(backbone, input_ids, attention_mask)
        if read_rows is None:
            read_rows = torch.arange(hidden.shape[0], device=hidden.device)
            read_positions = last_token_index(attention_mask)
        return head(hidden[read_rows, read_positions]).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        read_rows: torch.Tensor | None = None,
        read_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q logits: [B] for one critic, [N, B] for an ensemble of N, read at each row's last real token; or, given
        `read_rows` and `read_positions` (a critic batch's, one entry per turn), [T] / [N, T] read at those
        (row, position) pairs."""
        if (read_rows is None) != (read_positions is None):
            raise ValueError("read_rows and read_positions come together")
        where = (input_ids, attention_mask, read_rows, read_positions)
        logits = self._member_logits(self.backbone, self.head, *where)
        if self.ensemble_size == 1:
            return logits
        others = [self._member_logits(m["backbone"], m["head"], *where) for m in self.extra_members]
        return torch.stack([logits, *others])

    def batch_logits(self, batch: dict) -> torch.Tensor:
        """Q logits of a critic batch's turns (data/datamodule.py), [T] or [N, T]; a batch without read positions
        has one turn per row, read at its last token."""
        return self(batch["input_ids"], batch["attention_mask"], batch.get("read_rows"), batch.get("read_positions"))

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """PPO's reward: Q_k(s, a) in [0, 1]; for an ensemble mean - pessimism * std over the members."""
        probs = torch.sigmoid(self(input_ids, attention_mask))
        return probs if self.ensemble_size == 1 else pm.ensemble_lower_bound(probs, self.pessimism)

    @torch.no_grad()
    def q_mean(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The estimate of Q_k(s, a): the members' mean (bootstrapped critic targets, the off-policy estimate)."""
        probs = torch.sigmoid(self(input_ids, attention_mask))
        return probs if self.ensemble_size == 1 else probs.mean(dim=0)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.loss_name == "bce":
            per_example = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            per_example = (torch.sigmoid(logits) - target) ** 2
        if weight is None:
            return per_example.mean()
        # Pooled buffers (data.pool_weights): weights arrive divided by the data's mean weight,
        # so this is the weighted mean over the data set, not re-normalised per batch.
        return (weight * per_example).mean()

    def _ensemble_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Sum over members of each member's loss, weighted by its bootstrap counts (and pool weights).

        The members share no parameter, so the sum gives each one the gradient of its own loss.
        """
        pool, counts = batch.get("weight"), batch.get("bootstrap")
        losses = []
        for m in range(self.ensemble_size):
            weight = None if counts is None else counts[m]
            if pool is not None:
                weight = pool if weight is None else weight * pool
            losses.append(self._loss(logits[m], batch["target"], weight))
        return torch.stack(losses).sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.batch_logits(batch)
        if self.ensemble_size == 1:
            loss = self._loss(logits, batch["target"], batch.get("weight"))
        else:
            loss = self._ensemble_loss(logits, batch)
        # Several processes: this rank's share of the global batch mean (a share of turns, not of rows).
        share = global_share(batch["target"].shape[0])
        if share is not None:
            loss = loss * share
        loss = maybe_nan("critic.loss", loss)  # crash tests only; a no-op otherwise
        if any_rank(not bool(torch.isfinite(loss))):  # every process stops together
            # Raised before backward and step, so the weights stay the last good ones.
            raise FloatingPointError(
                f"critic phase: non-finite loss ({loss.item()}) at step {self.global_step} (batch {batch_idx})"
            )
        n = batch["target"].shape[0]
        self.log("critic/train_loss", loss / self.ensemble_size, prog_bar=True, batch_size=n)  # per member
        failpoint("critic.step")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.batch_logits(batch)
        n = batch["target"].shape[0]
        if self.ensemble_size == 1:
            probs = torch.sigmoid(logits)
            val_loss = self._loss(logits, batch["target"])
        else:  # the ensemble's estimate is the members' mean; the loss is the members' mean loss
            probs = torch.sigmoid(logits).mean(dim=0)
            val_loss = torch.stack([self._loss(member, batch["target"]) for member in logits]).mean()
        # The mean over every validation turn of every rank: a metric summing loss x turns and turns, since ranks
        # hold different numbers of turns (Lightning's sync_dist would average the ranks' turn counts as integers).
        self.val_loss.update(val_loss.detach(), n)
        self.log("critic/val_loss", self.val_loss, prog_bar=True, batch_size=n)
        self.val_brier.update(probs, batch["target"])
        self.val_auroc.update(probs, batch["success"])
        self._val_classes_seen |= set(batch["success"].unique().tolist())
        self.val_calibration.update(probs, batch["target"])
        self.log("critic/val_brier", self.val_brier, batch_size=n)
        self.log("critic/val_calibration_error", self.val_calibration, batch_size=n)

    def on_validation_epoch_start(self) -> None:
        self._val_classes_seen: set[int] = set()

    def on_validation_epoch_end(self) -> None:
        # AUROC is undefined with one class only; torchmetrics would report 0.0, the worst score. Say NaN.
        seen = torch.tensor([0 in self._val_classes_seen, 1 in self._val_classes_seen], dtype=torch.long)
        # Every rank must take the same branch: compute() is collective when several processes run.
        both = bool((all_reduce_sum(seen) > 0).all())
        auroc = self.val_auroc.compute() if both else torch.tensor(float("nan"))
        self.log("critic/val_auroc", auroc)
        self.val_auroc.reset()

    def configure_optimizers(self):
        # Lightning builds the optimizer before on_fit_start: thaw here too.
        return adamw(self._thaw(), lr=self.lr, weight_decay=self.weight_decay)
