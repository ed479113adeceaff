"""One strategy and precision per phase (bootstrap, critic, policy), checked before any work, and the up-front
process launch.

`trainer.strategy` is every phase's default; `critic_strategy`, `policy_strategy` and `bootstrap_strategy`
override it per phase (e.g. DDP for a small critic, ZeRO-3 for a large policy). Likewise `trainer.precision`
and `critic_precision`, `policy_precision`, `bootstrap_precision` (e.g. bf16 for the critic and behaviour
cloning, float32 for PPO's log-prob ratios). All phases run on the same
processes: a multi-process run is SPMD, started once before any work (`launch_processes`), and every phase
Trainer then finds its processes already there.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

PHASES = ("bootstrap", "critic", "policy")

# Strategies that start their processes from inside `fit` (spawn) cannot run a loop around several fits.
_SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook", "xla", "fsdp_spawn")
_SINGLE = ("single_device", "single_xla")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _as_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    return dict(obj)


def phase_spec(phase: str, raw_config: Any) -> tuple[str, Any]:
    """(the config key that sets this phase's strategy, its value)."""
    own = _get(raw_config, f"{phase}_strategy")
    if own is not None:
        return f"{phase}_strategy", own
    return "trainer.strategy", _get(_get(raw_config, "trainer"), "strategy", "auto")


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX). Elsewhere PyTorch emulates bf16,
    which is slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def phase_precision(phase: str, raw_config: Any, on_cpu: bool = True) -> tuple[str, str]:
    """(the config key that sets this phase's precision, the precision its Trainer gets).

    `auto` is bf16-mixed on a CPU with native bf16 (`native_cpu_bf16`), else trainer.precision (float32 by default).
    """
    trainer_precision = str(_get(_get(raw_config, "trainer"), "precision", None) or "32-true")
    own = _get(raw_config, f"{phase}_precision")
    if own is None:
        return "trainer.precision", trainer_precision
    if str(own) == "auto":
        return f"{phase}_precision", "bf16-mixed" if on_cpu and native_cpu_bf16() else trainer_precision
    return f"{phase}_precision", str(own)


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_phase_strategy(phase: str, raw_config: Any, system: Any = None):
    """A new strategy object for one phase Trainer (a name is returned as is)."""
    key, spec = phase_spec(phase, raw_config)
    if spec is None or isinstance(spec, str):
        return spec
    class_path = _get(spec, "class_path")
    if class_path is None:  # already an object (in-process callers): never reuse it across Trainers
        raise ValueError(f"{key} must be a name or a class_path/init_args mapping, got an object")
    init_args = _as_dict(_get(spec, "init_args"))
    try:
        strategy = _import(class_path)(**init_args)
    except (ImportError, AttributeError, TypeError) as err:
        raise ValueError(f"{key}: cannot build {class_path}: {err}") from err
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if phase == "policy" and isinstance(strategy, DeepSpeedStrategy) and system is not None:
        # The policy module clips with clip_gradients(), which DeepSpeed ignores: its engine clips instead.
        strategy.config.setdefault("gradient_clipping", system.policy.max_grad_norm)
    return strategy


def _deepspeed_conflicts(key: str, spec: Any, strategy, precision: tuple[str, str], phase: str, system) -> list[str]:
    """Settings a DeepSpeed `config` would silently override or that contradict the run's own settings."""
    problems = []
    init_args = _as_dict(_get(spec, "init_args"))
    config = strategy.config
    zero = config.get("zero_optimization", {})
    if init_args.get("config") is not None:
        # Lightning ignores stage/offload arguments when a config is given: make the contradiction visible.
        # (jsonargparse fills in every default, so only values other than the defaults count as set.)
        defaults = {}
        for cls in reversed(type(strategy).__mro__):  # subclasses pass most arguments on as **kwargs
            if "__init__" in vars(cls):
                params = inspect.signature(cls.__init__).parameters.items()
                defaults.update({k: v.default for k, v in params if v.default is not inspect.Parameter.empty})
        init_args = {k: v for k, v in init_args.items() if k not in defaults or v != defaults[k]}
        if "stage" in init_args and int(init_args["stage"]) != int(zero.get("stage", 0)):
            problems.append(
                f"{key}.init_args.stage is {init_args['stage']} but its config's zero_optimization.stage is "
                f"{zero.get('stage', 0)} (the config wins silently); set one of them"
            )
        for arg, section in (("offload_optimizer", "offload_optimizer"), ("offload_parameters", "offload_param")):
            if init_args.get(arg) and section not in zero:
                problems.append(
                    f"{key}.init_args.{arg} is true but its config has no zero_optimization.{section} (the config wins)"
                )
    if "gradient_accumulation_steps" in config:
        problems.append(
            f"{key}: the DeepSpeed config sets gradient_accumulation_steps; the phases set their own batches"
        )
    if phase == "policy" and system is not None and "gradient_clipping" in config:
        if float(config["gradient_clipping"]) != float(system.policy.max_grad_norm):
            problems.append(
                f"{key}: the DeepSpeed config's gradient_clipping {config['gradient_clipping']} differs from "
                f"model.policy.max_grad_norm {system.policy.max_grad_norm}"
            )
    precision_key, precision_value = precision
    half = "bf16" if "bf16" in precision_value else "fp16" if "16" in precision_value else None
    for section in ("fp16", "bf16"):
        enabled = bool(config.get(section, {}).get("enabled", False))
        if enabled and section != half:
            problems.append(f"{key}: the DeepSpeed config enables {section} but {precision_key} is {precision_value!r}")
    if int(zero.get("stage", 0)) == 3 and phase == "policy" and system is not None and system.policy.lora is not None:
        problems.append(
            f"{key}: ZeRO-3 with model.policy.lora is not supported "
            "(the reference swaps the adapter's weights); use stage 2"
        )
    critic = getattr(system, "critic", None)
    if int(zero.get("stage", 0)) == 3 and phase in ("critic", "policy") and critic is not None:
        # The critic reads its LM head outside the backbone's forward, where ZeRO-3 leaves the weights partitioned:
        # PPO's scoring with a log-probability readout, and the critic's fit with it or with the auxiliary loss.
        readouts = ("reply_logprob", "reply_surprise")
        if critic.readout in readouts or (phase == "critic" and critic.uses_aux):
            named = repr(critic.readout) if critic.readout in readouts else " / ".join(map(repr, readouts))
            problems.append(
                f"{key}: ZeRO-3 partitions the critic's embeddings, which model.critic.readout {named} "
                "(and, in the critic phase, model.critic.aux_next_message_coef and aux_reaction_coef) read outside "
                "the backbone's forward; use stage 2, or none of these settings"
            )
    return problems


