"""`CriticModule`: the multi-turn Q-critic Q_k(state, suggestion) fit on Monte Carlo returns.

A sequence model over [state; suggestion] with a scalar head read at the last
token and a sigmoid output, so Q is a discounted success probability in
[0, 1]. BCE against the soft target G_i (its minimiser is E[G]) or MSE.
A training batch row may hold a whole conversation (data/batching.py): Q of each
turn is then read at that turn's reply's last token in the one causal pass, and
the loss and metrics are over turns, as with one row per turn.

Two fitting aids (docs/critic.md, "Fitting Q to rank replies"): an auxiliary next-token loss on the
customer's next message given [state | reply] through the same backbone (`aux_next_message_coef`),
and early stopping on the held-out critic loss that keeps the best epoch's weights
(`early_stopping_patience`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MeanSquaredError, Metric
from torchmetrics.classification import BinaryAUROC
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from iterppo_lightning.distributed.collectives import all_reduce_sum, any_rank, global_share
from iterppo_lightning.models.fused_ops import adamw, cpu_bf16_kernels, fuse_activations, restore_kernels
from iterppo_lightning.models.lora import LoraSettings, add_lora_to_backbone
from iterppo_lightning.models.modeling import (
    backbone_hidden,
    last_token_index,
    reply_means,
    span_surprise_features,
    span_token_logprobs,
)
from iterppo_lightning.modules.optimizer_carry import OptimizerCarryMixin
from iterppo_lightning.rl import ppo_math as pm
from iterppo_lightning.utils.failpoints import failpoint, maybe_nan

CRITIC_TARGETS = ("mc", "td", "fqe", "myopic")
CRITIC_READOUTS = ("last", "reply_mean", "reply_logprob", "reply_surprise")
LOGPROB_READOUTS = ("reply_logprob", "reply_surprise")
"""Readouts that read token log-probabilities through the backbone's LM head."""


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


def _ties_embeddings(config) -> bool:
    """Whether a causal LM of this config reads its logits with its input embeddings (GPT-2 and most small LMs)."""
    return bool(getattr(config, "tie_word_embeddings", True))


