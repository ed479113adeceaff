"""The critic probe (loop/critic_probe.py) on scripted conversations with a tiny pi_k and fake critics.

An oracle critic, one that returns each reply's true value, must score a perfect probe; a constant one has no
spread; the same seed gives the same numbers. The metrics' maths is hand-checked in tests/rl/test_probe_metrics.py,
the replay in tests/env/test_simulator_replay.py, the loop and the command end to end in
tests/commands/test_probe_critic.py.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from iterppo_lightning.env.reply_parser import parse_reply
from iterppo_lightning.env.sales_simulator import SimulatorConfig
from iterppo_lightning.env.simulator_replay import ReplayMismatch
from iterppo_lightning.loop import critic_probe as cp
from iterppo_lightning.loop.config import CriticProbeConfig, LoopConfig
from iterppo_lightning.loop.variants import check_variant_settings

SETTINGS = CriticProbeConfig(states=8, continuations=4, policy_samples=2, seed=3)


class TableCritic(nn.Module):
    """Q(s, a) from a table of token rows (unknown rows: `default`); records every row it is asked about."""

    def __init__(self, table: dict[tuple[int, ...], float] | None = None, default: float = 0.5):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # score_pairs reads the device from a parameter
        self.table = table or {}
        self.default = default
        self.rows: list[tuple[int, ...]] = []

    def q_mean(self, ids: torch.Tensor, mask: torch.Tensor, reply_starts=None) -> torch.Tensor:
        rows = [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)]
        self.rows += rows
        return torch.tensor([self.table.get(r, self.default) for r in rows], dtype=torch.float64)


def context(**overrides) -> cp.ProbeContext:
    values = dict(simulator=SimulatorConfig(), gamma=0.9, run_seed=0, iteration=0, max_new_tokens=8)
    return cp.ProbeContext(**{**values, **overrides})


def probe(critic, tiny_model, tokenizer, conversations, settings=SETTINGS, monkeypatch=None, **ctx):
    """The probe's record; with `monkeypatch`, also the scored states (the candidates and their returns)."""
    seen = {}
    if monkeypatch is not None:
        real = cp.summarize

        def keep(states, settings, context):
            seen["states"] = states
            return real(states, settings, context)

        monkeypatch.setattr(cp, "summarize", keep)
    record = cp.run_critic_probe(critic, tiny_model, tokenizer, conversations, settings, context(**ctx))
    return record, seen.get("states")


@pytest.fixture()
def first_pass(tiny_model, tokenizer, conversations, monkeypatch):
    """One probe with a recording critic: the rows it scored, in order, and the states with their true values."""
    recorder = TableCritic()
    record, states = probe(recorder, tiny_model, tokenizer, conversations, monkeypatch=monkeypatch)
    return SimpleNamespace(record=record, states=states, rows=recorder.rows)


def test_the_probe_covers_every_stage_and_the_canonical_moves(first_pass) -> None:
    record, states = first_pass.record, first_pass.states
    assert record["states"] == 8 and record["stages"] == {"nothing": 2, "need": 2, "budget": 2, "need+budget": 2}
    for st in states:
        assert st.moves[:6] == [
            "ask_need",
            "ask_budget",
            "recommend_discount",
            "recommend",
            "discount_only",
            "small_talk",
        ]
        assert len(set(st.texts)) == len(st.texts)  # no reply twice
        assert all(len(r) == 4 for r in st.returns) and all(0 <= g <= 1 for r in st.returns for g in r)
    # The decisive state, need and budget known: the right product with a discount wins whatever the customer.
    decisive = record["discount_decision"]
    assert decisive["states"] == 2 and decisive["true_a"] >= decisive["true_b"]
    assert record["candidates"] == sum(len(st.texts) for st in states) == len(first_pass.rows)
    assert record["continuations"] == 4 and record["persona"] == "posterior"
    assert 0 <= record["true_se"] <= 0.5


def test_an_oracle_critic_scores_a_perfect_probe(first_pass, tiny_model, tokenizer, conversations) -> None:
    truths = [cp.pm.mean(r) for st in first_pass.states for r in st.returns]
    oracle = TableCritic(dict(zip(first_pass.rows, truths)))
    record, _ = probe(oracle, tiny_model, tokenizer, conversations)
    assert oracle.rows == first_pass.rows  # the same states and candidates: the probe is seeded
    assert record["corr_states"] >= 4 and record["pairs"] >= 10
    assert record["within_state_corr"] == pytest.approx(1.0)
    assert record["pairwise_acc"] == 1.0
    assert record["spread_ratio"] == pytest.approx(1.0)
    assert record["bias"] == pytest.approx(0.0, abs=1e-12) and record["mae"] == pytest.approx(0.0, abs=1e-12)
    assert record["within_state_error"] == pytest.approx(0.0, abs=1e-12)
    for decision in cp.DECISIONS:
        if record[decision]["states"]:
            assert record[decision]["q_diff"] == pytest.approx(record[decision]["true_diff"]), decision
    assert record["category_decision"]["states"] > 0  # scripted conversations reveal the need
    own = record["policy_samples_only"]
    assert own["pairs"] == 0 or own["pairwise_acc"] == 1.0


def test_a_constant_critic_has_no_spread(first_pass) -> None:
    record = first_pass.record  # the recording critic says 0.5 everywhere
    assert record["spread_ratio"] == 0.0 and record["q_spread"] == 0.0 and record["true_spread"] > 0
    assert record["within_state_corr"] == 0.0  # no ranking information
    assert record["pairwise_acc"] == 0.5  # every pair a tie
    assert record["mean_q"] == 0.5 and record["bias"] == pytest.approx(0.5 - record["mean_true"])
    # Q - V = 0.5 - V: its spread within a state is the truth's own.
    assert record["within_state_error"] == pytest.approx(record["true_spread"])


