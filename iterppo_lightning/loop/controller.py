"""`OuterLoop`: the plain-Python controller of Iterative PPO.

Per iteration k: collect with pi_k (or read a batch of logs) -> fit Q_k (fresh
Trainer) -> fit pi_(k+1) with PPO (fresh Trainer) -> callbacks estimate,
evaluate, export, report and decide to stop. Lightning 2.x has no public loop
API, and a Trainer's second `fit` trains nothing, hence a controller around
fresh Trainers instead of a custom fit loop.

Each step ends with a commit to `run_state.json` (see run_state.py), and each
step reseeds from (seed, iteration, step): a run killed anywhere and resumed
computes exactly what an uninterrupted run computes.

Several processes (distributed.py): every process runs this loop. Rank 0 alone
collects, evaluates (the callbacks) and writes; every commit is a barrier, so
the other ranks read buffers and pi_0 only once they are on disk; all ranks
take part in the phase fits, and rank 0's early-stop decision is broadcast.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from rich.console import Console

from iterppo_lightning.distributed import collectives as dist_utils
from iterppo_lightning.loop.bootstrap import behaviour_clone, make_pi0
from iterppo_lightning.data.log_io import read_logs
from iterppo_lightning.data.buffer import save_buffer
from iterppo_lightning.loop.collection import read_log_batch, simulate_batch
from iterppo_lightning.rl.critic_targets import lambda_return_targets, myopic_targets, sample_replies, score_pairs
from iterppo_lightning.utils.failpoints import failpoint
from iterppo_lightning.models.policy_folder import check_policy_dir
from iterppo_lightning.env.factory import make_environment
from iterppo_lightning.models.source import check_source, enable_gradient_checkpointing, load_causal_lm
from iterppo_lightning.env.episodes import summarize_conversations
from iterppo_lightning.loop.run_state import (
    IterationProgress,
    RunState,
    RunStateError,
    config_differences,
    load_run_state,
    remove_stale_temporaries,
    save_run_state,
)
from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.utils.atomic_io import atomic_path, atomic_write_text, is_temp_name
from iterppo_lightning.utils.seeding import derive_seed
from iterppo_lightning.distributed.zero import check_zero_checkpoint, zero_stage

TrainerFactory = Callable[..., L.Trainer]

# Keys a continued run may change: the next batch of logs, how many iterations to run in total,
# and trainer settings that do not touch the numbers (display, logging).
RESUMABLE_CHANGES = {
    "data.logs",
    "model.loop.iterations",
    "trainer.enable_progress_bar",
    "trainer.logger",
    "trainer.callbacks",
    "trainer.default_root_dir",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
}


class RunDirError(RuntimeError):
    """The run directory cannot be used (already holds a run, or is not writable)."""


class NumericalFault(RuntimeError):
    """A loss became NaN or Inf; the phase stopped before touching the weights."""


def prepare_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds anything but a run, and fail before any work if it is not writable."""
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


