"""utils.seeding: every seed the project derives, unchanged from the formulas it replaced.

The expected values were computed with the helpers as they were before they were
folded into `derive_seed` / `hash_bits` / `derive_uniform` (hand-rolled sha256 in
the controller, the episode runner and the datamodule), so a run seeded before the
change draws the same customers, splits and bootstrap counts after it.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from iterppo_lightning.data.datamodule import bootstrap_count, in_validation
from iterppo_lightning.env.episodes import episode_seeds
from iterppo_lightning.utils.seeding import (
    derive_seed,
    derive_uniform,
    hash_bits,
    imagine_outcome_rng,
    ope_sample_rng,
    scripted_agent_rng,
    scripted_episode_seed,
    tiny_model_seed,
)

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
    assert [in_validation(c, 0.5, 0) for c in IDS] == [False, False, False, False]
    assert [in_validation(c, 0.2, 3) for c in IDS] == [False, False, False, True]


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


# The seeded streams and arithmetic seeds below were computed with the inline formulas they
# replaced (loop/bootstrap.py, env/scripted_agents.py, callbacks/off_policy_estimate.py,
# env/imagine.py), so moving them here changed no value.


def test_tiny_model_seed_is_unchanged():
    # was random.Random(seed).randrange(2**31) in loop.bootstrap.make_pi0
    assert [tiny_model_seed(s) for s in (0, 1, 7, 123)] == [1654615998, 577090037, 1390851128, 224899942]


def test_scripted_episode_seed_is_unchanged():
    # was scripted_agents.episode_seed: seed * 1_000_003 + index
    got = [scripted_episode_seed(s, i) for s, i in ((0, 0), (0, 5), (3, 2), (123, 99))]
    assert got == [0, 5, 3000011, 123000468]


def test_scripted_agent_rng_is_unchanged():
    # was random.Random(f"agent-{seed}") in scripted_agents.play_episode
    rngs = [scripted_agent_rng(s) for s in (0, 5, 1000003)]
    assert [[r.random() for _ in range(2)] for r in rngs] == [
        [0.5969287776619604, 0.14657205259246509],
        [0.4594198796661362, 0.13770796090229598],
        [0.44985262457177666, 0.2665039259833649],
    ]


def test_ope_sample_rng_is_unchanged():
    # was random.Random(iteration) in the off-policy estimate callback: the run seed plays no part
    assert [ope_sample_rng(k).sample(list(range(10)), 3) for k in (0, 1, 4)] == [[6, 9, 0], [2, 1, 4], [3, 4, 1]]


def test_imagine_outcome_rng_is_unchanged():
    # was random.Random(config.seed) in imagine.sample_outcomes
    rng = imagine_outcome_rng(3)
    assert [int(rng.random() < 0.5) for _ in range(8)] == [1, 0, 1, 0, 0, 1, 1, 0]


def test_scripted_measurement_is_unchanged():
    from iterppo_lightning.env.imagine import ImagineConfig, sample_outcomes
    from iterppo_lightning.env.sales_simulator import SalesSimulator, SimulatorConfig
    from iterppo_lightning.env.scripted_agents import BehaviourAgent, play_episode, run_agent

    config = SimulatorConfig(mode="agent")
    assert run_agent(BehaviourAgent(), config, 20, 3) == {"success_rate": 0.05, "mean_turns": 2.3, "episodes": 20}
    conv = play_episode(BehaviourAgent(), SalesSimulator(config), 12345, "x")
    digest = hashlib.sha256(json.dumps(conv.to_dict(), sort_keys=True).encode()).hexdigest()
    assert digest[:16] == "95e62d7fe9b659b9"
    assert sample_outcomes(ImagineConfig(seed=3), 8) == [1, 0, 1, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("bits", [0, 7, 264])
def test_hash_bits_refuses_a_width_it_cannot_give(bits):
    with pytest.raises(ValueError, match="bits"):
        hash_bits("x", bits=bits)
