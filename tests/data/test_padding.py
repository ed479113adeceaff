"""data.padding: token-id lists to (ids, mask) batches, left- or right-aligned."""

from __future__ import annotations

import torch

from iterppo_lightning.data.padding import pad_left, pad_right


def test_pad_left_right_aligns_and_masks():
    ids, mask = pad_left([[1, 2, 3], [4], []], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_right_left_aligns_and_masks():
    ids, mask = pad_right([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
