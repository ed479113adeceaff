"""The on-disk format of a saved policy folder: the one module that writes, reads and checks it.

A policy folder is a deployable Hugging Face model (tokenizer and chat template
included) plus what a run adds beside it:

    config.json, model.safetensors, tokenizer files   a full model (`save_pretrained`), or
    adapter_config.json, adapter_model.safetensors    a LoRA adapter export (applies to `lora_base`)
    lora_adapter/                                      beside a merged LoRA export: the adapter as
                                                       trained, to resume on the same base
    value_head.pt                                      the PPO value head (state dict of an nn.Linear)
    iterppo_policy.json                                the lineage card (policy id, parent, data, lora_base)

Every other module goes through the functions here; none spells a file name.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from iterppo_lightning.models.fused_ops import fuse_activations
from iterppo_lightning.models.lora import adapter_parameters, adapter_state, is_lora
from iterppo_lightning.utils.atomic_io import atomic_dir
from iterppo_lightning.utils.failpoints import failpoint

__all__ = [
    "POLICY_CARD_FILE",
    "VALUE_HEAD_FILE",
    "LORA_ADAPTER_DIR",
    "ADAPTER_CONFIG_FILE",
    "SavedPolicy",
    "write_policy_folder",
    "export_policy",
    "read_card",
    "lora_adapter_dir",
    "lora_base_of",
    "check_policy_dir",
    "load_policy",
    "read_policy_folder",
    "saved_adapter_state",
]

POLICY_CARD_FILE = "iterppo_policy.json"
"""The lineage card: JSON with the policy id, its parent, the data it was trained on and, with LoRA, `lora_base`."""
VALUE_HEAD_FILE = "value_head.pt"
"""The PPO value head's state dict (an nn.Linear(hidden_size, 1))."""
LORA_ADAPTER_DIR = "lora_adapter"
"""Beside a merged LoRA export: the adapter as trained, for an exact resume on the same base."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""peft's marker of an adapter folder."""


# -- writing ---------------------------------------------------------------------------------
def export_policy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: str | Path, *, merge: bool) -> Path:
    """Write the model to `folder` (created if needed) with its tokenizer; returns the folder.

    merge=True: a LoRA adapter folded into the base weights, a plain HF causal-LM folder
    that AutoModelForCausalLM loads without peft. The merge runs on a deep copy (the
    live adapter keeps training; merge then unmerge in place would leave rounding
    error in the base), so it briefly needs a second copy of the model in memory.
    merge=False: peft's adapter folder (adapter_config.json + adapter weights), for
    PeftModel.from_pretrained on the same base. A model without LoRA is saved as is.
    Not atomic by itself: `write_policy_folder` calls it inside a temporary folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_lora(model) and merge:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(folder)
        del merged
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_policy_folder(
    path: str | Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    value_head: nn.Module | None = None,
    card: dict | None = None,
    merge: bool = False,
) -> Path:
    """Write a whole policy folder at `path` (replacing one that is there), written aside then renamed into place.

    `merge` only matters for a LoRA model: a merged export then also keeps the adapter as
    trained in LORA_ADAPTER_DIR; without it the folder is the adapter export itself.
    """
    with atomic_dir(path, overwrite=True) as tmp:
        export_policy(model, tokenizer, tmp, merge=merge)
        if merge and is_lora(model):
            model.save_pretrained(tmp / LORA_ADAPTER_DIR)  # the adapter as trained, for resume
        if value_head is not None:
            torch.save(value_head.state_dict(), tmp / VALUE_HEAD_FILE)
        if card is not None:
            (tmp / POLICY_CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        failpoint("policy_save.before_rename")
    return Path(path)


# -- reading -----------------------------------------------------------------------------------
def read_card(path: str | Path) -> dict | None:
    """The folder's lineage card, or None when it has none (e.g. a model folder given by the user)."""
    card_file = Path(path) / POLICY_CARD_FILE
    return json.loads(card_file.read_text(encoding="utf-8")) if card_file.is_file() else None


def _is_adapter_export(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).exists()


def lora_adapter_dir(path: str | Path) -> Path | None:
    """Where a saved policy keeps its LoRA adapter: `lora_adapter/` beside a merged export, the folder itself for
    an adapter export; None for a plain model."""
    path = Path(path)
    if (path / LORA_ADAPTER_DIR / ADAPTER_CONFIG_FILE).exists():
        return path / LORA_ADAPTER_DIR
    if _is_adapter_export(path):
        return path
    return None