def check_phase_strategies(raw_config: Any, system: Any, cli_trainer) -> None:
    """Every phase's strategy can be built, runs on the run's processes, and agrees with the run's settings."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy

    from iterppo_lightning.distributed.cpu_deepspeed import CPUDeepSpeedStrategy

    world = cli_trainer.world_size
    on_gpu = isinstance(cli_trainer.accelerator, CUDAAccelerator)
    problems = []
    for phase in PHASES:
        key, spec = phase_spec(phase, raw_config)
        precision = phase_precision(phase, raw_config, on_cpu=isinstance(cli_trainer.accelerator, CPUAccelerator))
        if isinstance(spec, str):
            if spec.startswith("deepspeed") and not on_gpu:  # Lightning's registered deepspeed* names
                problems.append(
                    f"{key} is {spec!r}, which needs CUDA GPUs; on CPU use "
                    "iterppo_lightning.distributed.cpu_deepspeed.CPUDeepSpeedStrategy (trainer.accelerator is not cuda)"
                )
            if world > 1 and spec in _SPAWNING + _SINGLE:
                problems.append(
                    f"{key} is {spec!r}: with {world} processes every phase needs a strategy "
                    "that runs on all of them (ddp or deepspeed)"
                )
            continue
        strategy = build_phase_strategy(phase, raw_config, system)
        if world > 1 and isinstance(strategy, SingleDeviceStrategy):
            problems.append(f"{key} is a single-device strategy, but the run has {world} processes")
        if isinstance(strategy, DeepSpeedStrategy):
            if not on_gpu and not isinstance(strategy, CPUDeepSpeedStrategy):
                problems.append(
                    f"{key}: {type(strategy).__name__} needs CUDA GPUs; on CPU use "
                    "iterppo_lightning.distributed.cpu_deepspeed.CPUDeepSpeedStrategy (trainer.accelerator is not cuda)"
                )
            problems.extend(_deepspeed_conflicts(key, spec, strategy, precision, phase, system))
            if isinstance(strategy, CPUDeepSpeedStrategy) and precision[1] not in ("32-true", "32"):
                problems.append(
                    f"{key}: CPUDeepSpeedStrategy runs in float32 only, but {precision[0]} is {precision[1]!r}"
                )
    if problems:
        unique = list(dict.fromkeys(problems))  # phases sharing trainer.strategy report it once
        raise ValueError("strategy settings:\n  " + "\n  ".join(unique))


def _init_process_group(trainer) -> None:
    """The process group every phase Trainer then reuses (Lightning and DeepSpeed skip their own init)."""
    import torch.distributed as dist
    from lightning.pytorch.accelerators import CUDAAccelerator

    if dist.is_initialized():
        return
    strategy = trainer.strategy
    strategy.set_world_ranks()
    env = strategy.cluster_environment
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    backend = "gloo"
    if isinstance(trainer.accelerator, CUDAAccelerator):
        torch.cuda.set_device(strategy.local_rank)
        backend = "nccl"
    # The group lives for the whole run, and the other ranks wait in it while rank 0 collects and evaluates:
    # its timeout is the strategy's `timeout` (Lightning's default 30 min; raise it for long collections).
    timeout = getattr(strategy, "_timeout", None)
    dist.init_process_group(backend, rank=env.global_rank(), world_size=env.world_size(), timeout=timeout)


def launch_processes(trainer, function: Callable[[], Any]) -> Any:
    """Run `function` in every process of the run: start the local processes first when nothing else did.

    One process: just call it. Several on one machine (trainer.devices > 1, no torchrun/SLURM): Lightning's
    subprocess launcher starts the other local ranks NOW (each reruns this command), before any work, so every
    process runs the whole outer loop. Under torchrun or SLURM the processes exist already.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if trainer.world_size <= 1:
        return function()
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher):
        raise ValueError(
            f"trainer.strategy {type(trainer.strategy).__name__} starts its processes inside each fit "
            f"({type(launcher).__name__}); use ddp or a DeepSpeed strategy, or launch with torchrun/srun"
        )

    def run() -> Any:
        _init_process_group(trainer)
        return function()

    try:
        result = launcher.launch(run)
    except BaseException:
        for proc in launcher.procs:  # no rank is left waiting in a collective for one that is gone
            proc.kill()
        raise
    for proc in launcher.procs:
        proc.wait()
    return result
