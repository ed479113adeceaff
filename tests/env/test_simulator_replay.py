"""Replaying logged simulated conversations from their seeds, and the hidden customers consistent with a state."""

from __future__ import annotations

import copy
import math

import pytest

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.episodes import episode_seeds, run_episodes
from iterppo_lightning.env.sales_simulator import (
    TOO_EXPENSIVE,
    Persona,
    SalesEpisode,
    SalesSimulator,
    SimulatorConfig,
    persona_prior,
)
from iterppo_lightning.env.scripted_agents import OptimalAgent, play_episode, recommend
from iterppo_lightning.env.simulator_replay import (
    ReplayMismatch,
    draw_persona,
    episode_seed,
    posterior_personas,
    replay,
)

AGENT_MODE = SimulatorConfig(mode="agent")  # the business sends every suggestion: no business noise in the states


def same_turns(episode: SalesEpisode, logged: Conversation, turn: int) -> bool:
    return episode.conversation.turns[: turn + 1] == [
        *logged.turns[:turn],
        type(logged.turns[turn])(customer=logged.turns[turn].customer, outcome=logged.turns[turn].outcome),
    ]


def test_replay_reproduces_every_state_of_scripted_conversations(conversations) -> None:
    states = 0
    for conversation in conversations:
        for turn in conversation.agent_turns:
            episode = replay(SimulatorConfig(), conversation, turn)
            assert same_turns(episode, conversation, turn)
            assert not episode.done and episode.persona.to_dict() == conversation.metadata["persona"]
            states += 1
    assert states > 100


def test_replay_reproduces_conversations_a_policy_collected(tiny_model, tokenizer) -> None:
    # A (random) tiny model writes free text: edits, rejects and nonsense all replay exactly.
    collected = run_episodes(
        tiny_model, tokenizer, SalesSimulator(), episode_seeds("collect", 0, 0, 8), max_new_tokens=8
    )
    for conversation in collected:
        for turn in conversation.agent_turns:
            assert same_turns(replay(SimulatorConfig(), conversation, turn), conversation, turn)


def test_a_changed_log_or_simulator_is_refused(conversations) -> None:
    conversation = copy.deepcopy(next(c for c in conversations if len(c.agent_turns) >= 3))
    last = conversation.agent_turns[-1]
    conversation.turns[1].customer = "i want a flying car ."
    with pytest.raises(ReplayMismatch, match=r"turn 1 customer message .* != logged 'i want a flying car \.'"):
        replay(SimulatorConfig(), conversation, last)
    replay(SimulatorConfig(), conversation, 0)  # the state before the change is still reproduced

    # The business edited or rejected a suggestion: in agent mode it would have sent it as it was.
    touched = next(
        c for c in conversations if any(t.business_action in ("edit", "reject") for t in c.turns[:-1] if t.suggestion)
    )
    with pytest.raises(ReplayMismatch, match="model.environment"):
        replay(AGENT_MODE, touched, touched.agent_turns[-1])


def test_only_simulated_agent_turns_can_be_replayed(conversations) -> None:
    conversation = copy.deepcopy(conversations[0])
    with pytest.raises(ValueError, match="not a state the agent acted in"):
        replay(SimulatorConfig(), conversation, len(conversation.turns) - 1)  # the terminal turn
    del conversation.metadata["seed"]
    with pytest.raises(ValueError, match="records no simulator seed"):
        episode_seed(conversation)


def test_persona_prior_lists_every_persona_once_with_its_probability() -> None:
    prior = persona_prior(SimulatorConfig(price_sensitive_prob=0.3))
    # 4 needs x 3 budgets x 2 sensitivities x 3 patiences x 5 styles
    assert len(prior) == 360
    assert len({tuple(p.to_dict().values()) for p, _ in prior}) == 360
    assert sum(w for _, w in prior) == pytest.approx(1.0)
    # a price-sensitive persona: 0.3 / (4 * 3 * 3 * 5)
    assert {round(w, 12) for p, w in prior if p.price_sensitive} == {round(0.3 / 180, 12)}
    assert len(persona_prior(SimulatorConfig(price_sensitive_prob=0.0))) == 180  # impossible personas are left out


def test_another_persona_keeps_the_seeds_business_and_opening() -> None:
    own = SalesEpisode(SimulatorConfig(), 7, "a")
    other = SalesEpisode(SimulatorConfig(), 7, "b", Persona("phone", "basic", True, 5, 0))
    assert other.persona.need == "phone" and other.patience == 5
    assert other.conversation.turns[0].customer == own.conversation.turns[0].customer
    for _ in range(3):
        own.step("thanks for stopping by .")
        other.step("thanks for stopping by .")
    assert [(t.sent, t.business_action) for t in own.conversation.turns[:3]] == [
        (t.sent, t.business_action) for t in other.conversation.turns[:3]
    ]


