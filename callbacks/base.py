"""Base class for callbacks of the outer Iterative-PPO loop.

The loop runs iterations k = 0..K-1; each one collects conversations with
pi_k, fits the critic Q_k, fits the policy pi_(k+1), evaluates pi_(k+1) and
checkpoints. Callbacks are called in chain order at the points below, on the
process that writes (rank 0).

Every hook receives ``loop``, a ``LoopView`` (iterppo_lightning/loop/view.py,
documented field by field): the run folder, the loop's settings, the seed, the
environment, the policy and critic modules, the iteration's data, ``history``,
``initial_eval`` and ``should_stop``. A callback may set ``loop.should_stop``
(stop after this iteration) and ``loop.initial_eval`` (pi_0's evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


class IterationCallback:
    """No-op base: subclass and override only the hooks you need."""

    def on_run_start(self, loop: LoopView) -> None:
        """Called once before iteration 0; pi_0 exists (and may be evaluated)."""

    def on_iteration_start(self, loop: LoopView, iteration: int) -> None:
        """Called at the start of iteration ``iteration``, before collecting with pi_k."""

    def on_critic_end(self, loop: LoopView, iteration: int, metrics: dict) -> None:
        """Called after the critic Q_k was fitted; ``metrics`` are its validation metrics."""

    def on_policy_end(self, loop: LoopView, iteration: int, metrics: dict) -> None:
        """Called after pi_(k+1) was fitted; ``metrics`` are the PPO (or filtered-BC) metrics."""

    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        """Called when iteration ``iteration`` is done.

        ``record`` is mutable: callbacks earlier in the chain may add keys
        (evaluation, timings, ...) that later ones read. It is not yet in
        ``loop.history``.
        """

    def on_run_end(self, loop: LoopView, summary: dict) -> None:
        """Called once after the last iteration; ``summary`` is mutable."""
