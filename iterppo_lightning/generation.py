"""Batched sampling of replies with the KV cache (Hugging Face `generate`).

One entry point for PPO rollouts, collection and evaluation, so every phase
samples from the same distribution the log-probs are computed for.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel


def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask = tokens up to and including the first EOS; later tokens become pad."""
    is_eos = response == eos_id
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = (~after_first_eos).long()
    return response.masked_fill(after_first_eos, pad_id), mask


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one reply per left-padded prompt: (response_ids [B, R], response_mask [B, R]).

    Pure ancestral sampling (no top-k / top-p), so the sampled tokens follow
    exactly softmax(logits / temperature), the distribution PPO's ratio uses.
    """
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    model.train(was_training)
    response = out[:, prompt_ids.shape[1] :]
    return truncate_after_eos(response, eos_id, pad_id)
