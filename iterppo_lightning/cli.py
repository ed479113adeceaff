"""`iterppo` command line (LightningCLI): `fit` runs the outer loop, `evaluate` scores a saved policy.

    iterppo fit --config configs/quickstart.yaml --run_dir runs/quickstart [--resume]
    iterppo fit --config C --run_dir runs/logged --data.logs logs/batch_0.jsonl   # one iteration on logs
    iterppo evaluate --config configs/quickstart.yaml --policy runs/quickstart/final_policy --episodes 500 --seed 1
    iterppo collect --config C --episodes 500 --output logs/batch_0.jsonl [--policy DIR]
    iterppo validate-data logs/batch_0.jsonl
    iterppo imagine --config configs/sales_smollm2.yaml --output runs/imagined   # LLM-imagined conversations
    iterppo bootstrap --config C --seed_everything 0 --output runs/pi0_seed0   # pi_0 alone (for --model.policy_init)
    iterppo sweep --experiments configs/experiment/*.yaml --seeds 0 1 2 --out runs/sweep [--jobs 2] [--quick true]
    iterppo report --sweep runs/sweep --output docs/results.md

`fit` is defined on the CLI class, which LightningCLI calls instead of
`Trainer.fit`; it builds a fresh Trainer for every phase of every iteration
from the `trainer:` section of the config.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import lightning as L
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy
from lightning.fabric.utilities.exceptions import MisconfigurationException

from iterppo_lightning.loop.bootstrap import make_pi0
from iterppo_lightning.callbacks import default_callbacks
from iterppo_lightning.commands.collect import collect_logs
from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.env.factory import make_environment
from iterppo_lightning.commands.evaluate import evaluate_saved_policy
from iterppo_lightning.data.log_io import LogValidationError
from iterppo_lightning.loop.controller import NumericalFault, OuterLoop, RunDirError
from iterppo_lightning.distributed.phase_strategies import PHASES, build_phase_strategy, check_phase_strategies, launch_processes
from iterppo_lightning.loop.run_state import RunStateError
from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.utils.atomic_io import atomic_dir
from iterppo_lightning.utils.seeding import derive_seed
from iterppo_lightning.system import IterativePPO

TRAINER_DEFAULTS = {
    # Checkpoints of each phase are the loop's job (CheckpointCallback); Lightning's would pile up per phase.
    "enable_checkpointing": False,
    "logger": False,
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

    def fit(self, model, *args, **kwargs):
        """`Trainer.fit`, then (under DeepSpeed) hand the module back to the loop as a plain module (zero.py)."""
        from iterppo_lightning.distributed.collectives import is_distributed
        from iterppo_lightning.distributed.zero import optimizer_state_elements, partition_report, release_from_deepspeed, save_zero_checkpoint, zero_stage

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
        batch_size: int = 256,
    ) -> dict:
        """Evaluate a saved policy on fresh simulated customers and print one JSON object.

        Args:
            policy: folder of a saved policy (e.g. RUN_DIR/final_policy).
            episodes: number of fresh simulated conversations.
            seed: seed of the evaluation customers (never used by `fit`).
            greedy: greedy decoding instead of sampling from the policy.
            batch_size: conversations advanced together in one generate call.
        """
        if not policy:
            raise ValueError("evaluate needs --policy DIR (a folder written by `iterppo fit`)")
        result = evaluate_saved_policy(
            policy,
            make_environment(model),
            episodes,
            seed,
            greedy=greedy,
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
        batch_size: int = 256,
    ) -> dict:
        """Simulate conversations and write them as logs (docs/data.md): a file `fit --data.logs` accepts.

        Args:
            output: the log file to write, `.jsonl` or `.parquet` (never overwritten).
            episodes: number of simulated conversations.
            seed: seed of the simulated customers (another seed gives other customers and conversation ids).
            policy: a saved policy folder to suggest the replies; empty = the scripted behaviour agent.
            greedy: greedy decoding instead of sampling (with --policy).
            batch_size: conversations advanced together in one generate call.
        """
        result = collect_logs(model, output, episodes, seed, policy=policy, greedy=greedy, batch_size=batch_size)
        print(json.dumps(result))
        return result


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
        config = ImagineConfig(personas=personas, dialogues_per_persona=dialogues_per_persona, critique=critique, seed=seed)
        llm, tokenizer = load_causal_lm(source, require_chat_template=True)
        L.seed_everything(seed, verbose=False)
        report = imagine_conversations(llm, tokenizer, config)
        write_imagined_buffer(report, output)
        result = {"output": output, "personas": len(report.personas), "requested": report.requested, "parsed": report.parsed, "rejected": report.rejected}
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
        raise RuntimeError("bootstrap runs through the iterppo command (IterPPOCLI.bootstrap)")


class IterPPOCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "collect": {"model", "datamodule"},
            "imagine": {"model", "datamodule"},
            "bootstrap": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/iterppo", help="Folder for this run's outputs (must not hold another run).")
        parser.add_argument(
            "--resume", type=bool, default=False, help="Continue the run in --run_dir where it stopped (or start it when there is none)."
        )
        parser.add_argument(
            "--allow_config_change", type=bool, default=False, help="Let --resume continue although the model/data config changed."
        )
        for phase in PHASES:
            parser.add_argument(
                f"--{phase}_strategy",
                type=Optional[Union[str, Strategy]],
                default=None,
                help=f"Strategy of the {phase} phase's Trainer (a name or class_path/init_args); default trainer.strategy. "
                "Every phase runs on all the run's processes.",
            )

    def _trainer_factory(self, phase: str, **overrides) -> L.Trainer:
        trainer_config = dict(self._get(self.config_init, "trainer", default={}))
        # A fresh strategy object per phase Trainer (a used one refuses a second Trainer), from the raw config.
        raw = self.config[self.config["subcommand"]]
        overrides.setdefault("strategy", build_phase_strategy(phase, raw, getattr(self, "_model_for_strategies", None)))
        # Our DataModule shards every global batch itself (distributed.ShardedBatchSampler).
        overrides.setdefault("use_distributed_sampler", False)
        # instantiate_trainer extends the callbacks list in place: hand it a copy per phase.
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            # A fresh rich bar per phase: a bar object is tied to the Trainer that used it.
            callbacks.append(RichProgressBar(leave=True))
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
            default_callbacks(model.loop.early_stopping_patience),
            seed=int(config["seed_everything"]),
            config_text=self._parser("fit").dump(config, skip_none=False),
            resume=bool(config["resume"]),
            allow_config_change=bool(config["allow_config_change"]),
        )
        # Several processes: start them all now, before any work, so each runs the whole loop (SPMD).
        launch_processes(self.trainer, loop.run)


    def bootstrap(self, model: IterativePPO, datamodule: TrajectoryDataModule | None = None, output: str = "", **_: object) -> dict:
        """`iterppo bootstrap` (IterPPOTrainer.bootstrap documents it): needs the per-phase Trainer factory, hence here."""
        seed = int(self.config["bootstrap"]["seed_everything"])
        result = bootstrap_pi0(model, datamodule or TrajectoryDataModule(), self._trainer_factory, output, seed)
        print(json.dumps(result))
        return result


def bootstrap_pi0(model: IterativePPO, datamodule: TrajectoryDataModule, trainer_factory, output: str, seed: int) -> dict:
    """pi_0 by behaviour cloning, with the seeds `OuterLoop.make_initial_policy` uses: the same weights `fit` would make."""
    if not output:
        raise ValueError("bootstrap needs --output DIR (a new folder for pi_0)")
    if model.policy_init or model.base_model is not None:
        raise ValueError("bootstrap makes pi_0 from imagined conversations; this config already names pi_0 (model.policy_init or model.base_model)")
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{output!r} already exists; a pi_0 folder is never overwritten")
    with atomic_dir(out) as tmp:  # complete or absent: a killed bootstrap leaves only a temporary folder
        L.seed_everything(derive_seed(seed, -1, "bootstrap"), verbose=False)
        start = time.perf_counter()
        net, tokenizer = make_pi0(model.bootstrap, SalesSimulator(model.environment), datamodule, trainer_factory, tmp, seed)
        model.policy.attach(net, tokenizer)
        model.policy.save(tmp / "policy", card={"policy_id": "pi_0", "run_id": None, "parent": None, "source": "bootstrap", "seed": seed})
        seconds = time.perf_counter() - start
        (tmp / "bootstrap.json").write_text(json.dumps({"seconds": seconds, "episodes": model.bootstrap.episodes, "seed": seed}) + "\n")
    return {"output": str(out), "policy": str(out / "policy"), "seed": seed, "seconds": seconds}


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
    # Every process logs the same (global) PPO statistics; critic metrics are synced where it matters.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "validate-data":
        # No config, no model: a plain argument parser, not LightningCLI.
        from iterppo_lightning.commands.validate_data import main as validate_data

        sys.exit(validate_data(argv[1:]))
    if argv and argv[0] in ("sweep", "report"):
        # Many configs (sweep) or none (report): plain argument parsers that launch or read runs.
        from iterppo_lightning.experiments.report import main as report
        from iterppo_lightning.experiments.sweep import main as sweep

        sys.exit((sweep if argv[0] == "sweep" else report)(argv[1:]))
    _quiet_third_party()
    try:
        IterPPOCLI(
            IterativePPO,
            TrajectoryDataModule,
            trainer_class=IterPPOTrainer,
            seed_everything_default=0,
            save_config_callback=None,
            auto_configure_optimizers=False,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
        )
    except LogValidationError as err:  # the same report as `iterppo validate-data`
        print(f"iterppo: error: {err}\nnothing was written", file=sys.stderr)
        sys.exit(1)
    except NumericalFault as err:
        print(f"iterppo: error: {err}", file=sys.stderr)
        sys.exit(3)
    except (RunDirError, RunStateError, FileNotFoundError, FileExistsError, ValueError, MisconfigurationException) as err:
        print(f"iterppo: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
