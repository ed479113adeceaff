"""`TrajectoryDataModule`: the one DataModule both phases read.

From the trajectory buffers it builds
- critic examples ((state, suggestion) -> Monte Carlo return G_i), with the
  validation split made by WHOLE conversation (turns of one conversation are
  strongly correlated; splitting them would leak the outcome);
- policy prompts: the logged states s_j, drawn with replacement, one batch per
  PPO rollout;
- SFT examples (state -> suggestion) for behaviour cloning pi_0 and the
  filtered-BC baseline.
The per-turn examples (`train_examples`, `val_examples`: a `TurnExample` per agent
turn) are what targets, filters and the policy phase read. Critic and SFT batches
are made of sequences (data/batching.py): a conversation whose turns are token
prefixes of one another is ONE row, read at each turn's reply (one causal pass
instead of one per turn); any other conversation gives its per-turn rows. Batches
hold whole sequences, about `critic_batch_size` / `sft_batch_size` turns each,
bucketed by length so that little of a batch is padding.
The phase a `fit` trains, and its settings, are chosen for the fits inside a
`with datamodule.for_phase(...)` block; the previous ones come back after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, WeightedRandomSampler

from iterppo_lightning.data.batching import (
    BucketedBatchSampler,
    SequenceExample,
    SequenceGroup,
    conversation_sequence,
    group_pairs,
)
from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.data.log_schema import DEFAULT_MAX_MESSAGE_CHARS, check_max_message_chars
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
    next_ids: list[int] = field(default_factory=list)
    """What follows the reply in the conversation up to the customer's next message included (the next state's
    tokens after [state | reply], at most `max_action_tokens` of them): the critic's auxiliary next-message
    targets (model.critic.aux_next_message_coef). Empty when no customer message follows."""


class _ListDataset(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def in_validation(conversation_id: str, val_fraction: float, seed: int) -> bool:
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


def _with_next_messages(sequence: SequenceExample) -> tuple[list[int], list[tuple[int, int, int]]]:
    """A critic row with each turn's next customer message: (token ids, [(position predicting the token, token,
    turn offset in the row)]). A turn's next message is where the row already holds it (a conversation row's
    next state), or appended after the row's last reply; any other turn (its message would go in the middle of
    the row, which never happens for the rows data/batching.py makes) gets none."""
    ids = list(sequence.input_ids)
    out = []
    for t, (turn, end) in enumerate(zip(sequence.turns, sequence.reply_ends)):
        following = turn.next_ids
        if not following:
            continue
        if ids[end : end + len(following)] != following:
            if end != len(ids):
                continue
            ids.extend(following)
        out.extend((end - 1 + j, token, t) for j, token in enumerate(following))
    return ids, out


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
        conversation_rows: bool = False,
        imagined_weight: float = 0.0,
        imagined_buffer: str | None = None,
        max_message_chars: int | None = DEFAULT_MAX_MESSAGE_CHARS,
    ):
        """
        Args:
            gamma: discount of the Monte Carlo return G_i over customer turns (< 1).
            val_fraction: share of conversations (not turns) held out to validate the critic.
            critic_batch_size: (state, suggestion) pairs (agent turns) per critic step, about: a
                batch holds whole conversations (data/batching.py), as many steps per epoch as
                batches of exactly this many turns would make.
            sft_batch_size: (state, suggestion) pairs (cloned turns) per behaviour-cloning step, about,
                as for the critic.
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
            conversation_rows: True = critic and SFT batch rows are whole conversations where every
                turn's [state | suggestion] is a token prefix of the next (one causal pass reads all
                their turns, about 4x fewer tokens at quickstart size); False (default) = one row per
                turn. Both are length-bucketed. A batch of conversation rows holds fewer distinct
                conversations (about critic_batch_size / turns per conversation), so its gradient is
                noisier: at quickstart size the critic's validation AUROC and loss after critic_epochs
                were worse, which is why it is off by default (see docs/data.md).
            imagined_weight: > 0 = pool pi_0's bootstrap (imagined) conversations into the critic's
                training rows, each turn at this weight (D_k's turns weigh 1). They train the critic
                only: never its validation split, PPO's prompts or the critic probe's states. Their
                targets are the behaviour agent's Monte Carlo returns (off-policy for pi_k, hence the
                down-weighting; critic.target "mc" only). 0 = off (docs/critic.md).
            imagined_buffer: where those conversations are; None = the bootstrap's own: RUN/pi_0/buffer
                when the run bootstrapped pi_0, else the `buffer` folder next to model.policy_init (what
                `iterppo bootstrap OUTPUT` writes: OUTPUT/policy and OUTPUT/buffer).
            max_message_chars: the longest customer message, suggestion or sent message a batch of
                logs (data.logs) may hold, in characters; a longer one is a problem naming its file,
                line and field, before any work (`iterppo validate-data` checks the same). null = no limit.
        """
        super().__init__()
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"data.gamma must be in (0, 1], got {gamma}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if imagined_weight < 0:
            raise ValueError(f"data.imagined_weight must be >= 0, got {imagined_weight}")
        check_max_message_chars(max_message_chars)
        pool_weights = [1.0] if pool_weights is None else [float(w) for w in pool_weights]
        if not pool_weights or pool_weights[0] <= 0 or any(w < 0 for w in pool_weights):
            raise ValueError(
                f"data.pool_weights must start with a weight > 0 and hold no negative weight, got {pool_weights}"
            )
        self.save_hyperparameters()
        self.logs = logs
        self.max_message_chars = max_message_chars
        self.pool_weights = pool_weights
        self.conversation_rows = conversation_rows
        self.imagined_weight = float(imagined_weight)
        self.imagined_buffer = imagined_buffer
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
        self.next_messages = False
        """Critic batches carry each turn's next customer message (`aux_*` tensors, see _collate_sequences)."""
        self.pair_branches = False
        """Critic training batches keep branch pairs together and carry `pair_first` / `pair_second` (see
        `branch_pairs`)."""
        self.conversations: list[Conversation] = []
        self.train_examples: list[TurnExample] = []
        self.val_examples: list[TurnExample] = []
        self.train_sequences: list[SequenceExample] = []
        """The rows of critic / SFT batches: a conversation's turns in one sequence, or one turn each (fallback)."""
        self.val_sequences: list[SequenceExample] = []
        self.critic_only_sequences: list[SequenceExample] = []
        """Extra critic training rows (data.imagined_weight), in no other phase's data."""
        self._weighted = False
        self._critic_mean_weight = 1.0

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
        next_messages: bool = False,
        branch_pairs: bool = False,
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
            next_messages: critic batches carry each turn's next customer message as auxiliary
                next-token targets (model.critic.aux_next_message_coef).
            branch_pairs: critic training batches keep each branch's reply with the reply it branched from (the
                same state) and say which turns pair up (model.critic.branch_contrast_coef; `branch_pairs`).
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        size_attribute = _BATCH_SIZE_ATTRIBUTE[phase]
        saved = (
            self.phase,
            getattr(self, size_attribute),
            self.sft_turns,
            self.bootstrap_members,
            self.next_messages,
            self.pair_branches,
        )
        self.phase, self.sft_turns, self.bootstrap_members = phase, sft_turns, bootstrap_members
        self.next_messages, self.pair_branches = next_messages, branch_pairs
        if batch_size is not None:
            setattr(self, size_attribute, batch_size)
        try:
            yield self
        finally:
            (
                self.phase,
                own_batch_size,
                self.sft_turns,
                self.bootstrap_members,
                self.next_messages,
                self.pair_branches,
            ) = saved
            setattr(self, size_attribute, own_batch_size)

    def set_conversations(self, conversations: list[Conversation], weights: list[float] | None = None) -> None:
        """Use these conversations (e.g. the current buffer, or pooled buffers), optionally weighted per
        conversation."""
        if self.tokenizer is None:
            raise RuntimeError("call connect(tokenizer) before set_conversations")
        if weights is not None and len(weights) != len(conversations):
            raise ValueError(f"{len(weights)} weights for {len(conversations)} conversations")
        self.conversations = list(conversations)
        examples, sequences = self._build_examples(self.conversations, weights)
        self.train_examples = [e for e in examples if not self.in_validation(e.conversation_id)]
        self.val_examples = [e for e in examples if self.in_validation(e.conversation_id)]
        self.train_sequences = [s for s in sequences if not self.in_validation(s.turns[0].conversation_id)]
        self.val_sequences = [s for s in sequences if self.in_validation(s.turns[0].conversation_id)]
        if not self.train_examples:
            raise ValueError("the trajectory buffers hold no agent turns to train on")
        self._weighted = any(e.weight != 1.0 for e in examples)
        # Batches carry weight / (mean weight of the data), so the loss is a weighted mean over
        # the whole data set: a batch of old examples counts less, not the same as any batch.
        self._mean_weight = sum(e.weight for e in examples) / len(examples)
        self.critic_only_sequences = []

    def add_critic_only(self, conversations: list[Conversation], weight: float) -> None:
        """Add these conversations to the critic's training rows only, every turn at `weight` (data.imagined_weight);
        set_conversations drops them again. Their turns never enter the validation split, `train_examples`
        (targets, filters, PPO's prompts) or `conversations` (the probe's states)."""
        if self.tokenizer is None:
            raise RuntimeError("call connect(tokenizer) before add_critic_only")
        examples, sequences = self._build_examples(list(conversations), [float(weight)] * len(conversations))
        self.critic_only_sequences = sequences
        own = self.all_examples
        self._critic_mean_weight = (sum(e.weight for e in own) + weight * len(examples)) / (len(own) + len(examples))

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
        return in_validation(conversation_id, self.val_fraction, self.split_seed)

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
    ) -> tuple[list[TurnExample], list[SequenceExample]]:
        """Every agent turn's `TurnExample`, and the sequences critic and SFT batches are made of (data/batching.py):
        one per conversation whose untruncated turns are token prefixes of its last one, else one per turn."""
        states, actions, meta, spans = [], [], [], []
        next_messages: list[str | None] = []  # per agent turn: the customer's next message, if one follows
        closing_states, closing_of = [], {}
        for n, conv in enumerate(conversations):
            returns = conv.returns(self.gamma)
            weight = 1.0 if weights is None else weights[n]
            first = len(states)
            for g, i in zip(returns, conv.agent_turns):
                states.append(render_state(conv, i, self.tokenizer))
                actions.append(render_suggestion(conv.turns[i].suggestion, self.tokenizer))
                meta.append((g, int(conv.success), conv.conversation_id, i, weight))
                following = conv.turns[i + 1] if i + 1 < len(conv.turns) else None
                next_messages.append(None if following is None else following.customer)
                if following is not None and following.terminal:  # the closing message: a state no turn renders
                    closing_of[len(states) - 1] = len(closing_states)
                    closing_states.append(render_state(conv, i + 1, self.tokenizer))
            spans.append((first, len(states)))
        if not states:
            return [], []
        prompt_ids = self._encode(states)
        action_ids = self._encode(actions)
        closing_ids = self._encode(closing_states) if closing_states else []
        examples = [
            TurnExample(p[-self.max_prompt_tokens :], a[: self.max_action_tokens], g, s, cid, i, w)
            for p, a, (g, s, cid, i, w) in zip(prompt_ids, action_ids, meta)
        ]
        for first, stop in spans:
            for j in range(first, stop):
                if next_messages[j] is None:
                    continue  # the log stops after this reply: no customer message follows it
                following = closing_ids[closing_of[j]] if j in closing_of else prompt_ids[j + 1]
                examples[j].next_ids = self._next_message_ids(prompt_ids[j], action_ids[j], following, next_messages[j])
        sequences: list[SequenceExample] = []
        for first, stop in spans:
            prompts, replies, turns = prompt_ids[first:stop], action_ids[first:stop], examples[first:stop]
            whole = None
            # A truncated turn's row is not a prefix of the conversation: the conversation goes per turn.
            if self.conversation_rows and all(
                len(p) <= self.max_prompt_tokens and len(a) <= self.max_action_tokens for p, a in zip(prompts, replies)
            ):
                whole = conversation_sequence(prompts, replies, turns)
            sequences.extend([whole] if whole is not None else [SequenceExample.single_turn(e) for e in turns])
        return examples, sequences

    def _next_message_ids(self, prompt: list[int], reply: list[int], following: list[int], message: str) -> list[int]:
        """The auxiliary targets of one turn: the next state's tokens after [state | reply] (what a conversation row
        holds there: an edit or rejection, then the customer's next message and its markers) when [state | reply]
        is a token prefix of the next state, else the customer's message alone; at most max_action_tokens tokens.
        Empty for a truncated reply (what follows a cut reply is not what followed it)."""
        if len(reply) > self.max_action_tokens:
            return []
        whole = prompt + reply
        if following[: len(whole)] == whole:
            tail = following[len(whole) :]
        else:
            tail = self._encode([message])[0]
        return tail[: self.max_action_tokens]

    # -- collation ----------------------------------------------------------
    def _collate_sequences(self, batch: list[SequenceExample]) -> dict[str, torch.Tensor]:
        """Sequences right-padded, for the critic and for SFT. Per-row tensors: `input_ids`, `attention_mask`,
        `labels` (the turns' reply tokens, -100 elsewhere: behaviour cloning learns the replies only). Per-turn
        tensors, one entry per turn of the batch in row order: `read_rows` and `read_positions` (where Q_k of
        the turn is read: its reply's last token), `read_starts` (its reply's first token), `target`, `success`,
        and `weight` / `bootstrap` when used.
        With `next_messages` (critic phase), each turn's next customer message (TurnExample.next_ids) is in its
        row (conversation rows hold it already; the last turn's is appended), and per-token tensors say where:
        `aux_rows`, `aux_positions` (the position whose hidden state predicts the token: the one before it),
        `aux_targets` (the token) and `aux_turns` (its turn's index among the batch's turns). Appended tokens
        come after every read position, so causal attention leaves Q unchanged."""
        pad = self.tokenizer.pad_token_id
        aux = self.phase == "critic" and self.next_messages
        rows_ids, aux_parts = [], []
        for sequence in batch:
            row_ids, row_aux = _with_next_messages(sequence) if aux else (sequence.input_ids, [])
            rows_ids.append(row_ids)
            aux_parts.append(row_aux)
        ids, mask = pad_right(rows_ids, pad)
        labels = torch.full_like(ids, -100)
        rows, starts, positions, turns = [], [], [], []
        aux_rows, aux_positions, aux_targets, aux_turns = [], [], [], []
        for row, sequence in enumerate(batch):
            for position, target, t in aux_parts[row]:
                aux_rows.append(row)
                aux_positions.append(position)
                aux_targets.append(target)
                aux_turns.append(len(turns) + t)
            for turn, start, end in zip(sequence.turns, sequence.reply_starts, sequence.reply_ends):
                labels[row, start:end] = ids[row, start:end]
                rows.append(row)
                starts.append(start)
                positions.append(end - 1)
                turns.append(turn)
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "read_rows": torch.tensor(rows, dtype=torch.long),
            "read_positions": torch.tensor(positions, dtype=torch.long),
            "read_starts": torch.tensor(starts, dtype=torch.long),
            "target": torch.tensor([e.target for e in turns], dtype=torch.float32),
            "success": torch.tensor([e.success for e in turns], dtype=torch.long),
        }
        if self.phase == "critic" and self.critic_only_sequences:
            mean = self._critic_mean_weight
            out["weight"] = torch.tensor([e.weight / mean for e in turns], dtype=torch.float32)
        elif self._weighted:  # unweighted batches keep the plain mean (bit-identical to before pooling existed)
            out["weight"] = torch.tensor([e.weight / self._mean_weight for e in turns], dtype=torch.float32)
        if self.phase == "critic" and self.bootstrap_members > 1:
            out["bootstrap"] = torch.tensor(
                [
                    [bootstrap_count(e.conversation_id, m, self.split_seed) for e in turns]
                    for m in range(self.bootstrap_members)
                ],
                dtype=torch.float32,
            )
        if aux:
            out["aux_rows"] = torch.tensor(aux_rows, dtype=torch.long)
            out["aux_positions"] = torch.tensor(aux_positions, dtype=torch.long)
            out["aux_targets"] = torch.tensor(aux_targets, dtype=torch.long)
            out["aux_turns"] = torch.tensor(aux_turns, dtype=torch.long)
        return out

    def _collate_groups(self, groups: list[SequenceGroup]) -> dict[str, torch.Tensor]:
        """The groups' sequences collated as by `_collate_sequences`, plus `pair_first` and `pair_second`: for each
        branch pair of the batch, the indices of its two turns among the batch's turns."""
        sequences = [s for group in groups for s in group.sequences]
        out = self._collate_sequences(sequences)
        position = {id(turn): i for i, turn in enumerate(t for group in groups for t in group.turns)}
        pairs = [pair for group in groups for pair in group.pairs]
        out["pair_first"] = torch.tensor([position[id(a)] for a, _ in pairs], dtype=torch.long)
        out["pair_second"] = torch.tensor([position[id(b)] for _, b in pairs], dtype=torch.long)
        return out

    def _collate_pairs(self, batch: list[TurnExample]) -> dict[str, torch.Tensor]:
        """Per-turn rows [state | suggestion] right-padded (one row per turn), in the batch format of
        `_collate_sequences`."""
        return self._collate_sequences([SequenceExample.single_turn(e) for e in batch])

    def _collate_prompts(self, batch: list[TurnExample]) -> dict:
        """The policy phase's states left-padded, and `state_keys`: each one's (conversation_id, turn_index) (what
        the oracle critic replays; a plain list, which batch transfer leaves as it is)."""
        ids, mask = pad_left([e.prompt_ids for e in batch], self.tokenizer.pad_token_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "state_keys": [(e.conversation_id, e.turn_index) for e in batch],
        }

    # -- branch pairs ---------------------------------------------------------
    def branch_pairs(self) -> list[tuple[TurnExample, TurnExample]]:
        """Two replies at one state: (the turn a branch conversation branched from, the branch's own turn there),
        for every branch (env/branching.py) whose original is loaded too, when both are in the training split.
        Their returns are samples of Q(s, a) and Q(s, a') at the same s and hidden customer, so their difference
        is an unbiased sample of Q(s, a) - Q(s, a'), free of the state's own value."""
        by_key = {(e.conversation_id, e.turn_index): e for e in self.train_examples}
        pairs = []
        for conversation in self.conversations:
            branch = conversation.metadata.get("branch")
            if not branch:
                continue
            first = by_key.get((branch["of"], branch["turn"]))
            second = by_key.get((conversation.conversation_id, branch["turn"]))
            if first is not None and second is not None:
                pairs.append((first, second))
        return pairs

    # -- loaders --------------------------------------------------------------
    def _clones(self, e: TurnExample) -> bool:
        """Whether behaviour cloning learns this turn (sft_turns, sft_successful_only)."""
        if self.sft_turns is not None and (e.conversation_id, e.turn_index) not in self.sft_turns:
            return False
        return bool(e.success) or not self.sft_successful_only

    def _sft_examples(self, examples: list[TurnExample]) -> list[TurnExample]:
        return [e for e in examples if self._clones(e)]

    def _phase_sequences(self, sequences: list[SequenceExample]) -> list[SequenceExample]:
        """The critic's rows as they are; SFT's cut to the turns it clones (each cut after its last cloned reply)."""
        if self.phase == "critic":
            return sequences
        kept = (s.restricted(self._clones) for s in sequences)
        return [s for s in kept if s is not None]

    def _sequence_loader(self, sequences: list[SequenceExample], batch_size: int, shuffle: bool) -> DataLoader:
        """Batches of whole sequences, about `batch_size` turns each, bucketed by length (data/batching.py); with
        several processes every rank draws the same global batches and keeps its slice."""
        # Bucketed by the length each row will have once collated: with the next customer messages appended for
        # the critic's auxiliary loss, that is longer than the sequence itself.
        aux = self.phase == "critic" and self.next_messages
        lengths = [len(_with_next_messages(s)[0]) if aux else len(s.input_ids) for s in sequences]
        sampler = BucketedBatchSampler(lengths, [len(s.turns) for s in sequences], batch_size, shuffle)
        return DataLoader(_ListDataset(sequences), batch_sampler=sampler, collate_fn=self._collate_sequences)

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

    def _group_loader(self, groups: list[SequenceGroup], batch_size: int) -> DataLoader:
        """Shuffled batches of whole groups (each with its branch pairs), about `batch_size` turns each, bucketed by
        a group's longest sequence."""
        sampler = BucketedBatchSampler([g.length for g in groups], [len(g.turns) for g in groups], batch_size, True)
        return DataLoader(_ListDataset(groups), batch_sampler=sampler, collate_fn=self._collate_groups)

    def train_dataloader(self) -> DataLoader:
        if self.phase == "critic":
            sequences = self.train_sequences + self.critic_only_sequences
            if self.pair_branches:
                groups = group_pairs(sequences, self.branch_pairs())
                return self._group_loader(groups, self.critic_batch_size)
            return self._sequence_loader(sequences, self.critic_batch_size, shuffle=True)
        if self.phase == "sft":
            sequences = self._phase_sequences(self.train_sequences)
            if not sequences:
                raise ValueError("no successful conversations to behaviour-clone")
            return self._sequence_loader(sequences, self.sft_batch_size, shuffle=True)
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
        sequences = self._phase_sequences(self.val_sequences)
        if not sequences:
            return []
        batch = self.critic_batch_size if self.phase == "critic" else self.sft_batch_size
        return self._sequence_loader(sequences, batch, shuffle=False)
