"""Fused kernels in place of ops composed in Python: GELU (tanh) and AdamW.

GPT-2's default activation, `gelu_new`, evaluates the tanh approximation as
separate mul/pow/tanh/add ops, each a pass over memory with its own autograd
node; at the tiny models' sizes that is about a quarter of a critic step.
`torch.nn.functional.gelu(approximate="tanh")` is the same formula in one
kernel (largest difference 2.4e-7 on standard-normal inputs). Likewise AdamW
with `fused=True` updates every parameter in one kernel instead of a chain of
foreach ops.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation

__all__ = ["FUSED_ACTIVATIONS", "adamw", "fuse_activations"]

FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}
"""config.activation_function -> the fused name transformers maps to the same function."""


def fuse_activations(model: nn.Module) -> nn.Module:
    """Replace every `gelu_new` activation module of `model` by the fused tanh GELU, in place.

    The config is updated too, so a model saved afterwards (and any model built from its
    config) uses the fused kernel, and one saved before this change is fused when loaded.
    Models without such activations (SiLU, ReLU) are returned unchanged.
    """
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    for config in {id(c): c for c in _configs(model)}.values():
        if getattr(config, "activation_function", None) in FUSED_ACTIVATIONS:
            config.activation_function = FUSED_ACTIVATIONS[config.activation_function]
    return model


def _configs(model: nn.Module):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            yield config


def adamw(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel when every parameter is a float tensor on a device with a fused kernel.

    The update is the same algorithm; only float rounding differs from the default (foreach)
    implementation. The optimizer state has the same keys, so a state saved by either loads into
    the other.
    """
    params = list(params)
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fusable or None)
