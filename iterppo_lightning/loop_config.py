"""Settings of the outer Iterative-PPO loop (how much to collect, fit and evaluate per iteration)."""

from __future__ import annotations

from dataclasses import dataclass


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
    eval_greedy: bool = False
    """Evaluate with greedy decoding instead of sampling from the policy."""
    rollout_batch_size: int = 256
    """Conversations advanced together in one batched generate call."""
    max_prompt_tokens: int = 384
    """States longer than this keep their most recent tokens when the policy reads them."""
    early_stopping_patience: int | None = None
    """Stop after this many iterations without a better success rate (None = run all)."""

    def __post_init__(self) -> None:
        for name in ("iterations", "episodes_per_iteration", "critic_epochs", "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_episodes < 0:
            raise ValueError(f"loop.eval_episodes must be >= 0, got {self.eval_episodes}")
