"""Throughput of the critic phase or the behaviour-cloning phase: real modules, real DataModule, real Trainer.

What runs
---------
`--phase critic`: one `lightning.Trainer` fit of `iterppo_lightning.modules.critic.CriticModule` on the
critic examples of `TrajectoryDataModule`, as `OuterLoop.fit_q` runs it (`for_phase("critic")`, the
config's `critic_epochs`, validation on the held-out conversations after every epoch).
`--phase bc`: one fit of `iterppo_lightning.modules.sft.BehaviourCloningModule` on the SFT examples,
as `loop/bootstrap.py: behaviour_clone` runs it (`for_phase("sft", batch_size=bootstrap.batch_size)`,
`bootstrap.epochs`).

Everything defaults to the sizes of `--config` (configs/quickstart.yaml):

* conversations: the embedded `SalesSimulator` (the config's `environment`) played by the scripted
  `BehaviourAgent` with the config's `bootstrap.behaviour` overrides, as pi_0's imagined conversations
  are made (`loop/bootstrap.py: imagine_conversations`). bc uses `bootstrap.episodes` of them (3000);
  critic uses `loop.episodes_per_iteration` (1024). In the loop, the critic's conversations come from
  pi_k, a tiny LM cloned from this same agent, so their lengths are similar but not identical;
* tokenizer: `tiny_lm.train_word_tokenizer` on the conversations' text (`bootstrap.corpus`);
* model: `tiny_lm.build_tiny_causal_lm` of the config's `bootstrap.model` shape (random weights: the
  cost of a step does not depend on them). The critic is built from it, saved to a temporary folder,
  with the config's `model.critic` settings (`init_from_policy`: backbone loaded from that folder);
* data: `TrajectoryDataModule(**config["data"])` (gamma, batch sizes; max_prompt_tokens 384,
  max_action_tokens 24 and val_fraction 0.1 are its defaults), batched and collated as the loop
  does: rows of whole conversations (one causal pass for all their turns) or of single turns,
  about `--batch` turns per batch, bucketed by length and right-padded to the longest row;
* Trainer: CPU, one device, no logger, checkpoints, progress bar or model summary (the loop's
  Trainers add a progress bar and a logger; their cost is not counted here). Sanity validation
  runs, as in the loop, before the first epoch.

What is measured
----------------
The first `--warmup-epochs` epochs of the fit (default 1) are discarded: the measured window runs
from the end of the last warm-up epoch to the end of the last epoch (`on_train_epoch_end`), so it
holds every training step of the measured epochs, their validation and everything Lightning does
between them. Inside it, a callback times:

* forward: the module's `training_step` (model forward, loss, the finite check, `self.log`);
* backward: `on_before_backward` -> `on_after_backward`;
* optimizer step: `on_before_optimizer_step` -> the optimizer's step post-hook (AdamW update);
* validation: `on_validation_start` -> `on_validation_end` (forward passes and torchmetrics);
* between batches: `on_train_batch_end` -> the next `on_train_batch_start` of the same epoch (the
  DataLoader's next batch, i.e. sampling and collation, and Lightning's loop);
* other: the rest of the window (zero_grad, Lightning's closure and hooks, epoch start and end,
  the first batch of each epoch).

"outside share" is the issue's figure: 1 - (forward + backward + optimizer step) / window, so
validation counts as outside; "other share" counts only between batches and other, the time that is
neither model work nor validation.

Tokens count the training batches of the measured epochs: real tokens are the attention-mask ones,
computed tokens are batch rows x padded width (what the model actually processes). Their ratio is
the padding factor. Tokens/s in the table divide computed tokens by the stage's seconds. Examples
are agent turns (critic) or cloned turns (BC), whatever rows hold them; mean row length and padded
width are per row.

Usage
-----
    python benchmarks/phase_throughput.py --phase critic --threads 1
    python benchmarks/phase_throughput.py --phase bc --threads 1

The last line of stdout is one JSON object with every number and the arguments.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from _common import (
    machine_info,
    make_trainer,
    prepare_run,
    print_json_line,
    print_stage_table,
    warn_if_busy,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
STAGES = ("forward", "backward", "optimizer_step", "validation", "between_batches")
MODEL_STAGES = ("forward", "backward", "optimizer_step")
PHASE_NAMES = {"critic": "critic phase (Q_k fit)", "bc": "behaviour-cloning phase (pi_0 SFT)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--phase", choices=("critic", "bc"), required=True)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="fit config whose sizes are the defaults")
    p.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="simulated conversations (default: loop.episodes_per_iteration for critic, bootstrap.episodes for bc)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="turns per step (default: data.critic_batch_size for critic, bootstrap.batch_size for bc)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of the fit, warm-up included (default: loop.critic_epochs for critic, bootstrap.epochs for bc)",
    )
    p.add_argument("--warmup-epochs", type=int, default=1, help="first epochs of the fit whose timings are discarded")
    p.add_argument("--layers", type=int, default=None, help="default: bootstrap.model.n_layer")
    p.add_argument("--dim", type=int, default=None, help="default: bootstrap.model.n_embd")
    p.add_argument("--heads", type=int, default=None, help="default: bootstrap.model.n_head")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    fill_defaults(args, p)
    return args


def fill_defaults(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Unset sizes come from the config's YAML; a key it lacks takes the default of the class that reads it."""
    with open(args.config) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    bootstrap = model.get("bootstrap") or {}
    loop = model.get("loop") or {}
    data = config.get("data") or {}
    shape = bootstrap.get("model") or {}
    from iterppo_lightning.data.datamodule import TrajectoryDataModule
    from iterppo_lightning.loop.bootstrap import BootstrapConfig
    from iterppo_lightning.loop.config import LoopConfig
    from iterppo_lightning.models.tiny_lm import TinyLMConfig

    dm_defaults = {k: v.default for k, v in inspect.signature(TrajectoryDataModule).parameters.items()}
    if args.phase == "critic":
        episodes = loop.get("episodes_per_iteration", LoopConfig.episodes_per_iteration)
        batch = data.get("critic_batch_size", dm_defaults.get("critic_batch_size"))
        epochs = loop.get("critic_epochs", LoopConfig.critic_epochs)
    else:
        episodes = bootstrap.get("episodes", BootstrapConfig.episodes)
        batch = bootstrap.get("batch_size", BootstrapConfig.batch_size)
        epochs = bootstrap.get("epochs", BootstrapConfig.epochs)
    for name, value in (
        ("episodes", episodes),
        ("batch", batch),
        ("epochs", epochs),
        ("layers", shape.get("n_layer", TinyLMConfig.n_layer)),
        ("dim", shape.get("n_embd", TinyLMConfig.n_embd)),
        ("heads", shape.get("n_head", TinyLMConfig.n_head)),
    ):
        if getattr(args, name) is None:
            setattr(args, name, int(value))
    args.config_sections = {
        "data": data,
        "critic": model.get("critic") or {},
        "environment": model.get("environment") or {},
        "behaviour": bootstrap.get("behaviour") or {},
        "bootstrap_lr": bootstrap.get("lr", BootstrapConfig.lr),
        "n_positions": shape.get("n_positions", TinyLMConfig.n_positions),
    }
    if args.episodes < 1 or args.batch < 1:
        p.error("--episodes >= 1 and --batch >= 1 are required")
    if args.warmup_epochs < 0 or args.epochs <= args.warmup_epochs:
        p.error(f"--epochs ({args.epochs}) must exceed --warmup-epochs ({args.warmup_epochs}) >= 0")


