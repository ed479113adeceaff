"""`LoopView`: what the outer loop shows its callbacks and its collection step.

Callbacks (callbacks/) and `collection.simulate_batch` receive this record, never
the loop object itself, so what they may read is written down here, field by
field. Two fields are written back: a callback sets `should_stop` to end the run
after the current iteration, and the evaluation callback sets `initial_eval`
(pi_0's evaluation); the loop reads both after the callbacks ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from iterppo_lightning.data.datamodule import TrajectoryDataModule
    from iterppo_lightning.env.episodes import Environment
    from iterppo_lightning.loop.config import LoopConfig
    from iterppo_lightning.loop.run_dir import RunFolder
    from iterppo_lightning.loop.run_logger import RunLogger
    from iterppo_lightning.modules.critic import CriticModule
    from iterppo_lightning.modules.policy import PolicyModule


@dataclass
class LoopView:
    run_dir: Path
    """Folder of this run's outputs (run_state.json, iteration_k/, metrics.jsonl, ...)."""
    config: LoopConfig
    """The loop's settings (model.loop): iterations, episodes, evaluation episodes, ..."""
    seed: int
    """The run's seed (seed_everything); episode seeds derive from it."""
    logs: str | None = None
    """data.logs: the batch of logs this fit trains its one iteration on (None = the simulator)."""
    environment: Environment | None = None
    """The customers pi_k talks to: the scripted simulator or an LLM customer (env/factory.py)."""
    policy: PolicyModule | None = None
    """The policy module: pi_k until the policy fit, pi_(k+1) after it (`policy.policy`, `policy.tokenizer`)."""
    critic: CriticModule | None = None
    """Q_k, the critic fitted this iteration (frozen after the policy fit); None when the algorithm fits
    no critic (filtered BC)."""
    datamodule: TrajectoryDataModule | None = None
    """The data of the current iteration: `conversations`, `all_examples` (tokenized turns), `gamma`."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Records of finished iterations; the loop appends the current record only AFTER every
    `on_iteration_end` has run."""
    initial_eval: dict[str, Any] | None = None
    """Evaluation of pi_0 (same keys as a record); set by the evaluation callback in `on_run_start`."""
    should_stop: bool = False
    """Set it to True in `on_iteration_end` to stop after the current iteration (early stopping)."""
    folder: RunFolder | None = None
    """The run folder (loop/run_dir.py), the one place its layout is spelled; None = `RunFolder(run_dir)`."""
    logger: RunLogger | None = None
    """The run's experiment loggers (loop/run_logger.py): `logger.log_metrics({"loop/...": x})` logs at the run's
    next global step; None when the loop has none (callbacks then log nothing)."""

    def __post_init__(self) -> None:
        if self.folder is None:
            from iterppo_lightning.loop.run_dir import RunFolder  # torch and the run state: only when needed

            self.folder = RunFolder(self.run_dir)

    @property
    def num_iterations(self) -> int:
        """K, the iterations a simulated run makes (model.loop.iterations)."""
        return self.config.iterations

    def iteration_dir(self, k: int) -> Path:
        """Folder of iteration k (its buffer, critic.pt, policy/ = pi_(k+1), metrics.json)."""
        return self.folder.iteration_dir(k)
