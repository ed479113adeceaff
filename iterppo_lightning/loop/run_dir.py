"""The run folder: its layout, its commits, and opening it for a new, resumed or continued run.

Everything here is plumbing around `run_state.json` (run_state.py), apart from
the algorithm in controller.py:

- `RunFolder` names every file a run writes (`iteration_dir`, `critic_file`, ...);
- `RunFolder.open_on_every_rank` starts a new run, resumes an interrupted one, or
  continues a logged run with its next batch, refusing before any work what a
  resume could not reproduce (a changed config, another world size for sharded
  optimizer state, a batch of logs already trained on);
- `RunFolder.commit` rewrites `run_state.json` atomically; every commit is a
  barrier between processes, so what rank 0 committed is on disk for every rank;
- the critic's and the policy's optimizer state are saved and loaded here, so a
  restarted process gets back what the killed one had.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from iterppo_lightning.data.log_schema import DEFAULT_MAX_MESSAGE_CHARS
from iterppo_lightning.distributed import collectives as dist_utils
from iterppo_lightning.distributed.zero import check_zero_checkpoint
from iterppo_lightning.loop.collection import LogBatch, read_log_batch
from iterppo_lightning.loop.run_state import (
    IterationProgress,
    RunState,
    RunStateError,
    config_differences,
    load_run_state,
    remove_stale_temporaries,
    save_run_state,
)
from iterppo_lightning.modules.optimizer_carry import OptimizerCarryMixin
from iterppo_lightning.utils.atomic_io import atomic_path, atomic_write_text, is_temp_name
from iterppo_lightning.utils.failpoints import failpoint

# Keys a continued run may change: the next batch of logs, how many iterations to run in total,
# and trainer settings that do not touch the numbers (display, logging).
RESUMABLE_CHANGES = {
    "data.logs",
    "data.max_message_chars",
    "model.loop.iterations",
    "trainer.enable_progress_bar",
    "trainer.logger",
    "trainer.callbacks",
    "trainer.default_root_dir",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
}

WORLD_SIZE_KEYS = "trainer.devices x trainer.num_nodes"


def new_iteration_record(k: int) -> dict:
    """The record iteration k starts with; the steps and callbacks add to it, and it joins the history."""
    return {"iteration": k, "policy": f"pi_{k + 1}", "seconds": {}}


def write_bootstrap_record(pi0_dir: Path, seconds: float, episodes: int, seed: int | None = None) -> None:
    """`bootstrap.json` next to a bootstrapped pi_0: its wall seconds and episodes, and the seed when given
    (`iterppo bootstrap`; a run's own pi_0 has the run's seed, in run_state.json). Read by sweep and report."""
    record = {"seconds": seconds, "episodes": episodes}
    if seed is not None:
        record["seed"] = seed
    atomic_write_text(pi0_dir / "bootstrap.json", json.dumps(record) + "\n")


class RunDirError(RuntimeError):
    """The run directory cannot be used (already holds a run, or is not writable)."""


def prepare_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds anything but a run, and fail before any work if it is not writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {str(run_dir)!r} is a file, not a folder; choose a new --run_dir")
    if run_dir.exists():
        # A run killed before its first commit left only temporaries: they do not make it a run.
        for leftover in run_dir.iterdir():
            if leftover.name == ".write_probe" or (is_temp_name(leftover.name) and leftover.is_file()):
                leftover.unlink()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run_dir {str(run_dir)!r} already holds files; choose a new --run_dir (runs are never overwritten)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir {str(run_dir)!r} is not writable: {err}") from err


@dataclass
class OpenSettings:
    """How `fit` was asked to open the run folder (the command line's --resume, --allow_config_change, ...)."""

    seed: int
    """The run's seed (recorded in a new run's state)."""
    logs: str | None = None
    """data.logs: the batch of logs this fit trains one iteration on (None = the simulator)."""
    resume: bool = False
    """Finish an interrupted run instead of refusing a folder that holds one."""
    allow_config_change: bool = False
    """Continue although the config differs from the one the run was started with."""
    config_text: str | None = None
    """The config as YAML, written to config.yaml (None = not recorded, e.g. in tests)."""
    max_message_chars: int | None = DEFAULT_MAX_MESSAGE_CHARS
    """data.max_message_chars: the longest message a batch of logs may hold (None = no limit)."""
    config_defaults: str | None = None
    """The config with nothing set: a key the saved config lacks counts as its default here
    (run_state.config_differences)."""


@dataclass
class OpenedRun:
    """What opening the folder settled, beyond the run state itself."""

    logs: str | None
    """The batch of logs this fit trains on: the one given, or the batch an interrupted logged iteration
    started with (a resume without --data.logs finishes it on that batch)."""
    log_batch: LogBatch | None
    """That batch, read and checked against the run's lineage (rank 0 only; None when already collected)."""


class RunFolder:
    """A run's folder on disk: where each file goes, the committed `RunState`, and how a fit opens it."""

    def __init__(self, path: str | Path, policy_init: str | None = None, console: Console | None = None):
        self.path = Path(path)
        self.policy_init = policy_init
        """A given pi_0 folder (model.policy_init); None = the run makes pi_0 in `pi_0/policy`."""
        self.console = console or Console(stderr=True)
        self.state: RunState | None = None
        self._opening = False

    # -- layout ------------------------------------------------------------------------------
    def iteration_dir(self, k: int) -> Path:
        return self.path / f"iteration_{k}"

    def buffer_dir(self, k: int) -> Path:
        """The conversations iteration k trains on (collected, or its batch of logs)."""
        return self.iteration_dir(k) / "buffer"

    @property
    def pi0_dir(self) -> Path:
        """Where the run makes its own pi_0: `policy/`, and for a bootstrapped one its logs and bootstrap.json."""
        return self.path / "pi_0"

    def policy_dir(self, k: int) -> Path:
        """Folder of pi_k (pi_0 = the given policy folder, or the run's copy of a base model / bootstrapped pi_0;
        pi_(k+1) = what iteration k exported)."""
        if k == 0:
            return Path(self.policy_init) if self.policy_init else self.pi0_dir / "policy"
        return self.iteration_dir(k - 1) / "policy"

    def critic_file(self, k: int) -> Path:
        """Q_k's weights and optimizer state."""
        return self.iteration_dir(k) / "critic.pt"

    def policy_optimizer_file(self, k: int) -> Path:
        """The optimizer state of the fit that made pi_(k+1) (with policy.keep_optimizer_state)."""
        return self.iteration_dir(k) / "policy_optimizer.pt"

    def zero_checkpoint(self, k: int, phase: str) -> Path:
        """The sharded ZeRO checkpoint a DeepSpeed `phase` fit of iteration k leaves (with keep_optimizer_state)."""
        return self.iteration_dir(k) / f"{phase}_zero"

    @property
    def state_file(self) -> Path:
        return self.path / "run_state.json"

    # -- commits -----------------------------------------------------------------------------
    def commit(self) -> None:
        """Write the run state (rank 0), then wait until every rank can read what it names."""
        if dist_utils.is_main():
            save_run_state(self.path, self.state)
        if not self._opening:
            dist_utils.barrier()  # what rank 0 just committed is on disk for every rank

    def begin_iteration(self, k: int, logs: str | None) -> IterationProgress:
        """The progress record of iteration k: the interrupted one's, or a new one."""
        progress = self.state.in_progress
        if progress is None or progress.iteration != k:
            source = {"kind": "logs", "path": str(Path(logs).resolve())} if logs else {"kind": "simulator"}
            progress = IterationProgress(k, source)
            progress.record = new_iteration_record(k)
            self.state.in_progress = progress
        return progress

    def finish_iteration(
        self, progress: IterationProgress, history: list[dict], stopped: bool, callback_states: dict
    ) -> None:
        """Iteration k is done: its record joins the history, its data the lineage; then commit."""
        state, k = self.state, progress.iteration
        state.history = list(history)
        lineage = {"iteration": k, "trained": f"pi_{k}", "exported": f"pi_{k + 1}", "source": progress.source}
        state.lineage.append(lineage)
        state.completed_iterations = k + 1
        state.in_progress = None
        if stopped:  # committed with the iteration, so a resume never runs past an early stop
            state.finished = state.stopped_early = True
        state.callbacks = callback_states
        self.commit()

    # -- opening -----------------------------------------------------------------------------
    def open_on_every_rank(
        self,
        settings: OpenSettings,
        carried: dict[str, OptimizerCarryMixin],
        preflight: Callable[[], None] = lambda: None,
    ) -> OpenedRun:
        """Rank 0 opens the run (`preflight` checks, run_dir, run_state); the others then read what it committed.

        `carried` are the modules by phase ("critic", "policy") whose sharded optimizer state a resume loads.
        """
        if not dist_utils.is_distributed():
            return self._open(settings, carried, preflight)
        main = dist_utils.is_main()
        failure, opened = None, None
        if main:
            self._opening = True
            try:
                opened = self._open(settings, carried, preflight)
            except Exception as err:  # the other ranks stop too, instead of waiting for rank 0 forever
                failure = err
            finally:
                self._opening = False
        outcome = dist_utils.broadcast_object(None if failure is None else (type(failure).__name__, str(failure)))
        if failure is not None:
            raise failure
        if outcome is not None:
            raise RunStateError(f"rank 0 could not open the run ({outcome[0]}: {outcome[1]})")
        if main:
            return opened
        self.state = load_run_state(self.path)
        logs = settings.logs
        progress = self.state.in_progress
        if progress is not None and progress.source.get("kind") == "logs":
            logs = progress.source["path"]
        return OpenedRun(logs, None)

    def _open(self, settings: OpenSettings, carried: dict, preflight: Callable[[], None]) -> OpenedRun:
        """Start a new run, resume an interrupted one, or continue a logged run with its next batch."""
        preflight()  # bad model paths fail here, before a run_dir exists or any training starts
        try:
            return self._open_folder(settings, carried)
        except OSError as err:  # a file where the folder should be, no permission, a full disk: no traceback
            raise RunDirError(f"cannot open the run in run_dir {str(self.path)!r}: {err}") from err

    def _open_folder(self, settings: OpenSettings, carried: dict) -> OpenedRun:
        logs = settings.logs
        if not self.state_file.exists():
            self.state = RunState(seed=settings.seed, mode="logs" if logs else "simulator")
            batch = self._read_logs_first(logs, settings.max_message_chars)
            prepare_run_dir(self.path)
            self._start_logged_iteration(logs)
            self.commit()
            if settings.config_text is not None:
                atomic_write_text(self.path / "config.yaml", settings.config_text)
            return OpenedRun(logs, batch)
        self.state = load_run_state(self.path)
        progress = self.state.in_progress
        if progress is not None and progress.source.get("kind") == "logs":
            # An interrupted logged iteration finishes on the batch it started with, and only on that one.
            if logs and str(Path(logs).resolve()) != progress.source["path"]:
                raise RunStateError(
                    f"iteration {progress.iteration} of {str(self.path)!r} was interrupted while training on "
                    f"{progress.source['path']}; finish it with --resume true (that batch, or no --data.logs) "
                    f"before giving the next batch {logs}"
                )
            logs = progress.source["path"]
        interrupted = self.state.in_progress is not None or not self.state.pi0_ready
        if not settings.resume and not (logs and not interrupted):
            finished = not interrupted and self.state.finished
            hint = "it is finished" if finished else "rerun with --resume true to finish it"
            raise RunDirError(
                f"run_dir {str(self.path)!r} already holds a run ({hint}; a logged run continues when given "
                "its next batch with --data.logs; otherwise choose a new --run_dir)"
            )
        changed = self._check_config(settings, logs)
        self._check_zero_checkpoints(carried)
        batch = self._read_logs_first(logs, settings.max_message_chars)
        if changed:  # only once the logs passed: a refused batch changes nothing on disk
            atomic_write_text(self.path / "config.yaml", settings.config_text)
        removed = remove_stale_temporaries(self.path)
        if removed:
            self.console.print(
                f"resume: removed {len(removed)} half-written file(s): {', '.join(removed)}", highlight=False
            )
        if logs and self.state.in_progress is None:
            self._start_logged_iteration(logs)
            self.commit()
        return OpenedRun(logs, batch)

    def _check_zero_checkpoints(self, carried: dict[str, OptimizerCarryMixin]) -> None:
        """Sharded optimizer state the next fits would load: refuse another world size before anything changes."""
        c = self.state.completed_iterations
        for phase, module in carried.items():
            for j in (c - 1, c):
                checkpoint = self.zero_checkpoint(j, phase)
                if module.keep_optimizer_state and checkpoint.exists():
                    check_zero_checkpoint(checkpoint, dist_utils.world_size(), WORLD_SIZE_KEYS)

    def _start_logged_iteration(self, logs: str | None) -> None:
        """Record which batch the next iteration trains on, so a crash anywhere resumes on that batch."""
        if not logs:
            return
        self.state.mode = "logs"
        k = self.state.completed_iterations
        progress = IterationProgress(k, {"kind": "logs", "path": str(Path(logs).resolve())})
        progress.record = new_iteration_record(k)
        self.state.in_progress = progress

    def _read_logs_first(self, logs: str | None, max_message_chars: int | None) -> LogBatch | None:
        """Validate the batch of logs before any work (and before a new run_dir is even created)."""
        progress = self.state.in_progress
        if not logs or (progress is not None and progress.collected):
            return None
        k = progress.iteration if progress is not None else self.state.completed_iterations
        return read_log_batch(logs, self.state, self.path, k, max_message_chars=max_message_chars)

    def _check_config(self, settings: OpenSettings, logs: str | None) -> bool:
        """Refuse changes a resume could not reproduce; True when config.yaml needs the new text."""
        saved = self.path / "config.yaml"
        if settings.config_text is None:
            return False
        if not saved.exists():
            return True
        saved_text, defaults = saved.read_text(encoding="utf-8"), settings.config_defaults
        diffs = config_differences(saved_text, settings.config_text, RESUMABLE_CHANGES, defaults)
        if diffs and not settings.allow_config_change:
            raise RunStateError(
                f"the config differs from the one {str(self.path)!r} was started with, so resuming would not "
                "reproduce the run:\n  " + "\n  ".join(diffs) + "\npass --allow_config_change true to continue anyway"
            )
        if diffs:
            self.console.print(
                "[yellow]continuing with a changed config:[/yellow]\n  " + "\n  ".join(diffs), highlight=False
            )
        # Rewrite only for a real change: a bare --resume (no --data.logs) changes nothing.
        every = config_differences(saved_text, settings.config_text, set(), defaults)
        return any(not (d.startswith("data.logs:") and not logs) for d in every)

    # -- module state on disk ----------------------------------------------------------------
    def save_critic(self, critic, k: int) -> None:
        """Q_k's weights, hyperparameters and carried optimizer state, written then renamed (rank 0)."""
        if not dist_utils.is_main():
            return
        saved = {
            "state_dict": critic.state_dict(),
            "hparams": dict(critic.hparams),
            "optimizer_state": critic.carried_optimizer_state,
        }
        with atomic_path(self.critic_file(k)) as tmp:
            torch.save(saved, tmp)
            failpoint("critic_save.before_rename")

    @staticmethod
    def load_critic(critic, path: Path, base_model_dir: Path) -> None:
        """Rebuild the critic on pi_0's backbone and load a saved Q (weights and optimizer state)."""
        saved = torch.load(path, weights_only=False)
        critic.build(base_model_dir)
        critic.load_state_dict(saved["state_dict"])
        critic.carried_optimizer_state = saved.get("optimizer_state")

    def save_policy_optimizer_state(self, policy: OptimizerCarryMixin, k: int) -> None:
        """The Adam moments the fit of pi_(k+1) ends with, when the policy carries them (rank 0)."""
        state = policy.carried_optimizer_state
        if dist_utils.is_main() and policy.keep_optimizer_state and state is not None:
            with atomic_path(self.policy_optimizer_file(k)) as tmp:
                torch.save(state, tmp)

    @staticmethod
    def load_optimizer_state(module: OptimizerCarryMixin, path: Path) -> None:
        if module.keep_optimizer_state and path.exists():
            module.carried_optimizer_state = torch.load(path, weights_only=False)
