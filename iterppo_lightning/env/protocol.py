"""Bring your own environment: a small text protocol, and the adapter that makes any such object a run's environment.

A user's environment is a class with two methods (docs/environments.md):

    reset(seed: int) -> str | tuple[str, dict]
        Start a new episode from `seed` and return the counterpart's opening message, optionally with a
        metadata dict (a persona, the hidden target, ...) that is stored with the conversation and shown by
        `iterppo sample`, never shown to the agent.
    step(agent_message: str) -> tuple[str, int | float | bool, bool]
        The agent's message in; the counterpart's next message, the outcome and whether the episode is over.
        The outcome is the success flag of the episode (1 / True = the goal was reached, 0 = not) and is read on
        the step that ends the episode; a non-zero outcome on any other step is an error (the trainer's returns
        and critic targets are built from one terminal success flag).

The run instantiates the class once per episode (`class_path` with `init_args`, from YAML), so an instance
holds one conversation and may keep any state it likes. Everything else stays as for the embedded simulator:
`ProtocolEnvironment` builds the same typed records (data/conversation.py) the simulator builds, so
collection, buffers, critic targets, evaluation and `sample` run unchanged. An agent that abstains (an
empty reply) sends the empty string.

The embedded simulator satisfies the protocol too (`SalesCustomer`): with the business always sending the
agent's message (`mode: agent`) it plays exactly the conversations the simulator plays natively
(tests/env/test_protocol.py). The run itself keeps the native simulator, whose records also say when the
business edited or rejected a suggestion, something the two-method protocol has no words for.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from iterppo_lightning.data.conversation import Conversation, Turn

KEY = "model.environment_class"


@runtime_checkable
class TextEnvironment(Protocol):
    """What a user's environment class provides (one instance per episode)."""

    def reset(self, seed: int) -> str | tuple[str, dict]: ...

    def step(self, agent_message: str) -> tuple[str, int | float | bool, bool]: ...


@dataclass
class EnvironmentClassConfig:
    """`model.environment_class`: the user's environment class, as LightningCLI names classes."""

    class_path: str
    """Importable dotted name of the class, e.g. ``my_package.envs.NumberGuess``."""
    init_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the class's constructor (every episode gets a fresh instance built with them)."""


