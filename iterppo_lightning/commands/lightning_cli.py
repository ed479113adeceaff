"""The LightningCLI subcommands of `iterppo`: fit, evaluate, collect, imagine, bootstrap.

`iterppo_lightning.cli` imports this module only for these subcommands (it pulls in torch and Lightning).

    iterppo fit --config configs/quickstart.yaml --run_dir runs/quickstart [--resume]
    (Ctrl-C or SIGTERM: one line naming the phase and the exact resume command; exit 130 / 143)
    iterppo fit --config C --run_dir runs/logged --data.logs logs/batch_0.jsonl   # one iteration on logs
    iterppo evaluate --config configs/quickstart.yaml --policy runs/quickstart/final_policy --episodes 500 --seed 1
    iterppo evaluate --run_dir runs/quickstart --episodes 500    # the run's config.yaml and final_policy
    iterppo sample --policy runs/quickstart/final_policy -n 5 [--greedy]   # full dialogues (the run's config)
    iterppo collect --config C --episodes 500 --output logs/batch_0.jsonl [--policy DIR]
    iterppo imagine --config configs/sales_smollm2.yaml --output runs/imagined   # LLM-imagined conversations
    iterppo bootstrap --config C --seed_everything 0 --output runs/pi0_seed0   # pi_0 alone (for --model.policy_init)

A LightningCLI subcommand is a method of the Trainer class: its signature gives the subcommand's
arguments, its docstring their help. `fit` is also defined on the CLI class, which LightningCLI calls
instead of `Trainer.fit`; it builds a fresh Trainer for every phase of every iteration from the
`trainer:` section of the config (`_trainer_factory`). `bootstrap` trains phase by phase too: the CLI
hands the Trainer that factory (`IterPPOTrainer.phase_trainers`) before the subcommand runs.

Before LightningCLI instantiates anything, `IterPPOCLI.parse_arguments` checks every numeric and shape
setting (config_checks.py) and lists every bad one at once. `main` turns SIGINT and SIGTERM into one line
naming where the command was (for `fit`: the phase, the iteration and the exact resume command) and the
shell's exit status for the signal (utils/interrupts.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy

from iterppo_lightning.commands.bootstrap import bootstrap_pi0
from iterppo_lightning.commands.collect import collect_logs
from iterppo_lightning.commands.config_checks import check_config, config_problems
from iterppo_lightning.commands.evaluate import evaluate_saved_policy
from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.data.log_io import LogValidationError
from iterppo_lightning.distributed.phase_strategies import (
    PHASES,
    build_phase_strategy,
    check_phase_strategies,
    launch_processes,
    phase_precision,
)
from iterppo_lightning.env.chat_endpoint import ChatEndpointError
from iterppo_lightning.env.factory import make_environment
from iterppo_lightning.loop.controller import NumericalFault, OuterLoop
from iterppo_lightning.loop.run_dir import RunDirError
from iterppo_lightning.loop.run_state import RunStateError
from iterppo_lightning.system import IterativePPO
from iterppo_lightning.utils.interrupts import Interrupted, as_interrupt, raise_on_interrupt
from iterppo_lightning.utils.progress_bar import PhaseProgressBar
from iterppo_lightning.utils.third_party import quiet_deepspeed_accelerator_detection

__all__ = ["main", "resolve_fit_config", "FitConfigError", "IterPPOCLI", "IterPPOTrainer", "TRAINER_DEFAULTS"]

TRAINER_DEFAULTS = {
    # What a resume needs is the loop's job: each step commits its weights (critic.pt, the policy folder) and
    # run_state.json to the run folder (loop/run_dir.py). Lightning's checkpoints would pile up per phase.
    "enable_checkpointing": False,
    # `fit` logs the whole run to one set of loggers at one global step (loop/run_logger.py): true = a CSV file
    # (and TensorBoard when installed) in RUN/logs; Logger objects (W&B, MLflow, ...) = those and the CSV; false =
    # none. Every phase logs every step: a phase often has fewer steps than Lightning's default interval (50).
    "logger": True,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


class _RestoreRandomState(Callback):
    def __init__(self, states: dict):
        self.states = states

    def on_fit_start(self, trainer, pl_module) -> None:  # after the strategy's setup, before any data is drawn
        _set_rng_states(self.states)
        trainer.callbacks.remove(self)


class IterPPOTrainer(L.Trainer):
    zero_checkpoint_dir = None
    """Where a DeepSpeed fit saves its sharded checkpoint (set by the loop; None = none)."""
    partition_report = None
    """After a DeepSpeed fit: parameter elements this process held (zero.partition_report)."""
    phase_trainers: Callable[..., L.Trainer] | None = None
    """Makes a fresh Trainer for one phase, `phase_trainers("bootstrap", max_epochs=2)`, from the config
    (set by IterPPOCLI; commands that train phase by phase use it)."""
    run_seed = 0
    """The config's `seed_everything` (set by IterPPOCLI): bootstrap derives pi_0's seeds from it as `fit` does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SIGTERM is the command's to handle (main: utils/interrupts.py), not each phase fit's. Lightning's handler
        # would turn it into a SystemExit with status 0 at the next batch, and under several processes it runs a
        # broadcast inside the signal handler, which deadlocks against the other ranks' gradient all-reduce.
        # Its SLURM requeue (SIGUSR1) saves a Lightning checkpoint that `fit` never reads (resume: --resume).
        connector = getattr(self, "_signal_connector", None)
        if connector is not None:
            connector.register_signal_handlers = lambda: None

    def fit(self, model, *args, **kwargs):
        """Lightning's Trainer.fit, once per phase; `iterppo fit` passes no checkpoint (resume: --resume).

        Under DeepSpeed it then hands the module back to the loop as a plain module (zero.py).
        """
        from iterppo_lightning.distributed.collectives import is_distributed
        from iterppo_lightning.distributed.zero import (
            optimizer_state_elements,
            partition_report,
            release_from_deepspeed,
            save_zero_checkpoint,
            zero_stage,
        )

        if is_distributed():
            # Multi-process strategies reseed every process from the global seed while setting up; put the
            # loop's random state back so a fit draws what the same fit draws in a single process.
            self.callbacks.append(_RestoreRandomState(_collect_rng_states()))
        result = super().fit(model, *args, **kwargs)
        if zero_stage(self) > 0:
            self.partition_report = partition_report(model)
            self.partition_report["optimizer_state_elements"] = optimizer_state_elements(self.strategy.model)
            if self.zero_checkpoint_dir is not None:
                save_zero_checkpoint(self, self.zero_checkpoint_dir)
            release_from_deepspeed(model, getattr(self.strategy, "model", None))
        return result

    def evaluate(
        self,
        model: IterativePPO,
        datamodule: TrajectoryDataModule | None = None,
        policy: str = "",
        episodes: int = 500,
        seed: int = 0,
        greedy: bool = False,
        temperature: float = 1.0,
        batch_size: int = 256,
    ) -> dict:
        """Evaluate a saved policy on fresh simulated customers and print one JSON object.

        The config: --run_dir RUN (its config.yaml; the policy defaults to RUN/final_policy), or a
        --policy inside a run folder alone, or --config (a run's config.yaml too).

        Args:
            policy: folder of a saved policy (e.g. RUN_DIR/final_policy).
            episodes: number of fresh simulated conversations.
            seed: seed of the evaluation customers (never used by `fit`).
            greedy: greedy decoding instead of sampling from the policy.
            temperature: sampling temperature (not with --greedy).
            batch_size: conversations advanced together in one generate call.
        """
        if not policy:
            raise ValueError("evaluate needs --policy DIR (a folder written by `iterppo fit`) or --run_dir RUN")
        result = evaluate_saved_policy(
            policy,
            make_environment(model),
            episodes,
            seed,
            greedy=greedy,
            temperature=temperature,
            max_new_tokens=model.policy.max_new_tokens,
            max_prompt_tokens=model.loop.max_prompt_tokens,
            batch_size=batch_size,
            gamma=datamodule.gamma if datamodule is not None else 1.0,
        )
        print(json.dumps(result))
        return result

    def collect(
        self,
        model: IterativePPO,
        datamodule: TrajectoryDataModule | None = None,
        output: str = "",
        episodes: int = 500,
        seed: int = 0,
        policy: str = "",
        greedy: bool = False,
        temperature: float = 1.0,
        batch_size: int = 256,
    ) -> dict:
        """Simulate conversations and write them as logs (docs/data.md): a file `fit --data.logs` accepts.

        The config: --run_dir RUN (its config.yaml), or a --policy inside a run folder alone, or --config.

        Args:
            output: the log file to write, `.jsonl`, `.jsonl.gz` or `.parquet` (never overwritten).
            episodes: number of simulated conversations.
            seed: seed of the simulated customers (another seed gives other customers and conversation ids).
            policy: a saved policy folder to suggest the replies; empty = the scripted behaviour agent.
            greedy: greedy decoding instead of sampling (with --policy).
            temperature: sampling temperature (with --policy, not with --greedy).
            batch_size: conversations advanced together in one generate call.
        """
        result = collect_logs(
            model,
            output,
            episodes,
            seed,
            policy=policy,
            greedy=greedy,
            temperature=temperature,
            batch_size=batch_size,
        )
        print(json.dumps(result))
        return result

    def sample(
        self,
        model: IterativePPO,
        datamodule: TrajectoryDataModule | None = None,
        policy: str = "",
        dialogues: int = 5,
        seed: int = 0,
        greedy: bool = False,
        temperature: float = 1.0,
    ) -> None:
        """Print a saved policy's full dialogues with fresh simulated customers, readable in a terminal.

        Each dialogue: turn numbers, who speaks (the customer, the agent's suggestion, what the business
        sent when it edited or rejected it), the customer's persona when known, and the outcome. The
        customers are `evaluate`'s for the same --seed. The config: --run_dir RUN (its config.yaml and
        RUN/final_policy), or a --policy inside a run folder alone, or --config.

        Args:
            policy: folder of a saved policy (e.g. RUN_DIR/final_policy or RUN_DIR/pi_0/policy).
            dialogues: how many dialogues to print (-n).
            seed: seed of the customers (evaluate's customers for the same seed).
            greedy: greedy decoding instead of sampling from the policy.
            temperature: sampling temperature (not with --greedy).
        """
        from iterppo_lightning.commands.sample import format_dialogues, sample_dialogues

        if not policy:
            raise ValueError("sample needs --policy DIR (a folder written by `iterppo fit`) or --run_dir RUN")
        conversations = sample_dialogues(
            policy,
            make_environment(model),
            dialogues,
            seed,
            greedy=greedy,
            temperature=temperature,
            max_new_tokens=model.policy.max_new_tokens,
            max_prompt_tokens=model.loop.max_prompt_tokens,
        )
        print(format_dialogues(conversations, policy, seed, greedy, temperature=temperature))

    def imagine(
        self,
        model: IterativePPO,
        datamodule: TrajectoryDataModule | None = None,
        output: str = "",
        personas: int = 8,
        dialogues_per_persona: int = 4,
        critique: bool = True,
        seed: int = 0,
    ) -> dict:
        """Imagined conversations from an LLM (personas -> outcome-conditioned dialogues -> critique) as a buffer.

        The model is `model.base_model` (or `model.customer_model`). OUTPUT/buffer is valid logs
        (policy id "imagined"): `fit --data.logs OUTPUT/buffer` trains iteration 0 on it.

        Args:
            output: a new folder: OUTPUT/buffer and OUTPUT/imagine_report.json (never overwritten).
            personas: personas to ask the LLM for.
            dialogues_per_persona: dialogues imagined per persona (outcome sampled per dialogue).
            critique: rewrite each dialogue so the customer reveals one thing at a time.
            seed: seed of the sampled outcomes and of the generation.
        """
        from iterppo_lightning.env.imagine import ImagineConfig, imagine_conversations, write_imagined_buffer
        from iterppo_lightning.models.source import load_causal_lm

        if not output:
            raise ValueError("imagine needs --output DIR (a new folder for the buffer)")
        if Path(output).exists():
            raise FileExistsError(f"{output!r} already exists; buffers are never overwritten")
        source = model.base_model or model.customer_model
        if source is None:
            raise ValueError("imagine needs a chat model: set model.base_model (or model.customer_model) in the config")
        config = ImagineConfig(
            personas=personas, dialogues_per_persona=dialogues_per_persona, critique=critique, seed=seed
        )
        llm, tokenizer = load_causal_lm(source, require_chat_template=True)
        L.seed_everything(seed, verbose=False)
        report = imagine_conversations(llm, tokenizer, config)
        write_imagined_buffer(report, output)
        result = {
            "output": output,
            "personas": len(report.personas),
            "requested": report.requested,
            "parsed": report.parsed,
            "rejected": report.rejected,
        }
        print(json.dumps(result))
        return result

    def bootstrap(self, model: IterativePPO, datamodule: TrajectoryDataModule | None = None, output: str = "") -> dict:
        """Make pi_0 alone, exactly as `fit` bootstraps it for this config and seed, into a new folder.

        OUTPUT/policy is pi_0 (pass it as `fit --model.policy_init OUTPUT/policy`), OUTPUT/buffer the
        imagined conversations it was cloned from, OUTPUT/bootstrap.json its wall seconds. `iterppo
        sweep` makes one per seed this way and shares it between experiments with the same pi_0 recipe.

        Args:
            output: a new folder (never overwritten).
        """
        if self.phase_trainers is None:
            raise ValueError("bootstrap trains phase by phase: set IterPPOTrainer.phase_trainers (the CLI does)")
        datamodule = datamodule or TrajectoryDataModule()
        result = bootstrap_pi0(model, datamodule, self.phase_trainers, output, self.run_seed)
        print(json.dumps(result))
        return result


class IterPPOCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "collect": {"model", "datamodule"},
            "sample": {"model", "datamodule"},
            "imagine": {"model", "datamodule"},
            "bootstrap": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str,
            default="runs/iterppo",
            help="Folder for this run's outputs (must not hold another run).",
        )
        # Flags: `--resume` alone means true; `--resume true` / `--resume false` still parse.
        parser.add_argument(
            "--resume",
            type=bool,
            nargs="?",
            const=True,
            default=False,
            help="Continue the run in --run_dir where it stopped (or start it when there is none).",
        )
        parser.add_argument(
            "--allow_config_change",
            type=bool,
            nargs="?",
            const=True,
            default=False,
            help="Let --resume continue although the model/data config changed.",
        )
        for phase in PHASES:
            parser.add_argument(
                f"--{phase}_strategy",
                type=str | Strategy | None,
                default=None,
                help=f"Strategy of the {phase} phase's Trainer (a name or class_path/init_args); "
                "default trainer.strategy. Every phase runs on all the run's processes.",
            )
            parser.add_argument(
                f"--{phase}_precision",
                type=str | None,
                default=None,
                help=f"Precision of the {phase} phase's Trainer (e.g. bf16-mixed, 32-true, or auto: bf16-mixed on a "
                "CPU with native bf16, else trainer.precision); default trainer.precision.",
            )

    def parse_arguments(self, parser, args) -> None:
        """Check every numeric and shape setting first (all problems at once, by key), then parse as LightningCLI.

        The first parse skips validation: the parser would stop at the first bad value, and config dataclasses
        check themselves while being parsed, with messages that do not name the key.
        """
        if not isinstance(args, dict):
            lenient = parse_unvalidated(parser, list(sys.argv[1:] if args is None else args))
            subcommand = lenient.get("subcommand") if lenient is not None else None
            if subcommand:
                check_config(subcommand, lenient[subcommand])  # ConfigError: main prints it, exit 2
        super().parse_arguments(parser, args)

    def before_bootstrap(self) -> None:
        # LightningCLI calls before_<subcommand> first: the Trainer's bootstrap builds its phase Trainers as fit does.
        self.trainer.phase_trainers = self._trainer_factory
        self.trainer.run_seed = int(self.config["bootstrap"]["seed_everything"])

    def _on_cpu(self) -> bool:
        from lightning.pytorch.accelerators import CPUAccelerator

        return isinstance(self.trainer.accelerator, CPUAccelerator)

    def _trainer_factory(self, phase: str, **overrides) -> L.Trainer:
        trainer_config = dict(self._get(self.config_init, "trainer", default={}))
        # A fresh strategy object per phase Trainer (a used one refuses a second Trainer), from the raw config.
        raw = self.config[self.config["subcommand"]]
        overrides.setdefault("strategy", build_phase_strategy(phase, raw, getattr(self, "_model_for_strategies", None)))
        precision_key, precision = phase_precision(phase, raw, on_cpu=self._on_cpu())
        if precision_key != "trainer.precision":
            overrides.setdefault("precision", precision)
        # Our DataModule shards every global batch itself (distributed/collectives.py: ShardedBatchSampler).
        overrides.setdefault("use_distributed_sampler", False)
        # The run's loggers come from the loop (`logger=`, at the run's global step); a phase Trainer made outside
        # a run (`iterppo bootstrap`) logs nothing rather than restart at step 0 in a folder of its own.
        overrides.setdefault("logger", False)
        # instantiate_trainer extends the callbacks list in place: hand it a copy per phase.
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            # A fresh bar per phase (a bar object is tied to the Trainer that used it), named after the phase;
            # the loop adds the iteration ("critic · iteration 2").
            callbacks.append(PhaseProgressBar(label=phase, leave=True))
        overrides.setdefault("callbacks", callbacks)
        return self.instantiate_trainer(**overrides)

    def fit(self, model: IterativePPO, datamodule: TrajectoryDataModule | None = None, **_: object) -> None:
        config = self.config["fit"]
        datamodule = datamodule or TrajectoryDataModule()
        self._model_for_strategies = model
        # Bad strategy settings fail here, before any process starts or any file is written.
        check_phase_strategies(config, model, self.trainer)
        loop = OuterLoop(
            model,
            datamodule,
            self._trainer_factory,
            Path(config["run_dir"]),
            callbacks=None,  # the chain model.loop.callbacks / extra_callbacks describe (callbacks.callback_chain)
            seed=int(config["seed_everything"]),
            config_text=self._parser("fit").dump(config, skip_none=False),
            resume=bool(config["resume"]),
            allow_config_change=bool(config["allow_config_change"]),
            logger=self._get(self.config_init, "trainer", default={}).get("logger"),
            # A run made by an older version lacks the keys added since; they count as their defaults.
            config_defaults=default_fit_config() if config["resume"] else None,
        )
        # Several processes: start them all now, before any work, so each runs the whole loop (SPMD).
        try:
            launch_processes(self.trainer, loop.run)
        except BaseException as err:
            interrupted = as_interrupt(err)
            if interrupted is None:
                raise
            interrupted.where, interrupted.folder = loop.stage.describe(), str(loop.run_dir)
            raise interrupted from (None if interrupted is err else err)