def lora_base_of(path: str | Path) -> str:
    """The weights a saved policy's adapter applies to (its card's `lora_base`; the folder itself for pi_0)."""
    path = Path(path)
    base = (read_card(path) or {}).get("lora_base")
    if base is None:
        if _is_adapter_export(path):
            raise ValueError(
                f"{str(path)!r} is a LoRA adapter without a recorded base model (lora_base in {POLICY_CARD_FILE})"
            )
        return str(path.resolve())
    return base


def check_policy_dir(path: str | Path) -> Path:
    """Raise a clear error naming `path` and what is missing unless it holds a saved policy (full or LoRA adapter)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"policy directory {str(path)!r} does not exist")
    has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    if _is_adapter_export(path):  # adapter weights + tokenizer + a base to apply to
        missing = [] if any(path.glob("adapter_model.*")) else ["adapter weights (adapter_model.safetensors)"]
        missing += [] if has_tokenizer else ["tokenizer (tokenizer.json)"]
        if missing:
            raise ValueError(f"{str(path)!r} is not a saved policy: missing {', '.join(missing)}")
        check_policy_dir(lora_base_of(path))
        return path
    missing = [name for name in ("config.json",) if not (path / name).exists()]
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    if missing or not has_weights or not has_tokenizer:
        what = missing + ([] if has_weights else ["model weights (*.safetensors)"])
        what += [] if has_tokenizer else ["tokenizer (tokenizer.json)"]
        raise ValueError(f"{str(path)!r} is not a saved policy: missing {', '.join(what)}")
    return path


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a saved policy folder (model + tokenizer) for inference, with a clear error if it is not one.

    An adapter export is applied to its recorded base and merged.
    """
    path = check_policy_dir(path)
    tokenizer = _load_tokenizer(path)
    if _is_adapter_export(path):
        from peft import PeftModel

        base, _ = load_policy(lora_base_of(path))
        return PeftModel.from_pretrained(base, path).merge_and_unload(), tokenizer
    model = fuse_activations(AutoModelForCausalLM.from_pretrained(path))
    return model, tokenizer


@dataclass
class SavedPolicy:
    """A policy folder read back for training (PolicyModule.load)."""

    model: PreTrainedModel
    """The causal LM; with `trainable_adapter` and an adapter in the folder, a trainable PeftModel on its base."""
    tokenizer: PreTrainedTokenizerBase
    """Left-padded, as the policy samples."""
    value_head: nn.Linear | None
    """The saved PPO value head; None when the folder has none (pi_0 given by the user)."""
    lora_base: str
    """The folder of the weights an adapter trained from here applies to."""


def read_policy_folder(path: str | Path, *, trainable_adapter: bool = False) -> SavedPolicy:
    """Read a policy folder to train on.

    trainable_adapter (a run with LoRA): when the folder holds an adapter, the exact state to resume
    is that adapter, trainable, on the base it was trained on (never on a merged export, which would
    apply the adapter twice). Otherwise the folder's model as `load_policy` gives it, which is then
    the base of any new adapter.
    """
    path = Path(path)
    adapter = lora_adapter_dir(path)
    if trainable_adapter and adapter is not None:
        from peft import PeftModel

        lora_base = lora_base_of(path)
        base, _ = load_policy(lora_base)
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        tokenizer = _load_tokenizer(path)
    else:
        model, tokenizer = load_policy(path)
        lora_base = str(path.resolve())
    head = None
    if (path / VALUE_HEAD_FILE).exists():
        head = nn.Linear(model.config.hidden_size, 1)
        head.load_state_dict(torch.load(path / VALUE_HEAD_FILE, weights_only=True))
    return SavedPolicy(model, tokenizer, head, lora_base)


def saved_adapter_state(model: nn.Module, policy_dir: str | Path) -> dict[str, torch.Tensor]:
    """The adapter state (in `model`'s parameter names) that stands for a saved policy on `model`'s base.

    A folder with an adapter (`lora_adapter/` beside a merged export, or an adapter export) gives
    that adapter's weights; a plain folder (pi_0 saved as the base itself) gives zeros, which
    compute the base exactly. Used to restore kl_anchor pi_0's reference after a restart.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    live = adapter_state(model)
    adapter = lora_adapter_dir(policy_dir)
    if adapter is None:
        return {name: torch.zeros_like(value) for name, value in live.items()}
    params = adapter_parameters(model)
    try:
        set_peft_model_state_dict(model, load_peft_weights(str(adapter)))
        return adapter_state(model)
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(live[name])
