"""Masked forward passes shared by the policy, the reference and the critic.

Sequences are [left-padded prompt | right-padded response]. Position ids are
`cumsum(mask) - 1`, exactly what Hugging Face `generate` uses, so log-probs
computed here match the distribution the tokens were sampled from.
"""

from __future__ import annotations

import math

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


def reply_means(
    hidden: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of `hidden` [B, L, H] over positions starts[i] .. ends[i] (both included) of row rows[i]: [N, H].

    Positions where `mask` [B, L] is 0 are left out of the mean. One cumulative sum over the positions serves
    every span, so many turns read from one conversation row cost one pass.
    """
    weights = (
        torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        if mask is None
        else mask.to(hidden.dtype)
    )
    sums = torch.nn.functional.pad((hidden * weights[..., None]).cumsum(1), (0, 0, 1, 0))
    counts = torch.nn.functional.pad(weights.cumsum(1), (1, 0))
    total = sums[rows, ends + 1] - sums[rows, starts]
    count = (counts[rows, ends + 1] - counts[rows, starts]).clamp_min(1.0)
    return total / count[:, None]


def _span_token_logprobs(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    output_weight: torch.Tensor,
    output_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(span index [S], row [S], position [S], log p(token | everything before it) [S]) of every span token."""
    lengths = ends - starts + 1
    span = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths)
    # Position of each span token: its span's start plus its rank within the span.
    offsets = torch.arange(int(lengths.sum()), device=rows.device) - torch.repeat_interleave(
        lengths.cumsum(0) - lengths, lengths
    )
    token_rows, positions = rows[span], starts[span] + offsets
    inputs = hidden[token_rows, positions - 1].to(output_weight.dtype)
    logits = torch.nn.functional.linear(inputs, output_weight, output_bias)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, input_ids[token_rows, positions][:, None]).squeeze(1)
    return span, token_rows, positions, logprobs


def _span_mean(values: torch.Tensor, span: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean per span of per-token `values` [S] or [S, H] (token i belongs to span span[i]): [N] or [N, H]."""
    sums = torch.zeros((len(lengths), *values.shape[1:]), dtype=values.dtype, device=values.device)
    sums.index_add_(0, span, values)
    return sums / lengths.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))


def span_token_logprobs(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    output_weight: torch.Tensor,
    output_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per span, the mean and the minimum over its tokens of log p(token | everything before it) [N], [N].

    Span i is positions starts[i] .. ends[i] (both included, starts[i] >= 1) of row rows[i] of `input_ids` [B, L];
    the token at position t is predicted from `hidden` [B, L, H] at t - 1 through the output layer
    (`output_weight` [V, H], `output_bias` [V]), in the output layer's dtype. Only the spans' positions go through
    it.
    """
    span, _, _, logprobs = _span_token_logprobs(hidden, input_ids, rows, starts, ends, output_weight, output_bias)
    means = _span_mean(logprobs, span, ends - starts + 1)
    minima = torch.full_like(means, float("inf")).scatter_reduce(0, span, logprobs, reduce="amin")
    return means, minima


def span_surprise_features(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    output_weight: torch.Tensor,
    output_bias: torch.Tensor | None = None,
    threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per span, the mean over its tokens of log p_t [N] and of log p_t * hidden[t] [N, H].

    log p_t is span_token_logprobs' (the token at t predicted from t - 1); hidden[t] is the state at the token
    itself, which knows what the token is. A linear head over both computes mean_t (u . h_t + c) * log p_t: a
    weight on each token's surprise that depends on the token, so surprise at one kind of word (a category) can
    cost value where surprise at another (a discount) does not. Positions are read in the output layer's dtype.
    `threshold` tau in (0, 1): log p_t becomes min(0, log p_t - log tau), so a token at least tau likely counts as
    no surprise at all, and a reply cannot gain by being likelier than that.
    """
    span, token_rows, positions, logprobs = _span_token_logprobs(
        hidden, input_ids, rows, starts, ends, output_weight, output_bias
    )
    if threshold is not None:
        logprobs = torch.clamp(logprobs - math.log(threshold), max=0.0)
    lengths = ends - starts + 1
    states = hidden[token_rows, positions].to(logprobs.dtype)
    return _span_mean(logprobs, span, lengths), _span_mean(states * logprobs[:, None], span, lengths)


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