def read_environment_class(value: dict) -> EnvironmentClassConfig:
    """The YAML mapping {class_path, init_args} as a config; a ValueError naming the key when it is malformed."""
    unknown = sorted(set(value) - {"class_path", "init_args"})
    problems = [f"{KEY}.{key} is not a setting (give class_path and init_args)" for key in unknown]
    class_path, init_args = value.get("class_path"), value.get("init_args") or {}
    if not isinstance(class_path, str) or not class_path:
        problems.append(f"{KEY}.class_path is required: the dotted name of your class, e.g. my_package.MyEnv")
    if not isinstance(init_args, dict):
        problems.append(f"{KEY}.init_args must be a mapping of constructor arguments, got {init_args!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return EnvironmentClassConfig(class_path, dict(init_args))


def resolve_class(config: EnvironmentClassConfig) -> type:
    """The class `config.class_path` names; a ValueError naming the key says why it cannot be used."""
    path = config.class_path
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{KEY}.class_path {path!r} must be a dotted name, module.Class (e.g. my_package.MyEnv)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{KEY}.class_path {path!r}: cannot import {module_name!r} ({error})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{KEY}.class_path {path!r}: module {module_name!r} has no class {class_name!r}")
    missing = [name for name in ("reset", "step") if not callable(getattr(cls, name, None))]
    if missing:
        raise ValueError(
            f"{KEY}.class_path {path!r} lacks {' and '.join(missing)}: an environment class has "
            "reset(seed) -> opening message and step(agent_message) -> (next message, outcome, done) "
            "(docs/environments.md)"
        )
    return cls


def _outcome(value: Any, where: str) -> int:
    """A step's outcome as the 0/1 flag the records hold."""
    if isinstance(value, bool) or (isinstance(value, numbers.Real) and value in (0, 1)):
        return int(value)
    raise ValueError(f"{where}: the outcome must be 0 or 1 (or a bool), got {value!r}")


class ProtocolEpisode:
    """One conversation with a protocol object, recorded as the simulator records its conversations."""

    def __init__(self, environment: TextEnvironment, seed: int, conversation_id: str, name: str) -> None:
        self.environment = environment
        self.name = name
        opening = environment.reset(seed)
        metadata: dict[str, Any] = {}
        if isinstance(opening, tuple):
            if len(opening) != 2 or not isinstance(opening[1], dict):
                raise ValueError(f"{name}.reset(seed) must return a message or (message, metadata dict)")
            opening, persona = opening
            if persona:
                metadata["persona"] = dict(persona)
        if not isinstance(opening, str):
            raise ValueError(f"{name}.reset(seed) must return a message (str), got {type(opening).__name__}")
        metadata["seed"] = seed
        self.done = False
        self.conversation = Conversation(conversation_id, [Turn(customer=opening)], metadata=metadata)

    def step(self, suggestion: str | None) -> None:
        """Send the agent's message (None, an abstain, sends ""), append the counterpart's answer."""
        if self.done:
            raise RuntimeError(f"episode {self.conversation.conversation_id!r} is already finished")
        sent = suggestion or ""
        pending = self.conversation.turns[-1]
        pending.suggestion = suggestion
        pending.sent = sent
        pending.business_action = "accept"
        answer = self.environment.step(sent)
        if not isinstance(answer, tuple) or len(answer) != 3:
            raise ValueError(f"{self.name}.step(message) must return (next message, outcome, done), got {answer!r}")
        message, outcome, done = answer
        if not isinstance(message, str):
            raise ValueError(f"{self.name}.step(message): the next message must be a str, got {message!r}")
        flag = _outcome(outcome, f"{self.name}.step(message)")
        if flag and not done:
            raise ValueError(
                f"{self.name}.step(message) returned outcome {outcome!r} on a step that does not end the episode: "
                "the outcome is the episode's success flag, given with done=True"
            )
        self.conversation.turns.append(Turn(customer=message, outcome=flag))
        self.done = bool(done)
        if self.done:
            close = getattr(self.environment, "close", None)
            if callable(close):
                close()


class ProtocolEnvironment:
    """The run's environment for a user's class: a fresh instance of it per episode."""

    def __init__(self, cls: type, init_args: dict[str, Any] | None = None) -> None:
        self.cls = cls
        self.init_args = dict(init_args or {})
        self.name = f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    def from_config(cls, config: EnvironmentClassConfig) -> ProtocolEnvironment:
        return cls(resolve_class(config), config.init_args)

    def new_episode(self, seed: int, conversation_id: str) -> ProtocolEpisode:
        try:
            instance = self.cls(**self.init_args)
        except TypeError as error:  # init_args that do not fit the constructor
            raise ValueError(f"{KEY}.init_args {self.init_args} do not fit {self.name}: {error}") from None
        return ProtocolEpisode(instance, seed, conversation_id, self.name)


class SalesCustomer:
    """The embedded simulator's customer behind the text protocol (the business always sends the agent's message
    unless the simulator's settings say otherwise). `init_args` are `SimulatorConfig`'s fields."""

    def __init__(self, **settings: Any) -> None:
        from iterppo_lightning.env.sales_simulator import SimulatorConfig

        self.config = SimulatorConfig(**{"mode": "agent", **settings})
        self.episode = None

    def reset(self, seed: int) -> tuple[str, dict]:
        from iterppo_lightning.env.sales_simulator import SalesEpisode

        self.episode = SalesEpisode(self.config, seed, "")
        return self.episode.conversation.turns[0].customer, self.episode.persona.to_dict()

    def step(self, agent_message: str) -> tuple[str, int, bool]:
        self.episode.step(agent_message or None)
        last = self.episode.conversation.turns[-1]
        return last.customer, last.outcome, self.episode.done
