"""`CriticProbeConfig`: the settings of the critic probe (model.loop.critic_probe, `iterppo probe-critic`).

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
