"""Single-process pieces of the multi-process path: batch sharding and per-reply sampling seeds."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from iterppo_lightning.distributed.collectives import ShardedBatchSampler, global_offset, global_share, shard_bounds
from iterppo_lightning.models.generation import sample_responses


def test_one_process_draws_exactly_the_batches_a_shuffled_dataloader_draws():
    data = list(range(37))
    torch.manual_seed(3)
    plain = [b.tolist() for b in DataLoader(data, batch_size=8, shuffle=True)]
    torch.manual_seed(3)
    sharded = [b.tolist() for b in DataLoader(data, batch_sampler=ShardedBatchSampler(RandomSampler(data), 8, 0, 1))]
    assert sharded == plain


def test_ranks_split_every_global_batch_contiguously_and_cover_it():
    sampler = list(range(21))  # global batches of 8, 8, 5
    shards = [list(ShardedBatchSampler(sampler, 8, r, 3)) for r in range(3)]
    glued = [sum((shards[r][b] for r in range(3)), []) for b in range(3)]
    assert glued == [b for b in BatchSampler(sampler, 8, drop_last=False)]
    assert [len(b) for b in shards[0]] == [3, 3, 2] and [len(b) for b in shards[2]] == [2, 2, 1]
    assert all(len(s) == 3 for s in (ShardedBatchSampler(sampler, 8, r, 3) for r in range(3)))


def test_a_final_batch_smaller_than_the_world_is_dropped_not_left_empty_on_a_rank():
    shards = [list(ShardedBatchSampler(list(range(9)), 8, r, 2)) for r in range(2)]
    assert shards == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert len(ShardedBatchSampler(list(range(9)), 8, 0, 2)) == 1


def test_shard_bounds_partition_the_range():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_single_process_helpers_are_identities():
    assert global_share(5) is None
    assert global_offset(7) == (0, 7)


def test_per_reply_seeds_make_a_reply_independent_of_its_batch():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_embd=32, n_head=2, n_positions=64)).eval()
    prompts = torch.randint(2, 50, (4, 6))
    mask = torch.ones_like(prompts)
    seeds = [11, 12, 13, 14]
    together, _ = sample_responses(model, prompts, mask, 1, 0, 8, reply_seeds=seeds)
    torch.manual_seed(123)  # the global stream plays no part
    halves = [
        sample_responses(model, prompts[i : i + 2], mask[i : i + 2], 1, 0, 8, reply_seeds=seeds[i : i + 2])[0]
        for i in (0, 2)
    ]
    for i, half in enumerate(halves):
        length = min(half.shape[1], together.shape[1])
        assert torch.equal(half[:, :length], together[2 * i : 2 * i + 2, :length])
    other, _ = sample_responses(model, prompts, mask, 1, 0, 8, reply_seeds=[21, 22, 23, 24])
    assert not torch.equal(other, together)
