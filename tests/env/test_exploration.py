"""Exploring starts in collection: at most one reply per conversation sampled at a higher temperature."""

from __future__ import annotations

import pytest
import torch

import iterppo_lightning.env.episodes as episodes
from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.env.episodes import Exploration, episode_seeds, run_episodes
from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.loop.config import LoopConfig


def _stub_suggest(calls: list):
    """Replaces the policy: records (conversation id, turn, temperature) and always asks for the need."""

    def suggest(model, tokenizer, conversations, *, temperature, **kwargs):
        calls.extend((c.conversation_id, len(c.turns) - 1, temperature) for c in conversations)
        return ["what are you looking for ?"] * len(conversations)

    return suggest


def test_an_explored_reply_is_sampled_at_the_exploration_temperature_once_per_conversation(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(episodes, "suggest", _stub_suggest(calls))
    explore = Exploration(prob=0.4, temperature=2.5, seed=7)
    conversations = run_episodes(
        None, None, SalesSimulator(), episode_seeds("collect", 0, 0, 64), exploration=explore, temperature=0.9
    )
    explored = {c.conversation_id: c.metadata.get("explored_turn") for c in conversations}
    hot = [(cid, turn) for cid, turn, t in calls if t == 2.5]
    assert all(t in (0.9, 2.5) for _, _, t in calls)
    # Every hot call is the one turn its conversation records, and no conversation explores twice.
    assert sorted(hot) == sorted((cid, turn) for cid, turn in explored.items() if turn is not None)
    assert len({cid for cid, _ in hot}) == len(hot)
    assert 10 < len(hot) < 64  # some conversations explore, not all (about 1 - 0.6^turns of them)


def test_probability_one_explores_every_first_reply(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(episodes, "suggest", _stub_suggest(calls))
    conversations = run_episodes(
        None, None, SalesSimulator(), episode_seeds("collect", 0, 0, 16), exploration=Exploration(1.0, 2.0, 0)
    )
    assert [c.metadata["explored_turn"] for c in conversations] == [0] * 16
    assert [t for _, turn, t in calls if turn > 0] == [1.0] * sum(1 for _, turn, _ in calls if turn > 0)


def test_the_explored_turn_depends_only_on_seed_conversation_and_turn() -> None:
    explore = Exploration(prob=0.3, temperature=2.0, seed=3)
    conversations = [Conversation(f"it0-{i}", [Turn("hi")]) for i in range(2000)]
    whole = explore.choose(conversations)
    chunks = [i + start for start in range(0, 2000, 128) for i in explore.choose(conversations[start : start + 128])]
    assert whole == chunks
    assert 0.27 < len(whole) / 2000 < 0.33
    assert whole != Exploration(prob=0.3, temperature=2.0, seed=4).choose(conversations)
    conversations[whole[0]].metadata["explored_turn"] = 0
    assert whole[0] not in explore.choose(conversations)  # at most one per conversation


def test_no_exploration_collects_exactly_what_it_did_before(tiny_model, tokenizer) -> None:
    seeds = episode_seeds("collect", 0, 0, 8)
    torch.manual_seed(0)
    plain = run_episodes(tiny_model, tokenizer, SalesSimulator(), seeds, max_new_tokens=6)
    torch.manual_seed(0)
    off = run_episodes(
        tiny_model, tokenizer, SalesSimulator(), seeds, max_new_tokens=6, exploration=Exploration(0, 2, 0)
    )
    assert plain == off


@pytest.mark.parametrize(("key", "value"), [("explore_prob", -0.1), ("explore_prob", 1.5), ("explore_temperature", 0)])
def test_bad_exploration_settings_are_refused_by_key(key, value) -> None:
    with pytest.raises(ValueError, match=f"model.loop.{key}"):
        LoopConfig(**{key: value})
