"""`LoopStage`: which step of the outer loop is running, in the words an interrupted run reports it with."""

from __future__ import annotations

from typing import NamedTuple


class LoopStage(NamedTuple):
    phase: str
    """"start" (opening the run, restoring a resumed one), "bootstrap" (making pi_0), "collection", "critic",
    "policy" or "evaluation" (the iteration's callbacks: evaluation, estimates, export, report)."""
    iteration: int = -1
    """The outer iteration k (iteration_k in the run folder); -1 = before iteration 0."""

    def describe(self) -> str:
        if self.phase == "start":
            return "the start of the run (before any step)"
        if self.iteration < 0:
            what = "making pi_0" if self.phase == "bootstrap" else "pi_0"
            return f"the {self.phase} phase ({what}, before iteration 0)"
        return f"the {self.phase} phase of iteration {self.iteration}"
