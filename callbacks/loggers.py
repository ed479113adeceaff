"""`LoggerCallback`: the outer loop's numbers, once per policy, in the run's experiment loggers under `loop/`.

The phase Trainers log their own steps (bc/, critic/, ppo/); what only the loop knows, the success rate of each
new policy with its 95% CI, its return, the off-policy estimate, the critic's validation and probe numbers, the
iteration's KL and the seconds per phase, goes here: every finite number of the iteration's record
(`loop.run_logger.flatten_record`, e.g. `loop/success_rate`, `loop/ci95_low`, `loop/ope/q_policy`,
`loop/critic_probe/within_state_corr`, `loop/ppo/kl`), with `loop/policy` = k + 1 for pi_(k+1), at the run's next
global step. pi_0's evaluation is logged once, with `loop/policy` = 0. It runs after the callbacks that fill
the record (estimate, evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import IterationCallback

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


class LoggerCallback(IterationCallback):
    def __init__(self) -> None:
        self.initial_logged = False

    def on_run_start(self, loop: LoopView) -> None:
        if loop.logger is None or loop.initial_eval is None or self.initial_logged:
            return
        self._log(loop, {**loop.initial_eval, "policy": 0})
        self.initial_logged = True

    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        if loop.logger is not None:
            self._log(loop, {**record, "iteration": iteration, "policy": iteration + 1})

    @staticmethod
    def _log(loop: LoopView, record: dict[str, Any]) -> None:
        from iterppo_lightning.loop.run_logger import flatten_record  # lightning: only when there is a logger

        loop.logger.log_metrics(flatten_record(record))

    def state_dict(self) -> dict[str, Any]:
        return {"initial_logged": self.initial_logged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_logged = bool(state.get("initial_logged", False))
