"""utils.seeding: every seed the project derives, unchanged from the formulas it replaced.

The expected values were computed with the helpers as they were before they were
folded into `derive_seed` / `hash_bits` / `derive_uniform` (hand-rolled sha256 in
the controller, the episode runner and the datamodule), so a run seeded before the
change draws the same customers, splits and bootstrap counts after it.
"""

from __future__ import annotations

import hashlib

import pytest

from iterppo_lightning.data.datamodule import _in_validation, bootstrap_count
from iterppo_lightning.env.episodes import episode_seeds
from iterppo_lightning.utils.seeding import derive_seed, derive_uniform, hash_bits

IDS = ["c0", "pi_1-0-17", "behaviour-3-99", "x"]


def test_step_seeds_are_unchanged():
    # was controller.step_seed(seed, iteration, step)
    got = [derive_seed(0, -1, "bootstrap"), derive_seed(0, 0, "collect"), derive_seed(7, 3, "policy")]
    assert got + [derive_seed(123, 1, "iteration_end")] == [1840503948, 775677470, 1132857076, 555831028]


def test_episode_seeds_are_unchanged():
    assert episode_seeds("collect", 0, 1, 4) == [541096898, 1933482268, 457474674, 2004918897]
    assert episode_seeds("eval", 5, 0, 3) == [1980787812, 1841699219, 1202176949]
    assert episode_seeds("imagine", 0, 0, 2) == [1008623248, 779023951]


def test_validation_split_is_unchanged():
    fractions = [hash_bits(0, c, bits=64) / 2**64 for c in IDS]
    assert fractions == [0.5356021687661285, 0.5307520853760879, 0.5718367124777117, 0.8586095062719348]
    assert [_in_validation(c, 0.5, 0) for c in IDS] == [False, False, False, False]
    assert [_in_validation(c, 0.2, 3) for c in IDS] == [False, False, False, True]


def test_bootstrap_counts_are_unchanged():
    assert [[bootstrap_count(c, m, 0) for c in IDS] for m in range(3)] == [[0, 0, 0, 2], [1, 2, 2, 1], [0, 0, 3, 2]]
    assert [[bootstrap_count(c, m, 11) for c in IDS] for m in range(3)] == [[2, 2, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1]]
    draws = [derive_uniform(0, "bootstrap", m, c) for c in IDS[:2] for m in range(2)]
    assert draws == [0.09185206454781625, 0.5975497172477012, 0.22055419920691632, 0.8969491117944306]


def test_hash_bits_is_the_sha256_prefix_of_the_joined_parts():
    digest = hashlib.sha256(b"3:a:-1").digest()
    assert hash_bits(3, "a", -1, bits=32) == int.from_bytes(digest[:4], "big")
    assert hash_bits(3, "a", -1, bits=64) == int.from_bytes(digest[:8], "big")


def test_derived_values_are_in_range():
    seeds = [derive_seed("ns", i) for i in range(200)]
    assert all(0 <= s < 2**31 for s in seeds) and len(set(seeds)) == len(seeds)
    assert all(0.0 <= derive_uniform("u", i) < 1.0 for i in range(200))


@pytest.mark.parametrize("bits", [0, 7, 264])
def test_hash_bits_refuses_a_width_it_cannot_give(bits):
    with pytest.raises(ValueError, match="bits"):
        hash_bits("x", bits=bits)
