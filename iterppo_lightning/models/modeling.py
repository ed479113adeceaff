"""Masked forward passes shared by the policy, the reference and the critic.

Sequences are [left-padded prompt | right-padded response]. Position ids are
`cumsum(mask) - 1`, exactly what Hugging Face `generate` uses, so log-probs
computed here match the distribution the tokens were sampled from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works with pads on either side)."""
    length = attention_mask.shape[1]
    positions = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def backbone_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of a causal LM or a bare backbone."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,
    )
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    return out.hidden_states[-1]


def causal_lm_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    want_hidden: bool = False,
    logits_to_keep: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, T, V] (or of the last `logits_to_keep` positions) and, when asked, last hidden states [B, T, H].

    PPO only needs logits at the reply positions; skipping the LM head over the
    prompt saves a large share of the forward and backward on long states.
    """
    extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=want_hidden,
        use_cache=False,
        **extra,
    )
    return out.logits, (out.hidden_states[-1] if want_hidden else None)


POLICY_CARD_FILE = "iterppo_policy.json"
LORA_ADAPTER_DIR = "lora_adapter"


def lora_adapter_dir(path: str | Path) -> Path | None:
    """Where a saved policy keeps its LoRA adapter: `lora_adapter/` beside a merged export, the folder itself for an adapter export."""
    path = Path(path)
    if (path / LORA_ADAPTER_DIR / "adapter_config.json").exists():
        return path / LORA_ADAPTER_DIR
    if (path / "adapter_config.json").exists():
        return path
    return None


def lora_base_of(path: str | Path) -> str:
    """The weights a saved policy's adapter applies to (its card's `lora_base`; the folder itself for pi_0)."""
    path = Path(path)
    card_file = path / POLICY_CARD_FILE
    card = json.loads(card_file.read_text(encoding="utf-8")) if card_file.exists() else {}
    base = card.get("lora_base")
    if base is None:
        if (path / "adapter_config.json").exists():
            raise ValueError(f"{str(path)!r} is a LoRA adapter without a recorded base model (lora_base in {POLICY_CARD_FILE})")
        return str(path.resolve())
    return base


def check_policy_dir(path: str | Path) -> Path:
    """Raise a clear error naming `path` and what is missing unless it holds a saved policy (full or LoRA adapter)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"policy directory {str(path)!r} does not exist")
    has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    if (path / "adapter_config.json").exists():  # an adapter export: adapter weights + tokenizer + a base to apply to
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


def load_policy(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a saved policy folder (model + tokenizer), with a clear error if it is not one.

    An adapter export is applied to its recorded base and merged, for inference.
    """
    path = check_policy_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base, _ = load_policy(lora_base_of(path))
        return PeftModel.from_pretrained(base, path).merge_and_unload(), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path)
    return model, tokenizer
