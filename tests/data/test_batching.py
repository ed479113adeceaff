"""data/batching.py: conversation sequences, balanced cuts, length-bucketed batches and their per-process slices."""

from __future__ import annotations

import math
import random

import pytest
import torch

from iterppo_lightning.data.batching import (
    BucketedBatchSampler,
    SequenceExample,
    balanced_cut,
    batch_count,
    bucketed_batches,
    conversation_sequence,
    group_pairs,
)


def _padding(batches: list[list[int]], lengths: list[int]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return computed / real


def _data(n: int = 600, seed: int = 0) -> tuple[list[int], list[int]]:
    """Sequence lengths and turn counts shaped like conversations: more turns, more tokens."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 6) for _ in range(n)]
    return [18 * s + rng.randint(0, 30) for s in sizes], sizes


# -- conversation sequences -----------------------------------------------------------------------------------


def test_a_conversation_is_one_sequence_only_when_every_turn_is_a_prefix():
    prompts = [[1, 2], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]]
    replies = [[3, 4], [6], [8, 9]]
    seq = conversation_sequence(prompts, replies, ["t0", "t1", "t2"])
    assert seq.input_ids == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert (seq.reply_starts, seq.reply_ends) == ([2, 5, 7], [4, 6, 9])
    for prompt, reply, start, end in zip(prompts, replies, seq.reply_starts, seq.reply_ends):
        assert seq.input_ids[:end] == prompt + reply and seq.input_ids[start:end] == reply
    # A state that renders an earlier reply differently (a chat template writing the message sent): no sequence.
    assert conversation_sequence([[1, 2], [1, 2, 7, 4, 5]], [[3, 4], [6]], ["t0", "t1"]) is None
    # Replies that would overlap the next state: no sequence either.
    assert conversation_sequence([[1, 2], [1, 2, 3]], [[3, 4], [4, 5]], ["t0", "t1"]) is None


def test_restricted_keeps_the_chosen_turns_and_cuts_after_the_last():
    seq = conversation_sequence([[1], [1, 2, 3], [1, 2, 3, 4, 5]], [[2], [4], [6]], ["a", "b", "c"])
    first_two = seq.restricted(lambda t: t in ("a", "b"))
    assert first_two.input_ids == [1, 2, 3, 4] and first_two.turns == ["a", "b"]
    middle = seq.restricted(lambda t: t == "b")
    assert (middle.input_ids, middle.reply_starts, middle.reply_ends) == ([1, 2, 3, 4], [3], [4])
    assert seq.restricted(lambda t: True) is seq
    assert seq.restricted(lambda t: False) is None


# -- cuts and buckets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8, 32])
@pytest.mark.parametrize("min_items", [1, 2, 3])
def test_balanced_cut_gives_exactly_the_counted_batches_each_item_once(batch_size, min_items):
    lengths, sizes = _data(97)
    count = batch_count(sizes, batch_size, min_items)
    assert count == min(math.ceil(sum(sizes) / batch_size), len(sizes) // min_items)
    order = list(range(len(sizes)))[::-1]
    batches = balanced_cut(order, sizes, count, min_items)
    assert len(batches) == count and all(len(b) >= min_items for b in batches)
    assert [i for b in batches for i in b] == order  # contiguous runs of the order, each item once
    if count == math.ceil(sum(sizes) / batch_size):  # not limited by min_items: about batch_size turns each
        turns = [sum(sizes[i] for i in b) for b in batches]
        assert max(turns) <= batch_size + max(sizes) and sum(turns) / len(turns) <= batch_size


def test_bucketed_batches_hold_every_item_once_with_little_padding():
    lengths, sizes = _data()
    plain = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    unsorted = balanced_cut(plain, sizes, batch_count(sizes, 32))
    for generator in (torch.Generator().manual_seed(1), None):
        batches = bucketed_batches(lengths, sizes, 32, generator)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert len(batches) == math.ceil(sum(sizes) / 32)
        assert _padding(batches, lengths) <= 1.2 < _padding(unsorted, lengths)


def test_shuffled_batches_are_a_function_of_the_seed():
    lengths, sizes = _data()

    def draw(seed):
        return bucketed_batches(lengths, sizes, 16, torch.Generator().manual_seed(seed))

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    # Not one fixed set of batches in another order: which sequences share a batch changes too.
    assert {tuple(sorted(b)) for b in draw(3)} != {tuple(sorted(b)) for b in draw(4)}
    assert bucketed_batches(lengths, sizes, 16) == bucketed_batches(lengths, sizes, 16)  # validation: fixed


def test_sampler_draws_from_torchs_seeded_rng_and_every_rank_gets_its_slice():
    lengths, sizes = _data(200)

    def epoch(rank_, world, seed):
        torch.manual_seed(seed)
        sampler = BucketedBatchSampler(lengths, sizes, 24, shuffle=True, rank_=rank_, world=world)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        return batches

    single = epoch(0, 1, 5)
    assert single == epoch(0, 1, 5) and single != epoch(0, 1, 6)
    for world in (2, 3):
        shards = [epoch(r, world, 5) for r in range(world)]
        assert all(len(s) == len(single) for s in shards)
        for step, global_batch in enumerate(single):
            slices = [s[step] for s in shards]
            assert all(slices)  # no rank without data
            assert [i for part in slices for i in part] == global_batch  # the same global batch, cut in order


def test_sampler_never_leaves_a_rank_without_a_sequence():
    # Two long conversations of 10 turns each and a batch of 4 turns: as many batches as the ranks allow.
    sampler = lambda r: BucketedBatchSampler([50, 60, 70], [10, 10, 1], 4, shuffle=False, rank_=r, world=2)  # noqa: E731
    assert len(sampler(0)) == 1
    assert [b for r in range(2) for b in sampler(r)] == [[0, 1], [2]]  # the first ranks get the extra row
    assert list(BucketedBatchSampler([50], [3], 4, shuffle=False, rank_=0, world=2)) == []  # fewer rows than ranks


def test_single_turn_sequence_is_the_per_turn_row():
    class Turn:
        prompt_ids, action_ids = [5, 6, 7], [8, 9]

    seq = SequenceExample.single_turn(Turn())
    assert (seq.input_ids, seq.reply_starts, seq.reply_ends) == ([5, 6, 7, 8, 9], [3], [5])


def test_group_pairs_keeps_both_turns_of_each_pair_in_one_group():
    turns = [object() for _ in range(6)]  # stand-ins for TurnExamples: matched by identity
    s0 = SequenceExample([1, 2, 3, 4], [turns[0], turns[1]], [1, 3], [2, 4])  # a conversation row, two turns
    s1 = SequenceExample([1, 5], [turns[2]], [1], [2])
    s2 = SequenceExample([1, 2, 3, 6, 7], [turns[3]], [3], [5])
    s3 = SequenceExample([9], [turns[4]], [0], [1])
    # turns[1] pairs with turns[2], turns[2] with turns[3] (joining s0, s1, s2); turns[5] is in no sequence.
    pairs = [(turns[1], turns[2]), (turns[3], turns[2]), (turns[4], turns[5])]
    groups = group_pairs([s0, s3, s1, s2], pairs)
    assert [g.sequences for g in groups] == [[s0, s1, s2], [s3]]
    assert groups[0].pairs == pairs[:2] and groups[1].pairs == []
    assert (groups[0].length, len(groups[0].turns)) == (5, 4)
    assert [g.sequences for g in group_pairs([s0, s1], [])] == [[s0], [s1]]
