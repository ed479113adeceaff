"""Sequences of one causal pass, and length-bucketed batches of them (critic and behaviour cloning).

A `SequenceExample` is one row of a critic or SFT batch: token ids and, per agent turn it carries,
the span of the turn's reply in those ids. A whole conversation is one sequence when every turn's
[state | reply] is a token prefix of the next one's (the plain marker format is): one causal pass
then gives each turn exactly the hidden states its own per-turn row would, for about half the
tokens. A conversation that is not (truncation, a chat template whose rendering is not
prefix-stable) is one single-turn sequence per turn, the per-turn rows as before.

`bucketed_batches` cuts a list of sequences into batches that count about `batch_size` turns each,
grouping sequences of similar length so that right-padding costs little; `BucketedBatchSampler` draws
them once per epoch from torch's seeded RNG and hands each process its slice of every global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from iterppo_lightning.distributed.collectives import rank, shard_bounds, world_size

POOL_BATCHES = 32
"""Shuffled sequences are sorted by length within pools of this many batches: batches of similar lengths
(little padding), while which sequences share a batch still changes from epoch to epoch."""


@dataclass
class SequenceExample:
    """One row of a critic / SFT batch: `input_ids`, and per turn its example and reply span [start, end)."""

    input_ids: list[int]
    turns: list  # list[TurnExample]: the per-turn records (target, success, weight, ...), shared, not copied
    reply_starts: list[int]
    reply_ends: list[int]
    """Exclusive end of each turn's reply: Q_k of the turn is read at reply_end - 1, its last token."""

    @classmethod
    def single_turn(cls, turn) -> SequenceExample:
        """The per-turn row [state | reply] of one `TurnExample` (its ids as stored, truncation included)."""
        start = len(turn.prompt_ids)
        return cls(turn.prompt_ids + turn.action_ids, [turn], [start], [start + len(turn.action_ids)])

    def restricted(self, keep: Callable[[object], bool]) -> SequenceExample | None:
        """This sequence for the turns `keep` accepts, cut after the last kept reply (None if none is kept)."""
        chosen = [i for i, turn in enumerate(self.turns) if keep(turn)]
        if len(chosen) == len(self.turns):
            return self
        if not chosen:
            return None
        end = self.reply_ends[chosen[-1]]
        return SequenceExample(
            self.input_ids[:end],
            [self.turns[i] for i in chosen],
            [self.reply_starts[i] for i in chosen],
            [self.reply_ends[i] for i in chosen],
        )


@dataclass
class SequenceGroup:
    """Sequences that must share a critic batch: those holding two replies at one state (a branch pair), so that the
    critic can compare them within the batch. `pairs`: the (TurnExample, TurnExample) pairs among their turns."""

    sequences: list[SequenceExample]
    pairs: list[tuple[object, object]]

    @property
    def length(self) -> int:
        """Its longest sequence's tokens: what a batch holding it is padded to, at least."""
        return max(len(s.input_ids) for s in self.sequences)

    @property
    def turns(self) -> list:
        """Its sequences' turns, in order: the order a batch holding it lists them in."""
        return [turn for sequence in self.sequences for turn in sequence.turns]


