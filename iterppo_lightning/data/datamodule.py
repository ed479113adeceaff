"""`TrajectoryDataModule`: the one DataModule both phases read.

From the trajectory buffers it builds
- critic examples ((state, suggestion) -> Monte Carlo return G_i), with the
  validation split made by WHOLE conversation (turns of one conversation are
  strongly correlated; splitting them would leak the outcome);
- policy prompts: the logged states s_j, drawn with replacement, one batch per
  PPO rollout;
- SFT examples (state -> suggestion) for behaviour cloning pi_0 and the
  filtered-BC baseline.
The phase a `fit` trains, and its settings, are chosen for the fits inside a
`with datamodule.for_phase(...)` block; the previous ones come back after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, WeightedRandomSampler

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.data.padding import pad_left, pad_right
from iterppo_lightning.data.rendering import render_state, render_suggestion
from iterppo_lightning.distributed.collectives import ShardedBatchSampler
from iterppo_lightning.utils.seeding import derive_uniform, hash_bits

PHASES = ("critic", "policy", "sft")
_BATCH_SIZE_ATTRIBUTE = {"critic": "critic_batch_size", "policy": "policy_batch_size", "sft": "sft_batch_size"}


@dataclass
class TurnExample:
    prompt_ids: list[int]
    action_ids: list[int]
    target: float
    """Monte Carlo return G_i of the suggestion."""
    success: int
    """Whether the conversation ended in success (label for AUROC)."""
    conversation_id: str
    turn_index: int = 0
    weight: float = 1.0
    """Sample weight (data.pool_weights: older buffers may count less)."""


class _ListDataset(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _in_validation(conversation_id: str, val_fraction: float, seed: int) -> bool:
    # A hash of the id (not a shuffled index) keeps a conversation on the same
    # side of the split no matter which buffers are loaded or in what order.
    return hash_bits(seed, conversation_id, bits=64) / 2**64 < val_fraction


def bootstrap_count(conversation_id: str, member: int, seed: int) -> int:
    """How many times critic ensemble member `member` counts this conversation: a Poisson(1) draw.

    A Poisson(1) count per conversation is the usual streaming approximation of resampling the
    conversations with replacement (a bootstrap). It comes from a hash of (seed, member,
    conversation id), so it does not depend on batching or load order, and a resumed run
    draws the same counts.
    """
    u = derive_uniform(seed, "bootstrap", member, conversation_id)
    count, term = 0, math.exp(-1.0)
    cdf = term
    while u >= cdf and count < 30:  # inverse CDF of Poisson(1): P(k) = e^-1 / k!
        count += 1
        term /= count
        cdf += term
    return count


class TrajectoryDataModule(L.LightningDataModule):
    def __init__(
        self,
        gamma: float = 0.9,
        val_fraction: float = 0.1,
        critic_batch_size: int = 64,
        sft_batch_size: int = 64,
        policy_batch_size: int = 64,
        policy_batches: int = 16,
        max_prompt_tokens: int = 384,
        max_action_tokens: int = 24,
        sft_successful_only: bool = False,
        split_seed: int = 0,
        logs: str | None = None,
        pool_weights: list[float] | None = None,
    ):
        """
        Args:
            gamma: discount of the Monte Carlo return G_i over customer turns (< 1).
            val_fraction: share of conversations (not turns) held out to validate the critic.
            critic_batch_size: (state, suggestion) pairs per critic step.
            sft_batch_size: (state, suggestion) pairs per behaviour-cloning step.
            policy_batch_size: logged states per PPO rollout.
            policy_batches: PPO rollouts (prompt batches) per outer iteration.
            max_prompt_tokens: states longer than this keep their most recent tokens.
            max_action_tokens: suggestions are cut to this many tokens (incl. the end token).
            sft_successful_only: behaviour-clone only successful conversations (filtered BC).
            split_seed: seed of the conversation-level validation split.
            logs: conversation logs (JSONL, Parquet or a saved HF dataset folder, see
                docs/data.md) to train this iteration on instead of simulating: `fit`
                runs one iteration on them and exports the next policy.
            pool_weights: weights of the buffers an iteration trains on, newest first:
                [1.0] (default) = only the current batch; [1.0, 0.5] adds the previous
                batch at half weight. Pooling makes the data off-policy: pair it with
                critic.target "fqe" (see docs/data.md).
        """
        super().__init__()
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"data.gamma must be in (0, 1], got {gamma}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        pool_weights = [1.0] if pool_weights is None else [float(w) for w in pool_weights]
        if not pool_weights or pool_weights[0] <= 0 or any(w < 0 for w in pool_weights):
            raise ValueError(
                f"data.pool_weights must start with a weight > 0 and hold no negative weight, got {pool_weights}"
            )
        self.save_hyperparameters()
        self.logs = logs
        self.pool_weights = pool_weights
        self.gamma = gamma
        self.val_fraction = val_fraction
        self.critic_batch_size = critic_batch_size
        self.sft_batch_size = sft_batch_size
        self.policy_batch_size = policy_batch_size
        self.policy_batches = policy_batches
        self.max_prompt_tokens = max_prompt_tokens
        self.max_action_tokens = max_action_tokens
        self.sft_successful_only = sft_successful_only
        self.split_seed = split_seed
        self.tokenizer = None
        self.phase = "critic"
        self.sft_turns: set[tuple[str, int]] | None = None
        """Behaviour-clone only these (conversation_id, turn index) pairs (None = every turn); see for_phase."""
        self.bootstrap_members = 1
        """Critic ensemble size: with > 1, critic batches carry each member's bootstrap counts."""
        self.conversations: list[Conversation] = []
        self.train_examples: list[TurnExample] = []
        self.val_examples: list[TurnExample] = []
        self._weighted = False

    # -- wiring -----------------------------------------------------------
    def connect(self, tokenizer) -> None:
        """Give the data module the tokenizer of the models it feeds."""
        self.tokenizer = tokenizer

    def use_phase(self, phase: str) -> None:
        """Switch the phase for good, with the DataModule's own settings (a single fit, e.g. in tests);
        the loop uses `for_phase`, which puts everything back."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        self.phase = phase

    @contextmanager
    def for_phase(
        self,
        phase: str,
        *,
        batch_size: int | None = None,
        sft_turns: set[tuple[str, int]] | None = None,
        bootstrap_members: int = 1,
    ) -> Iterator[TrajectoryDataModule]:
        """The fits inside the block train `phase` with these settings; the previous ones come back after it,
        whatever happens inside.

        Args:
            phase: "critic", "policy" or "sft".
            batch_size: this phase's batch size for the block (None = the DataModule's own, e.g.
                data.sft_batch_size); behaviour cloning passes its recipe's.
            sft_turns: behaviour-clone only these (conversation_id, turn index) pairs (None = every turn).
            bootstrap_members: critic ensemble size: with > 1, critic batches carry each member's
                Poisson bootstrap counts.
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        size_attribute = _BATCH_SIZE_ATTRIBUTE[phase]
        saved = (self.phase, getattr(self, size_attribute), self.sft_turns, self.bootstrap_members)
        self.phase, self.sft_turns, self.bootstrap_members = phase, sft_turns, bootstrap_members
        if batch_size is not None:
            setattr(self, size_attribute, batch_size)
        try:
            yield self
        finally:
            self.phase, own_batch_size, self.sft_turns, self.bootstrap_members = saved
            setattr(self, size_attribute, own_batch_size)

    def set_conversations(self, conversations: list[Conversation], weights: list[float] | None = None) -> None:
        """Use these conversations (e.g. the current buffer, or pooled buffers), optionally weighted per
        conversation."""
        if self.tokenizer is None:
            raise RuntimeError("call connect(tokenizer) before set_conversations")
        if weights is not None and len(weights) != len(conversations):
            raise ValueError(f"{len(weights)} weights for {len(conversations)} conversations")
        self.conversations = list(conversations)
        examples = self._build_examples(self.conversations, weights)
        self.train_examples = [
            e for e in examples if not _in_validation(e.conversation_id, self.val_fraction, self.split_seed)
        ]
        self.val_examples = [
            e for e in examples if _in_validation(e.conversation_id, self.val_fraction, self.split_seed)
        ]
        if not self.train_examples:
            raise ValueError("the trajectory buffers hold no agent turns to train on")
        self._weighted = any(e.weight != 1.0 for e in examples)
        # Batches carry weight / (mean weight of the data), so the loss is a weighted mean over
        # the whole data set: a batch of old examples counts less, not the same as any batch.
        self._mean_weight = sum(e.weight for e in examples) / len(examples)

    def load_buffers(self, paths: list[str], weights: list[float] | None = None) -> None:
        """Train on these buffers; `weights[i]` weighs every conversation of `paths[i]`."""
        conversations, per_conversation = [], []
        for i, p in enumerate(paths):
            loaded = load_buffer(p)
            conversations.extend(loaded)
            per_conversation.extend([1.0 if weights is None else float(weights[i])] * len(loaded))
        self.set_conversations(conversations, None if weights is None else per_conversation)

    def in_validation(self, conversation_id: str) -> bool:
        """Whether this conversation is held out (the split is by whole conversation)."""
        return _in_validation(conversation_id, self.val_fraction, self.split_seed)

    @property
    def all_examples(self) -> list[TurnExample]:
        return self.train_examples + self.val_examples

    def set_targets(self, targets) -> None:
        """Replace the training targets: `targets[(conversation_id, turn_index)]` (e.g. TD(lambda), see critic_targets).

        Validation keeps the Monte Carlo returns, so its metrics stay comparable across
        critic targets instead of measuring agreement with the critic's own bootstrap.
        """
        for e in self.train_examples:
            e.target = float(targets[(e.conversation_id, e.turn_index)])

    # -- example building ---------------------------------------------------
    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _build_examples(
        self, conversations: list[Conversation], weights: list[float] | None = None
    ) -> list[TurnExample]:
        states, actions, meta = [], [], []
        for n, conv in enumerate(conversations):
            returns = conv.returns(self.gamma)
            weight = 1.0 if weights is None else weights[n]
            for g, i in zip(returns, conv.agent_turns):
                states.append(render_state(conv, i, self.tokenizer))
                actions.append(render_suggestion(conv.turns[i].suggestion, self.tokenizer))
                meta.append((g, int(conv.success), conv.conversation_id, i, weight))
        if not states:
            return []
        prompt_ids = self._encode(states)
        action_ids = self._encode(actions)
        return [
            TurnExample(p[-self.max_prompt_tokens :], a[: self.max_action_tokens], g, s, cid, i, w)
            for p, a, (g, s, cid, i, w) in zip(prompt_ids, action_ids, meta)
        ]

    # -- collation ----------------------------------------------------------
    def _collate_pairs(self, batch: list[TurnExample]) -> dict[str, torch.Tensor]:
        """[state | suggestion] right-padded, for the critic and for SFT."""
        pad = self.tokenizer.pad_token_id
        ids, mask = pad_right([e.prompt_ids + e.action_ids for e in batch], pad)
        labels = ids.clone()
        labels[mask == 0] = -100
        for row, e in enumerate(batch):
            labels[row, : len(e.prompt_ids)] = -100  # behaviour cloning learns the reply only
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "target": torch.tensor([e.target for e in batch], dtype=torch.float32),
            "success": torch.tensor([e.success for e in batch], dtype=torch.long),
        }
        if self._weighted:  # unweighted batches keep the plain mean (bit-identical to before pooling existed)
            out["weight"] = torch.tensor([e.weight / self._mean_weight for e in batch], dtype=torch.float32)
        if self.phase == "critic" and self.bootstrap_members > 1:
            out["bootstrap"] = torch.tensor(
                [
                    [bootstrap_count(e.conversation_id, m, self.split_seed) for e in batch]
                    for m in range(self.bootstrap_members)
                ],
                dtype=torch.float32,
            )
        return out

    def _collate_prompts(self, batch: list[TurnExample]) -> dict[str, torch.Tensor]:
        ids, mask = pad_left([e.prompt_ids for e in batch], self.tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    # -- loaders --------------------------------------------------------------
    def _sft_examples(self, examples: list[TurnExample]) -> list[TurnExample]:
        if self.sft_turns is not None:
            examples = [e for e in examples if (e.conversation_id, e.turn_index) in self.sft_turns]
        return [e for e in examples if e.success] if self.sft_successful_only else examples

    @staticmethod
    def _loader(examples, batch_size: int, collate, shuffle: bool = False, sampler=None) -> DataLoader:
        """Global batches drawn the same on every process, each cut to this rank's slice
        (distributed/collectives.py: `ShardedBatchSampler`).

        In a single process this iterates exactly like `DataLoader(batch_size=..., shuffle=..., sampler=...)`.
        """
        dataset = _ListDataset(examples)
        if sampler is None:
            sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(sampler, batch_size), collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        if self.phase == "critic":
            return self._loader(self.train_examples, self.critic_batch_size, self._collate_pairs, shuffle=True)
        if self.phase == "sft":
            examples = self._sft_examples(self.train_examples)
            if not examples:
                raise ValueError("no successful conversations to behaviour-clone")
            return self._loader(examples, self.sft_batch_size, self._collate_pairs, shuffle=True)
        # Policy phase: every logged state (train and validation alike) is a
        # prompt; PPO needs no held-out set. Sampling with replacement gives a
        # fixed number of rollouts per iteration regardless of buffer size.
        prompts = self.all_examples
        n = self.policy_batch_size * self.policy_batches
        if self._weighted:
            sampler = WeightedRandomSampler([e.weight for e in prompts], num_samples=n, replacement=True)
        else:
            sampler = RandomSampler(prompts, replacement=True, num_samples=n)
        return self._loader(prompts, self.policy_batch_size, self._collate_prompts, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.phase == "policy" or not self.val_examples:
            return []
        examples = self.val_examples if self.phase == "critic" else self._sft_examples(self.val_examples)
        if not examples:
            return []
        batch = self.critic_batch_size if self.phase == "critic" else self.sft_batch_size
        return self._loader(examples, batch, self._collate_pairs)