def _quiet_third_party() -> None:
    """Keep the console for our progress: per-shard save/load bars of datasets and transformers add nothing."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # One Trainer per phase would repeat "GPU available ..." and tips every phase; the
    # per-iteration table is the record of progress. Warnings still show.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # The frozen reference and critic are in eval mode on purpose during the policy phase.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 renamed (once per collective).
    warnings.filterwarnings("ignore", message=r"`torch.distributed.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # `logger: true` builds the run's loggers (loop/run_logger.py), which say once when TensorBoard is missing.
    warnings.filterwarnings("ignore", message=r"Starting from v1.9.0, `tensorboardX` has been removed")
    quiet_deepspeed_accelerator_detection()
    # Every process logs the same (global) PPO statistics; critic metrics are synced where it matters.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True")


def build_cli(
    args: list[str] | None,
    *,
    cli_class: type[IterPPOCLI] = IterPPOCLI,
    parser_kwargs: dict | None = None,
    run: bool = True,
) -> IterPPOCLI:
    """The `iterppo` LightningCLI with its classes and defaults; `run=False` parses and instantiates only.

    When `args` starts with a subcommand, only that subcommand's parser is built: LightningCLI would build one
    per subcommand (each holds the whole model signature, ~0.2 s apiece), and a command uses only its own.
    """
    named = args[0] if args and args[0] in SUBCOMMANDS else None
    if run and named is not None:
        cli_class = _one_subcommand(cli_class, named)
        parser_kwargs = {k: v for k, v in (parser_kwargs or {}).items() if k == named or k not in SUBCOMMANDS}
    return cli_class(
        IterativePPO,
        TrajectoryDataModule,
        trainer_class=IterPPOTrainer,
        seed_everything_default=0,
        save_config_callback=None,
        auto_configure_optimizers=False,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs=parser_kwargs or {},
        args=args,
        run=run,
    )


SUBCOMMANDS = tuple(IterPPOCLI.subcommands())


def _one_subcommand(cli_class: type[IterPPOCLI], name: str) -> type[IterPPOCLI]:
    """`cli_class` offering only the subcommand `name` (LightningCLI builds a parser for each one it offers)."""
    table = {name: cli_class.subcommands()[name]}
    return type(cli_class.__name__, (cli_class,), {"subcommands": staticmethod(lambda: dict(table))})


def parse_unvalidated(parser, argv: list[str]):
    """The config `argv` gives, merged as the parser merges it but with no value checked (None when even that
    fails, or for --help / --print_config, which print and exit: the real parse then reports or prints)."""
    if not argv or any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
        return None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with contextlib.suppress(Exception, SystemExit):
            return parser.parse_args(argv, _skip_validation=True)
    return None


def _subcommand(argv: list[str]) -> str:
    return next((a for a in argv if a in SUBCOMMANDS), "fit")


def resume_command(argv: list[str], run_dir: str | None) -> str:
    """`argv` (subcommand first) as the command that resumes its run: any --resume value dropped, --resume added,
    and --run_dir named when the command left it to the config or the default."""
    words, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--resume":
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            skip = following in ("true", "false", "yes", "no", "1", "0")
            continue
        if not word.startswith("--resume="):
            words.append(word)
    if run_dir and not any(w == "--run_dir" or w.startswith("--run_dir=") for w in words):
        words += ["--run_dir", run_dir]
    return shlex.join(["iterppo", *words, "--resume"])


def interrupt_report(interrupted: Interrupted, argv: list[str]) -> str:
    """The one line an interrupted command leaves: the signal, where it was, and how to continue."""
    subcommand = _subcommand(argv)
    head = f"iterppo: interrupted ({interrupted.signal_name})"
    if subcommand == "fit":
        where = interrupted.where or "the start of the run (before any step)"
        kept = f" in {interrupted.folder}" if interrupted.folder else ""
        return (
            f"{head} in {where}; every step committed before it is kept{kept}. "
            f"Resume with: {resume_command(argv, interrupted.folder)}"
        )
    return (
        f"{head} in `iterppo {subcommand}`; its output is written only once complete, so nothing was written. "
        f"Run it again with: {shlex.join(['iterppo', *argv])}"
    )


def _is_main_process() -> bool:
    """Rank 0 (the only process of a single-process command) reports; the other ranks stop quietly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def main(args: list[str] | None = None, descriptions: dict[str, str] | None = None) -> None:
    """Run one LightningCLI subcommand, `args` (default: the process's) starting with its name.

    Bad input exits with `iterppo: error: ...` and the exit code of its kind (1 bad logs, 3 numerical fault, 2 other).
    SIGINT / SIGTERM exit with 130 / 143 after one line saying where the command was and how to continue.
    descriptions: subcommand -> the line its --help starts with (default: the first line of its docstring).
    """
    _quiet_third_party()
    argv = list(sys.argv[1:] if args is None else args)
    with raise_on_interrupt():
        try:
            _run(args, descriptions)
        except BaseException as err:
            interrupted = as_interrupt(err)
            if interrupted is None:
                raise
            if _is_main_process():
                print(interrupt_report(interrupted, argv), file=sys.stderr, flush=True)
            sys.exit(interrupted.exit_code)


