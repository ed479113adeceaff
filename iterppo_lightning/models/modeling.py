"""Masked forward passes shared by the policy, the reference and the critic.

Sequences are [left-padded prompt | right-padded response]. Position ids are
`cumsum(mask) - 1`, exactly what Hugging Face `generate` uses, so log-probs
computed here match the distribution the tokens were sampled from.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


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
    logits_to_keep: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, T, V] (or of the last `logits_to_keep` positions, or of the positions a 1-D tensor lists) and,
    when asked, last hidden states [B, T, H].

    PPO only needs logits at the reply positions; skipping the LM head over the
    prompt saves a large share of the forward and backward on long states.
    """
    keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    extra = {} if keep_all else {"logits_to_keep": logits_to_keep}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=want_hidden,
        use_cache=False,
        **extra,
    )
    return out.logits, (out.hidden_states[-1] if want_hidden else None)