def test_the_same_seed_gives_the_same_numbers(first_pass, tiny_model, tokenizer, conversations) -> None:
    again, _ = probe(TableCritic(), tiny_model, tokenizer, conversations, batch_size=5)  # other batches too
    assert again == first_pass.record
    other, _ = probe(TableCritic(), tiny_model, tokenizer, conversations, replace(SETTINGS, seed=4))
    assert other != first_pass.record


def test_logged_persona_continuations(tiny_model, tokenizer, conversations, monkeypatch) -> None:
    settings = replace(SETTINGS, persona="logged", states=4)
    record, states = probe(TableCritic(), tiny_model, tokenizer, conversations, settings, monkeypatch)
    assert record["persona"] == "logged" and record["states"] == 4
    # With the logged customer, the right product with a discount at a need+budget state buys at once unless the
    # business rejects the suggestion: a return of 1 (gamma^0) in most continuations.
    for st in states:
        if st.stage == "need+budget":
            assert cp.pm.mean(st.returns[st.moves.index("recommend_discount")]) >= 0.5


def test_a_log_the_simulator_does_not_reproduce_is_refused(tiny_model, tokenizer, conversations) -> None:
    tampered = copy.deepcopy(conversations)
    for conversation in tampered:
        conversation.turns[0].customer = "good day ."
    with pytest.raises(ReplayMismatch, match="customer message"):
        probe(TableCritic(), tiny_model, tokenizer, tampered)
    unseeded = copy.deepcopy(conversations[:3])
    for conversation in unseeded:
        conversation.metadata.pop("seed")
    with pytest.raises(ValueError, match="records no simulator seed"):
        probe(TableCritic(), tiny_model, tokenizer, unseeded)


def test_canonical_moves_use_what_the_customer_revealed(conversations) -> None:
    rng = random.Random(0)
    for conversation in conversations:
        for turn in conversation.agent_turns:
            moves = dict(cp.canonical_moves(conversation, turn, rng))
            if cp.state_stage(conversation, turn) == "need+budget":
                persona = conversation.metadata["persona"]
                assert (
                    moves["recommend_discount"]
                    == f"how about the {persona['budget']} {persona['need']} ? i can give you 10 % off ."
                )
                assert moves["recommend"] == f"how about the {persona['budget']} {persona['need']} ?"
                assert parse_reply(moves["wrong_product"]).product[1] != persona["need"]


def test_settings_are_checked() -> None:
    for bad, match in (
        ({"states": 0}, "states must be >= 1"),
        ({"continuations": 1}, "continuations must be >= 2"),
        ({"policy_samples": -1}, "policy_samples must be >= 0"),
        ({"pair_threshold": 1.0}, r"pair_threshold must be in \[0, 1\)"),
        ({"persona": "random"}, "persona must be one of"),
    ):
        with pytest.raises(ValueError, match=f"model.loop.critic_probe.{match}"):
            CriticProbeConfig(**bad)


@pytest.mark.parametrize(
    ("logs", "llm_customer", "algorithm", "named"),
    [
        ("logs.jsonl", None, "iterative_ppo", "data.logs"),
        (None, object(), "iterative_ppo", "LLM customer"),
        (None, None, "filtered_bc", "fits no critic"),
    ],
)
def test_the_probe_is_refused_without_a_simulated_ground_truth(logs, llm_customer, algorithm, named) -> None:
    loop = LoopConfig(critic_probe=CriticProbeConfig())
    system = SimpleNamespace(loop=loop, llm_customer=llm_customer, algorithm=algorithm)
    datamodule = SimpleNamespace(logs=logs, pool_weights=[1.0])
    with pytest.raises(ValueError, match=f"model.loop.critic_probe .*{named}"):
        check_variant_settings(system, datamodule)
    loop.critic_probe = None
    check_variant_settings(system, datamodule)  # off: nothing to refuse


def test_nan_free_record_is_json_ready(first_pass) -> None:
    flat = [v for v in first_pass.record.values() if isinstance(v, float)]
    assert flat and all(math.isfinite(v) for v in flat)


def test_policy_samples_only_ranks_pi_k_replies_alone() -> None:
    """A critic right about pi_k's replies and wrong about a canonical move pi_k never writes: the all-candidates
    numbers are hurt, the pi_k-only ones are perfect (hand-worked: one state, three samples, one canonical move)."""
    returns = [[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]  # true values 0, 1, 0.5 (pi_k) and 0 (wrong product)
    moves = ["policy", "policy", "policy", "wrong_product"]
    state = cp._State(None, 0, "need", moves, ["a", "b", "c", "d"], [], returns)
    state.q = [0.1, 0.9, 0.5, 0.95]  # ranks pi_k's three right, the wrong product first
    record = cp.summarize([state], SETTINGS, context())
    own = record["policy_samples_only"]
    assert own["within_state_corr"] == pytest.approx(1.0)
    assert own["pairwise_acc"] == 1.0 and own["pairs"] == 3  # |dV| 1, 0.5, 0.5 all above the 0.1 threshold
    assert record["pairwise_acc"] == pytest.approx(3 / 5)  # + (b, d) wrong, (c, d) wrong; (a, d) has dV 0
    assert record["within_state_corr"] < 0.5