def group_pairs(sequences: Sequence[SequenceExample], pairs: Sequence[tuple[object, object]]) -> list[SequenceGroup]:
    """`sequences` joined into groups so that the two turns of each pair are in one group (a sequence holding turns
    of several pairs joins them all); every other sequence is a group of its own. A pair with a turn in none of
    `sequences` is dropped. Groups come in the order of their first sequence."""
    where = {id(turn): i for i, sequence in enumerate(sequences) for turn in sequence.turns}
    parent = list(range(len(sequences)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    kept = [(a, b) for a, b in pairs if id(a) in where and id(b) in where]
    for a, b in kept:
        ra, rb = root(where[id(a)]), root(where[id(b)])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, SequenceGroup] = {}
    for i, sequence in enumerate(sequences):
        groups.setdefault(root(i), SequenceGroup([], [])).sequences.append(sequence)
    for a, b in kept:
        groups[root(where[id(a)])].pairs.append((a, b))
    return list(groups.values())


def conversation_sequence(
    prompts: Sequence[list[int]], replies: Sequence[list[int]], turns: list
) -> SequenceExample | None:
    """One sequence for a conversation's turns, in order, if each turn's prompt + reply (untruncated ids) is exactly
    a prefix of the last turn's and the replies follow one another without overlap; else None.

    Checked on the token lists themselves, so a tokenizer or template that renders a state differently from the
    turn before it (or any truncation done before the call) falls back to per-turn rows instead of being assumed.
    """
    if not turns:
        return None
    full = prompts[-1] + replies[-1]
    starts, ends = [], []
    for prompt, reply in zip(prompts, replies):
        start, end = len(prompt), len(prompt) + len(reply)
        if (ends and start < ends[-1]) or full[:start] != prompt or full[start:end] != reply:
            return None
        starts.append(start)
        ends.append(end)
    return SequenceExample(full, list(turns), starts, ends)


def batch_count(sizes: Sequence[int], batch_size: int, min_items: int = 1) -> int:
    """Batches per epoch: ceil(turns / batch_size), as per-turn rows would make, but never so many that a batch
    would hold fewer than `min_items` sequences (one per process)."""
    return min(math.ceil(sum(sizes) / batch_size), len(sizes) // min_items)


def balanced_cut(order: list[int], sizes: Sequence[int], batches: int, min_items: int = 1) -> list[list[int]]:
    """`order` cut into exactly `batches` contiguous, non-empty runs of at least `min_items` items each, whose
    summed sizes come as close as the items allow to equal shares of the total (each cut goes to the item
    boundary nearest its share)."""
    n = len(order)
    if batches < 1 or n < batches * min_items:
        raise ValueError(f"cannot cut {n} items into {batches} batches of at least {min_items}")
    cumulative = [0]
    for i in order:
        cumulative.append(cumulative[-1] + sizes[i])
    total = cumulative[-1]
    out, start = [], 0
    for b in range(batches - 1):
        target = total * (b + 1) / batches
        end = start + min_items
        limit = n - (batches - 1 - b) * min_items  # enough items left for the batches still to cut
        while end < limit and abs(cumulative[end + 1] - target) <= abs(cumulative[end] - target):
            end += 1
        out.append(order[start:end])
        start = end
    out.append(order[start:])
    return out


def bucketed_batches(
    lengths: Sequence[int],
    sizes: Sequence[int],
    batch_size: int,
    generator: torch.Generator | None = None,
    min_items: int = 1,
    pool_batches: int = POOL_BATCHES,
) -> list[list[int]]:
    """Global batches of item indices: `batch_count(...)` of them, each about `batch_size` in `sizes` (turns).

    With a generator (training): a random permutation, sorted by `lengths` (tokens) within consecutive pools of
    about `pool_batches` batches (ascending and descending in turn, so the batch across a pool boundary joins
    similar lengths too), cut into balanced runs, and the batches put in a random order. Without (validation):
    every item sorted by length, cut, in that order; nothing is drawn.
    """
    n = len(lengths)
    count = batch_count(sizes, batch_size, min_items)
    if count < 1:
        return []
    if generator is None:
        order = sorted(range(n), key=lengths.__getitem__)
    else:
        permutation = torch.randperm(n, generator=generator).tolist()
        pool = max(1, round(pool_batches * n / count))
        order = []
        for p, start in enumerate(range(0, n, pool)):
            order.extend(sorted(permutation[start : start + pool], key=lengths.__getitem__, reverse=p % 2 == 1))
    batches = balanced_cut(order, sizes, count, min_items)
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


class BucketedBatchSampler(Sampler[list[int]]):
    """Length-bucketed global batches (`bucketed_batches`), each cut to this process's contiguous slice.

    Shuffled, every epoch draws one seed from torch's global RNG (as `RandomSampler` does), so a run seeded
    per step draws the same batches on every process, whatever their number: each global batch holds at least
    one sequence per process and each process keeps its slice (distributed/collectives.py: `shard_bounds`).
    Unshuffled (validation) the batches are fixed and nothing is drawn.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        sizes: Sequence[int],
        batch_size: int,
        shuffle: bool,
        rank_: int | None = None,
        world: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.lengths, self.sizes = list(lengths), list(sizes)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def global_batches(self) -> list[list[int]]:
        generator = None
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        return bucketed_batches(self.lengths, self.sizes, self.batch_size, generator, min_items=self.world)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            start, stop = shard_bounds(len(batch), self.rank, self.world)
            yield batch[start:stop]

    def __len__(self) -> int:
        return batch_count(self.sizes, self.batch_size, self.world)