def _zero_stage(trainer) -> int:
    from iterppo_lightning.distributed.zero import zero_stage

    return zero_stage(trainer)


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
        aux_next_message_coef: float = 0.0,
        early_stopping_patience: int = 0,
        branch_contrast_coef: float = 0.0,
        backbone_overrides: dict[str, int | float] | None = None,
        readout: Literal["last", "reply_mean", "reply_logprob", "reply_surprise"] = "last",
        aux_reaction_coef: float = 0.0,
        head_hidden: int = 0,
        surprise_threshold: float | None = None,
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
            aux_next_message_coef: weight of an auxiliary loss added to the critic's: next-token
                cross-entropy of the customer's next message (what follows the reply in the
                conversation, data TurnExample.next_ids) given [state | reply], through each
                member's backbone and an LM head (the backbone's tied input embeddings, or pi_0's
                own lm_head). Q is still read at the reply's last token, so the appended tokens
                cannot change it (causal attention). Turns no customer message follows have none.
                Reported as critic/val_aux_loss. 0 = off.
            early_stopping_patience: N > 0 = after each epoch compare the held-out critic loss
                (critic/val_loss) with the best so far; stop after N epochs without a lower one
                and restore the best epoch's weights (its validation metrics are the ones
                reported, with critic/val_best_epoch). 0 = off: train every critic_epochs epoch.
                Without a validation split (data.val_fraction 0) it does nothing.
            branch_contrast_coef: weight of a within-state loss added to the critic's, over branch pairs (two
                replies at one state and hidden customer, data `branch_pairs`; needs model.loop.branch_fraction > 0):
                the mean over pairs of ((Q(s, a) - Q(s, a')) - (G - G'))^2, in probability units, per member. Its
                minimiser is the true difference of the two replies' values, and the state's own value cancels
                out of it, so it trains exactly the ranking at a state that PPO reads. 0 = off.
            backbone_overrides: model-config fields of a critic backbone unlike pi_0's (e.g. {n_layer: 4, n_embd:
                256, n_head: 8} for a GPT-2): the critic is built from pi_0's config with these fields changed, with
                random weights (it cannot start from pi_0's), on pi_0's tokenizer. Needs init_from_policy false.
                None = pi_0's architecture.
            readout: what the Q head reads. "last": the last hidden state at the reply's last token (the
                whole [state | reply] reaches it through attention alone). "reply_mean": the mean of the last
                hidden states over the reply's tokens, so what each reply token found in the state (a category
                the customer named, a question already answered) reaches the head directly (docs/critic.md,
                "Where Q reads a reply"). "reply_logprob": the last hidden state, plus the mean and the minimum over
                the reply's tokens of each token's log-probability given what precedes it, through the backbone's
                LM head (its tied input embeddings, or pi_0's own lm_head): a reply that names another category than
                the one the customer asked for, or asks again what was answered, contains a token the conversation
                made unlikely, which the last hidden state alone carries poorly. "reply_surprise": reply_mean's
                features, plus the mean over the reply's tokens of log p_t and of log p_t times the token's own
                hidden state (modeling.span_surprise_features): a linear head over them weighs each token's
                surprise by what the token is, so an unlikely category word can cost value while an unlikely
                discount does not. Every readout but "last" needs each row's reply start when scoring
                (`score(..., reply_starts)`).
            aux_reaction_coef: weight of an auxiliary loss on the features Q's head reads: through a linear map and
                the LM head, they predict every token of the customer's next message (a bag of words: each token's
                cross-entropy, the same prediction for all of them). The customer's reaction to a reply (a purchase,
                "i do not need a ...", "not in my price range") is what decides the reply's value, and, unlike the
                return, it is observed without Monte Carlo noise; this makes the readout itself encode it, where
                aux_next_message_coef trains the positions after the reply (docs/critic.md, "The customer's
                reaction at the readout"). Weighted per turn like aux_next_message_coef. Reported as
                critic/val_reaction_loss and critic/train_reaction_loss. 0 = off.
            head_hidden: 0 = Q's head is linear in the features it reads. N > 0 = a two-layer head (N GELU units,
                then the scalar): a linear head over the mean of the reply's hidden states can weigh what the reply
                says and what the state holds, but not whether the two agree (the category the reply names against
                the one the customer asked for), which is a product of the two (docs/critic.md, "A head that can
                compare"). Its output layer starts at zero, so a new critic still starts at Q = 0.5.
            surprise_threshold: for readout "reply_surprise": tau in (0, 1) such that a reply token at least tau likely
                counts as no surprise, min(0, log p_t - log tau) in place of log p_t (modeling.span_surprise_features).
                The plain readout pays PPO for every gain in likelihood, so the policy sharpens onto its own modes;
                with a threshold only unlikely tokens (another category than the one asked for) move Q (docs/critic.md,
                "Only the unlikely tokens"). None = log p_t as it is.
        """
        super().__init__()
        if loss not in ("bce", "mse"):
            raise ValueError(f"critic loss must be 'bce' or 'mse', got {loss!r}")
        if readout not in CRITIC_READOUTS:
            raise ValueError(f"model.critic.readout must be one of {CRITIC_READOUTS}, got {readout!r}")
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
        if aux_next_message_coef < 0:
            raise ValueError(f"model.critic.aux_next_message_coef must be >= 0, got {aux_next_message_coef}")
        if surprise_threshold is not None and not 0.0 < surprise_threshold < 1.0:
            raise ValueError(f"model.critic.surprise_threshold must be in (0, 1), got {surprise_threshold}")
        if surprise_threshold is not None and readout != "reply_surprise":
            raise ValueError(
                f"model.critic.surprise_threshold {surprise_threshold} only applies to readout 'reply_surprise', "
                f"got readout {readout!r}"
            )
        if head_hidden < 0:
            raise ValueError(f"model.critic.head_hidden must be >= 0, got {head_hidden}")
        if aux_reaction_coef < 0:
            raise ValueError(f"model.critic.aux_reaction_coef must be >= 0, got {aux_reaction_coef}")
        if early_stopping_patience < 0:
            raise ValueError(f"model.critic.early_stopping_patience must be >= 0, got {early_stopping_patience}")
        if branch_contrast_coef < 0:
            raise ValueError(f"model.critic.branch_contrast_coef must be >= 0, got {branch_contrast_coef}")
        if backbone_overrides and init_from_policy:
            raise ValueError(
                f"model.critic.backbone_overrides {backbone_overrides} makes a critic unlike pi_0, which cannot start "
                "from pi_0's weights: set model.critic.init_from_policy false"
            )
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
        self.aux_next_message_coef = aux_next_message_coef
        self.early_stopping_patience = early_stopping_patience
        self.branch_contrast_coef = branch_contrast_coef
        self.backbone_overrides = dict(backbone_overrides or {})
        self.readout = readout
        self.aux_reaction_coef = aux_reaction_coef
        self.head_hidden = head_hidden
        self.surprise_threshold = surprise_threshold
        self._trainable: set[str] = set()
        self.backbone: nn.Module | None = None
        self.head: nn.Module | None = None
        """Q's head: an nn.Linear from the readout's features to the logit, or with head_hidden a two-layer MLP."""
        self.lm_head: nn.Linear | None = None
        """The auxiliary loss's LM head of member 1 when the backbone's embeddings are not tied (else None: the
        tied input embeddings serve)."""
        self.extra_members = nn.ModuleList()
        """Members 2..N of an ensemble, each a ModuleDict(backbone, head[, lm_head]); member 1 is backbone/head."""
        self.reaction_maps = nn.ModuleList()
        """aux_reaction_coef > 0: one linear map per member, from the features Q's head reads to the LM head's input
        (empty otherwise, so a critic without it saves what it saved before)."""
        self._best: dict | None = None
        """Early stopping: the best epoch so far (its val loss, epoch, trainable weights, validation metrics)."""
        self._stale_epochs = 0
        self.val_aux_loss = MeanMetric()
        self.val_reaction_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_brier = MeanSquaredError()
        self.val_auroc = BinaryAUROC()
        self.val_calibration = SoftCalibrationError(calibration_bins)

    @property
    def uses_aux(self) -> bool:
        """Whether critic batches should carry the next customer messages (data module `next_messages`)."""
        return self.aux_next_message_coef > 0 or self.aux_reaction_coef > 0

    @property
    def _reads_lm_head(self) -> bool:
        """Whether a member's LM head is used (the auxiliary losses, the reply_logprob and reply_surprise readouts)."""
        return self.uses_aux or self.readout in LOGPROB_READOUTS

    @property
    def uses_branch_pairs(self) -> bool:
        """Whether critic training batches should keep branch pairs together (data module `branch_pairs`)."""
        return self.branch_contrast_coef > 0

    @property
    def is_built(self) -> bool:
        return self.backbone is not None

    def build(self, base_model_dir: str | Path) -> None:
        """Create backbone + scalar head (one per ensemble member) from a saved causal LM folder.

        One critic starts with a zero head (Q = 0.5 everywhere). Ensemble members keep nn.Linear's
        random head initialisation, drawn one after the other from the step's seeded RNG (and,
        without init_from_policy, their random backbones too), so each starts differently.
        """
        self.backbone, self.head, self.lm_head = self._build_member(base_model_dir)
        self.extra_members = nn.ModuleList()
        for _ in range(self.ensemble_size - 1):
            backbone, head, lm_head = self._build_member(base_model_dir)
            parts = {"backbone": backbone, "head": head}
            if lm_head is not None:
                parts["lm_head"] = lm_head
            self.extra_members.append(nn.ModuleDict(parts))
        self.reaction_maps = nn.ModuleList()
        if self.aux_reaction_coef > 0:
            # Drawn after every member, so the members' own initialisation is what it is without this loss.
            hidden = self.backbone.config.hidden_size
            features = next(self.head.parameters()).shape[1]  # the first layer's weight is [out, in]
            self.reaction_maps.extend(nn.Linear(features, hidden) for _ in self._members())
        self.carried_optimizer_state = None
        self._trainable = {name for name, p in self.named_parameters() if p.requires_grad}

    def _build_member(self, base_model_dir: str | Path) -> tuple[nn.Module, nn.Module, nn.Linear | None]:
        if self.init_from_policy:
            backbone = AutoModel.from_pretrained(base_model_dir)
        else:
            config = AutoConfig.from_pretrained(base_model_dir)
            for field, value in self.backbone_overrides.items():
                if not hasattr(config, field):
                    raise ValueError(
                        f"model.critic.backbone_overrides: {field!r} is not a field of the policy's model config "
                        f"({type(config).__name__})"
                    )
                setattr(config, field, value)
            backbone = AutoModel.from_config(config)
        fuse_activations(backbone)
        hidden = backbone.config.hidden_size
        lm_head = None
        if self._reads_lm_head and not _ties_embeddings(backbone.config):
            # An untied LM: the auxiliary head starts as pi_0's own (or random without init_from_policy).
            lm_head = nn.Linear(hidden, backbone.config.vocab_size, bias=False)
            if self.init_from_policy:
                source = AutoModelForCausalLM.from_pretrained(base_model_dir).get_output_embeddings()
                lm_head.weight.data.copy_(source.weight.data)
                if getattr(source, "bias", None) is not None:
                    lm_head.bias = nn.Parameter(source.bias.data.clone())
            if self.lora is not None:  # LoRA trains the adapter and the value head only
                lm_head.requires_grad_(False)
        if self.lora is not None:
            backbone = add_lora_to_backbone(backbone, self.lora)
        extra = {"reply_logprob": 2, "reply_surprise": hidden + 1}.get(self.readout, 0)
        if self.head_hidden:
            head = nn.Sequential(nn.Linear(hidden + extra, self.head_hidden), nn.GELU(), nn.Linear(self.head_hidden, 1))
        else:
            head = nn.Linear(hidden + extra, 1)
        if self.ensemble_size == 1:  # the output layer at zero: Q = 0.5 everywhere
            output = head[-1] if self.head_hidden else head
            nn.init.zeros_(output.weight)
            nn.init.zeros_(output.bias)
        return backbone, head, lm_head

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
        self._bf16_changes = cpu_bf16_kernels(self, self._trainer)

    def teardown(self, stage: str) -> None:
        restore_kernels(getattr(self, "_bf16_changes", []))
        self._bf16_changes = []

    def on_fit_start(self) -> None:
        self._thaw()
        self._best, self._stale_epochs = None, 0
        if self._reads_lm_head and _zero_stage(self.trainer) == 3:
            raise ValueError(
                "model.critic.aux_next_message_coef, aux_reaction_coef (and readouts 'reply_logprob', "
                "'reply_surprise') read the backbone's (tied) embeddings as an LM head outside the backbone's "
                "forward, where ZeRO stage 3 holds them partitioned; use none of them, or a ZeRO stage below 3"
            )
        if self.early_stopping_patience and _zero_stage(self.trainer) == 3:
            raise ValueError(
                "model.critic.early_stopping_patience keeps the best epoch's weights in memory, which ZeRO stage 3 "
                "partitions across processes; set it to 0 or use a ZeRO stage below 3"
            )

    # -- maths ----------------------------------------------------------------
    def _member_outputs(
        self,
        backbone,
        head,
        lm_head,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        read_rows: torch.Tensor | None = None,
        read_positions: torch.Tensor | None = None,
        read_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q logits at the read positions, the last hidden states [B, T, H], the features the head read [R, F])."""
        hidden = backbone_hidden(backbone, input_ids, attention_mask)
        if read_rows is None:
            read_rows = torch.arange(hidden.shape[0], device=hidden.device)
            read_positions = last_token_index(attention_mask)
        # A bfloat16 backbone (base_model.dtype) feeds the float32 head, and under mixed precision the head still
        # runs in float32: Q's of two replies at one state often differ by less than bf16's step at 1.0 (2^-7).
        with torch.autocast(hidden.device.type, enabled=False):
            if self.readout != "last" and read_starts is None:
                raise ValueError(
                    f"model.critic.readout {self.readout!r} reads each reply's tokens: pass where each reply starts "
                    "(read_starts / reply_starts)"
                )
            dtype = next(head.parameters()).dtype  # bf16 hidden states are read in float32
            if self.readout in ("reply_mean", "reply_surprise"):
                features = reply_means(hidden.to(dtype), read_rows, read_starts, read_positions, attention_mask)
            else:
                features = hidden[read_rows, read_positions].to(dtype)
            if self.readout in LOGPROB_READOUTS:
                out = backbone.get_input_embeddings() if lm_head is None else lm_head
                bias = getattr(out, "bias", None)
                where = (hidden, input_ids, read_rows, read_starts, read_positions, out.weight.to(dtype))
                bias = None if bias is None else bias.to(dtype)
                if self.readout == "reply_logprob":
                    means, minima = span_token_logprobs(*where, bias)
                    features = torch.cat([features, means[:, None], minima[:, None]], dim=1)
                else:
                    means, weighted = span_surprise_features(*where, bias, threshold=self.surprise_threshold)
                    features = torch.cat([features, weighted, means[:, None]], dim=1)
            q = head(features).squeeze(-1)
        return q, hidden, features

    def _members(self) -> list[tuple[nn.Module, nn.Module, nn.Linear | None]]:
        """(backbone, head, lm_head or None) of every member, member 1 first."""
        out = [(self.backbone, self.head, self.lm_head)]
        for m in self.extra_members:
            out.append((m["backbone"], m["head"], m["lm_head"] if "lm_head" in m else None))
        return out

    @staticmethod
    def _lm_token_losses(backbone, lm_head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each target token [A] predicted from h [A, H] through the member's LM head."""
        if lm_head is None:  # tied: the backbone's own input embeddings
            logits = F.linear(h, backbone.get_input_embeddings().weight.to(h.dtype))
        else:
            logits = lm_head(h.to(lm_head.weight.dtype))
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def _batch_outputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Q logits of a critic batch's turns ([T] or [N, T]) and, when the batch carries next messages, every
        member's per-token cross-entropy ([A] or [N, A]) of the auxiliary next-message loss and of the reaction loss
        (each None when its coefficient is 0)."""
        if self.uses_aux and "aux_targets" not in batch:
            raise ValueError(
                "model.critic.aux_next_message_coef or aux_reaction_coef > 0 needs critic batches that carry each "
                "turn's next customer message: fit with datamodule.for_phase('critic', next_messages=True) "
                "(OuterLoop.fit_q does)"
            )
        if not self.uses_aux:
            return self.batch_logits(batch), None, None
        # Through the module's own call, like every other forward (ZeRO-3 traces the order of module calls).
        logits, hiddens, features = self(**self._batch_where(batch), with_hidden=True)
        targets, next_losses, reaction_losses = batch["aux_targets"], [], []
        for m, ((backbone, _, lm_head), hidden) in enumerate(zip(self._members(), hiddens)):
            if self.aux_next_message_coef > 0:  # each token from the hidden state just before it
                h = hidden[batch["aux_rows"], batch["aux_positions"]]
                next_losses.append(self._lm_token_losses(backbone, lm_head, h, targets))
            if self.aux_reaction_coef > 0:  # every token of a turn's next message from that turn's readout
                h = self.reaction_maps[m](features[m][batch["aux_turns"]])
                reaction_losses.append(self._lm_token_losses(backbone, lm_head, h, targets))

        def stacked(losses: list[torch.Tensor]) -> torch.Tensor | None:
            if not losses:
                return None
            return losses[0] if self.ensemble_size == 1 else torch.stack(losses)

        return logits, stacked(next_losses), stacked(reaction_losses)

    def _aux_loss(self, token_losses: torch.Tensor, batch: dict) -> torch.Tensor:
        """Sum over members of each member's mean next-message cross-entropy, each token weighted like its turn
        (the member's bootstrap count, the pool weight)."""
        if token_losses.shape[-1] == 0:
            return token_losses.sum()  # no turn of this batch has a next message: 0, still in the graph
        turns = batch["aux_turns"]
        pool, counts = batch.get("weight"), batch.get("bootstrap")
        per_member = token_losses if self.ensemble_size > 1 else token_losses.unsqueeze(0)
        losses = []
        for m, member in enumerate(per_member):
            weight = None if counts is None else counts[m][turns]
            if pool is not None:
                weight = pool[turns] if weight is None else weight * pool[turns]
            losses.append(member.mean() if weight is None else (weight * member).mean())
        return torch.stack(losses).sum()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        read_rows: torch.Tensor | None = None,
        read_positions: torch.Tensor | None = None,
        with_hidden: bool = False,
        read_starts: torch.Tensor | None = None,
    ):
        """Q logits: [B] for one critic, [N, B] for an ensemble of N, read at each row's last real token; or, given
        `read_rows` and `read_positions` (a critic batch's, one entry per turn), [T] / [N, T] read at those
        (row, position) pairs. `read_starts` (one per row, or per read pair): where each read reply starts, for the
        "reply_mean" readout. `with_hidden`: (those logits, every member's last hidden states [B, L, H], every
        member's features the head read [R, F])."""
        if (read_rows is None) != (read_positions is None):
            raise ValueError("read_rows and read_positions come together")
        where = (input_ids, attention_mask, read_rows, read_positions, read_starts)
        outputs = [self._member_outputs(*member, *where) for member in self._members()]
        logits = outputs[0][0] if self.ensemble_size == 1 else torch.stack([q for q, _, _ in outputs])
        if with_hidden:
            return logits, [hidden for _, hidden, _ in outputs], [features for _, _, features in outputs]
        return logits

    def batch_logits(self, batch: dict) -> torch.Tensor:
        """Q logits of a critic batch's turns (data/datamodule.py), [T] or [N, T]; a batch without read positions
        has one turn per row, read at its last token."""
        return self(**self._batch_where(batch))

    @staticmethod
    def _batch_where(batch: dict) -> dict:
        """forward's arguments for a critic batch: ids, mask, and where each turn's reply is read."""
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "read_rows": batch.get("read_rows"),
            "read_positions": batch.get("read_positions"),
            "read_starts": batch.get("read_starts"),
        }

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_starts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """PPO's reward: Q_k(s, a) in [0, 1]; for an ensemble mean - pessimism * std over the members.
        `reply_starts` [B]: where each row's reply starts (needed by the "reply_mean" readout)."""
        probs = torch.sigmoid(self(input_ids, attention_mask, read_starts=reply_starts))
        return probs if self.ensemble_size == 1 else pm.ensemble_lower_bound(probs, self.pessimism)

    @torch.no_grad()
    def q_mean(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_starts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The estimate of Q_k(s, a): the members' mean (bootstrapped critic targets, the off-policy estimate)."""
        probs = torch.sigmoid(self(input_ids, attention_mask, read_starts=reply_starts))
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

    def _contrast_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Sum over members of each member's mean ((Q_a - Q_b) - (G_a - G_b))^2 over the batch's branch pairs."""
        first, second = batch["pair_first"], batch["pair_second"]
        probs = torch.sigmoid(logits)
        if self.ensemble_size == 1:
            probs = probs.unsqueeze(0)
        if first.numel() == 0:
            return probs.sum() * 0.0  # no pair in this batch: 0, still in the graph
        target = batch["target"]
        return pm.paired_difference_loss(probs[:, first], probs[:, second], target[first], target[second]).sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, token_losses, reaction_losses = self._batch_outputs(batch)
        if self.ensemble_size == 1:
            loss = self._loss(logits, batch["target"], batch.get("weight"))
        else:
            loss = self._ensemble_loss(logits, batch)
        # Several processes: this rank's share of the global batch mean (a share of turns, not of rows).
        share = global_share(batch["target"].shape[0])
        if share is not None:
            loss = loss * share
        if self.uses_branch_pairs:
            if "pair_first" not in batch:
                raise ValueError(
                    "model.critic.branch_contrast_coef > 0 needs critic batches that keep branch pairs together: fit "
                    "with datamodule.for_phase('critic', branch_pairs=True) (OuterLoop.fit_q does)"
                )
            contrast = self._contrast_loss(logits, batch)
            pairs = batch["pair_first"].numel()
            self.log("critic/train_contrast_loss", contrast.detach() / self.ensemble_size, batch_size=max(pairs, 1))
            pair_share = global_share(pairs)
            loss = loss + self.branch_contrast_coef * (contrast if pair_share is None else contrast * pair_share)
        if token_losses is not None:
            aux = self._aux_loss(token_losses, batch)
            self.log("critic/train_aux_loss", aux.detach() / self.ensemble_size, batch_size=token_losses.shape[-1])
            aux_share = global_share(token_losses.shape[-1])  # a share of next-message tokens
            loss = loss + self.aux_next_message_coef * (aux if aux_share is None else aux * aux_share)
        if reaction_losses is not None:
            reaction = self._aux_loss(reaction_losses, batch)
            tokens = reaction_losses.shape[-1]
            self.log("critic/train_reaction_loss", reaction.detach() / self.ensemble_size, batch_size=tokens)
            share = global_share(tokens)
            loss = loss + self.aux_reaction_coef * (reaction if share is None else reaction * share)
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
        logits, token_losses, reaction_losses = self._batch_outputs(batch)
        n = batch["target"].shape[0]
        if token_losses is not None and token_losses.shape[-1] > 0:  # the members' mean, over every token
            self.val_aux_loss.update(token_losses.detach().float().mean(), token_losses.shape[-1])
            self.log("critic/val_aux_loss", self.val_aux_loss, batch_size=token_losses.shape[-1])
        if reaction_losses is not None and reaction_losses.shape[-1] > 0:
            self.val_reaction_loss.update(reaction_losses.detach().float().mean(), reaction_losses.shape[-1])
            self.log("critic/val_reaction_loss", self.val_reaction_loss, batch_size=reaction_losses.shape[-1])
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

    # -- early stopping -------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        """Early stopping: this epoch's validation ran already (Lightning validates before this hook); keep its
        weights if its critic loss is the best yet, and stop after `early_stopping_patience` epochs without one.
        Every process reads the same (synced) loss, so all decide alike."""
        if not self.early_stopping_patience:
            return
        metrics = self.trainer.callback_metrics
        if "critic/val_loss" not in metrics:  # no validation split
            return
        loss = float(metrics["critic/val_loss"])
        if self._best is None or loss < self._best["loss"]:
            self._best = {
                "loss": loss,
                "epoch": self.current_epoch,
                "weights": {n: p.detach().clone() for n, p in self.named_parameters() if n in self._trainable},
                "metrics": {k: v.detach().clone() for k, v in metrics.items() if k.startswith("critic/val")},
            }
            self._stale_epochs = 0
        else:
            self._stale_epochs += 1
            if self._stale_epochs >= self.early_stopping_patience:
                self.trainer.should_stop = True

    def on_fit_end(self) -> None:
        """Early stopping: back to the best epoch's weights, and report that epoch's validation metrics."""
        if self._best is None:
            return
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in self._best["weights"].items():
                params[name].copy_(value)
        metrics = self.trainer.callback_metrics
        metrics.update(self._best["metrics"])
        metrics["critic/val_best_epoch"] = torch.tensor(float(self._best["epoch"]))
        metrics["critic/val_epochs_run"] = torch.tensor(float(self.current_epoch))  # epochs finished
        self._best = None

    def configure_optimizers(self):
        # Lightning builds the optimizer before on_fit_start: thaw here too.
        return adamw(self._thaw(), lr=self.lr, weight_decay=self.weight_decay)