def test_forks_with_one_seed_play_the_same_continuation(conversations) -> None:
    conversation = next(c for c in conversations if len(c.agent_turns) >= 2)
    base = replay(SimulatorConfig(), conversation, 1)
    first, second, deep = base.fork(123), base.fork(123), copy.deepcopy(base)
    while not first.done:
        move = OptimalAgent().act(first.conversation, None)
        first.step(move)
        second.step(move)
    assert second.done and first.conversation.turns == second.conversation.turns
    assert first.persona == base.persona and first.conversation.turns[:1] == base.conversation.turns[:1]
    assert first.conversation.turns[1].customer == base.conversation.turns[1].customer
    # The forks left the episode they came from as it was.
    assert base.conversation.turns == deep.conversation.turns and base.patience == deep.patience
    assert not base.done and base.conversation.turns[1].suggestion is None
    # Another seed: other streams (the business draws differ within a few steps).
    others = [base.fork(seed) for seed in range(20)]
    for episode in others:
        episode.step("thanks for stopping by .")
    assert len({(e.conversation.turns[1].business_action, e.conversation.turns[1].sent) for e in others}) > 1


def optimal_conversation(seed: int, config: SimulatorConfig = AGENT_MODE) -> Conversation:
    return play_episode(OptimalAgent(), SalesSimulator(config), seed, f"opt-{seed}")


def test_posterior_at_the_opening_is_the_prior() -> None:
    posterior = posterior_personas(AGENT_MODE, optimal_conversation(3), 0)
    assert len(posterior) == 360
    assert all(w == pytest.approx(1 / 360) for _, w in posterior)


def test_posterior_once_need_and_budget_are_known() -> None:
    conversation = optimal_conversation(3)
    truth = conversation.metadata["persona"]
    # Turn 1: the need phrase fixes the need and (its template) the style; budget, sensitivity, patience are open.
    after_need = posterior_personas(AGENT_MODE, conversation, 1)
    assert len(after_need) == 3 * 2 * 3
    assert {(p.need, p.style) for p, _ in after_need} == {(truth["need"], truth["style"])}
    assert all(w == pytest.approx(1 / 18) for _, w in after_need)
    # Turn 2: the budget too. Left: price sensitivity (prior 0.3) x patience 3..5 (all still there after 2 messages).
    config = SimulatorConfig(mode="agent", price_sensitive_prob=0.3)
    conversation = optimal_conversation(3, config)
    both = posterior_personas(config, conversation, 2)
    assert {(p.need, p.budget, p.style) for p, _ in both} == {(truth["need"], truth["budget"], truth["style"])}
    weights = sorted((p.price_sensitive, p.patience, round(w, 9)) for p, w in both)
    assert weights == [(False, n, round(0.7 / 3, 9)) for n in (3, 4, 5)] + [(True, n, round(0.1, 9)) for n in (3, 4, 5)]


def test_posterior_reads_too_expensive_and_patience() -> None:
    # A price-sensitive customer with patience >= 4, offered the right product without a discount at turn 2.
    seed = next(
        s for s in range(200) if (p := SalesEpisode(AGENT_MODE, s, "x").persona).price_sensitive and p.patience >= 4
    )
    episode = SalesEpisode(AGENT_MODE, seed, "x")
    persona = episode.persona
    for move in (OptimalAgent.ASK_NEED, OptimalAgent.ASK_BUDGET, recommend(persona.budget, persona.need, False)):
        episode.step(move)
    conversation = episode.conversation
    conversation.metadata["seed"] = seed
    assert conversation.turns[3].customer == TOO_EXPENSIVE and not episode.done
    posterior = posterior_personas(AGENT_MODE, conversation, 3)
    # Sensitive for sure; three messages cost 3, so a patience of 3 would have left: 4 or 5, equally likely.
    assert sorted((p.price_sensitive, p.patience) for p, _ in posterior) == [(True, 4), (True, 5)]
    assert [w for _, w in posterior] == pytest.approx([0.5, 0.5])
    assert persona in [p for p, _ in posterior]


def test_draw_persona_is_the_inverse_cdf() -> None:
    a, b, c = (Persona("laptop", t, False, 3, 0) for t in ("basic", "standard", "premium"))
    posterior = [(a, 0.2), (b, 0.5), (c, 0.3)]
    # cumulative 0.2, 0.7, 1.0
    assert [draw_persona(posterior, u) for u in (0.0, 0.19, 0.2, 0.69, 0.7, 0.999999)] == [a, a, b, b, c, c]
    assert draw_persona([(a, 0.5), (b, 0.5 - 1e-12)], 1 - 1e-13) == b  # rounding never falls off the end
    assert not math.isnan(sum(w for _, w in posterior))
