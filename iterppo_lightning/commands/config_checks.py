"""Every numeric and shape setting of a training subcommand, checked before anything is built or written.

The modules and configs check their own arguments too, but one at a time and only once they are built:
a zero batch size used to surface as a ZeroDivisionError after pi_0 was bootstrapped and the run folder
existed. `config_problems` reads the parsed config (commands/lightning_cli.py calls it right after
parsing, before LightningCLI instantiates anything) and returns every problem at once, each naming the
key as it is typed on the command line (`model.critic.lr`, not `model.critic.init_args.lr`).

Besides value ranges it refuses what `fit` would silently ignore: Trainer flags the loop sets per phase
(`trainer.max_epochs`: the phases' epochs are model.loop.critic_epochs, model.policy.ppo_epochs and
model.bootstrap.epochs) and `ckpt_path` (a run resumes from its own folder: `--resume`), and a run folder
that cannot be written.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "config_problems", "check_config"]


class ConfigError(ValueError):
    """The config has values no run can use; the message lists every one, by key."""


Check = Callable[[float], bool]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_least(low: float) -> tuple[Check, str]:
    return (lambda v: v >= low), f">= {low:g}"


def _above(low: float) -> tuple[Check, str]:
    return (lambda v: v > low), f"> {low:g}"


def _within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> tuple[Check, str]:
    def check(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return check, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


COUNT = _at_least(1)
NON_NEGATIVE = _at_least(0)
POSITIVE = _above(0)
PROBABILITY = _within(0, 1)
FINITE: tuple[Check, str] = (math.isfinite, "a finite number")

# key -> (check, what the value must be). A value of None (an optional setting left off) is never checked;
# a value of the wrong type is left to the parser, which names it.
MODEL_RULES: dict[str, tuple[Check, str]] = {
    "model.critic.lr": POSITIVE,
    "model.critic.weight_decay": NON_NEGATIVE,
    "model.critic.calibration_bins": COUNT,
    "model.critic.td_lambda": PROBABILITY,
    "model.critic.td_rounds": COUNT,
    "model.critic.ensemble_size": COUNT,
    "model.critic.pessimism": NON_NEGATIVE,
    "model.critic.aux_next_message_coef": NON_NEGATIVE,
    "model.critic.aux_reaction_coef": NON_NEGATIVE,
    "model.critic.head_hidden": NON_NEGATIVE,
    "model.critic.surprise_threshold": _within(0, 1, low_open=True, high_open=True),
    "model.critic.branch_contrast_coef": NON_NEGATIVE,
    "model.critic.early_stopping_patience": NON_NEGATIVE,
    "model.policy.lr": POSITIVE,
    "model.policy.ppo_epochs": COUNT,
    "model.policy.minibatches": COUNT,
    "model.policy.clip_eps": POSITIVE,
    "model.policy.value_clip": POSITIVE,
    "model.policy.vf_coef": NON_NEGATIVE,
    "model.policy.gamma_token": _within(0, 1, low_open=True),
    "model.policy.gae_lambda": PROBABILITY,
    "model.policy.entropy_coef": FINITE,  # negative: an entropy penalty
    "model.policy.kl_coef": NON_NEGATIVE,
    "model.policy.kl_target": POSITIVE,
    "model.policy.kl_horizon": COUNT,
    "model.policy.target_kl": POSITIVE,
    "model.policy.max_iteration_kl": POSITIVE,
    "model.policy.max_new_tokens": COUNT,
    "model.policy.temperature": POSITIVE,
    "model.policy.max_grad_norm": POSITIVE,
    "model.policy.group_size": COUNT,
    "model.policy.length_group_cost": NON_NEGATIVE,
    "model.environment.min_patience": COUNT,
    "model.environment.max_patience": COUNT,
    "model.environment.price_sensitive_prob": PROBABILITY,
    "model.environment.accept_prob": PROBABILITY,
    "model.environment.edit_prob": PROBABILITY,
    "model.environment.reject_prob": PROBABILITY,
    "model.environment.max_reply_words": COUNT,
    "model.environment.max_agent_turns": COUNT,
    "model.environment.need_synonym_prob": PROBABILITY,
    "model.environment.wrong_category_penalty": NON_NEGATIVE,
    "model.bootstrap.episodes": COUNT,
    "model.bootstrap.epochs": COUNT,
    "model.bootstrap.lr": POSITIVE,
    "model.bootstrap.curriculum_steps": NON_NEGATIVE,
    "model.bootstrap.batch_size": COUNT,
    "model.bootstrap.model.n_layer": COUNT,
    "model.bootstrap.model.n_embd": COUNT,
    "model.bootstrap.model.n_head": COUNT,
    "model.bootstrap.model.n_positions": COUNT,
    "model.loop.iterations": COUNT,
    "model.loop.episodes_per_iteration": COUNT,
    "model.loop.eval_episodes": NON_NEGATIVE,
    "model.loop.critic_epochs": COUNT,
    "model.loop.collect_temperature": POSITIVE,
    "model.loop.explore_prob": PROBABILITY,
    "model.loop.explore_temperature": POSITIVE,
    "model.loop.branch_fraction": _within(0, 1, high_open=True),
    "model.loop.branch_temperature": POSITIVE,
    "model.loop.rollout_batch_size": COUNT,
    "model.loop.max_prompt_tokens": COUNT,
    "model.loop.early_stopping_patience": COUNT,
    "model.loop.critic_probe.states": COUNT,
    "model.loop.critic_probe.continuations": _at_least(2),
    "model.loop.critic_probe.policy_samples": NON_NEGATIVE,
    "model.loop.critic_probe.pair_threshold": _within(0, 1, high_open=True),
    "model.loop.oracle_critic.continuations": COUNT,
    "model.loop.table_critic.prior": POSITIVE,
    "model.filtered_bc.epochs": COUNT,
    "model.filtered_bc.lr": POSITIVE,
    "model.filtered_bc.batch_size": COUNT,
    "data.gamma": _within(0, 1, low_open=True),
    "data.val_fraction": _within(0, 1, high_open=True),
    "data.critic_batch_size": COUNT,
    "data.sft_batch_size": COUNT,
    "data.policy_batch_size": COUNT,
    "data.policy_batches": COUNT,
    "data.max_prompt_tokens": COUNT,
    "data.max_action_tokens": COUNT,
    "data.imagined_weight": NON_NEGATIVE,
    "seed_everything": _within(0, 2**32 - 1),
}

COMMAND_RULES: dict[str, dict[str, tuple[Check, str]]] = {
    "evaluate": {"episodes": COUNT, "batch_size": COUNT, "seed": NON_NEGATIVE},
    "collect": {"episodes": COUNT, "batch_size": COUNT, "seed": NON_NEGATIVE},
    "imagine": {"personas": COUNT, "dialogues_per_persona": COUNT, "seed": NON_NEGATIVE},
}
"""The subcommand's own arguments (`iterppo evaluate --episodes`), beside the model and data settings."""

