"""LoRA adapters for the policy and the critic, with pi_k as the same model under a snapshot of its adapter.

Full fine-tuning keeps a frozen deep copy of the policy as the KL reference pi_k:
twice the base model in memory. With LoRA only the adapter changes during an
iteration, so pi_k is the live model with the adapter weights it had at the
start of the iteration: `adapter_state` takes that snapshot (a few MB) and
`adapter_weights` swaps it in for the reference forward and back out after:

    snapshot = adapter_state(policy)                  # on_fit_start: pi_k
    with adapter_weights(policy, snapshot):           # in each rollout
        ref_logits, _ = causal_lm_forward(policy, ids, mask)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass
class LoraSettings:
    """LoRA hyperparameters (the `lora:` section of a run config)."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input. Kept at 0 by default: PPO ratios assume the sampling and
    the scoring forwards see the same network."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear" (every nn.Linear but the LM head)."""
    merge_on_export: bool = True
    """Export pi_(k+1) merged into the base weights (a plain HF folder) or as an adapter folder."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module (or be 'all-linear')")

    def peft_config(self, task_type: str):
        from peft import LoraConfig, TaskType

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
            task_type=TaskType(task_type),
        )


def is_lora(model: nn.Module) -> bool:
    """Whether `model` is a peft model carrying a LoRA adapter."""
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel):
        return False
    return any(config.peft_type == PeftType.LORA for config in model.peft_config.values())


def _wrap(model: nn.Module, settings: LoraSettings, task_type: str):
    from peft import get_peft_model

    if is_lora(model):
        raise ValueError("model already has a LoRA adapter: add_lora would nest a second one")
    # get_peft_model replaces the targeted nn.Linear modules of `model` in place: the base weights are
    # shared, not copied, and the object passed in must not be used on its own afterwards.
    with warnings.catch_warnings():
        # peft reads `model.is_gradient_checkpointing`, which transformers 5.x deprecated (a FutureWarning
        # on every call); nothing for our callers to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, settings.peft_config(task_type))


def add_lora(model: PreTrainedModel, settings: LoraSettings):
    """`model` wrapped as a peft causal LM with a fresh adapter; only the adapter's weights require grad.

    A fresh adapter has B = 0, so the wrapped model computes exactly what `model` did.
    """
    peft_model = _wrap(model, settings, "CAUSAL_LM")
    train_only_adapter(peft_model)
    return peft_model


def add_lora_to_backbone(backbone: PreTrainedModel, settings: LoraSettings):
    """A LoRA adapter on a bare `AutoModel` backbone (no LM head), for the critic.

    Task type FEATURE_EXTRACTION: the peft wrapper returns the backbone's hidden states
    (modeling.backbone_hidden reads them). The critic trains the adapter plus its own
    scalar head, which lives outside this model and is left as it is.
    """
    peft_model = _wrap(backbone, settings, "FEATURE_EXTRACTION")
    train_only_adapter(peft_model)
    return peft_model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name (lora_A / lora_B / ... of every tuner layer).

    Found through peft's own `adapter_layer_names` rather than by name matching, and
    not through requires_grad: that flag is toggled when a model is frozen (the critic
    during the policy phase), the membership is not.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in module.adapter_layer_names:
                ids.update(id(p) for p in getattr(module, attribute).parameters())
    params = {name: p for name, p in model.named_parameters() if id(p) in ids}
    if not params:
        raise ValueError(f"{type(model).__name__} has no adapter parameters (use add_lora first)")
    return params


def train_only_adapter(model: nn.Module) -> None:
    """requires_grad on the adapter's weights only; the base stays frozen.

    peft does this in get_peft_model, but `module.requires_grad_(True)` (the critic's
    on_fit_start does it) thaws the whole base again: call this after such a call.
    """
    adapter = set(adapter_parameters(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapter)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of the adapter's weights: the snapshot that stands for pi_k during an iteration."""
    return {name: p.detach().clone() for name, p in adapter_parameters(model).items()}


def _check_state(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for name, param in params.items():
        if state[name].shape != param.shape:
            raise ValueError(f"adapter state {name}: shape {tuple(state[name].shape)} != model {tuple(param.shape)}")


@contextlib.contextmanager
def adapter_weights(model: nn.Module, state: dict[str, torch.Tensor], eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run the block with the adapter set to `state` (pi_k), then put the live weights back, even on error.

    The block runs under no_grad: the reference is never differentiated, and a graph
    holding the swapped-in weights would be invalid once they are restored in place.
    With `eval_mode` the model is in eval mode inside the block (no adapter dropout:
    pi_k is a fixed distribution) and each module's train/eval flag is restored after.
    """
    params = adapter_parameters(model)
    _check_state(params, state)
    live = {name: p.detach().clone() for name, p in params.items()}
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
            if eval_mode:
                model.eval()
            yield model
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(live[name])
        for module, training in modes.items():
            module.training = training
