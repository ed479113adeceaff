"""`PolicyModule`: token-level PPO against a frozen Q-critic with a KL penalty to pi_k.

One `training_step` = one PPO rollout and update on a batch of logged states:
sample replies (batched, KV cache; the old log-probs and values come from the
sampling passes) -> score them (reference log-probs, Q_k at the last reply
token) -> per-token rewards (-beta * KL + Q at the end) -> GAE -> `ppo_epochs`
x `minibatches` clipped updates, stopping early when the approximate KL to the
rollout policy passes `target_kl`. The reference is reset to the current
weights (pi_k) at the start of every fit, i.e. every outer iteration, as
Theorem 2 requires.

Padding: the prompts are left-padded to the batch's longest and the replies
right-padded to its longest. Every forward (generation's prefill, the scoring
forwards, each update minibatch) runs over groups of rows of similar length
(`data/padding.length_groups`), each trimmed to its own longest prompt and reply;
the group outputs are put back in row order before any loss or statistic, so
the batch statistics, the minibatches and the losses are those of the unsplit
batch (`length_group_cost`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from iterppo_lightning.data.padding import length_groups
from iterppo_lightning.distributed import collectives as dist_utils
from iterppo_lightning.distributed.zero import gathered_for_generation, zero_stage
from iterppo_lightning.models.fused_ops import adamw, cpu_bf16_kernels, restore_kernels
from iterppo_lightning.models.generation import PREFILL_CALL_COST, sample_scored_replies
from iterppo_lightning.models.lora import LoraSettings, adapter_state, adapter_weights, add_lora, is_lora
from iterppo_lightning.models.modeling import causal_lm_forward
from iterppo_lightning.models.policy_folder import (
    load_policy,
    read_policy_folder,
    saved_adapter_state,
    write_policy_folder,
)
from iterppo_lightning.modules.optimizer_carry import OptimizerCarryMixin
from iterppo_lightning.rl import ppo_math as pm
from iterppo_lightning.utils.failpoints import failpoint, maybe_nan


@dataclass
class Rollout:
    """One PPO rollout: B sampled replies, scored, with their advantages (what `ppo_update` trains on).

    B = rows (policy_batch_size states x group_size replies, the replies to one state on adjacent
    rows), P = prompt tokens (left-padded), R = reply tokens (right-padded; `response_mask` marks
    the tokens up to and including the first EOS). Every tensor is per row (first dim B); the
    per-token quantities [B, R] are aligned with `responses`.
    """

    query_responses: torch.Tensor
    """[B, P+R] long: the prompt then the sampled reply, the sequence every scoring forward reads."""
    attention_mask: torch.Tensor
    """[B, P+R] long: 1 on real tokens (prompt and reply), 0 on padding."""
    responses: torch.Tensor
    """[B, R] long: the sampled reply tokens (pad after the first EOS)."""
    response_mask: torch.Tensor
    """[B, R] long: 1 on the reply's tokens up to and including its first EOS."""
    logprobs: torch.Tensor
    """[B, R] float: log-probs of the reply tokens under the rollout policy (PPO's "old" log-probs), as the
    sampling passes computed them; 0 after the reply."""
    values: torch.Tensor
    """[B, R] float: the value head at each reply position under the rollout policy (the "old" values); 0 after
    the reply."""
    advantages: torch.Tensor
    """[B, R] float: per-token advantages (GAE, or the group baseline), whitened when asked."""
    returns: torch.Tensor
    """[B, R] float: value targets (GAE returns; zeros for grpo / rloo, which train no value head)."""
    scores: torch.Tensor
    """[B] float: Q_k of each reply as the critic gave it (before the EOS penalty and normalisation)."""
    seq_kl: torch.Tensor
    """[B] float: the reply's summed per-token KL to the reference."""
    ended: torch.Tensor
    """[B] bool: the reply produced EOS within max_new_tokens."""

    @property
    def prompt_len(self) -> int:
        """P: the reply starts at this column of `query_responses`."""
        return self.query_responses.shape[1] - self.responses.shape[1]

    @property
    def batch_size(self) -> int:
        """B: the number of rows."""
        return self.responses.shape[0]

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rollout restricted to rows `index` (a minibatch), every field indexed alike."""
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


class _Group(NamedTuple):
    """Rows that one forward computes together, trimmed to their own widths (`PolicyModule._groups`)."""

    positions: torch.Tensor
    """Where the rows are in the list the groups were made from (to put outputs back in its order)."""
    rows: torch.Tensor
    """The rows' indices in the rollout."""
    prompt_width: int
    """Longest prompt of the group: the prompt columns kept (the last ones)."""
    reply_width: int
    """Longest reply of the group: the reply columns kept (the first ones)."""


