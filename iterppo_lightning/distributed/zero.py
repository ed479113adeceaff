"""DeepSpeed ZeRO around one phase fit: generation with gathered weights, a partition report, and handing the
modules back to the loop as plain PyTorch modules afterwards.

Why hand them back: ZeRO mutates modules in place. Under stage 3 every parameter becomes a partitioned
placeholder with gather hooks on its module; under stage 1/2 the optimizer hangs gradient hooks on the
parameters. The loop keeps using the same policy and critic objects between fits (collection, evaluation,
export, the next iteration's fit with a fresh engine), so after each DeepSpeed fit `release_from_deepspeed`
removes the engine's hooks and replaces every parameter with a plain one holding the full (gathered) values.
Between fits every rank therefore holds whole models; only the fits are sharded.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from iterppo_lightning.utils.atomic_io import replace_dir

ZERO_CHECKPOINT_TAG = "phase"
ZERO_CHECKPOINT_CARD = "iterppo_zero.json"


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def zero_stage(trainer) -> int:
    """0 without DeepSpeed, else the ZeRO stage of the trainer's DeepSpeed strategy."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int(strategy.config.get("zero_optimization", {}).get("stage", 0))


def _engine_optimizer(module: nn.Module):
    trainer = getattr(module, "_trainer", None)
    engine = getattr(getattr(trainer, "strategy", None), "model", None) if trainer is not None else None
    return getattr(engine, "optimizer", None)


@contextlib.contextmanager
def gathered_for_generation(module: nn.Module, model: nn.Module) -> Iterator[nn.Module]:
    """Under ZeRO-3: gather `model`'s parameters once and remove the per-layer gather hooks while generating.

    A plain forward under ZeRO-3 all-gathers every layer at every decoding step, and HF `generate` would
    need `synced_gpus` so that no rank stops stepping early. With the weights gathered and the hooks off,
    generation is a local computation: ranks may stop at different lengths. Every rank must enter (the
    gather is collective). `module` is the LightningModule being fit (to find its DeepSpeed engine).
    Without ZeRO-3 this yields `model` untouched.
    """
    params = [p for p in model.parameters() if is_zero3_param(p)]
    optimizer = _engine_optimizer(module)
    offload = getattr(optimizer, "parameter_offload", None)
    if not params or offload is None:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        offload._remove_module_hooks()
        try:
            yield model
        finally:
            offload.setup_zero_stage3_hooks()  # also invalidates the prefetch trace


def partition_report(module: nn.Module) -> dict[str, float]:
    """Parameter elements held by this process versus the model's total (sharding check and memory record)."""
    total = held = 0
    zero3 = False
    seen: set[int] = set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_zero3_param(p):
            zero3 = True
            total += p.ds_numel
            held += p.ds_tensor.numel()
        else:
            total += p.numel()
            held += p.numel()
    return {
        "param_elements": float(total),
        "param_elements_held": float(held),
        "held_fraction": held / max(total, 1),
        "zero3": float(zero3),
    }


def optimizer_state_elements(engine) -> float:
    """Elements of optimizer state (e.g. Adam moments, fp32 master partitions) this process holds."""
    seen, total = set(), 0
    zero_optimizer = getattr(engine, "optimizer", None)
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    tensors = [t for state in getattr(inner, "state", {}).values() for t in state.values() if torch.is_tensor(t)]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        tensors += [t for t in getattr(zero_optimizer, name, []) if torch.is_tensor(t)]
    for t in tensors:
        if id(t) not in seen and t.dim() > 0:
            seen.add(id(t))
            total += t.numel()
    return float(total)


def release_from_deepspeed(module: nn.Module, engine) -> None:
    """Make `module` a plain PyTorch module again after a DeepSpeed fit (see the module docstring).

    Collective under ZeRO-3 (every rank gathers), so every rank calls it. Tied weights stay tied.
    """
    import deepspeed

    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()  # removes ZeRO-3 module hooks and the optimizer's gradient hooks
    replaced: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in replaced:
                if is_zero3_param(p):
                    with deepspeed.zero.GatheredParameters([p]):
                        data = p.data.detach().clone()
                else:
                    data = p.data.detach().clone()
                replaced[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            sub._parameters[name] = replaced[id(p)]


def zero3_shard_numel(numel: int, world: int) -> int:
    """Elements of one parameter a rank holds under ZeRO-3 (DeepSpeed pads to a multiple of the world size)."""
    return math.ceil(numel / world)


def save_zero_checkpoint(trainer, path: Path) -> None:
    """The engine's sharded checkpoint (every rank writes its partition), written then renamed into `path`.

    Collective: every rank calls it. Rank 0 adds a card with the world size and stage, checked before a
    resumed run loads it (`check_zero_checkpoint`).
    """
    from iterppo_lightning.distributed import collectives as dist_utils

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-zero")  # the same name on every rank (they write into one folder)
    engine = trainer.strategy.deepspeed_engine
    # Frozen weights (the reference pi_k, the critic Q_k inside the policy module) are not part of the training
    # state and must not come back from an earlier iteration's checkpoint.
    engine.save_checkpoint(str(tmp), tag=ZERO_CHECKPOINT_TAG, exclude_frozen_parameters=True)
    dist_utils.barrier()
    if dist_utils.is_main():
        card = {"world_size": dist_utils.world_size(), "stage": zero_stage(trainer), "tag": ZERO_CHECKPOINT_TAG}
        (tmp / ZERO_CHECKPOINT_CARD).write_text(json.dumps(card, indent=2) + "\n")
        # The previous checkpoint is renamed aside, not deleted, until the new one is in place.
        replace_dir(tmp, path)
    dist_utils.barrier()


def check_zero_checkpoint(path: Path, world: int, setting: str) -> None:
    """Refuse a sharded checkpoint written by another number of processes (DeepSpeed cannot re-partition it)."""
    card_file = Path(path) / ZERO_CHECKPOINT_CARD
    if not card_file.exists():
        raise ValueError(f"{path} is not a complete ZeRO checkpoint of this run (no {ZERO_CHECKPOINT_CARD})")
    card = json.loads(card_file.read_text())
    if int(card["world_size"]) != world:
        raise ValueError(
            f"the ZeRO checkpoint {path} was written by {card['world_size']} processes, this run has {world} "
            f"({setting}); its optimizer state is partitioned for {card['world_size']}: resume with the same "
            "number of processes, or set keep_optimizer_state false to restart the optimizer"
        )