PHASE_TRAINER_FLAGS = {
    "trainer.max_epochs": "model.loop.critic_epochs, model.policy.ppo_epochs and model.bootstrap.epochs",
    "trainer.min_epochs": "model.loop.critic_epochs, model.policy.ppo_epochs and model.bootstrap.epochs",
    "trainer.max_steps": "model.bootstrap.curriculum_steps and the epochs above",
    "trainer.min_steps": "model.bootstrap.curriculum_steps and the epochs above",
}
"""Trainer settings the loop sets for each phase's Trainer itself (a value here would be ignored), and the keys
that set them instead. Lightning's defaults (None, max_steps -1) are what "unset" looks like."""

PRECISION_KEYS = ("trainer.precision", "bootstrap_precision", "critic_precision", "policy_precision")
"""The run's precision and each phase's own (distributed/phase_strategies.py: phase_precision)."""

TRAINING_COMMANDS = ("fit", "bootstrap")
"""Subcommands that train phase by phase (the Trainer flags above would be ignored there)."""


def _lookup(config: Any, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key, stepping through `init_args` of class_path entries transparently."""
    node = config
    for part in key.split("."):
        if node is None:
            return True, None
        if not hasattr(node, "get") and hasattr(node, "__dict__"):
            node = vars(node)
        if not hasattr(node, "get"):
            return False, None
        if part not in node and "init_args" in node:
            node = node.get("init_args")
            if node is None:
                return False, None
            if not hasattr(node, "get"):
                node = vars(node)
        if part not in node:
            return False, None
        node = node.get(part)
    return True, node


def _value(config: Any, key: str) -> Any:
    return _lookup(config, key)[1]


def _range_problems(config: Any, rules: dict[str, tuple[Check, str]]) -> list[str]:
    problems = []
    for key, (check, requirement) in rules.items():
        found, value = _lookup(config, key)
        if not found or value is None or not _number(value):
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
            problems.append(f"{key} must be {requirement}, got {value!r}")
    return problems


def _numbers(config: Any, *keys: str) -> list[float] | None:
    values = [_value(config, key) for key in keys]
    return values if all(_number(v) for v in values) else None


def _shape_problems(config: Any) -> list[str]:
    """Settings that are each in range but do not fit together."""
    problems = []
    shape = _numbers(config, "model.bootstrap.model.n_embd", "model.bootstrap.model.n_head")
    if shape and shape[1] > 0 and shape[0] % shape[1]:
        problems.append(
            f"model.bootstrap.model.n_embd ({shape[0]}) must be a multiple of model.bootstrap.model.n_head "
            f"({shape[1]}): each attention head gets n_embd / n_head dimensions"
        )
    patience = _numbers(config, "model.environment.min_patience", "model.environment.max_patience")
    if patience and patience[0] > patience[1]:
        problems.append(
            f"model.environment.min_patience ({patience[0]}) must be <= model.environment.max_patience ({patience[1]})"
        )
    replies = _numbers(
        config, "model.environment.accept_prob", "model.environment.edit_prob", "model.environment.reject_prob"
    )
    if replies and all(p >= 0 for p in replies) and abs(sum(replies) - 1.0) > 1e-6:
        problems.append(
            "model.environment.accept_prob + edit_prob + reject_prob must sum to 1, got "
            f"{replies[0]:g} + {replies[1]:g} + {replies[2]:g} = {sum(replies):g}"
        )
    ensemble = _numbers(config, "model.critic.pessimism", "model.critic.ensemble_size")
    if ensemble and ensemble[0] > 0 and ensemble[1] < 2:
        problems.append(
            f"model.critic.pessimism {ensemble[0]:g} needs model.critic.ensemble_size >= 2 (one critic has no "
            f"spread to be pessimistic about), got {ensemble[1]}"
        )
    contrast = _numbers(config, "model.critic.branch_contrast_coef", "model.loop.branch_fraction")
    if contrast and contrast[0] > 0 and contrast[1] <= 0:
        problems.append(
            f"model.critic.branch_contrast_coef {contrast[0]:g} compares two replies at one state, which only branch "
            "conversations give: set model.loop.branch_fraction > 0 (or the coefficient to 0)"
        )
    weights = _value(config, "data.pool_weights")
    if isinstance(weights, (list, tuple)) and all(_number(w) for w in weights):
        if not weights or weights[0] <= 0 or any(w < 0 for w in weights):
            problems.append(f"data.pool_weights must start with a weight > 0 and hold no negative one, got {weights}")
    if _value(config, "model.policy_init") is None and _value(config, "model.base_model") is None:
        problems += _tiny_model_context_problems(config)
    return problems


def _tiny_model_context_problems(config: Any) -> list[str]:
    """The bootstrapped tiny GPT-2 (no policy_init / base_model) has n_positions positions: the longest state
    plus reply either reader sees must fit, or a long conversation fails mid-run."""
    problems = []
    positions = _value(config, "model.bootstrap.model.n_positions")
    if not _number(positions) or positions < 1:
        return problems
    readers = [
        ("the policy", "model.loop.max_prompt_tokens", "model.policy.max_new_tokens"),
        ("the critic", "data.max_prompt_tokens", "data.max_action_tokens"),
    ]
    for reader, prompt_key, reply_key in readers:
        lengths = _numbers(config, prompt_key, reply_key)
        if lengths and sum(lengths) > positions:
            problems.append(
                f"model.bootstrap.model.n_positions ({positions}) is shorter than what {reader} reads: "
                f"{prompt_key} ({lengths[0]}) + {reply_key} ({lengths[1]}) = {sum(lengths)}"
            )
    return problems


def _system_prompt_problems(config: Any) -> list[str]:
    """model.system_prompt is baked into a chat base_model's template when pi_0 is made from it: it needs
    model.base_model (pi_0 from policy_init or the bootstrapped word-level model would never get it, and the
    word-level models' plain format has no system turn)."""
    prompt = _value(config, "model.system_prompt")
    if prompt is None:
        return []
    if not isinstance(prompt, str) or not prompt.strip():
        return [f"model.system_prompt must be non-empty text, got {prompt!r}"]
    if _value(config, "model.base_model") is None:
        return [
            "model.system_prompt needs model.base_model (a chat model): it is baked into pi_0's chat template; "
            "the word-level models' plain format has no system turn, and a model.policy_init folder keeps the "
            "template it was saved with"
        ]
    return []


def _trainer_problems(config: Any) -> list[str]:
    problems = []
    for key, instead in PHASE_TRAINER_FLAGS.items():
        value = _value(config, key)
        if value is not None and not (key == "trainer.max_steps" and value == -1):
            problems.append(
                f"{key} is set for each phase by the loop, from {instead}; remove it (a value here would be ignored)"
            )
    from lightning.fabric.connector import _PRECISION_INPUT_STR

    allowed = typing.get_args(_PRECISION_INPUT_STR)
    for key in PRECISION_KEYS:
        value = _value(config, key)
        phase_key = key != "trainer.precision"  # the phase keys also take `auto` (phase_strategies.phase_precision)
        if value is not None and str(value) not in allowed + ("16", "32", "64", "bf16") + (
            ("auto",) if phase_key else ()
        ):
            names = ", ".join(allowed + (("auto",) if phase_key else ()))
            problems.append(f"{key} must be one of {names}, got {value!r}")
    if _value(config, "ckpt_path"):
        problems.append(
            "ckpt_path: `iterppo fit` does not load Lightning checkpoints; every step of a run is committed to its "
            "run folder, and `--run_dir RUN --resume` continues it from there"
        )
    return problems


def _run_dir_problems(run_dir: Any) -> list[str]:
    """A run folder that exists as a file, or that cannot be written or created (checked without creating it)."""
    if not isinstance(run_dir, str) or not run_dir:
        return ["run_dir must be a folder path"] if not run_dir else []
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        return [f"run_dir {run_dir!r} is a file, not a folder; choose a new --run_dir"]
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            return [f"run_dir {run_dir!r} is not writable"]
        return []
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return [f"run_dir {run_dir!r} cannot be created: {str(ancestor)!r} is a file, not a folder"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"run_dir {run_dir!r} cannot be created: {str(ancestor)!r} is not writable"]
    return []


def config_problems(subcommand: str, config: Any, *, check_run_dir: bool = True) -> list[str]:
    """Every bad setting of `subcommand`'s parsed config (its own section: model, data, trainer, ...), by key.

    check_run_dir: also check that `fit`'s run_dir can be written (off where the config is only resolved).
    """
    problems = _range_problems(config, MODEL_RULES) + _shape_problems(config)
    problems += _system_prompt_problems(config)
    problems += _range_problems(config, COMMAND_RULES.get(subcommand, {}))
    if subcommand in TRAINING_COMMANDS:
        problems += _trainer_problems(config)
    if subcommand == "fit" and check_run_dir:
        problems += _run_dir_problems(_value(config, "run_dir"))
    return problems


def check_config(subcommand: str, config: Any) -> None:
    """Raise ConfigError listing every problem `config_problems` finds (nothing when there is none)."""
    problems = config_problems(subcommand, config)
    if problems:
        raise ConfigError(
            f"{len(problems)} bad setting(s); nothing was started or written:\n  " + "\n  ".join(problems)
        )
