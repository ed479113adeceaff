"""The environment protocol's adapter: the records it builds, the errors it names, and the simulator behind it."""

from __future__ import annotations

import pytest
from guess_env import NumberGuess

from iterppo_lightning.env.protocol import (
    EnvironmentClassConfig,
    ProtocolEnvironment,
    SalesCustomer,
    read_environment_class,
    resolve_class,
)
from iterppo_lightning.env.sales_simulator import SalesSimulator, SimulatorConfig
from iterppo_lightning.env.scripted_agents import BehaviourAgent, play_episode


def play(environment, seed: int, messages: list[str | None]):
    episode = environment.new_episode(seed, f"c{seed}")
    for message in messages:
        if episode.done:
            break
        episode.step(message)
    return episode


def test_a_won_game_is_recorded_as_the_simulator_records_a_purchase():
    environment = ProtocolEnvironment(NumberGuess, {"low": 1, "high": 4, "max_turns": 3})
    target = NumberGuess().reset(7)[1]["target"]
    wrong = 1 if target != 1 else 2
    episode = play(environment, 7, [f"is it {wrong} ?", f"then {target} ."])
    conv = episode.conversation
    assert episode.done and conv.success
    assert [t.customer for t in conv.turns][0] == "guess a number from 1 to 4 ."
    assert [t.outcome for t in conv.turns] == [0, 0, 1]
    assert [t.suggestion for t in conv.turns] == [f"is it {wrong} ?", f"then {target} .", None]
    assert [t.sent for t in conv.turns] == [f"is it {wrong} ?", f"then {target} .", None]
    assert [t.business_action for t in conv.turns] == ["accept", "accept", "none"]
    assert conv.turns[-1].terminal and conv.agent_turns == [0, 1]
    assert conv.metadata == {"persona": {"target": target}, "seed": 7}
    assert conv.returns(1.0) == [1.0, 1.0]


def test_a_lost_game_ends_with_a_terminal_turn_and_outcome_0_and_an_abstain_sends_nothing():
    environment = ProtocolEnvironment(NumberGuess, {"low": 1, "high": 4, "max_turns": 2})
    episode = play(environment, 3, [None, "no idea"])
    conv = episode.conversation
    assert episode.done and not conv.success
    assert [t.outcome for t in conv.turns] == [0, 0, 0]
    assert conv.turns[0].suggestion is None and conv.turns[0].sent == ""
    assert conv.turns[-1].customer == "say a number . game over ." and conv.turns[-1].terminal
    with pytest.raises(RuntimeError, match="already finished"):
        episode.step("4")


def test_the_same_seed_gives_the_same_game_whatever_else_was_played():
    environment = ProtocolEnvironment(NumberGuess, {"high": 100})
    first = environment.new_episode(11, "a").conversation.metadata
    for seed in range(5):
        environment.new_episode(seed, "x")
    assert environment.new_episode(11, "b").conversation.metadata == first


class _Broken:
    def __init__(self, answer):
        self.answer = answer

    def reset(self, seed):
        return "hi"

    def step(self, agent_message):
        return self.answer


@pytest.mark.parametrize(
    "answer, named",
    [
        (("ok", 1, False), "does not end the episode"),
        (("ok", 0.5, True), "must be 0 or 1"),
        (("ok", 0), "must return (next message, outcome, done)"),
        ((3, 0, True), "the next message must be a str"),
    ],
)
def test_a_step_that_breaks_the_protocol_is_named(answer, named):
    environment = ProtocolEnvironment(_Broken, {"answer": answer})
    with pytest.raises(ValueError) as error:
        play(environment, 0, ["hello"])
    assert named in str(error.value) and "_Broken" in str(error.value)


def test_bad_class_paths_and_init_args_are_named_by_key():
    with pytest.raises(ValueError, match=r"model.environment_class.class_path 'nope.Env': cannot import 'nope'"):
        resolve_class(EnvironmentClassConfig("nope.Env"))
    with pytest.raises(ValueError, match=r"module 'guess_env' has no class 'Missing'"):
        resolve_class(EnvironmentClassConfig("guess_env.Missing"))
    with pytest.raises(ValueError, match=r"lacks reset and step"):
        resolve_class(EnvironmentClassConfig("pathlib.Path"))
    with pytest.raises(ValueError, match=r"class_path is required.*|init_args must be a mapping"):
        read_environment_class({"init_args": []})
    with pytest.raises(ValueError, match=r"model.environment_class.kwargs is not a setting"):
        read_environment_class({"class_path": "guess_env.NumberGuess", "kwargs": {}})
    environment = ProtocolEnvironment.from_config(EnvironmentClassConfig("guess_env.NumberGuess", {"colour": 1}))
    with pytest.raises(ValueError, match=r"model.environment_class.init_args \{'colour': 1\} do not fit"):
        environment.new_episode(0, "c")


def test_the_embedded_simulator_behind_the_protocol_plays_the_same_conversations():
    """The business always sends the agent's message (mode agent): the protocol adapter around the simulator's
    customer and the native simulator give the same turns, outcomes and personas for the same seeds."""
    config = SimulatorConfig(mode="agent")
    native_env = SalesSimulator(config)
    wrapped_env = ProtocolEnvironment(SalesCustomer, {"mode": "agent"})
    agent = BehaviourAgent()
    successes = 0
    for seed in range(40):
        native = play_episode(agent, native_env, seed, f"c{seed}")
        suggestions = [native.turns[i].suggestion for i in native.agent_turns]
        wrapped = play(wrapped_env, seed, suggestions).conversation
        assert [t.customer for t in wrapped.turns] == [t.customer for t in native.turns]
        assert [t.outcome for t in wrapped.turns] == [t.outcome for t in native.turns]
        assert wrapped.metadata["persona"] == native.metadata["persona"]
        successes += native.success
    assert 0 < successes < 40  # both outcomes were compared