class PhaseTimer(L.Callback):
    """Seconds per stage and tokens of the training batches, in the epochs after the warm-up."""

    def __init__(self, warmup_epochs: int):
        self.warmup_epochs = warmup_epochs
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.epoch_walls: list[float] = []
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.steps = 0
        self.batches = 0
        self.examples = 0
        self.rows = 0
        self.real_tokens = 0
        self.computed_tokens = 0
        self.label_tokens = 0
        self.val_computed_tokens = 0
        self.epoch_real: dict[int, int] = {}
        self.epoch_computed: dict[int, int] = {}
        self._trainer = None
        self._marks: dict[str, float] = {}
        self._last_batch_end: float | None = None
        self._previous_epoch_end: float | None = None
        self._hooks = []
        self._original_training_step = None

    def _measuring(self) -> bool:
        t = self._trainer
        return t is not None and not t.sanity_checking and t.current_epoch >= self.warmup_epochs

    def _add(self, stage: str, start_key: str) -> None:
        start = self._marks.pop(start_key, None)
        if start is not None and self._measuring():
            self.seconds[stage] += time.perf_counter() - start

    # -- wiring: the forward wrapper and the optimizer post-hook ------------------------------
    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer
        self._original_training_step = pl_module.training_step

        @functools.wraps(self._original_training_step)
        def timed_training_step(*args, **kwargs):
            start = time.perf_counter()
            out = self._original_training_step(*args, **kwargs)
            if self._measuring():
                self.seconds["forward"] += time.perf_counter() - start
            return out

        pl_module.training_step = timed_training_step

    def teardown(self, trainer, pl_module, stage):
        if "training_step" in vars(pl_module):
            del pl_module.training_step  # the class's method again
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._measuring():
            self.steps += 1
        self._add("optimizer_step", "optimizer")

    # -- epochs ---------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module):
        self._last_batch_end = None
        if self.warmup_epochs == 0 and trainer.current_epoch == 0:
            self.window_start = self._previous_epoch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        now = time.perf_counter()
        if trainer.current_epoch == self.warmup_epochs - 1:
            self.window_start = now
        elif trainer.current_epoch >= self.warmup_epochs:
            self.epoch_walls.append(now - self._previous_epoch_end)  # this epoch and all that came after the last
            self.window_end = now
        self._previous_epoch_end = now

    # -- steps ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if not self._measuring():
            return
        if self._last_batch_end is not None:
            self.seconds["between_batches"] += now - self._last_batch_end
        mask = batch["attention_mask"]
        real, computed = int(mask.sum()), mask.numel()
        epoch = trainer.current_epoch
        self.epoch_real[epoch] = self.epoch_real.get(epoch, 0) + real
        self.epoch_computed[epoch] = self.epoch_computed.get(epoch, 0) + computed
        self.real_tokens += real
        self.computed_tokens += computed
        self.label_tokens += int((batch["labels"] != -100).sum())
        self.batches += 1
        self.examples += batch["target"].shape[0]  # turns: a row may hold a whole conversation
        self.rows += mask.shape[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_batch_end = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss):
        self._marks["backward"] = time.perf_counter()

    def on_after_backward(self, trainer, pl_module):
        self._add("backward", "backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._marks["optimizer"] = time.perf_counter()

    # -- validation -------------------------------------------------------------------------------
    def on_validation_start(self, trainer, pl_module):
        self._marks["validation"] = time.perf_counter()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self._measuring():
            self.val_computed_tokens += batch["attention_mask"].numel()

    def on_validation_end(self, trainer, pl_module):
        self._add("validation", "validation")

    @property
    def window_s(self) -> float:
        if self.window_start is None or self.window_end is None:
            return float("nan")
        return self.window_end - self.window_start


def make_conversations(args, sections: dict):
    from iterppo_lightning.env.episodes import episode_seeds
    from iterppo_lightning.env.sales_simulator import SalesSimulator, SimulatorConfig
    from iterppo_lightning.env.scripted_agents import BehaviourAgent
    from iterppo_lightning.loop.bootstrap import imagine_conversations

    simulator = SalesSimulator(SimulatorConfig(**sections["environment"]))
    agent = BehaviourAgent(**sections["behaviour"])
    namespace = "imagine" if args.phase == "bc" else "collect"  # pi_0's data / an iteration's data
    return imagine_conversations(simulator, agent, episode_seeds(namespace, args.seed, 0, args.episodes))


def build_phase(args, sections: dict, tokenizer, model, datamodule):
    """The phase's LightningModule, and the `for_phase` block the loop fits it in."""
    if args.phase == "bc":
        from iterppo_lightning.modules.sft import BehaviourCloningModule

        module = BehaviourCloningModule(lr=float(sections["bootstrap_lr"]))
        module.attach(model)
        return module, datamodule.for_phase("sft", batch_size=args.batch)
    from iterppo_lightning.modules.critic import CriticModule

    module = CriticModule(**sections["critic"])
    with tempfile.TemporaryDirectory(prefix="phase_bench_") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        module.build(tmp)
    return module, datamodule.for_phase("critic", batch_size=args.batch, bootstrap_members=module.ensemble_size)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sections = args.config_sections
    prepare_run(args.threads, args.seed)

    from iterppo_lightning.data.datamodule import TrajectoryDataModule
    from iterppo_lightning.loop.bootstrap import corpus
    from iterppo_lightning.models.tiny_lm import TinyLMConfig, build_tiny_causal_lm, train_word_tokenizer

    load_before = os.getloadavg()[0]
    t_setup = time.perf_counter()
    conversations = make_conversations(args, sections)
    tokenizer = train_word_tokenizer(corpus(conversations))
    shape = TinyLMConfig(
        n_layer=args.layers, n_embd=args.dim, n_head=args.heads, n_positions=int(sections["n_positions"])
    )
    model = build_tiny_causal_lm(tokenizer, shape, seed=args.seed)
    datamodule = TrajectoryDataModule(**sections["data"])
    datamodule.connect(tokenizer)
    datamodule.set_conversations(conversations)
    module, phase_block = build_phase(args, sections, tokenizer, model, datamodule)
    setup_s = time.perf_counter() - t_setup

    timer = PhaseTimer(args.warmup_epochs)
    trainer = make_trainer([timer], max_epochs=args.epochs, devices=1, use_distributed_sampler=False)
    with phase_block:
        train_rows = datamodule.train_dataloader().dataset
        val_rows = datamodule.val_dataloader().dataset if datamodule.val_examples else []
        train_examples, val_examples = (sum(len(s.turns) for s in rows) for rows in (train_rows, val_rows))
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_wall = time.perf_counter() - t0
    load_after = os.getloadavg()[0]

    # -- derived numbers ------------------------------------------------------------------------
    window = timer.window_s
    secs = dict(timer.seconds)
    model_s = sum(secs[k] for k in MODEL_STAGES)
    other_s = window - sum(secs.values())
    measured_epochs = args.epochs - args.warmup_epochs
    real, computed = timer.real_tokens, timer.computed_tokens

    def rate(n, s):
        return n / s if s > 0 else None

    epoch_walls = timer.epoch_walls
    warmup_text = "none"
    if args.warmup_epochs:
        warmup_text = f"first {args.warmup_epochs} epoch(s) of the fit, timings discarded"
    result = {
        "phase": args.phase,
        "steps_per_s": rate(timer.steps, window),
        "examples_per_s": rate(timer.examples, window),
        "real_tokens_per_s": rate(real, window),
        "computed_tokens_per_s": rate(computed, window),
        "real_tokens": real,
        "computed_tokens": computed,
        "padding_factor": computed / real if real else None,
        "real_tokens_per_epoch": real / measured_epochs,
        "computed_tokens_per_epoch": computed / measured_epochs,
        "label_tokens": timer.label_tokens,
        "mean_real_length": real / timer.rows if timer.rows else None,
        "mean_padded_width": computed / timer.rows if timer.rows else None,
        "steps": timer.steps,
        "batches": timer.batches,
        "steps_per_epoch": timer.steps / measured_epochs,
        "measured_epochs": measured_epochs,
        "epoch_wall_s": epoch_walls,
        "mean_epoch_wall_s": sum(epoch_walls) / len(epoch_walls) if epoch_walls else None,
        "window_s": window,
        "timings_s": secs,
        "other_s": other_s,
        "outside_share": 1.0 - model_s / window,
        "other_share": (secs["between_batches"] + other_s) / window,
        "validation_share": secs["validation"] / window,
        "val_computed_tokens": timer.val_computed_tokens,
        "fit_wall_s": fit_wall,
        "setup_s": setup_s,
        "warmup": warmup_text,
        "conversations": len(conversations),
        "train_examples": train_examples,
        "val_examples": val_examples,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "tokenizer_size": len(tokenizer),
        "model_params": sum(p.numel() for p in module.parameters()),
        **machine_info(),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": load_after,
        "args": {k: v for k, v in vars(args).items() if k != "config_sections"},
    }

    # -- report -----------------------------------------------------------------------------------
    print(
        f"{PHASE_NAMES[args.phase]}: GPT-2 {args.layers}x{args.dim} ({args.heads} heads, "
        f"{result['model_params']:,} params), tokenizer {len(tokenizer)}, {len(conversations)} conversations "
        f"-> {train_examples} train / {val_examples} val examples in {len(train_rows)} / {len(val_rows)} rows, "
        f"batch {args.batch}, "
        f"{args.epochs} epochs ({measured_epochs} measured), {torch.get_num_threads()} torch threads"
    )
    print(
        f"warm-up: {result['warmup']}; fit wall {fit_wall:.2f}s (sanity validation and warm-up included), "
        f"setup {setup_s:.2f}s"
    )
    rows = [(k, secs[k], rate(computed if k != "validation" else timer.val_computed_tokens, secs[k])) for k in STAGES]
    rows.append(("other", other_s, None))
    print_stage_table(
        rows,
        window,
        "measured epochs",
        [(f"  epoch {args.warmup_epochs + i + 1}", w) for i, w in enumerate(epoch_walls)],
    )
    print("tokens/s: computed (padded) tokens / stage seconds; validation counts its own batches")
    print(
        f"tokens per epoch: {result['real_tokens_per_epoch']:,.0f} real of {result['computed_tokens_per_epoch']:,.0f} "
        f"computed (padding x{result['padding_factor']:.2f}; mean row {result['mean_real_length']:.1f} tokens, "
        f"padded width {result['mean_padded_width']:.1f})"
    )
    print(
        f"steps/s: {result['steps_per_s']:.2f}  ({timer.steps} steps, {result['steps_per_epoch']:.0f} per epoch; "
        f"mean epoch {result['mean_epoch_wall_s']:.2f}s); real tokens/s {result['real_tokens_per_s']:,.0f}, "
        f"computed tokens/s {result['computed_tokens_per_s']:,.0f}"
    )
    print(
        f"share outside forward/backward/optimizer step: {result['outside_share']:.1%} "
        f"(validation {result['validation_share']:.1%}, between batches and other {result['other_share']:.1%})"
    )
    warn_if_busy(load_before, load_after)
    print_json_line(result)
    return result


if __name__ == "__main__":
    main()
