"""Batched sampling of replies with the KV cache (Hugging Face `generate`).

One entry point for PPO rollouts, collection and evaluation, so every phase
samples from the same distribution the log-probs are computed for.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel


class PerReplyGumbelSampler(LogitsProcessor):
    """Sampling from softmax(logits / T) with every reply drawing from its own seeded stream.

    Gumbel-max: argmax(logits / T + G), G i.i.d. standard Gumbel (= -log E, E ~ Exp(1)), is an exact sample of
    softmax(logits / T). Each row's noise comes from a generator seeded with `seeds[row]`, so a reply depends
    on its seed and its prompt only, not on which other prompts share the batch: a batch split over several
    processes samples the same replies as one process (given the same seeds per global row). Run under greedy
    decoding, which takes the argmax.
    """

    def __init__(self, seeds: list[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        exp = torch.stack([torch.empty(vocab).exponential_(generator=g) for g in self.generators]).to(scores.device)
        return scores.float() / self.temperature - exp.log()


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
    reply_seeds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one reply per left-padded prompt: (response_ids [B, R], response_mask [B, R]).

    Pure ancestral sampling (no top-k / top-p), so the sampled tokens follow
    exactly softmax(logits / temperature), the distribution PPO's ratio uses.
    `reply_seeds` (one per row): sample each reply from its own stream (PerReplyGumbelSampler)
    instead of torch's global one.
    """
    processors = None
    if reply_seeds is not None and not greedy:
        if len(reply_seeds) != prompt_ids.shape[0]:
            raise ValueError(f"{len(reply_seeds)} reply seeds for {prompt_ids.shape[0]} prompts")
        processors = LogitsProcessorList([PerReplyGumbelSampler(reply_seeds, temperature)])
        greedy = True  # the processor adds the noise; greedy decoding takes the argmax
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
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, logits_processor=processors
    )
    model.train(was_training)
    response = out[:, prompt_ids.shape[1] :]
    return truncate_after_eos(response, eos_id, pad_id)