class OuterLoop:
    def __init__(
        self,
        system,
        datamodule,
        trainer_factory: TrainerFactory,
        run_dir: str | Path,
        callbacks: list,
        seed: int = 0,
        config_text: str | None = None,
        resume: bool = False,
        allow_config_change: bool = False,
        console: Console | None = None,
    ):
        self.system = system
        self.config = system.loop
        self.datamodule = datamodule
        self.trainer_factory = trainer_factory
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.seed = seed
        self.config_text = config_text
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.console = console or Console(stderr=True)
        self.environment = SalesSimulator(system.environment)
        self.logs = datamodule.logs
        self.num_iterations = self.config.iterations
        self.history: list[dict] = []
        self.should_stop = False
        self.initial_eval: dict | None = None
        self.iteration = -1
        self.record: dict = {}
        self.base_model_dir: Path | None = None
        self.state: RunState | None = None
        self._log_batch = None
        self._opening = False

    # -- helpers used by callbacks ---------------------------------------------------
    @property
    def policy(self):
        return self.system.policy

    def iteration_dir(self, k: int) -> Path:
        return self.run_dir / f"iteration_{k}"

    def policy_dir(self, k: int) -> Path:
        """Folder of pi_k (pi_0 = the given policy folder, or the run's copy of a base model / bootstrapped pi_0)."""
        if k == 0:
            return Path(self.system.policy_init) if self.system.policy_init else self.run_dir / "pi_0" / "policy"
        return self.iteration_dir(k - 1) / "policy"

    def _call(self, hook: str, *args) -> None:
        if not self.main:  # evaluation, estimates, export and reports: rank 0's work
            return
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _seed(self, iteration: int, step: str) -> None:
        L.seed_everything(derive_seed(self.seed, iteration, step), verbose=False)

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
        self.record.setdefault("warnings", []).append(message)

    @property
    def main(self) -> bool:
        """True on the process that collects, evaluates and writes (the only one in a single-process run)."""
        return dist_utils.is_main()

    def _commit(self) -> None:
        if self.main:
            save_run_state(self.run_dir, self.state)
        if not self._opening:
            dist_utils.barrier()  # what rank 0 just committed is on disk for every rank

    @property
    def filtered_bc(self) -> bool:
        """The filtered behaviour-cloning baseline: no critic, SFT on successes instead of PPO."""
        return self.system.algorithm == "filtered_bc"

    @property
    def offline(self) -> bool:
        """The fully offline baseline: one buffer and one Q_0 (iteration 0's) for the whole run."""
        return self.config.offline

    def check_variant_settings(self) -> None:
        """Refuse combinations the baselines do not define, before any run_dir exists."""
        if self.offline and self.logs:
            raise ValueError(
                "model.loop.offline collects its one batch from the simulator with pi_0; it cannot train on "
                f"data.logs ({self.logs}). Logs already train one iteration per batch: drop one of the two settings"
            )
        if self.offline and any(w > 0 for w in self.datamodule.pool_weights[1:]):
            raise ValueError(
                f"data.pool_weights {self.datamodule.pool_weights} pools earlier buffers, but model.loop.offline has only "
                "iteration 0's buffer: use [1.0]"
            )

    # -- opening the run directory ----------------------------------------------------
    def _open_on_every_rank(self) -> None:
        """Rank 0 opens the run (checks, run_dir, run_state); the others then read what it committed."""
        if not dist_utils.is_distributed():
            self._open()
            return
        if not self.main:
            self.console = Console(stderr=True, quiet=True)
        failure = None
        if self.main:
            self._opening = True
            try:
                self._open()
            except Exception as err:  # the other ranks stop too, instead of waiting for rank 0 forever
                failure = err
            finally:
                self._opening = False
        outcome = dist_utils.broadcast_object(None if failure is None else (type(failure).__name__, str(failure)))
        if failure is not None:
            raise failure
        if outcome is not None:
            raise RunStateError(f"rank 0 could not open the run ({outcome[0]}: {outcome[1]})")
        if not self.main:
            self.state = load_run_state(self.run_dir)
            progress = self.state.in_progress
            if progress is not None and progress.source.get("kind") == "logs":
                self.logs = progress.source["path"]

    def _open(self) -> None:
        """Start a new run, resume an interrupted one, or continue a logged run with its next batch."""
        # Bad model paths fail here, before a run_dir exists or any training starts.
        if self.system.policy_init:
            check_policy_dir(self.system.policy_init)
        if self.system.base_model is not None:
            check_source(self.system.base_model, require_chat_template=True)
            if self.system.bootstrap.buffer:
                read_logs(self.system.bootstrap.buffer)  # a bad buffer fails before any work too
        customer = self.system.customer_model or self.system.base_model
        if self.system.llm_customer is not None:
            check_source(customer, require_chat_template=True)
            if self.system.judge_model is not None:
                check_source(self.system.judge_model, require_chat_template=True)
        state_file = self.run_dir / "run_state.json"
        if not state_file.exists():
            self.state = RunState(seed=self.seed, mode="logs" if self.logs else "simulator")
            self._read_logs_first()
            prepare_run_dir(self.run_dir)
            self._start_logged_iteration()
            self._commit()
            if self.config_text is not None:
                atomic_write_text(self.run_dir / "config.yaml", self.config_text)
            return
        self.state = load_run_state(self.run_dir)
        progress = self.state.in_progress
        if progress is not None and progress.source.get("kind") == "logs":
            # An interrupted logged iteration finishes on the batch it started with, and only on that one.
            if self.logs and str(Path(self.logs).resolve()) != progress.source["path"]:
                raise RunStateError(
                    f"iteration {progress.iteration} of {str(self.run_dir)!r} was interrupted while training on "
                    f"{progress.source['path']}; finish it with --resume true (that batch, or no --data.logs) "
                    f"before giving the next batch {self.logs}"
                )
            self.logs = progress.source["path"]
        interrupted = self.state.in_progress is not None or not self.state.pi0_ready
        if not self.resume and not (self.logs and not interrupted):
            hint = "rerun with --resume true to finish it" if interrupted or not self.state.finished else "it is finished"
            raise RunDirError(
                f"run_dir {str(self.run_dir)!r} already holds a run ({hint}; a logged run continues when given "
                "its next batch with --data.logs; otherwise choose a new --run_dir)"
            )
        changed = self._check_config()
        self._check_zero_checkpoints()
        self._read_logs_first()
        if changed:  # only once the logs passed: a refused batch changes nothing on disk
            atomic_write_text(self.run_dir / "config.yaml", self.config_text)
        removed = remove_stale_temporaries(self.run_dir)
        if removed:
            self.console.print(f"resume: removed {len(removed)} half-written file(s): {', '.join(removed)}", highlight=False)
        if self.logs and self.state.in_progress is None:
            self._start_logged_iteration()
            self._commit()

    def _check_zero_checkpoints(self) -> None:
        """Sharded optimizer state the next fits would load: refuse another world size before anything changes."""
        c = self.state.completed_iterations
        for phase in ("critic", "policy"):
            module = getattr(self.system, phase)
            for j in (c - 1, c):
                checkpoint = self.zero_checkpoint(j, phase)
                if module.keep_optimizer_state and checkpoint.exists():
                    check_zero_checkpoint(checkpoint, dist_utils.world_size(), "trainer.devices x trainer.num_nodes")

    def _start_logged_iteration(self) -> None:
        """Record which batch the next iteration trains on, so a crash anywhere resumes on that batch."""
        if not self.logs:
            return
        self.state.mode = "logs"
        k = self.state.completed_iterations
        progress = IterationProgress(k, {"kind": "logs", "path": str(Path(self.logs).resolve())})
        progress.record = {"iteration": k, "policy": f"pi_{k + 1}", "seconds": {}}
        self.state.in_progress = progress

    def _read_logs_first(self) -> None:
        """Validate the batch of logs before any work (and before a new run_dir is even created)."""
        progress = self.state.in_progress
        if not self.logs or (progress is not None and progress.collected):
            return
        k = progress.iteration if progress is not None else self.state.completed_iterations
        self._log_batch = read_log_batch(self.logs, self.state, self.run_dir, k)

    def _check_config(self) -> bool:
        """Refuse changes a resume could not reproduce; True when config.yaml needs the new text."""
        saved = self.run_dir / "config.yaml"
        if self.config_text is None:
            return False
        if not saved.exists():
            return True
        diffs = config_differences(saved.read_text(encoding="utf-8"), self.config_text, RESUMABLE_CHANGES)
        if diffs and not self.allow_config_change:
            raise RunStateError(
                f"the config differs from the one {str(self.run_dir)!r} was started with, so resuming would not "
                "reproduce the run:\n  " + "\n  ".join(diffs) + "\npass --allow_config_change true to continue anyway"
            )
        if diffs:
            self.console.print("[yellow]continuing with a changed config:[/yellow]\n  " + "\n  ".join(diffs), highlight=False)
        # Rewrite only for a real change: a bare --resume (no --data.logs) changes nothing.
        every = config_differences(saved.read_text(encoding="utf-8"), self.config_text, set())
        return any(not (d.startswith("data.logs:") and not self.logs) for d in every)

    # -- restoring modules after a restart -----------------------------------------------
    def _restore(self) -> None:
        """Bring the modules to the last committed state (everything a fresh process lacks)."""
        state, policy = self.state, self.system.policy
        c = state.completed_iterations
        progress = state.in_progress
        policy_from = self.iteration_dir(c) / "policy" if progress and progress.policy_fitted else self.policy_dir(c)
        policy.load(policy_from)
        base = self.system.base_model
        if base is not None and base.gradient_checkpointing:  # a saved folder does not carry the setting
            enable_gradient_checkpointing(policy.policy)
        # Adam moments exist only for policies this run fitted (never for pi_0 / policy_init).
        fitted_in = c if progress and progress.policy_fitted else c - 1
        if fitted_in >= 0:
            self._load_optimizer_state(policy, self.iteration_dir(fitted_in) / "policy_optimizer.pt")
        if policy.kl_anchor == "pi_0":  # `load` made the reference pi_k; the run's reference is pi_0
            policy.pin_reference(self.policy_dir(0))
        if state.policy_state:
            policy.kl_controller.load_state_dict(state.policy_state["kl_controller"])
        critic_file = (
            self.iteration_dir(c) / "critic.pt" if progress and progress.critic_fitted else self.iteration_dir(c - 1) / "critic.pt"
        )
        if self.offline and (c > 0 or (progress and progress.critic_fitted)):
            critic_file = self.iteration_dir(0) / "critic.pt"  # Q_0 serves every iteration
        if critic_file.exists():
            self._load_critic(critic_file)
        for cb in self.callbacks:
            saved = state.callbacks.get(type(cb).__name__)
            if saved is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(saved)
        self.history = list(state.history)
        self.initial_eval = state.initial_eval

    @staticmethod
    def _load_optimizer_state(module, path: Path) -> None:
        if module.keep_optimizer_state and path.exists():
            module._carried_optimizer_state = torch.load(path, weights_only=False)

    def _load_critic(self, path: Path) -> None:
        critic = self.system.critic
        saved = torch.load(path, weights_only=False)
        critic.build(self.base_model_dir)
        critic.load_state_dict(saved["state_dict"])
        critic._carried_optimizer_state = saved.get("optimizer_state")

    def _save_critic(self, path: Path) -> None:
        if not self.main:
            return
        critic = self.system.critic
        with atomic_path(path) as tmp:
            torch.save(
                {"state_dict": critic.state_dict(), "hparams": dict(critic.hparams), "optimizer_state": critic._carried_optimizer_state},
                tmp,
            )
            failpoint("critic_save.before_rename")

    # -- phases ---------------------------------------------------------------------------
    def make_initial_policy(self) -> None:
        """pi_0: a given folder, a pretrained chat model (copied into the run), or behaviour cloning on imagined conversations."""
        policy = self.system.policy
        if self.system.policy_init:
            policy.load(self.system.policy_init)
            return
        if self.system.base_model is not None:
            model, tokenizer = load_causal_lm(self.system.base_model, require_chat_template=True)
            if self.system.bootstrap.buffer:
                # pi_0 = the base model behaviour-cloned on imagined (or logged) conversations.
                self._seed(-1, "bootstrap")
                conversations = read_logs(self.system.bootstrap.buffer)
                behaviour_clone(model, tokenizer, conversations, self.system.bootstrap, self.datamodule, self.trainer_factory, self.run_dir / "pi_0")
            policy.attach(model, tokenizer)
            # A copy in the run: resume and the critic's backbone never depend on the source staying put.
            card = {"policy_id": "pi_0", "run_id": self.state.run_id, "parent": None, "source": self.system.base_model.path}
            # Always a full (merged) folder: the critic's backbone and every adapter start from it.
            policy.lora_base = str(self.policy_dir(0).resolve())
            if self.main:
                policy.save(self.policy_dir(0), card=card, merge=True)
            return
        out = self.run_dir / "pi_0"
        if self.main:
            shutil.rmtree(out, ignore_errors=True)  # what an interrupted bootstrap left (never committed)
        dist_utils.barrier()
        self._seed(-1, "bootstrap")
        start = time.perf_counter()
        model, tokenizer = make_pi0(self.system.bootstrap, self.environment, self.datamodule, self.trainer_factory, out, self.seed)
        policy.attach(model, tokenizer)
        if self.main:
            policy.save(out / "policy", card={"policy_id": "pi_0", "run_id": self.state.run_id, "parent": None, "source": "bootstrap"})
            atomic_write_text(out / "bootstrap.json", f'{{"seconds": {time.perf_counter() - start}, "episodes": {self.system.bootstrap.episodes}}}\n')

    def _conversations_before(self) -> int:
        return sum(int(r.get("collect", {}).get("episodes", 0)) for r in self.history)

    def collect(self, k: int, progress: IterationProgress) -> None:
        buffer = self.iteration_dir(k) / "buffer"
        if progress.collected:
            return
        if self.offline and k > 0:  # everything was collected in iteration 0
            self.record["collect"] = {"episodes": 0, "reused_from_iteration": 0}
            self.record["conversations_collected"] = self._conversations_before()
            self.record["seconds"]["collect"] = 0.0
            progress.collected = True
            self._commit()
            return
        if not self.main:  # rank 0 collects; the commit below is the barrier after which the buffer is on disk
            progress.collected = True
            self._commit()
            return
        shutil.rmtree(buffer, ignore_errors=True)  # written but never committed: redo it
        start = time.perf_counter()
        if self.logs:
            batch = self._log_batch
            conversations, progress.source = batch.conversations, batch.source
            for message in batch.warnings:
                self._warn(message)
        else:
            self._seed(k, "collect")
            # Offline: the whole run's conversation budget, all from pi_0, at once.
            episodes = self.config.episodes_per_iteration * self.num_iterations if self.offline else None
            conversations = simulate_batch(self, k, episodes)
            failpoint("collect.before_save")
        save_buffer(conversations, buffer)
        stats = summarize_conversations(conversations)
        self.record["collect"] = {"episodes": stats["episodes"], "success_rate": stats["success_rate"], "mean_turns": stats["mean_turns"]}
        # The x-axis of budget comparisons: conversations collected by the run so far, this batch included.
        self.record["conversations_collected"] = self._conversations_before() + stats["episodes"]
        self.record["seconds"]["collect"] = time.perf_counter() - start
        progress.collected = True
        self._commit()

    def _training_buffers(self, k: int) -> tuple[list[str], list[float]]:
        """This iteration's buffer and, with data.pool_weights, earlier ones (newest first)."""
        if self.offline:
            return [str(self.iteration_dir(0) / "buffer")], [1.0]
        paths, weights = [], []
        for age, weight in enumerate(self.datamodule.pool_weights):
            j = k - age
            if j < 0:
                break
            if weight > 0:
                paths.append(str(self.iteration_dir(j) / "buffer"))
                weights.append(weight)
        return paths, weights

    def load_training_data(self, k: int) -> list[str]:
        """Give the DataModule this iteration's buffer (and pooled earlier ones); returns their paths."""
        self.datamodule.connect(self.policy.tokenizer)
        paths, weights = self._training_buffers(k)
        self.datamodule.load_buffers(paths, None if weights == [1.0] else weights)
        return paths

    def fit_critic(self, k: int) -> dict:
        critic, dm = self.system.critic, self.datamodule
        paths = self.load_training_data(k)
        dm.bootstrap_members = critic.ensemble_size
        dm.use_phase("critic")
        if not critic.is_built or not critic.warm_start:
            critic.build(self.base_model_dir)
        bootstrapped = critic.target in ("td", "fqe")
        if critic.target == "myopic":
            dm.set_targets(myopic_targets(dm.conversations))
        metrics = self._fit_critic_once(k, "critic_logs")
        if bootstrapped:
            for round_ in range(1, critic.td_rounds + 1):
                dm.set_targets(self._bootstrapped_targets(dm.conversations))
                dm.use_phase("critic")
                metrics = self._fit_critic_once(k, f"critic_logs_td{round_}")
        targets = [e.target for e in dm.all_examples]
        metrics.update(
            target=critic.target,
            fits=1 + (critic.td_rounds if bootstrapped else 0),
            mean_target=sum(targets) / len(targets),
            buffers=len(paths),
            conversations=len(dm.conversations),
        )
        if critic.ensemble_size > 1:
            metrics.update(ensemble_size=critic.ensemble_size, pessimism=critic.pessimism)
        return metrics

    def _fit_critic_once(self, k: int, logs: str) -> dict:
        trainer = self.trainer_factory("critic", max_epochs=self.config.critic_epochs, default_root_dir=str(self.iteration_dir(k) / logs))
        self._fit_phase(trainer, self.system.critic, k, "critic")
        return {key.split("/", 1)[1]: float(v) for key, v in trainer.callback_metrics.items() if key.startswith("critic/val")}

    def zero_checkpoint(self, k: int, phase: str) -> Path:
        """The sharded ZeRO checkpoint a DeepSpeed `phase` fit of iteration k leaves (with keep_optimizer_state)."""
        return self.iteration_dir(k) / f"{phase}_zero"

    def _fit_phase(self, trainer, module, k: int, phase: str) -> None:
        """One phase fit; under DeepSpeed with keep_optimizer_state its optimizer state goes through sharded checkpoints."""
        if module.keep_optimizer_state:
            trainer.zero_checkpoint_dir = self.zero_checkpoint(k, phase)
            previous = self.zero_checkpoint(k - 1, phase)
            module._zero_checkpoint_in = str(previous) if previous.exists() else None
            if module._zero_checkpoint_in is not None:
                check_zero_checkpoint(previous, dist_utils.world_size(), "trainer.devices x trainer.num_nodes")
        trainer.fit(module, datamodule=self.datamodule)
        if getattr(trainer, "partition_report", None) is not None:  # DeepSpeed: what this process held (rank 0's view)
            self.record.setdefault("sharding", {})[phase] = {
                "world_size": dist_utils.world_size(),
                "zero_stage": zero_stage(trainer),
                **trainer.partition_report,
            }

    def _bootstrapped_targets(self, conversations) -> dict:
        """TD(lambda) or FQE targets from the current critic (critic_targets.py)."""
        critic, dm, policy = self.system.critic, self.datamodule, self.system.policy
        # Q at a conversation's opening state is never bootstrapped on: score only later turns.
        first = {c.conversation_id: c.agent_turns[0] for c in conversations if c.agent_turns}
        examples = [e for e in dm.all_examples if e.turn_index != first.get(e.conversation_id)]
        prompts = [e.prompt_ids for e in examples]
        if critic.target == "fqe":
            replies = sample_replies(policy.policy, policy.tokenizer, prompts, policy.max_new_tokens, temperature=policy.temperature)
            lam = 0.0
        else:
            replies = [e.action_ids for e in examples]
            lam = critic.td_lambda
        q = score_pairs(critic, prompts, replies, policy.tokenizer.pad_token_id)
        next_q = {(e.conversation_id, e.turn_index): value for e, value in zip(examples, q)}
        return lambda_return_targets(conversations, next_q, dm.gamma, lam)

    def fit_policy(self, k: int) -> dict:
        policy, dm = self.system.policy, self.datamodule
        dm.use_phase("policy")
        policy.attach_critic(self.system.critic)
        trainer = self.trainer_factory("policy", max_epochs=1, default_root_dir=str(self.iteration_dir(k) / "policy_logs"))
        self._fit_phase(trainer, policy, k, "policy")
        return dict(policy.fit_stats)

    def fit_filtered_bc(self, k: int) -> dict:
        """The filtered-BC baseline: fine-tune pi_k with the SFT loss on the agent turns of the successful
        conversations of this iteration's training buffers (its own, pooled ones, or offline iteration 0's)."""
        dm, policy = self.datamodule, self.policy
        self.load_training_data(k)
        successes = [c for c in dm.conversations if c.success and c.agent_turns]
        stats = {"conversations": len(dm.conversations), "successful": len(successes)}
        # Behaviour cloning holds out whole conversations for its validation loss, as the critic does.
        if not any(not dm.in_validation(c.conversation_id) for c in successes):
            self._warn(f"iteration {k}: no successful conversation to clone (outside the validation split); pi_{k + 1} = pi_{k}")
            return {**stats, "examples": 0}
        metrics = behaviour_clone(
            policy.policy, policy.tokenizer, successes, self.system.filtered_bc, dm, self.trainer_factory, self.iteration_dir(k) / "bc_logs"
        )
        return {**stats, "examples": len(dm.train_examples), **metrics}

    def _policy_card(self, k: int, source: dict) -> dict:
        return {
            "policy_id": f"pi_{k + 1}",
            "parent": f"pi_{k}",
            "iteration": k,
            "run_id": self.state.run_id,
            "run_dir": str(self.run_dir.resolve()),
            "base_model": str(Path(self.base_model_dir).resolve()),
            "trained_on": source,
            "pooled": [{"iteration": k - age, "weight": w} for age, w in enumerate(self.datamodule.pool_weights[1:], 1) if k - age >= 0 and w > 0],
            "critic_target": self.system.critic.target,
            "algorithm": self.system.algorithm,
        }

    # -- one iteration ----------------------------------------------------------------------
    def _phase(self, k: int, fn):
        try:
            return fn(k)
        except FloatingPointError as err:
            where = "before iteration 0" if k < 0 else f"iteration {k}"
            raise NumericalFault(
                f"{where}, {err}. The weights were not updated with it; the last good state is "
                f"{self._last_good()} ({self.run_dir / 'run_state.json'}). Lower the learning rate or fix the data, "
                "then rerun with --resume (and --allow_config_change true if the config changed)."
            ) from err

    def _last_good(self) -> str:
        c = self.state.completed_iterations
        return f"pi_{c} in {self.policy_dir(c)}"

    def run_iteration(self, k: int) -> None:
        state = self.state
        progress = state.in_progress
        if progress is None or progress.iteration != k:
            source = {"kind": "logs", "path": str(Path(self.logs).resolve())} if self.logs else {"kind": "simulator"}
            progress = IterationProgress(k, source)
            progress.record = {"iteration": k, "policy": f"pi_{k + 1}", "seconds": {}}
            state.in_progress = progress
        self.record = progress.record
        self._call("on_iteration_start", k)

        self.collect(k, progress)

        if self.filtered_bc:
            pass  # no critic: the policy step clones the successful conversations
        elif progress.critic_fitted:
            self.load_training_data(k)
        elif self.offline and k > 0:  # Q_0 (fitted once, in iteration 0) serves every iteration
            self.load_training_data(k)
            self.record["critic"] = {**self.history[0]["critic"], "fits": 0, "reused_from_iteration": 0}
            self.record["seconds"]["critic"] = 0.0
            progress.critic_fitted = True
            self._commit()
        else:
            self._seed(k, "critic")
            start = time.perf_counter()
            self.record["critic"] = self._phase(k, self.fit_critic)
            self.record["seconds"]["critic"] = time.perf_counter() - start
            self._save_critic(self.iteration_dir(k) / "critic.pt")
            progress.critic_fitted = True
            self._commit()
        if "critic" in self.record:
            self._call("on_critic_end", k, self.record["critic"])

        policy_key = "bc" if self.filtered_bc else "ppo"
        if not progress.policy_fitted:
            self._seed(k, "policy")
            start = time.perf_counter()
            self.record[policy_key] = self._phase(k, self.fit_filtered_bc if self.filtered_bc else self.fit_policy)
            self.record["seconds"]["policy"] = time.perf_counter() - start
            out = self.iteration_dir(k) / "policy"
            if self.main:
                self.policy.save(out, card=self._policy_card(k, progress.source))
            if self.main and self.policy.keep_optimizer_state and not self.filtered_bc and self.policy._carried_optimizer_state is not None:
                with atomic_path(out.parent / "policy_optimizer.pt") as tmp:
                    torch.save(self.policy._carried_optimizer_state, tmp)
            state.policy_state = {"kl_controller": self.policy.kl_controller.state_dict()}
            progress.policy_fitted = True
            self._commit()
        elif not self.filtered_bc:
            self.policy.attach_critic(self.system.critic)
        self._call("on_policy_end", k, self.record[policy_key])

        self._seed(k, "iteration_end")
        self._call("on_iteration_end", k, self.record)
        self.should_stop = bool(dist_utils.broadcast_object(self.should_stop))  # rank 0's callbacks decide
        self.history.append(self.record)
        state.history = list(self.history)
        state.lineage.append({"iteration": k, "trained": f"pi_{k}", "exported": f"pi_{k + 1}", "source": progress.source})
        state.completed_iterations = k + 1
        state.in_progress = None
        if self.should_stop:  # committed with the iteration, so a resume never runs past an early stop
            state.finished = state.stopped_early = True
        state.callbacks = {type(cb).__name__: cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")}
        self._commit()

    # -- the loop ---------------------------------------------------------------------------
    def iterations_to_run(self) -> range:
        start = self.state.completed_iterations
        if self.logs:
            # Logged mode: one iteration per batch of logs (per `fit` call).
            return range(start, start + 1)
        if self.state.mode == "logs":
            self.console.print(f"{self.run_dir} trains on logs and is between batches; give the next one with --data.logs", highlight=False)
            return range(start, start)
        if self.state.stopped_early or start >= self.num_iterations:
            self.console.print(f"{self.run_dir} is finished ({start} iteration(s)); nothing to resume", highlight=False)
            return range(start, start)
        self.state.finished = False  # a finished run extended with a larger --model.loop.iterations
        return range(start, self.num_iterations)

    def run(self) -> dict:
        self.check_variant_settings()
        self._open_on_every_rank()
        try:
            return self._run()
        except OSError as err:
            raise RunStateError(
                f"file error in the run: {err}. Everything is written to a temporary name and renamed, so nothing is "
                f"half-written: {self.run_dir / 'run_state.json'} still describes the last finished step. If the disk "
                "is full or a folder unwritable, free space or fix permissions, then rerun with --resume true."
            ) from err

    def _run(self) -> dict:
        state = self.state
        if self.system.llm_customer is not None:
            self.environment = make_environment(self.system)
        self.base_model_dir = self.policy_dir(0)
        if not state.pi0_ready:
            self._phase(-1, lambda _: self.make_initial_policy())
            if self.policy.kl_anchor == "pi_0":  # the policy is pi_0 now: keep it as the reference
                self.policy.pin_reference()
            state.pi0_ready = True
            self._commit()
        else:
            self._restore()
        self._seed(-1, "initial_eval")
        self._call("on_run_start")
        self.initial_eval = dist_utils.broadcast_object(self.initial_eval)  # the commit below happens on every rank or none
        if state.initial_eval is None and self.initial_eval is not None:
            state.initial_eval = self.initial_eval
            self._commit()
        for k in self.iterations_to_run():
            self.iteration = k
            self.run_iteration(k)
            if self.should_stop:
                break
        last = state.completed_iterations - 1
        summary = {"final_policy": str(self.policy_dir(last + 1))}
        if not self.logs and (self.should_stop or state.completed_iterations >= self.num_iterations):
            state.finished = True
        state.stopped_early = state.stopped_early or self.should_stop
        self._call("on_run_end", summary)
        self._commit()
        return summary
