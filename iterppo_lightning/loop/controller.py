"""`OuterLoop`: the plain-Python controller of Iterative PPO (Algorithm 1).

    pi_0 <- given, a pretrained chat model, or behaviour cloning on imagined conversations
    for k = 0 .. K-1:
        D_k     <- collect conversations with pi_k (or read a batch of logs)      `collect`
        Q_k     <- fit the critic on D_k (fresh Trainer)                          `fit_critic`
        pi_k+1  <- improve pi_k against Q_k on D_k's states (fresh Trainer)       `improve_policy`
        callbacks estimate, evaluate, export, report, decide to stop; commit     `end_iteration`

Lightning 2.x has no public loop API, and a Trainer's second `fit` trains
nothing, hence a controller around fresh Trainers instead of a custom fit loop.
The baselines (filtered BC, offline, myopic / TD / FQE critics) plug in at three
seams (variants.py); the run folder, its commits and resume live in run_dir.py.

Each step ends with a commit to `run_state.json` (run_state.py), and each step
reseeds from (seed, iteration, step): a run killed anywhere and resumed computes
exactly what an uninterrupted run computes.

Several processes (distributed/collectives.py): every process runs this loop. Rank 0 alone
collects, evaluates (the callbacks) and writes; every commit is a barrier, so
the other ranks read buffers and pi_0 only once they are on disk; all ranks
take part in the phase fits, and rank 0's early-stop decision is broadcast.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.loggers import Logger
from rich.console import Console

from iterppo_lightning.callbacks import IterationCallback, callback_chain, callback_states, load_callback_states
from iterppo_lightning.data.buffer import load_buffer, save_buffer
from iterppo_lightning.data.log_io import read_logs
from iterppo_lightning.data.rendering import apply_system_prompt
from iterppo_lightning.distributed import collectives as dist_utils
from iterppo_lightning.distributed.zero import check_zero_checkpoint, zero_stage
from iterppo_lightning.env.episodes import summarize_conversations
from iterppo_lightning.env.factory import check_environment_sources, make_environment
from iterppo_lightning.loop.bootstrap import behaviour_clone, make_pi0
from iterppo_lightning.loop.critic_probe import ProbeContext, run_critic_probe
from iterppo_lightning.loop.oracle_critic import OracleCritic, make_oracle_critic
from iterppo_lightning.loop.run_dir import WORLD_SIZE_KEYS, OpenSettings, RunFolder, write_bootstrap_record
from iterppo_lightning.loop.run_logger import PHASE_NAMESPACES, RunLogger
from iterppo_lightning.loop.run_state import IterationProgress, RunState, RunStateError
from iterppo_lightning.loop.stage import LoopStage
from iterppo_lightning.loop.table_critic import TableCritic, TableRewardCritic
from iterppo_lightning.loop.variants import (
    DataSource,
    check_variant_settings,
    choose_critic_targets,
    choose_data_source,
    choose_policy_improvement,
)
from iterppo_lightning.loop.view import LoopView
from iterppo_lightning.models.policy_folder import check_policy_dir
from iterppo_lightning.models.source import check_source, enable_gradient_checkpointing, load_causal_lm
from iterppo_lightning.utils.progress_bar import name_progress_bar
from iterppo_lightning.utils.seeding import derive_seed

TrainerFactory = Callable[..., L.Trainer]
"""`factory(phase, **overrides)` -> a fresh Trainer. Sharded optimizer state (keep_optimizer_state under
DeepSpeed) needs one with a `zero_checkpoint_dir` it saves to after a fit, as the CLI's `IterPPOTrainer` has."""


def check_trainer_saves_zero_state(trainer: L.Trainer, phase: str) -> None:
    """Refuse a DeepSpeed phase Trainer that would drop the sharded optimizer state keep_optimizer_state asks for."""
    if zero_stage(trainer) > 0 and not hasattr(trainer, "zero_checkpoint_dir"):
        raise TypeError(
            f"model.{phase}.keep_optimizer_state under DeepSpeed needs a phase Trainer that saves the sharded "
            f"optimizer state (a `zero_checkpoint_dir` attribute, as commands/lightning_cli.IterPPOTrainer has); "
            f"the trainer factory made a {type(trainer).__name__}, which would silently drop it. Make phase "
            f"Trainers with IterPPOTrainer (or a subclass), or set model.{phase}.keep_optimizer_state false"
        )