class PolicyModule(OptimizerCarryMixin, L.LightningModule):
    def __init__(
        self,
        lr: float = 1e-4,
        ppo_epochs: int = 4,
        minibatches: int = 2,
        clip_eps: float = 0.2,
        value_clip: float | None = 0.2,
        vf_coef: float = 0.5,
        gamma_token: float = 1.0,
        gae_lambda: float = 0.95,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.05,
        adaptive_kl: bool = False,
        kl_target: float = 1.0,
        kl_horizon: int = 10000,
        target_kl: float | None = None,
        max_iteration_kl: float | None = None,
        whiten_advantages: bool = True,
        score_norm: str = "none",
        missing_eos_penalty: float | None = None,
        max_new_tokens: int = 24,
        temperature: float = 1.0,
        max_grad_norm: float = 1.0,
        keep_optimizer_state: bool = False,
        lora: LoraSettings | None = None,
        seed_per_reply: bool = False,
        advantage: str = "gae",
        group_size: int = 1,
        kl_anchor: str = "pi_k",
        length_group_cost: float | None = PREFILL_CALL_COST,
    ):
        """
        Args:
            lr: AdamW learning rate for the policy and its value head.
            ppo_epochs: passes over each rollout batch.
            minibatches: minibatches per pass.
            clip_eps: PPO ratio clip epsilon.
            value_clip: value-loss clip range around the rollout values (None = unclipped).
            vf_coef: weight of the value loss.
            gamma_token: discount across reply tokens in GAE (1.0: the reply is one action).
            gae_lambda: GAE lambda.
            entropy_coef: weight of the entropy bonus; negative, a penalty that sharpens the sampled policy.
            kl_coef: beta, the per-token KL penalty to the reference pi_k (initial value if adaptive).
            adaptive_kl: adapt beta towards `kl_target` (Ziegler et al. 2019).
            kl_target: target sequence KL of the adaptive controller.
            kl_horizon: horizon of the adaptive controller.
            target_kl: stop the current rollout's updates once the approximate KL
                between the updated and the rollout policy passes this (None = never).
            max_iteration_kl: end this fit (this outer iteration's policy phase) once a rollout's
                mean sequence KL to the reference pi_k passes this (None = never). `target_kl`
                bounds each update; this bounds the drift of a whole iteration.
            whiten_advantages: whiten advantages per rollout batch.
            score_norm: per-batch normalisation of Q scores: none, whiten, or center.
            missing_eos_penalty: subtracted from Q when a reply hits max_new_tokens without ending.
            max_new_tokens: longest reply sampled.
            temperature: sampling temperature (the log-probs use the same one).
            max_grad_norm: gradient norm clip.
            keep_optimizer_state: carry Adam moments across outer iterations.
            lora: train a LoRA adapter instead of every weight. The reference pi_k is then the
                same model with the adapter's weights from the start of the iteration, so no
                second copy of the base model is held.
            seed_per_reply: sample each rollout reply from its own stream, seeded by the rollout and the
                reply's position in the global batch (Gumbel-max), instead of torch's global stream. The
                replies then do not depend on how many processes share the batch, so a multi-process run
                reproduces a single-process one; a little slower (one noise draw per reply per token).
            advantage: the single-turn solver: "gae" (PPO with a value head and GAE), "grpo", "rloo" or
                "group_mean" (a group of replies per state is the baseline; no value head is trained and
                vf_coef is ignored). Per reply, with KL penalty P = -kl_coef * sum of per-token KL:
                grpo = (Q - group mean Q) / (group std Q + 1e-4) + (P - group mean P); rloo =
                (Q + P) - mean of (Q + P) over the other replies; group_mean = (Q + P) - group mean of
                (Q + P), GRPO in Q's own units. Applied to every reply token
                (ppo_math.group_token_advantages, docs/variants.md).
            group_size: replies sampled per state: a rollout is policy_batch_size states x
                group_size replies. The group baselines need >= 2.
            kl_anchor: the KL reference: "pi_k" (reset to the current policy every outer
                iteration, Theorem 2) or "pi_0" (the initial policy for the whole run).
            length_group_cost: run each forward (generation's prefill, scoring, every update
                minibatch) over groups of rows of similar length, each trimmed to its own longest
                prompt and reply (`data/padding.length_groups`); this is the cost of one more model call,
                in padded positions, that the split weighs against the padding it saves (48: measured
                for the tiny CPU models). None: no split, every forward over the whole padded batch.
                The groups change only the padding: losses, gradients and statistics are those of the
                unsplit batch (to float rounding). Under ZeRO-3 the scoring and update forwards are
                never split (every rank must run the same number of forwards).
        """
        super().__init__()
        if score_norm not in ("none", "whiten", "center"):
            raise ValueError(f"policy.score_norm must be none, whiten or center, got {score_norm!r}")
        if ppo_epochs < 1 or minibatches < 1:
            raise ValueError("policy.ppo_epochs and policy.minibatches must be >= 1")
        if length_group_cost is not None and length_group_cost < 0:
            raise ValueError(f"policy.length_group_cost must be >= 0 or None, got {length_group_cost}")
        pm.check_solver_settings(advantage, group_size, kl_anchor)
        self.save_hyperparameters()
        self.automatic_optimization = False
        # The hyperparameters as typed attributes (the loop, callbacks and benchmarks read some of them).
        self.lr: float = lr
        self.ppo_epochs: int = ppo_epochs
        self.minibatches: int = minibatches
        self.clip_eps: float = clip_eps
        self.value_clip: float | None = value_clip
        self.vf_coef: float = vf_coef
        self.gamma_token: float = gamma_token
        self.gae_lambda: float = gae_lambda
        self.entropy_coef: float = entropy_coef
        self.kl_coef: float = kl_coef
        self.adaptive_kl: bool = adaptive_kl
        self.kl_target: float = kl_target
        self.kl_horizon: int = kl_horizon
        self.target_kl: float | None = target_kl
        self.max_iteration_kl: float | None = max_iteration_kl
        self.whiten_advantages: bool = whiten_advantages
        self.score_norm: str = score_norm
        self.missing_eos_penalty: float | None = missing_eos_penalty
        self.max_new_tokens: int = max_new_tokens
        self.temperature: float = temperature
        self.max_grad_norm: float = max_grad_norm
        self.keep_optimizer_state: bool = keep_optimizer_state
        self.lora: LoraSettings | None = lora
        self.seed_per_reply: bool = seed_per_reply
        self.advantage: str = advantage
        self.group_size: int = group_size
        self.kl_anchor: str = kl_anchor
        self.length_group_cost: float | None = length_group_cost
        self.kl_controller = (
            pm.AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl else pm.FixedKLController(kl_coef)
        )
        self.policy = None
        self.reference = None
        self.value_head = None
        self.critic = None
        self.tokenizer = None
        self.lora_base: str | None = None
        """With LoRA: the folder of the weights the adapter applies to (recorded in saved cards)."""
        self._reference_pinned = False
        """kl_anchor pi_0: the reference is pi_0 and no fit resets it (see pin_reference)."""
        self._policy_is_reference = False
        """The policy's weights were the reference's when it was made, and no optimizer step ran since (under
        ZeRO-3 the weights cannot be compared after setup, so this flag, not a comparison, says so): the
        rollout's reference log-probs are then its own, and its KL exactly 0."""
        self.timings: dict[str, float] = defaultdict(float)
        self._step_stats: list[dict[str, float]] = []
        self._rollouts = 0
        self.fit_stats: dict[str, float] = {}

    # -- wiring -----------------------------------------------------------------
    def attach(self, model, tokenizer, value_head: nn.Linear | None = None) -> None:
        """Use this causal LM as the policy (pi_k); the reference is a frozen copy of it."""
        if self.lora is not None and self.lora.dropout > 0:
            raise ValueError("policy.lora.dropout must be 0: PPO compares log-probs of the same tokens across passes")
        if self.lora is not None and not is_lora(model):
            model = add_lora(model, self.lora)
        self.policy = model
        self.tokenizer = tokenizer
        self.value_head = value_head or nn.Linear(model.config.hidden_size, 1)
        if value_head is None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        if self.lora is not None:
            self.reference = None  # pi_k = this model with the adapter snapshot taken in on_fit_start
            self._reference_adapter = adapter_state(model)
        else:
            self.reference = copy.deepcopy(model)
            self.reference.requires_grad_(False).eval()
        self._reference_pinned = False
        self._policy_is_reference = True

    def pin_reference(self, pi0_dir: str | Path | None = None) -> None:
        """kl_anchor pi_0: keep the reference as it is for the whole run (no fit resets it to pi_k).

        Call it when the policy is pi_0 (right after attach), or in a restarted process with
        `pi0_dir`, the saved pi_0, which then becomes the reference (with LoRA: pi_0's adapter
        state, zeros when pi_0 is the base itself).
        """
        if pi0_dir is not None:
            if self.reference is None:
                self._reference_adapter = saved_adapter_state(self.policy, pi0_dir)
            else:
                self.reference = load_policy(pi0_dir)[0].requires_grad_(False).eval()
            self._policy_is_reference = self._same_weights_as_reference()
        self._reference_pinned = True

    def load(self, path: str | Path) -> None:
        """Continue from a saved policy folder (with LoRA: its adapter as trained, on its base)."""
        saved = read_policy_folder(path, trainable_adapter=self.lora is not None)
        self.lora_base = saved.lora_base
        self.attach(saved.model, saved.tokenizer, saved.value_head)

    def attach_critic(self, critic) -> None:
        """The frozen Q_k used as the reward model during this fit."""
        critic.requires_grad_(False).eval()
        self.critic = critic

    def _critic_score(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor,
        states: list[tuple[str, int]] | None,
        rollout_index: int,
        prompt_width: int,
    ) -> torch.Tensor:
        """Q of the [state; reply] rows `rows` of the rollout, each reply starting at column `prompt_width`. A critic
        with `needs_states` (the oracle and table critics, loop/oracle_critic.py and loop/table_critic.py) also gets
        each row's logged state and the rollout's index."""
        if not getattr(self.critic, "needs_states", False):
            # Every row of a trimmed group is [left-padded prompt | reply]: the replies start together.
            reply_starts = torch.full((ids.shape[0],), prompt_width, dtype=torch.long, device=ids.device)
            return self.critic.score(ids, mask, reply_starts)
        if states is None:
            raise RuntimeError(
                f"{type(self.critic).__name__} scores a reply from its logged state, but the policy batch carries no "
                "state_keys (TrajectoryDataModule's policy batches do)"
            )
        return self.critic.score(ids, mask, [states[r] for r in rows.tolist()], rollout_index)

    def save(self, path: str | Path, card: dict | None = None, merge: bool | None = None) -> Path:
        """Write the policy folder (models.policy_folder): model, tokenizer, value head and the lineage `card`.

        With LoRA the card records `lora_base`, and `merge` (default: lora.merge_on_export) picks a
        merged export (plus the adapter as trained) or an adapter export; without LoRA it is ignored.
        """
        if self.lora is not None:
            card = {**(card or {}), "lora_base": self.lora_base}
            merge = self.lora.merge_on_export if merge is None else merge
        else:
            merge = False
        return write_policy_folder(
            path, self.policy, self.tokenizer, value_head=self.value_head, card=card, merge=merge
        )

    # -- Lightning hooks ----------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Runs before the strategy wraps the module (DeepSpeed ZeRO-3 partitions the weights in its setup,
        # after which state_dict() holds empty placeholders), so the reference is reset here.
        if self.critic is None:
            raise RuntimeError("PolicyModule needs a critic: call attach_critic(Q_k) before fit")
        if self.lora is not None and zero_stage(self._trainer) == 3:  # _trainer: None outside a fit (tests)
            raise ValueError(
                "policy.lora with ZeRO-3 in the policy phase is not supported (the reference pi_k swaps the adapter's "
                "weights, which ZeRO-3 partitions); use ZeRO-2 for policy_strategy, or train the policy without LoRA"
            )
        if getattr(self.critic, "plays_a_policy_copy", False) and zero_stage(self._trainer) == 3:
            raise ValueError(
                "model.loop.oracle_critic with ZeRO-3 in the policy phase is not supported (the oracle's copy of pi_k "
                "would be partitioned, and ranks simulate different numbers of steps); use ZeRO-2 or DDP for "
                "policy_strategy, or the learned critic"
            )
        # Theorem 2's KL anchor is the CURRENT policy: reset the reference to pi_k
        # (unless kl_anchor pi_0 pinned it to pi_0).
        if self._reference_pinned:
            self._policy_is_reference = self._same_weights_as_reference()
        elif self.reference is None:
            self._reference_adapter = adapter_state(self.policy)
            self._policy_is_reference = True
        else:
            self.reference.load_state_dict(self.policy.state_dict())
            self.reference.requires_grad_(False).eval()
            self._policy_is_reference = True
        self._bf16_changes = cpu_bf16_kernels(self, self._trainer)

    def teardown(self, stage: str) -> None:
        restore_kernels(getattr(self, "_bf16_changes", []))
        self._bf16_changes = []

    def _same_weights_as_reference(self) -> bool:
        """Whether the policy's weights are the reference's, bit for bit (before any ZeRO-3 partitioning)."""
        if self.reference is None:
            current = adapter_state(self.policy)
            return current.keys() == self._reference_adapter.keys() and all(
                torch.equal(current[k], self._reference_adapter[k]) for k in current
            )
        mine, theirs = self.policy.state_dict(), self.reference.state_dict()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    def on_fit_start(self) -> None:
        self.policy.train()
        self.value_head.train()
        self._step_stats = []

    def on_train_end(self) -> None:
        super().on_train_end()
        keys = {k for s in self._step_stats for k in s}
        self.fit_stats = {
            k: sum(s[k] for s in self._step_stats if k in s) / len(self._step_stats) for k in sorted(keys)
        }

    def configure_optimizers(self):
        # With LoRA only the adapter requires grad; the base weights stay out of the optimizer.
        params = [p for p in self.policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        # weight_decay 0.01 is torch's AdamW default, which this phase has always used. The update clips its
        # gradients, which Lightning's mixed-precision plugin refuses for a fused optimizer.
        mixed = self._trainer is not None and isinstance(self._trainer.precision_plugin, MixedPrecision)
        return adamw(params, lr=self.lr, weight_decay=0.01, fused=not mixed)

    # -- rollout --------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, name: str):
        """Accumulate wall seconds under `timings[name]` (read by benchmarks/ppo_phase.py)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - start

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        # Dividing by 1.0 would still copy a [B, R, V] tensor.
        return logits if self.temperature == 1.0 else logits / self.temperature

    def _policy_outputs(self, full_ids, full_mask, prompt_len, response):
        """Response log-probs [B, R], values [B, R] and logits of the response positions, in one forward over the
        padded batch (the unsplit computation `_grouped_policy_outputs` must match; tests compare them)."""
        resp_len = response.shape[1]
        # Position t of the sequence predicts token t+1: the reply's logits are
        # those of positions prompt_len-1 .. end-1, i.e. the last resp_len+1 minus the final one.
        logits, hidden = causal_lm_forward(
            self.policy, full_ids, full_mask, want_hidden=True, logits_to_keep=resp_len + 1
        )
        resp_logits = self._tempered(logits[:, :-1])
        logprobs = pm.logprobs_from_logits(resp_logits, response)
        values = self._values(hidden[:, prompt_len - 1 : -1])
        return logprobs, values, resp_logits

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on hidden states [B, T, H] -> [B, T]; a bfloat16 policy (base_model.dtype) feeds the
        float32 head."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def _reference_logits(self, full_ids, full_mask, keep: int) -> torch.Tensor:
        with self._reference_model() as reference:
            return causal_lm_forward(reference, full_ids, full_mask, logits_to_keep=keep)[0]

    @contextlib.contextmanager
    def _reference_model(self):
        """The reference pi_k as a model to call (with LoRA: the policy under pi_k's adapter snapshot)."""
        if self.reference is None:
            with adapter_weights(self.policy, self._reference_adapter):
                yield self.policy
        else:
            yield self.reference

    # -- length groups ----------------------------------------------------------------
    def _split_forwards(self) -> bool:
        # ZeRO-3 gathers each layer's weights in every forward, a collective: every rank must run the same
        # number of forwards, so the scoring and update forwards stay whole there.
        return self.length_group_cost is not None and zero_stage(self._trainer) != 3

    def _groups(
        self,
        rows: list[int],
        prompt_lengths: list[int],
        reply_lengths: list[int] | None,
        split: bool,
        device: torch.device | None = None,
    ) -> list[_Group]:
        """The rollout rows `rows` in length groups (one group, trimmed to the rows' longest prompt and reply, when
        not `split`)."""
        plens = [prompt_lengths[r] for r in rows]
        rlens = None if reply_lengths is None else [reply_lengths[r] for r in rows]
        cost = self.length_group_cost if split else float("inf")
        groups = []
        for group in length_groups(plens, rlens, cost):
            groups.append(
                _Group(
                    positions=torch.tensor(group, dtype=torch.long, device=device),
                    rows=torch.tensor([rows[i] for i in group], dtype=torch.long, device=device),
                    prompt_width=max(plens[i] for i in group),
                    reply_width=0 if rlens is None else max(rlens[i] for i in group),
                )
            )
        return groups

    @staticmethod
    def _trimmed(ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, group: _Group):
        """The group's rows of [prompt | reply], cut to its longest prompt and reply (only padding is cut)."""
        cols = slice(prompt_len - group.prompt_width, prompt_len + group.reply_width)
        return ids[group.rows, cols], mask[group.rows, cols]

    @staticmethod
    def _reply_positions(group: _Group) -> torch.Tensor:
        """The positions of a trimmed [prompt | reply] row whose logits predict the reply tokens (the last prompt
        token up to the reply's last but one): `logits_to_keep` for them only."""
        return torch.arange(
            group.prompt_width - 1, group.prompt_width + group.reply_width - 1, device=group.rows.device
        )

    @staticmethod
    def _in_order(parts: list[torch.Tensor], groups: list[_Group], width: int | None = None) -> torch.Tensor:
        """Per-group outputs ([n_g] or [n_g, R_g], then right-padded with 0 to `width`) joined in the order of the
        rows the groups were made from (differentiable: a concatenation and one row gather)."""
        if width is not None:
            parts = [p if p.shape[1] == width else F.pad(p, (0, width - p.shape[1])) for p in parts]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        order = torch.cat([g.positions for g in groups])
        if torch.equal(order, torch.arange(len(order), device=order.device)):
            return joined
        return joined[torch.argsort(order)]

    def _grouped_policy_outputs(
        self, rollout: Rollout, groups: list[_Group]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_policy_outputs` of the grouped rows, one forward per group: log-probs, values and entropies [n, R]
        (0 on reply padding) in the order of the rows the groups were made from. Gradients flow into the
        policy and the value head; into the entropy only when it is trained (entropy_coef)."""
        prompt_len, width = rollout.prompt_len, rollout.responses.shape[1]
        logprobs, values, entropies = [], [], []
        for g in groups:
            ids, mask = self._trimmed(rollout.query_responses, rollout.attention_mask, prompt_len, g)
            logits, hidden = causal_lm_forward(
                self.policy, ids, mask, want_hidden=True, logits_to_keep=self._reply_positions(g)
            )
            # One log-softmax over the vocabulary for the sampled tokens' log-probs and the entropy.
            log_softmax = pm.log_softmax(self._tempered(logits))
            logprobs.append(pm.gather_logprobs(log_softmax, rollout.responses[g.rows, : g.reply_width]))
            values.append(self._values(hidden[:, g.prompt_width - 1 : -1]))
            if self.entropy_coef:
                entropies.append(pm.entropy_from_logprobs(log_softmax))
            else:  # logged only: keep the full-vocabulary entropy out of the backward pass
                with torch.no_grad():
                    entropies.append(pm.entropy_from_logprobs(log_softmax.detach()))
        return (
            self._in_order(logprobs, groups, width),
            self._in_order(values, groups, width),
            self._in_order(entropies, groups, width),
        )

    @torch.no_grad()
    def make_rollout(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        states: list[tuple[str, int]] | None = None,
        rollout_index: int = 0,
    ) -> Rollout:
        """Sample replies to the left-padded prompts [B, P] and score them (no gradient).

        `states` (the batch's "state_keys": each prompt's logged (conversation id, turn)) and `rollout_index`
        (the rollout's number in this fit) are read only by a critic that needs them (`_critic_score`)."""
        tok = self.tokenizer
        if self.group_size > 1:  # group_size replies per state, the replies to one state on adjacent rows
            prompt_ids = prompt_ids.repeat_interleave(self.group_size, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(self.group_size, dim=0)
            states = None if states is None else [s for s in states for _ in range(self.group_size)]
        seeds = None
        if self.seed_per_reply:
            # One draw from the global stream (identical on every rank), then one seed per global row.
            base = int(torch.randint(0, 2**62, (1,)).item())
            offset, _ = dist_utils.global_offset(prompt_ids.shape[0])
            seeds = [base + offset + row for row in range(prompt_ids.shape[0])]
        batch, prompt_len = prompt_ids.shape
        all_rows = list(range(batch))
        prompt_lengths = prompt_mask.sum(1).tolist()
        # Under ZeRO-3: gather the policy once and generate without per-layer hooks (zero.py). Generation is then
        # local to each rank, so its prefill may be split whatever the strategy.
        with self._timed("generate"), gathered_for_generation(self, self.policy) as model:
            prefill = None
            if self.length_group_cost is not None:
                prefill = [g.rows.tolist() for g in self._groups(all_rows, prompt_lengths, None, True)]
            sampled = sample_scored_replies(
                model,
                prompt_ids,
                prompt_mask,
                tok.eos_token_id,
                tok.pad_token_id,
                self.max_new_tokens,
                self.temperature,
                reply_seeds=seeds,
                prefill_groups=prefill,
            )
        response, resp_mask = sampled.response, sampled.response_mask
        full_ids = torch.cat([prompt_ids, response], dim=1)
        full_mask = torch.cat([prompt_mask, resp_mask], dim=1)
        width = response.shape[1]
        with self._timed("score_forward"):  # value head, reference and Q_k forwards
            # The rollout policy's log-probs and hidden states come from the sampling passes themselves.
            old_logprobs = sampled.logprobs
            old_values = self._values(sampled.hidden).masked_fill(resp_mask == 0, 0.0)
            groups = self._groups(
                all_rows, prompt_lengths, resp_mask.sum(1).tolist(), self._split_forwards(), response.device
            )
            if self._policy_is_reference and self._same_weights_as_reference():
                # pi_k itself (a fit's first rollout): the same log-probs, so the KL is exactly 0. The flag is
                # cleared by the first optimizer step; the comparison catches weights changed outside a fit.
                ref_logprobs = old_logprobs
            else:
                ref_parts = []
                with self._reference_model() as reference:
                    for g in groups:
                        ids, mask = self._trimmed(full_ids, full_mask, prompt_len, g)
                        keep = self._reply_positions(g)
                        ref_logits = causal_lm_forward(reference, ids, mask, logits_to_keep=keep)[0]
                        ref_parts.append(
                            pm.logprobs_from_logits(self._tempered(ref_logits), response[g.rows, : g.reply_width])
                        )
                ref_logprobs = self._in_order(ref_parts, groups, width)
            score_parts = []
            for g in groups:
                # The critic reads [state; reply] with the same tokenizer, its readout over the reply (its last token,
                # or all of it).
                ids, mask = self._trimmed(full_ids, full_mask, prompt_len, g)
                score_parts.append(self._critic_score(ids, mask, g.rows, states, rollout_index, g.prompt_width))
            score = self._in_order(score_parts, groups)
        ended = (response == tok.eos_token_id).any(dim=1)
        raw_score = score.clone()
        if self.missing_eos_penalty is not None:
            score = score - self.missing_eos_penalty * (~ended).float()
        # Batch statistics (score normalisation, advantage whitening) are over the global batch: every rank's rows.
        score = pm.normalize_scores(
            score, self.score_norm, reduce=dist_utils.all_reduce_sum if dist_utils.is_distributed() else None
        )
        rewards, kl = pm.per_token_rewards(score, old_logprobs, ref_logprobs, resp_mask, self.kl_controller.value)
        if self.advantage == "gae":
            advantages, returns = pm.gae_advantages(rewards, old_values, resp_mask, self.gamma_token, self.gae_lambda)
        else:  # grpo / rloo / group_mean: the other replies to the state are the baseline; no value target
            advantages = pm.group_token_advantages(score, rewards, resp_mask, self.group_size, self.advantage)
            returns = torch.zeros_like(old_values)
        if self.whiten_advantages:
            advantages = pm.masked_whiten(
                advantages, resp_mask, reduce=dist_utils.all_reduce_sum if dist_utils.is_distributed() else None
            )
        return Rollout(
            query_responses=full_ids,
            attention_mask=full_mask,
            responses=response,
            response_mask=resp_mask,
            logprobs=old_logprobs,
            values=old_values,
            advantages=advantages,
            returns=returns,
            scores=raw_score,
            seq_kl=(kl * resp_mask).sum(1),
            ended=ended,
        )

    # -- PPO update ----------------------------------------------------------------------
    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of clipped updates over the rollout in `minibatches` minibatches; mean statistics."""
        optimizer = self.optimizers()
        batch = rollout.batch_size
        # Minibatches are drawn over the GLOBAL batch (the same permutation on every rank); each rank trains
        # on its rows of each. In a single process this is the plain randperm(batch).split(mb_size).
        offset, global_batch = dist_utils.global_offset(batch)
        mb_size = math.ceil(global_batch / self.minibatches)
        agg: dict[str, list[float]] = defaultdict(list)
        stopped_early = False
        epochs_run = 0
        split = self._split_forwards()
        prompt_lengths = rollout.attention_mask[:, : rollout.prompt_len].sum(1).tolist()
        reply_lengths = rollout.response_mask.sum(1).tolist()
        for _ in range(self.ppo_epochs):
            epochs_run += 1
            for chunk in torch.randperm(global_batch, device=rollout.responses.device).split(mb_size):
                idx = (
                    chunk[(chunk >= offset) & (chunk < offset + batch)] - offset
                    if dist_utils.is_distributed()
                    else chunk
                )
                # A rank with no row in this minibatch still runs forward/backward (ZeRO's collectives need
                # every rank) on one row with zero weight.
                empty = idx.numel() == 0
                if empty:
                    idx = torch.zeros(1, dtype=torch.long, device=chunk.device)
                mb = rollout.rows(idx)
                with self._timed("update_forward"):
                    # One forward per length group, the outputs back in the minibatch's row order: the loss below
                    # is the unsplit minibatch's, and one backward gives its gradient.
                    groups = self._groups(idx.tolist(), prompt_lengths, reply_lengths, split, idx.device)
                    logprobs, values, entropies = self._grouped_policy_outputs(rollout, groups)
                mask = mb.response_mask
                pg_loss, pg_stats = pm.policy_loss(logprobs, mb.logprobs, mb.advantages, mask, self.clip_eps)
                loss = pg_loss
                if self.advantage == "gae":  # the group baselines leave the value head untouched
                    vf_loss, vf_stats = pm.value_loss(values, mb.values, mb.returns, mask, self.value_clip)
                    loss = loss + self.vf_coef * vf_loss
                entropy = pm.masked_mean(entropies, mask)
                if self.entropy_coef:
                    loss = loss - self.entropy_coef * entropy
                tokens = torch.zeros(()) if empty else mask.sum()
                share = dist_utils.global_share(tokens)  # token mean over the global minibatch (None: one process)
                if share is not None:
                    loss = loss * share
                loss = maybe_nan("policy.loss", loss)  # crash tests only; a no-op otherwise
                if dist_utils.any_rank(not bool(torch.isfinite(loss))):  # every process stops together
                    # Raise before backward/step so the last good weights stay intact.
                    raise FloatingPointError(
                        f"policy phase: non-finite PPO loss at global step {self.global_step} "
                        f"(rollout {self._rollouts})"
                    )
                optimizer.zero_grad()
                with self._timed("update_backward"):
                    self.manual_backward(loss)
                with self._timed("optimizer_step"):
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                    optimizer.step()
                self._policy_is_reference = False
                agg["policy_loss"].append(pg_loss.item())
                agg["entropy"].append(entropy.item())
                agg["clip_frac"].append(float(pg_stats["clip_frac"]))
                agg["approx_kl"].append(float(pg_stats["approx_kl"]))
                if self.advantage == "gae":
                    agg["value_loss"].append(vf_loss.item())
                    agg["vf_clip_frac"].append(float(vf_stats["vf_clip_frac"]))
                approx_kl = float(pg_stats["approx_kl"])
                if dist_utils.is_distributed():  # every rank must take the same decision
                    approx_kl = dist_utils.global_mean(pg_stats["approx_kl"].reshape(1), tokens.reshape(1).float())
                if self.target_kl is not None and approx_kl > self.target_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        stats = {k: sum(v) / len(v) for k, v in agg.items()}
        stats["epochs_run"] = float(epochs_run)
        stats["early_stopped"] = float(stopped_early)
        return stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        rollout = self.make_rollout(batch["input_ids"], batch["attention_mask"], batch.get("state_keys"), batch_idx)
        stats = self.ppo_update(rollout)
        self._rollouts += 1
        if dist_utils.is_distributed():  # rollout statistics over every rank's rows: the KL controller and
            mean = dist_utils.global_mean  # the early stop below must take the same decision on every rank
        else:

            def mean(x: torch.Tensor) -> float:
                return x.mean().item()

        mean_kl = mean(rollout.seq_kl)
        stats.update(
            kl=mean_kl,
            kl_coef=self.kl_controller.value,
            mean_score=mean(rollout.scores),
            response_length=mean(rollout.response_mask.sum(1).float()),
            ended_frac=mean(rollout.ended.float()),
        )
        self.kl_controller.update(mean_kl, n_steps=dist_utils.global_offset(rollout.batch_size)[1])
        if self.max_iteration_kl is not None and mean_kl > self.max_iteration_kl:
            # Q_k is only trustworthy near pi_k (Theorem 2): stop before PPO exploits its errors.
            stats["stopped_on_iteration_kl"] = 1.0
            self.trainer.should_stop = True
        self._step_stats.append(stats)
        failpoint("policy.step")
        shown = {"mean_score", "kl"}  # on the progress bar; the rest only in the logger
        n = rollout.batch_size
        self.log_dict({f"ppo/{k}": v for k, v in stats.items() if k not in shown}, batch_size=n)
        self.log_dict({f"ppo/{k}": stats[k] for k in shown}, prog_bar=True, batch_size=n)