def _run(args: list[str] | None, descriptions: dict[str, str] | None) -> None:
    try:
        build_cli(args, parser_kwargs={name: {"description": text} for name, text in (descriptions or {}).items()})
    except LogValidationError as err:  # the same report as `iterppo validate-data`
        print(f"iterppo: error: {err}\nnothing was written", file=sys.stderr)
        sys.exit(1)
    except NumericalFault as err:
        print(f"iterppo: error: {err}", file=sys.stderr)
        sys.exit(3)
    except ChatEndpointError as err:  # the customer's or judge's server: the run's committed steps are kept
        print(f"iterppo: error: {err}", file=sys.stderr)
        sys.exit(1)
    except (
        RunDirError,
        RunStateError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        MisconfigurationException,
        OSError,  # a run or output folder that cannot be written: a message, not a traceback
    ) as err:
        print(f"iterppo: error: {err}", file=sys.stderr)
        sys.exit(2)


# -- the resolved `fit` config, for callers in this process (iterppo sweep) -----------------------------


class FitConfigError(ValueError):
    """The config files and overrides are not a valid `fit` config (the parser's message says why)."""


class _ParsersBuilt(Exception):
    def __init__(self, cli: IterPPOCLI):
        self.cli = cli


class _ParsersOnly(IterPPOCLI):
    """LightningCLI parses the arguments and runs the subcommand in its constructor: stop once the parsers exist."""

    def parse_arguments(self, parser, args) -> None:
        raise _ParsersBuilt(self)


