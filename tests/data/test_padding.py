"""data.padding: token-id lists to (ids, mask) batches, left- or right-aligned, and the length groups that pad less."""

from __future__ import annotations

import pytest
import torch

from iterppo_lightning.data.padding import length_groups, pad_left, pad_right


def test_pad_left_right_aligns_and_masks():
    ids, mask = pad_left([[1, 2, 3], [4], []], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_right_left_aligns_and_masks():
    ids, mask = pad_right([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_groups_by_hand() -> None:
    # Prompt lengths 2, 9, 3, 8 (rows 0..3), no reply, call cost 5. Sorted: rows 0 (2), 2 (3), 3 (8), 1 (9).
    # Contiguous splits of that order, cost = sum of n_g * longest_g + 5 per group:
    #   one group                4 * 9 + 5             = 41
    #   {2, 3} {8, 9}            (2*3 + 5) + (2*9 + 5)  = 34   <- least
    #   {2, 3} {8} {9}           11 + 13 + 14          = 38
    #   {2} {3} {8, 9}           7 + 8 + 23            = 38
    #   {2} {3, 8, 9}            7 + (3*9 + 5)         = 39
    #   {2, 3, 8} {9}            (3*8 + 5) + 14        = 43
    #   singletons               22 + 4 * 5            = 42
    assert length_groups([2, 9, 3, 8], call_cost=5) == [[0, 2], [3, 1]]
    # A call cost of 0: padding is all that counts, so every length alone (2 + 3 + 8 + 9 = 22).
    assert length_groups([2, 9, 3, 8], call_cost=0) == [[0], [2], [3], [1]]
    # An infinite call cost: one group (the unsplit batch), in sorted order.
    assert length_groups([2, 9, 3, 8], call_cost=float("inf")) == [[0, 2, 3, 1]]


def test_length_groups_pad_prompt_and_reply_separately() -> None:
    # Row i = (prompt, reply): (5, 1), (1, 6), (5, 2); totals 6, 7, 7 -> sorted order 0, 1, 2 (tie by index).
    # Rows 1 and 2 have the same total but together need width max(1, 5) + max(6, 2) = 11, not 7.
    # call cost 3:  singletons (6+3) + (7+3) + (7+3) = 29 ; {0} {1, 2}: 9 + (2*11 + 3) = 34 ;
    #               {0, 1} {2}: (2*11 + 3) + 10 = 35 ; one group: 3*11 + 3 = 36      -> singletons
    assert length_groups([5, 1, 5], [1, 6, 2], call_cost=3) == [[0], [1], [2]]
    # call cost 10: singletons 20 + 30 = 50 ; {0} {1, 2}: 16 + 32 = 48 ; {0, 1} {2}: 32 + 17 = 49 ;
    #               one group: 33 + 10 = 43                                           -> one group
    assert length_groups([5, 1, 5], [1, 6, 2], call_cost=10) == [[0, 1, 2]]


def test_length_groups_ties_keep_the_smallest_last_group() -> None:
    # Two rows of 4 with call cost 0: one group 2*4 = 8 = singletons 4 + 4; the split found first
    # (last group = the last row alone) is kept.
    assert length_groups([4, 4], call_cost=0) == [[0], [1]]
    assert length_groups([4, 4], call_cost=1) == [[0, 1]]  # 8 + 1 < 4 + 1 + 4 + 1


def test_length_groups_cover_every_row_once_and_refuse_mismatched_lengths() -> None:
    lengths = [7, 1, 30, 12, 12, 3, 29, 8]
    groups = length_groups(lengths, [2, 0, 1, 5, 5, 9, 0, 3], call_cost=6)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert length_groups([], call_cost=1) == []
    with pytest.raises(ValueError):
        length_groups([1, 2], [1], call_cost=1)
