"""`CriticProbeConfig`: the settings of the critic probe (model.loop.critic_probe, `iterppo probe-critic`), and
`OracleCriticConfig`: those of the oracle critic (model.loop.oracle_critic), which computes Q the way the probe
computes its ground truth, and `TableCriticConfig`: those of the table critic (model.loop.table_critic), which reads
the dialogue through the simulator's parsers.

A module of its own, importing nothing heavy, so `iterppo probe-critic --help` starts without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE_PERSONAS = ("posterior", "logged")
"""critic_probe.persona: which hidden customer the ground truth plays (loop/critic_probe.py)."""


@dataclass
class CriticProbeConfig:
    """Ground-truth diagnostics of Q_k on the simulator (model.loop.critic_probe; docs/critic.md).

    The defaults add about 12 % to a quickstart iteration (docs/critic.md gives the measurement).
    """

    states: int = 24
    """Logged states of the iteration's buffer to probe, sampled evenly across what the customer has revealed
    (nothing, its need, its budget, both)."""
    continuations: int = 16
    """Simulated continuations per (state, reply) whose mean discounted return is the reply's true value."""
    policy_samples: int = 4
    """Replies sampled from pi_k at each state, beside the simulator's canonical moves (duplicates dropped)."""
    seed: int = 0
    """Seed of the probe (with the run's seed and the iteration): the same seed gives the same numbers."""
    pair_threshold: float = 0.1
    """Pairs of replies (and decisive decisions) count only when their true values differ by more than this."""
    persona: str = "posterior"
    """The customer the continuations play: "posterior" = drawn per continuation from the hidden customers
    consistent with the state (the value Q can know), "logged" = the logged customer's own persona."""

    def __post_init__(self) -> None:
        # Two continuations at least: the ground truth's standard error needs a spread.
        for name, low in (("states", 1), ("continuations", 2), ("policy_samples", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"model.loop.critic_probe.{name} must be >= {low}, got {getattr(self, name)}")
        if not 0.0 <= self.pair_threshold < 1.0:
            raise ValueError(f"model.loop.critic_probe.pair_threshold must be in [0, 1), got {self.pair_threshold}")
        if self.persona not in PROBE_PERSONAS:
            raise ValueError(f"model.loop.critic_probe.persona must be one of {PROBE_PERSONAS}, got {self.persona!r}")


@dataclass
class OracleCriticConfig:
    """PPO against Q computed from simulator continuations instead of a learned critic (model.loop.oracle_critic;
    docs/critic.md, "The oracle critic"): the ceiling a learned critic is measured against.

    Each rollout reply's Q is the mean discounted return (data.gamma) of `continuations` simulated continuations
    after it, from the logged state rebuilt from its episode seed, in which pi_k (frozen at the start of the
    policy phase) plays the rest: the critic probe's ground truth (loop/critic_probe.py), for every reply PPO samples.
    """

    continuations: int = 16
    """Simulated continuations per (state, reply) whose mean discounted return is the reply's Q."""
    persona: str = "posterior"
    """The customer the continuations play: "posterior" = drawn per continuation from the hidden customers
    consistent with the state (Q of the observable state, what a critic can know), "logged" = the logged
    customer's own persona (more than any critic can know)."""
    seed: int = 0
    """Seed of the continuations (with the run's seed, the iteration and the rollout): the same seed gives the
    same Q."""

    def __post_init__(self) -> None:
        if self.continuations < 1:
            raise ValueError(f"model.loop.oracle_critic.continuations must be >= 1, got {self.continuations}")
        if self.persona not in PROBE_PERSONAS:
            raise ValueError(f"model.loop.oracle_critic.persona must be one of {PROBE_PERSONAS}, got {self.persona!r}")


@dataclass
class TableCriticConfig:
    """PPO against the table critic instead of a learned one (model.loop.table_critic; loop/table_critic.py,
    docs/critic.md, "How much the data allows"): Q is the shrunk mean Monte Carlo return of hand-read (state, reply)
    features, fit on the same training conversations as Q_k. It perceives the dialogue perfectly and sees no more
    data, so the gap between it and the learned critic is what the learned critic's representation loses, and the
    gap between it and the oracle critic what the data lacks.
    """

    prior: float = 4.0
    """Pseudo-observations of its state's value that each (state, reply) cell's mean is shrunk towards."""

    def __post_init__(self) -> None:
        if not self.prior > 0:
            raise ValueError(f"model.loop.table_critic.prior must be > 0, got {self.prior}")