@functools.lru_cache(maxsize=1)
def fit_parser():
    """The parser of `iterppo fit` (built once per process: building it takes seconds)."""
    try:
        # Subcommand parsers inherit exit_on_error; only fit's is built.
        build_cli(["fit"], cli_class=_ParsersOnly, parser_kwargs={"exit_on_error": False})
    except _ParsersBuilt as built:
        return built.cli._parser("fit")
    raise AssertionError("_ParsersOnly always stops in parse_arguments")


NOTHING_SET = "{model: {critic: {}, policy: {}, loop: {}, bootstrap: {}, environment: {}}}"
"""An inline config that sets nothing: the sections fit needs, empty, so every key shows its default."""


def default_fit_config() -> str:
    """The full YAML config of `iterppo fit` with nothing set: every key at its default."""
    return resolve_fit_config([NOTHING_SET], [])


def resolve_fit_config(config_files: list[str], overrides: list[str]) -> str:
    """The full YAML config `iterppo fit --config F1 --config F2 ... OVERRIDES` would run with (its --print_config).

    Later config files and then the overrides (`--key value` pairs) win, as on the command line. Raises
    FitConfigError naming the bad key or value (every bad numeric or shape setting at once: config_checks.py);
    nothing is instantiated.
    """
    from jsonargparse import ArgumentError

    parser = fit_parser()
    args = [arg for path in config_files for arg in ("--config", str(path))] + list(overrides)
    lenient = parse_unvalidated(parser, args)
    problems = [] if lenient is None else config_problems("fit", lenient, check_run_dir=False)
    if problems:
        raise FitConfigError(f"{len(problems)} bad setting(s):\n  " + "\n  ".join(problems))
    try:
        config = parser.parse_args(args)
    except ArgumentError as err:
        raise FitConfigError(str(err)) from None
    return parser.dump(config, skip_unset=False)  # what --print_config writes
