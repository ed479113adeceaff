"""Settings of the outer Iterative-PPO loop (how much to collect, fit and evaluate per iteration)."""

from __future__ import annotations

from dataclasses import dataclass, field

from iterppo_lightning.callbacks.base import IterationCallback
from iterppo_lightning.loop.probe_config import CriticProbeConfig, OracleCriticConfig, TableCriticConfig


@dataclass
class LoopConfig:
    iterations: int = 4
    """Outer iterations K: each collects with pi_k, fits Q_k, and produces pi_(k+1)."""
    episodes_per_iteration: int = 512
    """Conversations collected with pi_k per iteration (the batch Q_k is fit on)."""
    eval_episodes: int = 256
    """Fresh simulated conversations used to measure each new policy's true success rate
    (0 = none: training on real logs, with no simulator to ask)."""
    critic_epochs: int = 3
    """Passes of the critic over the iteration's (state, suggestion, return) examples."""
    collect_temperature: float = 1.0
    """Sampling temperature while collecting (1.0 = on-policy Monte Carlo)."""
    explore_prob: float = 0.0
    """Exploring starts while collecting (docs/critic.md, "Coverage"): at each agent turn of a conversation that
    has not explored yet, the chance that pi_k's reply is sampled at explore_temperature instead; at most one
    explored reply per conversation. 0 = off (pure on-policy Monte Carlo). The same conversations go to every
    method (the critic, PPO's logged states, filtered BC)."""
    explore_temperature: float = 2.0
    """Sampling temperature of an explored reply."""
    branch_fraction: float = 0.0
    """Share of each iteration's conversations spent on branches (docs/critic.md, "Branches"): the rest are
    collected as usual, then each branch goes back to a distinct state of one of them (replayed from its seed),
    lets pi_k reply again and plays on to the end. 0 = off. Embedded simulator only (refused with data.logs or
    an LLM customer); every method gets the same conversations."""
    branch_temperature: float | None = None
    """Sampling temperature of a branch's first reply (None = collect_temperature: pi_k's own reply)."""
    eval_greedy: bool = False
    """Evaluate with greedy decoding instead of sampling from the policy."""
    eval_greedy_also: bool = False
    """Also measure greedy decoding on the same evaluation customers (recorded as greedy_success_rate and
    greedy_ci95 beside the sampled success_rate); ignored when eval_greedy is already true."""
    rollout_batch_size: int = 256
    """Conversations advanced together in one batched generate call."""
    max_prompt_tokens: int = 384
    """States longer than this keep their most recent tokens when the policy reads them."""
    early_stopping_patience: int | None = None
    """Stop after this many iterations without a better success rate (None = run all)."""
    offline: bool = False
    """Fully offline baseline: iteration 0 collects episodes_per_iteration * iterations
    conversations with pi_0 and fits Q_0 once; later iterations collect nothing and run PPO
    from pi_k on that buffer against Q_0 (docs/variants.md). Not with data.logs."""
    callbacks: list[IterationCallback] | None = None
    """The callback chain, run in order (class_path/init_args entries). None = the default chain:
    off-policy estimate, evaluation, export, reporting, and early stopping when
    early_stopping_patience is set (callbacks/__init__.py)."""
    extra_callbacks: list[IterationCallback] = field(default_factory=list)
    """Callbacks appended after the chain (the default one, or `callbacks`)."""
    critic_probe: CriticProbeConfig | None = None
    """After each critic fit, measure Q_k against the simulator's ground truth at sampled logged states (its
    numbers go to metrics.jsonl under "critic_probe"; docs/critic.md). None = off. Simulated runs only: refused
    with data.logs or an LLM customer, which have no ground truth to replay."""
    oracle_critic: OracleCriticConfig | None = None
    """PPO against Q from simulator continuations instead of a learned critic: no critic is fitted, and each
    rollout reply's Q is its mean discounted return over simulated continuations in which pi_k plays the rest
    (the critic probe's ground truth; docs/critic.md, "The oracle critic"). None = off (the learned Q_k).
    Simulated runs of iterative_ppo only: refused with data.logs, an LLM customer or filtered_bc."""
    table_critic: TableCriticConfig | None = None
    """PPO against the table critic instead of a learned one: no critic is fitted; Q is the shrunk mean Monte Carlo
    return of hand-read (state, reply) features of the same training conversations, read by the simulator's own
    parsers (loop/table_critic.py; docs/critic.md, "How much the data allows"). A diagnostic: what a critic that
    perceives the dialogue perfectly makes of the same data. None = off. Simulated runs of iterative_ppo only."""

    def __post_init__(self) -> None:
        for name in ("iterations", "episodes_per_iteration", "critic_epochs", "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.explore_prob <= 1.0:
            raise ValueError(f"model.loop.explore_prob must be in [0, 1], got {self.explore_prob}")
        if self.explore_temperature <= 0:
            raise ValueError(f"model.loop.explore_temperature must be > 0, got {self.explore_temperature}")
        if not 0.0 <= self.branch_fraction < 1.0:
            raise ValueError(f"model.loop.branch_fraction must be in [0, 1), got {self.branch_fraction}")
        if self.branch_temperature is not None and self.branch_temperature <= 0:
            raise ValueError(f"model.loop.branch_temperature must be > 0, got {self.branch_temperature}")
        if self.eval_episodes < 0:
            raise ValueError(f"loop.eval_episodes must be >= 0, got {self.eval_episodes}")
        if self.callbacks is not None and self.early_stopping_patience is not None:
            raise ValueError(
                "model.loop.early_stopping_patience adds early stopping to the default callback chain, but "
                "model.loop.callbacks replaces that chain: list an EarlyStoppingCallback in model.loop.callbacks "
                "instead (or add one with model.loop.extra_callbacks)"
            )


ALGORITHMS = ("iterative_ppo", "filtered_bc")
"""model.algorithm: what turns an iteration's conversations into pi_(k+1)."""


@dataclass
class FilteredBCConfig:
    """The filtered behaviour-cloning baseline (model.algorithm filtered_bc): SFT of pi_k on successes."""

    epochs: int = 2
    """Passes over the agent turns of the iteration's successful conversations."""
    lr: float = 1e-4
    """AdamW learning rate of the fine-tune (pi_0's recipe is bootstrap.lr)."""
    batch_size: int = 16
    """(state, reply) pairs per step."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.filtered_bc.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"model.filtered_bc.lr must be > 0, got {self.lr}")
