"""Padding token-id lists into a batch (ids and attention mask, torch only), and length groups that pad less.

Kept apart from the datamodule (Lightning, datasets) so that the pure functions
of `rl/`, the samplers of `models/` and the benchmarks can pad without importing them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["length_groups", "pad_left", "pad_right"]


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (len(seqs), longest): each sequence right-aligned after `pad_id`s (generation prompts)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (len(seqs), longest): each sequence left-aligned, then `pad_id`s."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    return ids, mask


def length_groups(
    prompt_lengths: Sequence[int], reply_lengths: Sequence[int] | None = None, call_cost: float = 0.0
) -> list[list[int]]:
    """Split rows into groups whose forward passes are each padded only to the group's own width.

    Row ``i`` holds ``prompt_lengths[i]`` real prompt tokens (left-padded) and
    ``reply_lengths[i]`` real reply tokens (right-padded; ``None``: no reply).
    A group ``g`` of ``n_g`` rows, laid out ``[prompt | reply]`` and trimmed
    to its longest prompt ``Pmax_g`` and longest reply ``Rmax_g``, costs
    ``n_g * (Pmax_g + Rmax_g) + call_cost`` positions, ``call_cost`` being the
    fixed cost of one more model call (Python dispatch, per-op overhead)
    counted in positions. Rows are sorted by total length (ties: by index) and
    the contiguous split of that order with the least total cost is found by
    dynamic programming (``O(B^2)``); ties keep the split found first, i.e.
    the fewest rows in the last group.

    Returns the groups as lists of row indices, shortest group first, each
    ascending by total length; every row is in exactly one group. With
    ``call_cost = inf`` it is one group (the unsplit, fully padded batch).

    Why: a batch left-padded to its longest prompt computes every pad
    position; the statistics PPO takes over the batch do not depend on how
    its rows are grouped for the forward passes, only the padding does.
    """
    n = len(prompt_lengths)
    if reply_lengths is None:
        reply_lengths = [0] * n
    if len(reply_lengths) != n:
        raise ValueError(f"{len(reply_lengths)} reply lengths for {n} prompt lengths")
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (prompt_lengths[i] + reply_lengths[i], i))
    if call_cost == float("inf"):
        return [order]
    prompts = [int(prompt_lengths[i]) for i in order]
    replies = [int(reply_lengths[i]) for i in order]
    # best[j]: least cost of the first j sorted rows; start[j]: where its last group starts.
    best = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        p_max = r_max = 0
        for i in range(j - 1, -1, -1):  # last group = sorted rows i .. j-1
            p_max = max(p_max, prompts[i])
            r_max = max(r_max, replies[i])
            cost = best[i] + (j - i) * (p_max + r_max) + call_cost
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[start[j] : j])
        j = start[j]
    return groups[::-1]
