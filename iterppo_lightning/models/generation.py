"""Batched sampling of replies with the KV cache.

`sample_scored_replies` is Hugging Face `generate`'s sampling written out as a
loop: the same tokens for the same random state, plus what PPO reads from the
sampling passes anyway (the sampled tokens' log-probs and the last hidden
states), a prefill split into groups of prompts of similar length, and rows
that have ended leaving the decoding steps. `sample_responses` runs it for
collection, evaluation and the critic probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from iterppo_lightning.data.padding import length_groups
from iterppo_lightning.models.modeling import position_ids_from_mask


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


PREFILL_CALL_COST = 48.0
"""The cost of one more prefill forward, in padded positions, that a length group must save to be split off
(`data/padding.length_groups`; the PPO phase's `policy.length_group_cost`, measured for the tiny CPU models)."""


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
    """Sample one reply per left-padded prompt: (response_ids [B, R], response_mask [B, R]). Collection,
    evaluation, the critic probe and chat replies use it.

    Pure ancestral sampling (no top-k / top-p), so the sampled tokens follow exactly softmax(logits /
    temperature), the distribution PPO's ratio uses; `greedy` takes the argmax. `reply_seeds` (one per row):
    sample each reply from its own stream (PerReplyGumbelSampler) instead of torch's global one. The tokens
    are those Hugging Face `generate` draws from the same random state (tests/models/test_generation.py);
    the work is less: the prompts are prefilled in groups of similar length and rows that have ended leave
    the decoding steps (`sample_scored_replies`).
    """
    groups = length_groups(prompt_mask.sum(1).tolist(), call_cost=PREFILL_CALL_COST)
    sampled = sample_scored_replies(
        model,
        prompt_ids,
        prompt_mask,
        eos_id,
        pad_id,
        max_new_tokens,
        temperature,
        reply_seeds=reply_seeds,
        prefill_groups=groups,
        greedy=greedy,
    )
    return sampled.response, sampled.response_mask


@dataclass
class ScoredReplies:
    """Replies sampled by `sample_scored_replies`, with what the sampling passes computed for them."""

    response: torch.Tensor
    """[B, R] long: the sampled tokens, pad after the first EOS (R = steps run: the longest reply)."""
    response_mask: torch.Tensor
    """[B, R] long: 1 up to and including the first EOS."""
    logprobs: torch.Tensor
    """[B, R] float32: log softmax(logits / temperature) of each sampled token; 0 after the reply."""
    hidden: torch.Tensor
    """[B, R, H]: the last hidden state at the position that predicted each reply token (the value head's
    input); 0 after the reply."""


def _prefill(model, ids, mask, cache):
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=True,
    )
    return out.logits[:, -1].float(), out.hidden_states[-1][:, -1]


def _grouped_prefill(model, prompt_ids, prompt_mask, groups):
    """Prefill every group trimmed to its longest prompt, then one cache for the whole batch, left-padded
    with zeros (masked keys) to the batch's prompt width. None when the cache is not a plain one per layer."""
    batch, width = prompt_ids.shape
    logits = hidden = None
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for rows in groups:
        index = torch.as_tensor(rows, dtype=torch.long, device=prompt_ids.device)
        mask = prompt_mask[index]
        trim = width - int(mask.sum(1).max())
        cache = DynamicCache(config=model.config)
        group_logits, group_hidden = _prefill(model, prompt_ids[index, trim:], mask[:, trim:], cache)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        if logits is None:
            logits = group_logits.new_empty(batch, group_logits.shape[-1])
            hidden = group_hidden.new_empty(batch, group_hidden.shape[-1])
            for layer in cache.layers:
                k, v = layer.keys, layer.values
                keys.append(k.new_zeros(batch, k.shape[1], width, k.shape[3]))
                values.append(v.new_zeros(batch, v.shape[1], width, v.shape[3]))
        logits[index], hidden[index] = group_logits, group_hidden
        for layer, k, v in zip(cache.layers, keys, values):
            k[index, :, trim:] = layer.keys
            v[index, :, trim:] = layer.values
    return logits, hidden, DynamicCache(ddp_cache_data=list(zip(keys, values)))


