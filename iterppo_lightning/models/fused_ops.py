"""Fused kernels in place of ops composed in Python (GELU, AdamW), and the attention kernel bf16 wants on CPU.

GPT-2's default activation, `gelu_new`, evaluates the tanh approximation as
separate mul/pow/tanh/add ops, each a pass over memory with its own autograd
node; at the tiny models' sizes that is about a quarter of a critic step.
`torch.nn.functional.gelu(approximate="tanh")` is the same formula in one
kernel (largest difference 2.4e-7 on standard-normal inputs). Likewise AdamW
with `fused=True` updates every parameter in one kernel instead of a chain of
foreach ops.

Under bf16 on a CPU with native bf16 matrix multiplies (AVX512-BF16 or AMX), a tiny model's matmuls
run about 4x faster than in float32, but PyTorch's fused CPU attention kernel (SDPA) is slower in
bf16 than in float32, its backward most of all (a critic step at quickstart size: 43 ms in float32,
43 ms in bf16 with SDPA, 19 ms in bf16 with eager attention). So a phase fitted in bf16 on CPU runs
with eager attention, the same function as separate matmul and softmax ops, and gives SDPA back
when the fit ends. Its LM head and the critic's Q head compute in float32 (a few percent of the
work): with Q rounded to bf16 the critic ranked replies worse on most seeds measured, and logits
rounded to bf16 are noise in every token's cross-entropy (docs/performance.md, "bf16 on CPU").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import GELUTanh, NewGELUActivation

__all__ = ["FUSED_ACTIVATIONS", "adamw", "Float32OutputHead", "cpu_bf16_kernels", "fuse_activations", "restore_kernels"]

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


def adamw(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, fused into one kernel when every parameter is a float tensor on a device with a fused kernel.

    The update is the same algorithm; only float rounding differs from the default (foreach)
    implementation. The optimizer state has the same keys, so a state saved by either loads into
    the other. `fused=False` keeps the foreach implementation: Lightning's mixed-precision plugin
    refuses to clip the gradients of a fused optimizer.
    """
    params = list(params)
    fusable = fused and bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fusable or None)


class Float32OutputHead(nn.Linear):
    """An LM head that computes its logits in float32 under autocast: bf16 logits are rounded to 2^-7 of their size
    (about 0.06 at a logit of 8), which is noise in every token's cross-entropy."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return nn.functional.linear(
                hidden.float(), self.weight.float(), None if self.bias is None else self.bias.float()
            )


def cpu_bf16_kernels(module: nn.Module, trainer) -> list[tuple[nn.Module, str, object]]:
    """Prepare every Hugging Face model inside `module` for a fit in bf16 on CPU (see the module docstring): eager
    attention instead of SDPA, and LM heads in float32. Nothing changes at other precisions or on other devices.
    Returns what was changed, for `restore_kernels` after the fit."""
    precision = str(getattr(trainer, "precision", "32-true"))
    if "bf16" not in precision or trainer.strategy.root_device.type != "cpu":
        return []
    changed = []
    for sub in module.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        # Nested models share their config: after the outer one switches, the inner one reads "eager".
        if sub.config._attn_implementation == "sdpa":
            sub.set_attn_implementation("eager")
            changed.append((sub, "attention", "sdpa"))
        head = sub.get_output_embeddings()
        if type(head) is nn.Linear:
            head.__class__ = Float32OutputHead
            changed.append((head, "class", nn.Linear))
    return changed


def restore_kernels(changed: list[tuple[nn.Module, str, object]]) -> None:
    """Undo what `cpu_bf16_kernels` changed."""
    for target, what, before in changed:
        if what == "attention":
            target.set_attn_implementation(before)
        else:
            target.__class__ = before
