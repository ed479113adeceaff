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
  does: one row per turn (or, with `--conversation-rows`, whole conversations: one causal pass for
  all their turns), about `--batch` turns per batch, bucketed by length and right-padded to the
  longest row;
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

The PPO policy phase (`--phase ppo`)
------------------------------------
One outer iteration's policy phase as `loop/variants.py` runs it: a fit of
`iterppo_lightning.modules.policy.PolicyModule` in a real Trainer inside `for_phase("policy")`, over
`data.policy_batches` (30) rollouts of `data.policy_batch_size` (64) states drawn with replacement from
the states of `loop.episodes_per_iteration` (1024) simulator conversations, with the config's
`model.policy` settings (quickstart: 20 new tokens, 4 PPO epochs x 2 minibatches, target_kl 0.02,
score_norm whiten). pi is the tiny GPT-2 of `bootstrap.model`, behaviour-cloned for `--bc-steps` (300)
steps on the conversations first, so that its replies end with <end> at lengths like pi_0's (a random
policy never ends one); Q_k is a random critic of the same shape (only its forward costs time). A
separate fit of `--warmup-batches` (1) rollouts runs first and is discarded; the measured fit starts
from a fixed seed, so every version of the module sees the same prompts.

It reports seconds per iteration (the measured fit's wall time), the module's stage timers
(`PolicyModule.timings`: generate, score_forward, update_forward, update_backward, optimizer_step) and
their shares, and real against computed tokens of generation, scoring and the update: forward hooks
on the policy, the reference and the critic count every call's input positions (computed) and their
attention-mask ones (real; for generation, the prompts' tokens and each reply's tokens but its last).

    python benchmarks/phase_throughput.py --phase ppo --threads 1
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
    LoopTimer,
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
    p.add_argument("--phase", choices=("critic", "bc", "ppo"), required=True)
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
    p.add_argument(
        "--precision",
        default="32-true",
        help="the phase Trainer's precision (bf16-mixed: what --critic_precision / --bootstrap_precision set in fit)",
    )
    p.add_argument(
        "--conversation-rows",
        action="store_true",
        help="critic / bc: data.conversation_rows true (whole conversations as rows) instead of the config's choice",
    )
    add_ppo_arguments(p)
    args = p.parse_args(argv)
    if args.phase == "ppo":
        fill_ppo_defaults(args, p)
    else:
        fill_defaults(args, p)
    return args


def config_sections(path: str) -> tuple[dict, dict, dict, dict, dict, dict]:
    """The config's model, model.bootstrap, model.loop, data and bootstrap.model sections (empty when absent),
    and the TrajectoryDataModule's defaults for the data keys the config leaves out."""
    from iterppo_lightning.data.datamodule import TrajectoryDataModule

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    bootstrap = model.get("bootstrap") or {}
    dm_defaults = {k: v.default for k, v in inspect.signature(TrajectoryDataModule).parameters.items()}
    loop, data, shape = model.get("loop") or {}, config.get("data") or {}, bootstrap.get("model") or {}
    return model, bootstrap, loop, data, shape, dm_defaults


def fill_sizes_and_sections(
    args: argparse.Namespace, model: dict, bootstrap: dict, data: dict, shape: dict, sizes: dict, sections: dict
) -> None:
    """Set every size the command line left unset (the phase's `sizes`, then the model shape) and store the
    config sections the phase reads as `args.config_sections` (the shared ones plus the phase's `sections`)."""
    from iterppo_lightning.loop.bootstrap import BootstrapConfig
    from iterppo_lightning.models.tiny_lm import TinyLMConfig

    shape_sizes = {
        "layers": shape.get("n_layer", TinyLMConfig.n_layer),
        "dim": shape.get("n_embd", TinyLMConfig.n_embd),
        "heads": shape.get("n_head", TinyLMConfig.n_head),
    }
    for name, value in {**sizes, **shape_sizes}.items():
        if getattr(args, name) is None:
            setattr(args, name, int(value))
    args.config_sections = {
        "data": data,
        "environment": model.get("environment") or {},
        "behaviour": bootstrap.get("behaviour") or {},
        "bootstrap_lr": bootstrap.get("lr", BootstrapConfig.lr),
        "n_positions": shape.get("n_positions", TinyLMConfig.n_positions),
        **sections,
    }


def fill_defaults(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Unset sizes come from the config's YAML; a key it lacks takes the default of the class that reads it."""
    model, bootstrap, loop, data, shape, dm_defaults = config_sections(args.config)
    from iterppo_lightning.loop.bootstrap import BootstrapConfig
    from iterppo_lightning.loop.config import LoopConfig

    if args.phase == "critic":
        episodes = loop.get("episodes_per_iteration", LoopConfig.episodes_per_iteration)
        batch = data.get("critic_batch_size", dm_defaults.get("critic_batch_size"))
        epochs = loop.get("critic_epochs", LoopConfig.critic_epochs)
    else:
        episodes = bootstrap.get("episodes", BootstrapConfig.episodes)
        batch = bootstrap.get("batch_size", BootstrapConfig.batch_size)
        epochs = bootstrap.get("epochs", BootstrapConfig.epochs)
    fill_sizes_and_sections(
        args,
        model,
        bootstrap,
        data,
        shape,
        sizes={"episodes": episodes, "batch": batch, "epochs": epochs},
        sections={"critic": model.get("critic") or {}},
    )
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
    # As OuterLoop.fit_q: the auxiliary loss needs each turn's next customer message in the batches.
    return module, datamodule.for_phase(
        "critic", batch_size=args.batch, bootstrap_members=module.ensemble_size, next_messages=module.uses_aux
    )


def data_and_model(args: argparse.Namespace, sections: dict, data_settings: dict):
    """Simulator conversations, a word-level tokenizer trained on them, a random tiny GPT-2 of the config's
    shape, and a TrajectoryDataModule holding the conversations."""
    from iterppo_lightning.data.datamodule import TrajectoryDataModule
    from iterppo_lightning.loop.bootstrap import corpus
    from iterppo_lightning.models.tiny_lm import TinyLMConfig, build_tiny_causal_lm, train_word_tokenizer

    conversations = make_conversations(args, sections)
    tokenizer = train_word_tokenizer(corpus(conversations))
    shape = TinyLMConfig(
        n_layer=args.layers, n_embd=args.dim, n_head=args.heads, n_positions=int(sections["n_positions"])
    )
    model = build_tiny_causal_lm(tokenizer, shape, seed=args.seed)
    datamodule = TrajectoryDataModule(**data_settings)
    datamodule.connect(tokenizer)
    datamodule.set_conversations(conversations)
    return conversations, tokenizer, model, datamodule


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.phase == "ppo":
        return main_ppo(args)
    sections = args.config_sections
    prepare_run(args.threads, args.seed)

    load_before = os.getloadavg()[0]
    t_setup = time.perf_counter()
    data_settings = {**sections["data"], **({"conversation_rows": True} if args.conversation_rows else {})}
    conversations, tokenizer, model, datamodule = data_and_model(args, sections, data_settings)
    module, phase_block = build_phase(args, sections, tokenizer, model, datamodule)
    setup_s = time.perf_counter() - t_setup

    timer = PhaseTimer(args.warmup_epochs)
    trainer = make_trainer(
        [timer], max_epochs=args.epochs, devices=1, use_distributed_sampler=False, precision=args.precision
    )
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


# -- --phase ppo: the PPO policy phase at the config's size --------------------------------------------------------
PPO_STAGES = ("generate", "score_forward", "update_forward", "update_backward", "optimizer_step")
PPO_TOKEN_STAGES = ("generation", "scoring", "update")


def add_ppo_arguments(p: argparse.ArgumentParser) -> None:
    """The options only `--phase ppo` reads (its batch is --batch, its conversations --episodes)."""
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="ppo: rollouts (prompt batches) in the measured fit (default: data.policy_batches)",
    )
    p.add_argument("--warmup-batches", type=int, default=1, help="ppo: rollouts of the separate, discarded warm-up fit")
    p.add_argument(
        "--bc-steps",
        type=int,
        default=300,
        help="ppo: behaviour-cloning steps on the conversations before the fit, so the random policy's replies end "
        "with <end> at realistic lengths, as pi_0's do (0: keep the random policy, whose replies never end)",
    )


def fill_ppo_defaults(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """`--phase ppo`: sizes from the config's data, model.policy, model.loop and model.bootstrap sections."""
    model, bootstrap, loop, data, shape, dm_defaults = config_sections(args.config)
    from iterppo_lightning.loop.bootstrap import BootstrapConfig
    from iterppo_lightning.loop.config import LoopConfig

    fill_sizes_and_sections(
        args,
        model,
        bootstrap,
        data,
        shape,
        sizes={
            "episodes": loop.get("episodes_per_iteration", LoopConfig.episodes_per_iteration),
            "batch": data.get("policy_batch_size", dm_defaults["policy_batch_size"]),
            "batches": data.get("policy_batches", dm_defaults["policy_batches"]),
        },
        sections={
            "policy": model.get("policy") or {},
            "bootstrap_batch_size": bootstrap.get("batch_size", BootstrapConfig.batch_size),
        },
    )
    if args.episodes < 1 or args.batch < 1 or args.batches < 1:
        p.error("--episodes, --batch and --batches must be >= 1")
    if args.warmup_batches < 0 or args.bc_steps < 0:
        p.error("--warmup-batches and --bc-steps must be >= 0")


class PpoTokenCounter:
    """Real and computed tokens of every model pass of the policy phase, by stage.

    Forward pre-hooks on the policy, the reference and the critic's backbone count each call's query positions
    (computed: input_ids rows x width) and their attention-mask ones (real). The stage is the method running:
    `make_rollout` (generation: policy calls with the KV cache on; scoring: every other call) or `ppo_update`
    (update). Generation's real tokens are the inputs whose output is used: the prompts' tokens and each reply's
    tokens but its last (up to the first EOS), read from the rollout, since a decoding step's mask also marks the
    tokens sampled after EOS.
    """

    def __init__(self, module):
        self.module = module
        self.stage: str | None = None
        self.computed = dict.fromkeys(PPO_TOKEN_STAGES, 0)
        self.real = dict.fromkeys(PPO_TOKEN_STAGES, 0)
        self.calls = dict.fromkeys(PPO_TOKEN_STAGES, 0)
        self.rollouts = 0
        self.rows = 0
        self.prompt_tokens = 0
        self.prompt_width = 0
        self.reply_tokens = 0
        self.active = False
        self._handles = []
        self._patched: list[str] = []

    def _hook(self, is_policy: bool):
        def pre_hook(mod, args, kwargs):
            if not self.active or self.stage is None:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if ids is None:
                return
            if self.stage == "update":
                stage = "update"
            else:
                stage = "generation" if is_policy and kwargs.get("use_cache") else "scoring"
            self.calls[stage] += 1
            self.computed[stage] += ids.numel()
            if stage != "generation" and mask is not None:
                self.real[stage] += int(mask[:, -ids.shape[1] :].sum())

        return pre_hook

    def attach(self, critic) -> None:
        module = self.module
        targets = [(module.policy, True)]
        if module.reference is not None:
            targets.append((module.reference, False))
        targets.append((critic.backbone, False))
        for member in getattr(critic, "extra_members", []):
            targets.append((member["backbone"], False))
        for model, is_policy in targets:
            self._handles.append(model.register_forward_pre_hook(self._hook(is_policy), with_kwargs=True))
        self._wrap("make_rollout", "rollout")
        self._wrap("ppo_update", "update")

    def _wrap(self, name: str, stage: str) -> None:
        original = getattr(self.module, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            self.stage = stage
            try:
                out = original(*args, **kwargs)
            finally:
                self.stage = None
            if stage == "rollout" and self.active:
                self._count_rollout(out)
            return out

        setattr(self.module, name, wrapped)
        self._patched.append(name)

    def _count_rollout(self, rollout) -> None:
        prompt_width = rollout.query_responses.shape[1] - rollout.responses.shape[1]
        prompt_tokens = int(rollout.attention_mask[:, :prompt_width].sum())
        reply_tokens = int(rollout.response_mask.sum())
        self.rollouts += 1
        self.rows += rollout.responses.shape[0]
        self.prompt_tokens += prompt_tokens
        self.prompt_width += prompt_width * rollout.responses.shape[0]
        self.reply_tokens += reply_tokens
        # A reply's last token (EOS, or the max_new_tokens-th) is never fed back: L - 1 useful inputs per reply.
        self.real["generation"] += prompt_tokens + reply_tokens - rollout.responses.shape[0]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in self._patched:
            delattr(self.module, name)  # the class's method again
        self._patched.clear()


def behaviour_clone_briefly(model, datamodule, sections: dict, steps: int) -> float:
    """`steps` behaviour-cloning steps on the conversations' suggestions (pi_0's recipe, cut short); loss at the end."""
    from iterppo_lightning.modules.sft import BehaviourCloningModule

    module = BehaviourCloningModule(lr=float(sections["bootstrap_lr"]))
    module.attach(model)
    trainer = make_trainer(max_steps=steps, max_epochs=-1, devices=1, num_sanity_val_steps=0, limit_val_batches=0)
    with datamodule.for_phase("sft", batch_size=int(sections["bootstrap_batch_size"])):
        trainer.fit(module, datamodule=datamodule)
    loss = trainer.callback_metrics.get("sft/train_loss")
    return float(loss) if loss is not None else float("nan")


def ppo_policy_fit(module, datamodule, batches: int, callbacks=(), precision: str = "32-true") -> float:
    """One policy-phase fit of `batches` rollouts, as the loop runs it; its wall seconds."""
    saved = datamodule.policy_batches
    datamodule.policy_batches = batches
    trainer = make_trainer(list(callbacks), max_epochs=1, devices=1, use_distributed_sampler=False, precision=precision)
    try:
        with datamodule.for_phase("policy"):
            t0 = time.perf_counter()
            trainer.fit(module, datamodule=datamodule)
            return time.perf_counter() - t0
    finally:
        datamodule.policy_batches = saved


def main_ppo(args: argparse.Namespace) -> dict:
    """`--phase ppo`: one outer iteration's policy phase (PolicyModule, real Trainer, prompts of simulator states)."""
    sections = args.config_sections
    prepare_run(args.threads, args.seed)

    from iterppo_lightning.modules.critic import CriticModule
    from iterppo_lightning.modules.policy import PolicyModule

    load_before = os.getloadavg()[0]
    t_setup = time.perf_counter()
    data_settings = {**sections["data"], "policy_batch_size": args.batch}
    conversations, tokenizer, model, datamodule = data_and_model(args, sections, data_settings)
    bc_loss = behaviour_clone_briefly(model, datamodule, sections, args.bc_steps) if args.bc_steps else None
    critic = CriticModule(init_from_policy=False)  # random Q_k: only its forward pass costs time
    with tempfile.TemporaryDirectory(prefix="phase_bench_") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        critic.build(tmp)
    module = PolicyModule(**sections["policy"])
    module.attach(model, tokenizer)
    module.attach_critic(critic)
    setup_s = time.perf_counter() - t_setup

    counter = PpoTokenCounter(module)
    counter.attach(critic)
    warm_wall = (
        ppo_policy_fit(module, datamodule, args.warmup_batches, precision=args.precision)
        if args.warmup_batches
        else None
    )
    module.timings.clear()  # discard what the warm-up accumulated
    counter.active = True
    window = LoopTimer()
    torch.manual_seed(args.seed + 1)  # the same prompts, whatever the warm-up drew
    fit_wall = ppo_policy_fit(module, datamodule, args.batches, [window], args.precision)
    counter.detach()
    load_after = os.getloadavg()[0]

    # -- derived numbers ------------------------------------------------------------------------
    timings = {k: float(v) for k, v in module.timings.items()}
    for k in PPO_STAGES:
        timings.setdefault(k, 0.0)
    stats = dict(module.fit_stats)
    model_s = sum(timings.values())
    other_s = fit_wall - model_s
    rows = counter.rows

    def rate(n, s):
        return n / s if s > 0 else None

    update_s = timings["update_forward"] + timings["update_backward"]
    stage_seconds = {"generation": timings["generate"], "scoring": timings["score_forward"], "update": update_s}
    tokens = {
        stage: {
            "real": counter.real[stage],
            "computed": counter.computed[stage],
            "padding_factor": counter.computed[stage] / counter.real[stage] if counter.real[stage] else None,
            "model_calls": counter.calls[stage],
            "computed_tokens_per_s": rate(counter.computed[stage], stage_seconds[stage]),
            "real_tokens_per_s": rate(counter.real[stage], stage_seconds[stage]),
        }
        for stage in PPO_TOKEN_STAGES
    }
    result = {
        "phase": "ppo",
        "iteration_wall_s": fit_wall,
        "loop_wall_s": window.seconds,
        "rollouts": counter.rollouts,
        "rollouts_per_s": rate(counter.rollouts, fit_wall),
        "episodes_per_s": rate(rows, fit_wall),
        "timings_s": timings,
        "other_s": other_s,
        "shares": {k: v / fit_wall for k, v in {**timings, "other": other_s}.items()},
        "outside_share": 1.0 - (timings["generate"] + timings["score_forward"] + update_s) / fit_wall,
        "tokens": tokens,
        "mean_prompt_tokens": counter.prompt_tokens / rows if rows else None,
        "mean_prompt_width_padded": counter.prompt_width / rows if rows else None,
        "mean_response_length": counter.reply_tokens / rows if rows else None,
        "ended_frac": stats.get("ended_frac"),
        "epochs_run": stats.get("epochs_run"),
        "early_stopped": stats.get("early_stopped"),
        "approx_kl": stats.get("approx_kl"),
        "bc_steps": args.bc_steps,
        "bc_final_loss": bc_loss,
        "warmup": f"separate fit of {args.warmup_batches} rollout(s), timings discarded" if warm_wall else "none",
        "warmup_wall_s": warm_wall,
        "setup_s": setup_s,
        "conversations": len(conversations),
        "prompts": len(datamodule.all_examples),
        "tokenizer_size": len(tokenizer),
        "policy_settings": dict(sections["policy"]),
        "model_params": sum(p.numel() for p in model.parameters()),
        **machine_info(),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": load_after,
        "args": {k: v for k, v in vars(args).items() if k != "config_sections"},
    }

    # -- report -----------------------------------------------------------------------------------
    print(
        f"PPO policy phase: GPT-2 {args.layers}x{args.dim} ({args.heads} heads, {result['model_params']:,} params), "
        f"tokenizer {len(tokenizer)}, {len(conversations)} conversations -> {result['prompts']} prompts, "
        f"{args.batches} rollouts of {args.batch}, policy settings {sections['policy']}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"pi: random GPT-2 behaviour-cloned for {args.bc_steps} steps (final loss {bc_loss}); Q: random critic; "
        f"warm-up: {result['warmup']}; setup {setup_s:.2f}s"
    )
    table = [(k, timings[k], None) for k in timings]
    table.append(("other", other_s, None))
    print_stage_table(table, fit_wall, "iteration (fit)", [("  training loop", window.seconds)])
    print(f"{'tokens':<12}{'real':>12}{'computed':>12}{'x pad':>8}{'calls':>8}{'computed/s':>12}")
    for stage in PPO_TOKEN_STAGES:
        t = tokens[stage]
        factor = f"{t['padding_factor']:.2f}" if t["padding_factor"] else ""
        print(
            f"{stage:<12}{t['real']:>12,}{t['computed']:>12,}{factor:>8}{t['model_calls']:>8}"
            f"{t['computed_tokens_per_s'] or 0:>12,.0f}"
        )
    print(
        f"prompts: mean {result['mean_prompt_tokens']:.1f} real tokens, "
        f"padded width {result['mean_prompt_width_padded']:.1f}; "
        f"replies: mean {result['mean_response_length']:.1f} tokens, ended {result['ended_frac']}; "
        f"epochs run {result['epochs_run']}"
    )
    print(
        f"seconds per iteration: {fit_wall:.2f} "
        f"({counter.rollouts} rollouts, {result['episodes_per_s']:.1f} episodes/s)"
    )
    warn_if_busy(load_before, load_after)
    print_json_line(result)
    return result


if __name__ == "__main__":
    main()
