"""Base class for callbacks of the outer Iterative-PPO loop.

The loop runs iterations k = 0..K-1; each one collects conversations with
pi_k, fits the critic Q_k, fits the policy pi_(k+1), evaluates pi_(k+1) and
checkpoints. Callbacks are called in chain order at the points below.

The ``loop`` argument exposes at least:

* ``run_dir: pathlib.Path`` - folder for this run's outputs;
* ``history: list[dict]`` - records of finished iterations; the loop appends
  the current record only AFTER every ``on_iteration_end`` has run;
* ``should_stop: bool`` - set it to True to stop after the current iteration;
* ``initial_eval: dict | None`` - evaluation of pi_0 (same keys as a record);
* ``num_iterations: int`` - K.
"""

from __future__ import annotations

from typing import Any


class IterationCallback:
    """No-op base: subclass and override only the hooks you need."""

    def on_run_start(self, loop: Any) -> None:
        """Called once before iteration 0; pi_0 exists (and may be evaluated)."""

    def on_iteration_start(self, loop: Any, iteration: int) -> None:
        """Called at the start of iteration ``iteration``, before collecting with pi_k."""

    def on_critic_end(self, loop: Any, iteration: int, metrics: dict) -> None:
        """Called after the critic Q_k was fitted; ``metrics`` are its validation metrics."""

    def on_policy_end(self, loop: Any, iteration: int, metrics: dict) -> None:
        """Called after pi_(k+1) was fitted; ``metrics`` are the PPO metrics."""

    def on_iteration_end(self, loop: Any, iteration: int, record: dict) -> None:
        """Called when iteration ``iteration`` is done.

        ``record`` is mutable: callbacks earlier in the chain may add keys
        (evaluation, timings, ...) that later ones read. It is not yet in
        ``loop.history``.
        """

    def on_run_end(self, loop: Any, summary: dict) -> None:
        """Called once after the last iteration; ``summary`` is mutable."""