def imagined_buffer(configured: str | None, folder: RunFolder, policy_init: str | None) -> Path:
    """data.imagined_weight's conversations: data.imagined_buffer, else the bootstrap's own buffer (RUN/pi_0/buffer,
    or the `buffer` folder next to model.policy_init, as `iterppo bootstrap OUTPUT` writes it)."""
    candidates = [Path(configured)] if configured else [folder.pi0_dir / "buffer"]
    if not configured and policy_init:
        candidates.append(Path(policy_init).parent / "buffer")
    for path in candidates:
        if path.is_dir():
            return path
    raise ValueError(
        f"data.imagined_weight pools pi_0's bootstrap conversations, but there is no buffer at "
        f"{' or '.join(str(p) for p in candidates)}: set data.imagined_buffer to one (e.g. `iterppo bootstrap`'s "
        "OUTPUT/buffer), or data.imagined_weight 0"
    )


class NumericalFault(RuntimeError):
    """A loss became NaN or Inf; the phase stopped before touching the weights."""


class OuterLoop:
    def __init__(
        self,
        system,
        datamodule,
        trainer_factory: TrainerFactory,
        run_dir: str | Path,
        callbacks: list[IterationCallback] | None = None,
        seed: int = 0,
        config_text: str | None = None,
        resume: bool = False,
        allow_config_change: bool = False,
        console: Console | None = None,
        logger: bool | Logger | list[Logger] | None = None,
        config_defaults: str | None = None,
    ):
        """
        Args:
            system: the `IterativePPO` the CLI built (critic, policy, environment, loop settings).
            datamodule: the DataModule both phases read.
            trainer_factory: `factory(phase, **overrides)` -> a fresh Trainer for one phase fit.
            run_dir: the run's folder (new, or one to resume or continue).
            callbacks: the callback chain; None = the one model.loop configures (callbacks.callback_chain).
            seed: the run's seed; every step reseeds from (seed, iteration, step).
            config_text: the config as YAML, kept in config.yaml and compared on resume.
            resume: finish an interrupted run instead of refusing its folder.
            allow_config_change: resume although the config changed.
            logger: `trainer.logger`: None/True = the run's CSV (and TensorBoard) logs in RUN/logs, False = none,
                Logger object(s) = those and the CSV (loop/run_logger.py).
            config_defaults: the config with nothing set, as YAML; on resume a key the saved config lacks (the run
                predates it) counts as unchanged when it has this default (None: compared as None).
        """
        self.system = system
        self.config = system.loop
        self.datamodule = datamodule
        self.make_trainer = trainer_factory
        self.logger_setting = logger
        self.run_logger: RunLogger | None = None
        """The run's loggers and global step (made once the run folder is open)."""
        self.current_iteration = -1
        """The iteration the phase Trainers are for (-1: pi_0), for their logger and progress bar."""
        self.seed = seed
        self.console = console or Console(stderr=True)
        self.callbacks = callback_chain(system.loop) if callbacks is None else list(callbacks)
        self.folder = RunFolder(run_dir, system.policy_init, self.console)
        self.settings = OpenSettings(
            seed,
            datamodule.logs,
            resume,
            allow_config_change,
            config_text,
            datamodule.max_message_chars,
            config_defaults,
        )
        self.logs = datamodule.logs
        self.improvement = choose_policy_improvement(system.algorithm)
        self.source: DataSource | None = None  # chosen once the run is open: it may resume a batch of logs
        self.view: LoopView | None = None
        self.record: dict = {}
        self.base_model_dir: Path | None = None
        self.oracle: OracleCritic | None = None
        """model.loop.oracle_critic: the oracle of the current policy phase (None when off, or before the phase)."""
        self.stage = LoopStage("start")
        """The step running now: what an interrupted run names (commands/lightning_cli.py)."""

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def state(self) -> RunState:
        return self.folder.state

    @property
    def policy(self):
        return self.system.policy

    @property
    def main(self) -> bool:
        """True on the process that collects, evaluates and writes (the only one in a single-process run)."""
        return dist_utils.is_main()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        check_variant_settings(self.system, self.datamodule)
        if dist_utils.is_distributed() and not self.main:
            self.console = self.folder.console = Console(stderr=True, quiet=True)
        carried = {"critic": self.system.critic, "policy": self.system.policy}
        opened = self.folder.open_on_every_rank(self.settings, carried, preflight=self.check_model_sources)
        self.logs = opened.logs
        self.source = choose_data_source(self.config, self.logs, opened.log_batch)
        try:
            return self._run()
        except OSError as err:
            raise RunStateError(
                f"file error in the run: {err}. Everything is written to a temporary name and renamed, so nothing is "
                f"half-written: {self.folder.state_file} still describes the last finished step. If the disk "
                "is full or a folder unwritable, free space or fix permissions, then rerun with --resume true."
            ) from err

    def _run(self) -> dict:
        self.run_logger = RunLogger(self.run_dir, self.logger_setting, state=self.state, console=self.console)
        if self.run_logger.enabled and self.main and self.run_logger.next_step == 0 and self.settings.config_text:
            self.run_logger.log_hyperparams(yaml.safe_load(self.settings.config_text) or {})  # once per run
        self.view = self.make_view()
        self.base_model_dir = self.folder.policy_dir(0)
        self.start_from_pi0()
        self.evaluate_pi0()
        for k in self.iterations_to_run():
            self.run_iteration(k)
            if self.view.should_stop:
                break
        return self.finish()

    def run_iteration(self, k: int) -> None:
        """One iteration; each step commits, and a resumed iteration skips the steps already on disk."""
        progress = self.folder.begin_iteration(k, self.logs)
        self.current_iteration = k
        self.record = progress.record
        self._call("on_iteration_start", k)
        self.collect(k, progress)  # D_k with pi_k
        self.fit_critic(k, progress)  # Q_k on D_k
        self.improve_policy(k, progress)  # pi_(k+1) from pi_k against Q_k
        self.end_iteration(k, progress)  # evaluate, export, report, maybe stop; commit

    # -- pi_0 -------------------------------------------------------------------------------
    def start_from_pi0(self) -> None:
        """Make pi_0 in a new run; in a restarted process, bring the modules back to the last commit."""
        if self.state.pi0_ready:
            self.restore()
            return
        self.stage = LoopStage("bootstrap")
        self._guarded(-1, lambda _: self.make_initial_policy())
        self.improvement.start(self.policy)
        self.state.pi0_ready = True
        self.folder.commit()

    def evaluate_pi0(self) -> None:
        self.stage = LoopStage("evaluation")
        self.seed_step(-1, "initial_eval")
        self._call("on_run_start")
        # The commit below happens on every rank or none.
        self.view.initial_eval = dist_utils.broadcast_object(self.view.initial_eval)
        if self.state.initial_eval is None and self.view.initial_eval is not None:
            self.state.initial_eval = self.view.initial_eval
            self.folder.commit()

    def make_initial_policy(self) -> None:
        """pi_0: a given folder, a pretrained chat model (copied into the run), or behaviour cloning on imagined
        conversations."""
        system, policy, folder = self.system, self.system.policy, self.folder
        if system.policy_init:
            policy.load(system.policy_init)
            return
        if system.base_model is not None:
            model, tokenizer = load_causal_lm(system.base_model, require_chat_template=True)
            if system.system_prompt is not None:
                apply_system_prompt(tokenizer, system.system_prompt)  # saved with pi_0: every later reader has it
            if system.bootstrap.buffer:
                # pi_0 = the base model behaviour-cloned on imagined (or logged) conversations.
                self.seed_step(-1, "bootstrap")
                conversations = read_logs(system.bootstrap.buffer)
                behaviour_clone(
                    model,
                    tokenizer,
                    conversations,
                    system.bootstrap,
                    self.datamodule,
                    self.trainer_factory,
                    folder.pi0_dir,
                )
            policy.attach(model, tokenizer)
            # A copy in the run: resume and the critic's backbone never depend on the source staying put.
            card = {"policy_id": "pi_0", "run_id": self.state.run_id, "parent": None, "source": system.base_model.path}
            # Always a full (merged) folder: the critic's backbone and every adapter start from it.
            policy.lora_base = str(folder.policy_dir(0).resolve())
            if self.main:
                policy.save(folder.policy_dir(0), card=card, merge=True)
            return
        out = folder.pi0_dir
        if self.main:
            shutil.rmtree(out, ignore_errors=True)  # what an interrupted bootstrap left (never committed)
        dist_utils.barrier()
        self.seed_step(-1, "bootstrap")
        start = time.perf_counter()
        environment = self.view.environment
        model, tokenizer = make_pi0(
            system.bootstrap, environment, self.datamodule, self.trainer_factory, out, self.seed
        )
        policy.attach(model, tokenizer)
        if self.main:
            card = {"policy_id": "pi_0", "run_id": self.state.run_id, "parent": None, "source": "bootstrap"}
            policy.save(folder.policy_dir(0), card=card)
            write_bootstrap_record(out, time.perf_counter() - start, system.bootstrap.episodes)

    # -- D_k ----------------------------------------------------------------------------------
    def collect(self, k: int, progress: IterationProgress) -> None:
        """D_k: rank 0 collects and saves the buffer; the commit is the barrier after which it is on disk."""
        self.stage = LoopStage("collection", k)
        if progress.collected:
            return
        if self.source.reuses_collection(k):  # offline: everything was collected in iteration 0
            self.record["collect"] = {"episodes": 0, "reused_from_iteration": 0}
            self.record["conversations_collected"] = self._conversations_before()
            self.record["seconds"]["collect"] = 0.0
        elif self.main:
            buffer = self.folder.buffer_dir(k)
            shutil.rmtree(buffer, ignore_errors=True)  # written but never committed: redo it
            start = time.perf_counter()
            batch = self.source.collect(self, k)
            progress.source = batch.source
            for message in batch.warnings:
                self.warn(message)
            save_buffer(batch.conversations, buffer)
            stats = summarize_conversations(batch.conversations)
            self.record["collect"] = {key: stats[key] for key in ("episodes", "success_rate", "mean_turns")}
            # The x-axis of budget comparisons: conversations collected by the run so far, this batch included.
            self.record["conversations_collected"] = self._conversations_before() + stats["episodes"]
            self.record["seconds"]["collect"] = time.perf_counter() - start
        progress.collected = True
        self.folder.commit()

    def _conversations_before(self) -> int:
        return sum(int(r.get("collect", {}).get("episodes", 0)) for r in self.view.history)

    def load_training_data(self, k: int) -> list[str]:
        """Give the DataModule this iteration's buffer (and pooled earlier ones); returns their paths."""
        self.datamodule.connect(self.policy.tokenizer)
        paths, weights = self.source.training_buffers(self.folder, k, self.datamodule.pool_weights)
        self.datamodule.load_buffers(paths, None if weights == [1.0] else weights)
        if self.datamodule.imagined_weight > 0:  # pi_0's bootstrap conversations, for the critic only
            imagined = imagined_buffer(self.datamodule.imagined_buffer, self.folder, self.system.policy_init)
            self.datamodule.add_critic_only(load_buffer(imagined), self.datamodule.imagined_weight)
            paths = [*paths, str(imagined)]
        return paths

    # -- Q_k ----------------------------------------------------------------------------------
    def fit_critic(self, k: int, progress: IterationProgress) -> None:
        """Q_k on D_k (or, offline, Q_0 again); filtered BC fits none, nor does a run with the oracle critic (its
        Q comes from simulator continuations during the policy phase: `policy_critic`)."""
        if not self.improvement.uses_critic:
            return
        self.stage = LoopStage("critic", k)
        reused_from = self.source.critic_iteration(k)
        oracle = self.config.oracle_critic
        if progress.critic_fitted:
            self.load_training_data(k)
        elif self.config.table_critic is not None:
            self.load_training_data(k)
            table = self.table_critic(k)
            self.record["critic"] = {"table": True, "fits": 0, "rows": table.rows, "prior": table.prior}
            self.record["seconds"]["critic"] = 0.0
            self.probe_critic(k, table)
            progress.critic_fitted = True
            self.folder.commit()
        elif oracle is not None:
            self.load_training_data(k)
            self.record["critic"] = {
                "oracle": True,
                "fits": 0,
                "continuations": oracle.continuations,
                "persona": oracle.persona,
                "seed": oracle.seed,
            }
            self.record["seconds"]["critic"] = 0.0
            if self.config.critic_probe is not None:
                self.record["critic_probe"] = {"skipped": "model.loop.oracle_critic: no critic is fitted to probe"}
            progress.critic_fitted = True
            self.folder.commit()
        elif reused_from != k:  # offline: Q_0 (fitted once, in iteration 0) serves every iteration
            self.load_training_data(k)
            critic = self.view.history[reused_from]["critic"]
            self.record["critic"] = {**critic, "fits": 0, "reused_from_iteration": reused_from}
            self.record["seconds"]["critic"] = 0.0
            progress.critic_fitted = True
            self.folder.commit()
        else:
            self.seed_step(k, "critic")
            start = time.perf_counter()
            self.record["critic"] = self._guarded(k, self.fit_q)
            self.record["seconds"]["critic"] = time.perf_counter() - start
            self.folder.save_critic(self.system.critic, k)
            self.probe_critic(k)
            progress.critic_fitted = True
            self.folder.commit()
        self._call("on_critic_end", k, self.record["critic"])

    def fit_q(self, k: int) -> dict:
        """One or more critic fits on this iteration's data, with the targets critic.target asks for."""
        critic, dm = self.system.critic, self.datamodule
        paths = self.load_training_data(k)
        rule = choose_critic_targets(critic.target)
        # An ensemble trains each member on its own bootstrap resample of the conversations; the auxiliary loss
        # (critic.aux_next_message_coef) needs each turn's next customer message in the batches, and the branch
        # contrast (critic.branch_contrast_coef) each branch pair in one batch.
        phase = dict(
            bootstrap_members=critic.ensemble_size,
            next_messages=critic.uses_aux,
            branch_pairs=critic.uses_branch_pairs,
        )
        with dm.for_phase("critic", **phase):
            if not critic.is_built or not critic.warm_start:
                critic.build(self.base_model_dir)
            first = rule.first(self)
            if first is not None:
                dm.set_targets(first)
            metrics = self._fit_critic_once(k, "critic_logs")
            refits = rule.refits(critic)
            for round_ in range(1, refits + 1):
                dm.set_targets(rule.refit(self))
                metrics = self._fit_critic_once(k, f"critic_logs_td{round_}")
        targets = [e.target for e in dm.all_examples]
        metrics.update(
            target=critic.target,
            fits=1 + refits,
            mean_target=sum(targets) / len(targets),
            buffers=len(paths),
            conversations=len(dm.conversations),
        )
        if critic.ensemble_size > 1:
            metrics.update(ensemble_size=critic.ensemble_size, pessimism=critic.pessimism)
        return metrics

    def _fit_critic_once(self, k: int, logs: str) -> dict:
        trainer = self.fit_phase("critic", self.system.critic, k, max_epochs=self.config.critic_epochs, logs=logs)
        metrics = trainer.callback_metrics.items()
        return {key.split("/", 1)[1]: float(v) for key, v in metrics if key.startswith("critic/val")}

    def probe_critic(self, k: int, critic=None) -> None:
        """model.loop.critic_probe: Q_k (or `critic`, the table critic) against the simulator's ground truth at
        logged states of D_k (rank 0), in the record as "critic_probe". It draws from its own seeded streams only, so
        the run's other numbers stay the same with or without it."""
        settings = self.config.critic_probe
        if settings is None or not self.main:
            return
        start = time.perf_counter()
        dm, policy = self.datamodule, self.policy
        conversations = [c for c in dm.conversations if c.iteration == k]  # D_k itself, not pooled buffers
        self.record["critic_probe"] = run_critic_probe(
            self.system.critic if critic is None else critic,
            policy.policy,
            policy.tokenizer,
            conversations,
            settings,
            self.simulation_context(k),
        )
        self.record["seconds"]["critic_probe"] = time.perf_counter() - start

    def simulation_context(self, k: int) -> ProbeContext:
        """The run's settings for simulated continuations in iteration k (the critic probe, the oracle critic)."""
        dm = self.datamodule
        return ProbeContext(
            simulator=self.system.environment,
            gamma=dm.gamma,
            run_seed=self.seed,
            iteration=k,
            max_new_tokens=self.policy.max_new_tokens,
            temperature=self.config.collect_temperature,
            policy_prompt_tokens=self.config.max_prompt_tokens,
            critic_prompt_tokens=dm.max_prompt_tokens,
            critic_action_tokens=dm.max_action_tokens,
            batch_size=self.config.rollout_batch_size,
        )

    def table_critic(self, k: int) -> TableCritic:
        """model.loop.table_critic's Q for iteration k: fit on the training conversations (validation split left
        out) of the iteration whose data Q_k would be fit on (iteration 0's for the fully offline variant)."""
        dm, fit_on = self.datamodule, self.source.critic_iteration(k)
        rows = [c for c in dm.conversations if c.iteration == fit_on and not dm.in_validation(c.conversation_id)]
        return TableCritic(self.system.environment, dm.gamma, self.config.table_critic.prior).fit(rows)

    def policy_critic(self, k: int):
        """What scores PPO's replies in iteration k's policy phase: Q_k; with model.loop.table_critic the table
        critic; with model.loop.oracle_critic an oracle of pi_k as it is now (call it before the fit) on the
        DataModule's states."""
        if self.config.table_critic is not None:
            dm = self.datamodule
            prompt_lengths = {(e.conversation_id, e.turn_index): len(e.prompt_ids) for e in dm.all_examples}
            return TableRewardCritic(self.table_critic(k), self.policy.tokenizer, dm.conversations, prompt_lengths)
        settings = self.config.oracle_critic
        if settings is None:
            return self.system.critic
        self.oracle = make_oracle_critic(self.policy, self.datamodule, settings, self.simulation_context(k))
        return self.oracle

    # -- pi_(k+1) -------------------------------------------------------------------------------
    def improve_policy(self, k: int, progress: IterationProgress) -> None:
        """pi_(k+1) from pi_k (PPO against Q_k, or filtered BC), exported with its lineage card."""
        self.stage = LoopStage("policy", k)
        key = self.improvement.record_key
        if progress.policy_fitted:
            self.improvement.refitted(self)
        else:
            self.seed_step(k, "policy")
            start = time.perf_counter()
            self.record[key] = self._guarded(k, lambda k: self.improvement.fit(self, k))
            self.record["seconds"]["policy"] = time.perf_counter() - start
            if self.oracle is not None:  # its seconds are part of the policy phase's
                self.record["oracle_critic"] = dict(self.oracle.stats)
                self.oracle = None
            if self.main:
                self.policy.save(self.folder.policy_dir(k + 1), card=self._policy_card(k, progress.source))
            if self.improvement.keeps_optimizer_state:
                self.folder.save_policy_optimizer_state(self.policy, k)
            self.state.policy_state = {"kl_controller": self.policy.kl_controller.state_dict()}
            progress.policy_fitted = True
            self.folder.commit()
        self._call("on_policy_end", k, self.record[key])

    def _policy_card(self, k: int, source: dict) -> dict:
        """pi_(k+1)'s lineage card; its paths are relative to the policy folder it is saved in (the run can move)."""
        here = self.folder.policy_dir(k + 1)
        pooled = [(k - age, w) for age, w in enumerate(self.datamodule.pool_weights[1:], 1) if k - age >= 0 and w > 0]
        return {
            "policy_id": f"pi_{k + 1}",
            "parent": f"pi_{k}",
            "iteration": k,
            "run_id": self.state.run_id,
            "run_dir": os.path.relpath(self.run_dir, here),
            "base_model": os.path.relpath(self.base_model_dir, here),
            "trained_on": source,
            "pooled": [{"iteration": j, "weight": w} for j, w in pooled],
            "critic_target": self.system.critic.target,
            "algorithm": self.system.algorithm,
        }

    # -- callbacks and the commit -----------------------------------------------------------------
    def end_iteration(self, k: int, progress: IterationProgress) -> None:
        """The callbacks estimate, evaluate, export, report and may stop the run; then the iteration commits."""
        self.stage = LoopStage("evaluation", k)
        self.seed_step(k, "iteration_end")
        self._call("on_iteration_end", k, self.record)
        self.view.should_stop = bool(dist_utils.broadcast_object(self.view.should_stop))  # rank 0's callbacks decide
        self.view.history.append(self.record)
        states = callback_states(self.callbacks)
        self.folder.finish_iteration(progress, self.view.history, self.view.should_stop, states)

    def iterations_to_run(self) -> range:
        start = self.state.completed_iterations
        if self.logs:
            # Logged mode: one iteration per batch of logs (per `fit` call).
            return range(start, start + 1)
        if self.state.mode == "logs":
            self.console.print(
                f"{self.run_dir} trains on logs and is between batches; give the next one with --data.logs",
                highlight=False,
            )
            return range(start, start)
        if self.state.stopped_early or start >= self.config.iterations:
            self.console.print(f"{self.run_dir} is finished ({start} iteration(s)); nothing to resume", highlight=False)
            return range(start, start)
        self.state.finished = False  # a finished run extended with a larger --model.loop.iterations
        return range(start, self.config.iterations)

    def finish(self) -> dict:
        state = self.state
        # Relative to the run folder, as every path in summary.json: the folder can be moved or copied whole.
        summary = {"final_policy": os.path.relpath(self.folder.policy_dir(state.completed_iterations), self.run_dir)}
        if not self.logs and (self.view.should_stop or state.completed_iterations >= self.config.iterations):
            state.finished = True
        state.stopped_early = state.stopped_early or self.view.should_stop
        self._call("on_run_end", summary)
        self.folder.commit()
        self.run_logger.finalize("success")
        return summary

    # -- resume -------------------------------------------------------------------------------
    def restore(self) -> None:
        """Bring the modules to the last committed state (everything a fresh process lacks)."""
        state, policy, folder = self.state, self.policy, self.folder
        c, progress = state.completed_iterations, state.in_progress
        policy_fitted = progress is not None and progress.policy_fitted
        policy.load(folder.policy_dir(c + 1) if policy_fitted else folder.policy_dir(c))
        base = self.system.base_model
        if base is not None and base.gradient_checkpointing:  # a saved folder does not carry the setting
            enable_gradient_checkpointing(policy.policy)
        # Adam moments exist only for policies this run fitted (never for pi_0 / policy_init).
        fitted_in = c if policy_fitted else c - 1
        if fitted_in >= 0:
            folder.load_optimizer_state(policy, folder.policy_optimizer_file(fitted_in))
        self.improvement.restore(policy, folder.policy_dir(0))
        if state.policy_state:
            policy.kl_controller.load_state_dict(state.policy_state["kl_controller"])
        critic_fitted_in = c if progress is not None and progress.critic_fitted else c - 1
        if critic_fitted_in >= 0:
            critic_file = folder.critic_file(self.source.critic_iteration(critic_fitted_in))
            if critic_file.exists():
                folder.load_critic(self.system.critic, critic_file, self.base_model_dir)
        load_callback_states(self.callbacks, state.callbacks)
        self.view.history = list(state.history)
        self.view.initial_eval = state.initial_eval

    # -- helpers ------------------------------------------------------------------------------
    def make_view(self) -> LoopView:
        """What callbacks and collection see (the environment loads an LLM customer's model, if any)."""
        return LoopView(
            run_dir=self.run_dir,
            config=self.config,
            seed=self.seed,
            logs=self.logs,
            environment=make_environment(self.system),
            policy=self.policy,
            critic=self.system.critic if self.improvement.uses_critic else None,
            datamodule=self.datamodule,
            folder=self.folder,
            logger=self.run_logger,
        )

    def check_model_sources(self) -> None:
        """Bad model paths fail before a run_dir exists or any training starts."""
        system = self.system
        if system.policy_init:
            check_policy_dir(system.policy_init)
        if system.base_model is not None:
            check_source(system.base_model, require_chat_template=True)
            if system.bootstrap.buffer:
                read_logs(system.bootstrap.buffer)  # a bad buffer fails before any work too
        check_environment_sources(system)  # the LLM customer's and judge's models, unless endpoints

    def trainer_factory(self, phase: str, **overrides) -> L.Trainer:
        """A fresh Trainer for one phase (the CLI's factory), logging to the run's loggers at the run's global step
        under the phase's namespace, its progress bar named after the phase and the iteration ("ppo · iteration
        2"). Every phase fit of the run, bootstrap and the variants' too, gets its Trainer here."""
        phase_logger = self.run_logger.for_phase(phase) if self.run_logger is not None else False
        overrides.setdefault("logger", phase_logger)
        trainer = self.make_trainer(phase, **overrides)
        namespace = phase_logger.namespace if phase_logger else PHASE_NAMESPACES.get(phase, phase)
        k = self.current_iteration
        name_progress_bar(trainer, f"{namespace} · {'pi_0' if k < 0 else f'iteration {k}'}")
        return trainer

    def fit_phase(self, phase: str, module, k: int, max_epochs: int, logs: str) -> L.Trainer:
        """One phase fit in a fresh Trainer; under DeepSpeed with keep_optimizer_state its optimizer state goes
        through sharded checkpoints. Returns the Trainer (its callback_metrics)."""
        root = str(self.folder.iteration_dir(k) / logs)
        trainer = self.trainer_factory(phase, max_epochs=max_epochs, default_root_dir=root)
        if module.keep_optimizer_state:
            check_trainer_saves_zero_state(trainer, phase)
            trainer.zero_checkpoint_dir = self.folder.zero_checkpoint(k, phase)
            previous = self.folder.zero_checkpoint(k - 1, phase)
            module.resume_from_zero_checkpoint(previous if previous.exists() else None)
            if previous.exists():
                check_zero_checkpoint(previous, dist_utils.world_size(), WORLD_SIZE_KEYS)
        trainer.fit(module, datamodule=self.datamodule)
        if getattr(trainer, "partition_report", None) is not None:  # DeepSpeed: what this process held (rank 0's view)
            self.record.setdefault("sharding", {})[phase] = {
                "world_size": dist_utils.world_size(),
                "zero_stage": zero_stage(trainer),
                **trainer.partition_report,
            }
        return trainer

    def seed_step(self, iteration: int, step: str) -> None:
        L.seed_everything(derive_seed(self.seed, iteration, step), verbose=False)

    def warn(self, message: str) -> None:
        """A warning on the console and in the iteration's record."""
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
        self.record.setdefault("warnings", []).append(message)

    def _call(self, hook: str, *args) -> None:
        if not self.main:  # evaluation, estimates, export and reports: rank 0's work
            return
        for cb in self.callbacks:
            getattr(cb, hook)(self.view, *args)

    def _guarded(self, k: int, fn):
        """Run a phase; a NaN/Inf loss becomes a NumericalFault naming the last good state."""
        try:
            return fn(k)
        except FloatingPointError as err:
            where = "before iteration 0" if k < 0 else f"iteration {k}"
            c = self.state.completed_iterations
            raise NumericalFault(
                f"{where}, {err}. The weights were not updated with it; the last good state is "
                f"pi_{c} in {self.folder.policy_dir(c)} ({self.folder.state_file}). Lower the learning rate or fix "
                "the data, then rerun with --resume (and --allow_config_change true if the config changed)."
            ) from err