@torch.no_grad()
def sample_scored_replies(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    reply_seeds: list[int] | None = None,
    prefill_groups: Sequence[Sequence[int]] | None = None,
    greedy: bool = False,
) -> ScoredReplies:
    """Sample one reply per left-padded prompt [B, P], keeping each sampled token's log-prob and hidden state.

    The loop of `generate`'s sampling (no top-k / top-p): per step softmax(logits / temperature) in float32
    and one `torch.multinomial` over the whole batch, a row that has ended gets pad, stop when every row has
    ended or after `max_new_tokens`. So it draws the same tokens as `sample_responses` from the same random
    state (tests/models/test_generation.py), and the log-probs are those of the distribution sampled from.
    Unlike `generate`, a row that has ended leaves the decoding forwards (its cache rows are dropped); the
    draw of each step still spans the whole batch, so the running rows' draws are unchanged.
    `reply_seeds`: each row from its own stream (PerReplyGumbelSampler), as in `sample_responses`.
    `greedy`: the argmax of the logits instead of a draw (temperature and seeds unused; log-probs at T = 1).

    `prefill_groups` (lists of row indices covering every row once, e.g. `data/padding.length_groups` of the
    prompt lengths): the prompts' forward runs per group, trimmed to the group's longest prompt, and the
    groups' KV caches are joined into one, left-padded to P, for the decoding steps (one forward per step
    for the whole batch). Only models whose cache is a plain `DynamicLayer` per layer are split; others
    prefill the batch at once.
    """
    batch, width = prompt_ids.shape
    if reply_seeds is not None and len(reply_seeds) != batch:
        raise ValueError(f"{len(reply_seeds)} reply seeds for {batch} prompts")
    was_training = model.training
    model.eval()
    try:
        first = None
        if prefill_groups is not None and len(prefill_groups) > 1:
            first = _grouped_prefill(model, prompt_ids, prompt_mask, prefill_groups)
        if first is None:
            cache = DynamicCache(config=model.config)
            logits, hidden = _prefill(model, prompt_ids, prompt_mask, cache)
        else:
            logits, hidden, cache = first
        sampler = PerReplyGumbelSampler(reply_seeds, temperature) if reply_seeds is not None and not greedy else None
        # The mask of every step's input, grown by one column per step (as generate grows it).
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
        position = prompt_mask.long().sum(1, keepdim=True)  # the next token's position id
        unfinished = torch.ones(batch, dtype=torch.long, device=prompt_ids.device)
        running = torch.arange(batch, device=prompt_ids.device)  # the rows the cache (and each step) holds
        tokens, logprobs, hiddens = [], [], []
        for step in range(max_new_tokens):
            scores = logits if temperature == 1.0 or greedy else logits / temperature
            if greedy:
                next_tokens = torch.argmax(scores, dim=-1)
            elif sampler is not None:
                next_tokens = torch.argmax(sampler(None, logits), dim=-1)  # Gumbel-max: noise added to logits / T
            else:
                next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            next_tokens = next_tokens * unfinished + pad_id * (1 - unfinished)
            logprobs.append(torch.log_softmax(scores, dim=-1).gather(1, next_tokens[:, None]).squeeze(1))
            tokens.append(next_tokens)
            hiddens.append(hidden)
            unfinished = unfinished & (next_tokens != eos_id).long()
            if step + 1 == max_new_tokens or not bool(unfinished.any()):
                break
            # Rows that have ended leave the decoding steps (their tokens would be pad anyway). The draw above
            # still covers the whole batch, so every running row gets the draw generate would give it.
            keep = unfinished[running].bool()
            if not bool(keep.all()):
                kept = keep.nonzero().squeeze(1)
                cache.batch_select_indices(kept)
                running = running[kept]
            out = model(
                input_ids=next_tokens[running, None],
                attention_mask=mask[running, : width + step + 1],
                position_ids=position[running] + step,
                cache=cache,
                use_cache=True,
                output_hidden_states=True,
            )
            logits, hidden = out.logits[:, -1].float(), out.hidden_states[-1][:, -1]
            if len(running) < batch:  # ended rows: any distribution (uniform), their draws are replaced by pad
                logits = logits.new_zeros(batch, logits.shape[-1]).index_copy_(0, running, logits)
                hidden = hidden.new_zeros(batch, hidden.shape[-1]).index_copy_(0, running, hidden)
    finally:
        model.train(was_training)
    response, response_mask = truncate_after_eos(torch.stack(tokens, dim=1), eos_id, pad_id)
    real = response_mask.bool()
    return ScoredReplies(
        response=response,
        response_mask=response_mask,
        logprobs=torch.stack(logprobs, dim=1).masked_fill(~real, 0.0),
        hidden=torch.stack(hiddens, dim=1).masked_fill(~real[..., None], 0.0),
    )
