"""Stop the outer loop when the monitored metric stops improving."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console

from iterppo_lightning.utils.stats import as_number, lookup

from .base import IterationCallback

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


class EarlyStoppingCallback(IterationCallback):
    """Sets ``loop.should_stop`` after ``patience`` iterations without improvement.

    An iteration improves when ``record[monitor]`` beats the best value so far
    by more than ``min_delta`` (higher is better with ``mode="max"``, lower
    with ``mode="min"``). The best value starts from ``loop.initial_eval`` (pi_0)
    when it has the metric. A missing or NaN value counts as no improvement.
    """

    def __init__(
        self,
        patience: int = 2,
        min_delta: float = 0.0,
        monitor: str = "success_rate",
        mode: str = "max",
        console: Console | None = None,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience = patience
        self.min_delta = min_delta
        self.monitor = monitor
        self.mode = mode
        self.console = console or Console()
        self.best: float | None = None
        self.best_iteration: int | None = None
        """None while the best is pi_0 (or nothing was seen yet)."""
        self.wait = 0
        """Iterations since the last improvement."""
        self.stopped_iteration: int | None = None

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def _seed_from_initial_eval(self, loop: LoopView) -> None:
        # Only when nothing is known yet, so a state restored with
        # load_state_dict (resumed run) is not overwritten.
        if self.best is None and self.wait == 0:
            self.best = as_number(lookup(loop.initial_eval, self.monitor))

    def on_run_start(self, loop: LoopView) -> None:
        self._seed_from_initial_eval(loop)

    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        self._seed_from_initial_eval(loop)
        value = as_number(lookup(record, self.monitor))
        if value is not None and self._improves(value):
            self.best, self.best_iteration, self.wait = value, iteration, 0
            return
        self.wait += 1
        if value is None:
            self.console.print(
                f"[yellow]early stopping: {self.monitor!r} missing or NaN at iteration "
                f"{iteration}; counted as no improvement[/yellow]",
                soft_wrap=True,
            )
        if self.wait >= self.patience:
            loop.should_stop = True
            self.stopped_iteration = iteration
            where = "pi_0" if self.best_iteration is None else f"iteration {self.best_iteration}"
            best = "-" if self.best is None else f"{self.best:.4f}"
            self.console.print(
                f"[bold]early stopping at iteration {iteration}[/bold]: {self.monitor} has not "
                f"improved by more than {self.min_delta} for {self.wait} iteration(s) "
                f"(best {best} at {where})",
                highlight=False,
                soft_wrap=True,
            )

    def state_dict(self) -> dict[str, Any]:
        """The tracking state, JSON-serializable, for checkpoints."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_iteration": self.best_iteration,
            "wait": self.wait,
            "stopped_iteration": self.stopped_iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; the configuration stays as constructed."""
        if state.get("monitor", self.monitor) != self.monitor or state.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"state tracks {state.get('monitor')!r} ({state.get('mode')}), "
                f"this callback tracks {self.monitor!r} ({self.mode})"
            )
        self.best = state.get("best")
        self.best_iteration = state.get("best_iteration")
        self.wait = int(state.get("wait", 0))
        self.stopped_iteration = state.get("stopped_iteration")
