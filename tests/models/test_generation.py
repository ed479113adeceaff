"""`sample_scored_replies` (and `sample_responses`, which runs it): the same tokens as Hugging Face `generate` for
the same random state, greedy included, the log-probs and hidden states of the full forward, and a prefill split
into length groups that changes nothing but the padding."""

from __future__ import annotations

import pytest
import torch
from conftest import ends_often

from iterppo_lightning.data.padding import length_groups, pad_left
from iterppo_lightning.models.generation import (
    PerReplyGumbelSampler,
    sample_responses,
    sample_scored_replies,
    truncate_after_eos,
)
from iterppo_lightning.models.modeling import causal_lm_forward


@pytest.fixture()
def eos_model(tiny_model, tokenizer):
    """The tiny model, biased to end its replies at many lengths (rows then leave the decoding steps early)."""
    return ends_often(tiny_model, tokenizer)


@pytest.fixture()
def prompts(tokenizer, conversations):
    """12 left-padded states of very different lengths (up to 36 tokens) and their length groups."""
    from iterppo_lightning.data.rendering import render_state

    states = [render_state(c, i, tokenizer) for c in conversations[:6] for i in c.agent_turns[:3]]
    seqs = [s[-n:] for s, n in zip(tokenizer(states, add_special_tokens=False)["input_ids"], range(3, 39, 3))]
    ids, mask = pad_left(seqs, tokenizer.pad_token_id)
    assert len(seqs) == 12 and (mask == 0).any()
    groups = length_groups(mask.sum(1).tolist(), call_cost=8)
    assert 1 < len(groups) < len(seqs), "the test needs a real split"
    return ids, mask, groups


def _generate(model, ids, mask, eos, pad, new_tokens, temperature=1.0, greedy=False, reply_seeds=None):
    """Hugging Face `generate`'s pure ancestral sampling (no top-k / top-p), or its greedy decoding: the reference."""
    from transformers import GenerationConfig, LogitsProcessorList

    processors = None
    if reply_seeds is not None and not greedy:
        processors = LogitsProcessorList([PerReplyGumbelSampler(reply_seeds, temperature)])
        greedy = True  # the processor adds the noise; greedy decoding takes the argmax
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None,
        max_new_tokens=new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors)
    return truncate_after_eos(out[:, ids.shape[1] :], eos, pad)


def _both(model, tokenizer, ids, mask, new_tokens, seed, temperature=1.0, prefill_groups=None, **kwargs):
    """generate's replies and ours, each from the same random state."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    reference = _generate(model, ids, mask, eos, pad, new_tokens, temperature, **kwargs)
    after_reference = torch.rand(1)
    torch.manual_seed(seed)
    ours = sample_scored_replies(
        model, ids, mask, eos, pad, new_tokens, temperature, prefill_groups=prefill_groups, **kwargs
    )
    # The same draws from the global stream, no more and no fewer.
    assert torch.equal(torch.rand(1), after_reference)
    return reference, ours


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("split", [False, True])
def test_the_same_tokens_as_generate_for_the_same_random_state(eos_model, tokenizer, prompts, temperature, split):
    ids, mask, groups = prompts
    lengths = set()
    for seed in range(3):
        (response, response_mask), ours = _both(
            eos_model, tokenizer, ids, mask, 10, seed, temperature, groups if split else None
        )
        assert torch.equal(ours.response, response) and torch.equal(ours.response_mask, response_mask)
        lengths |= set(response_mask.sum(1).tolist())
    assert len(lengths) > 4, "rows must end at many steps (and leave the decoding steps)"


def test_per_reply_seeds_give_generates_tokens_too(eos_model, tokenizer, prompts):
    ids, mask, groups = prompts
    seeds = list(range(100, 112))
    (response, response_mask), ours = _both(eos_model, tokenizer, ids, mask, 10, 0, 1.0, groups, reply_seeds=seeds)
    assert torch.equal(ours.response, response)
    assert response_mask.sum(1).min() < response_mask.sum(1).max()


@pytest.mark.parametrize("how", ["sampled", "per-reply seeds", "greedy"])
def test_sample_responses_gives_generates_tokens(eos_model, tokenizer, prompts, how):
    ids, mask, _ = prompts
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kwargs = {"sampled": {}, "per-reply seeds": {"reply_seeds": list(range(12))}, "greedy": {"greedy": True}}[how]
    torch.manual_seed(3)
    reference = _generate(eos_model, ids, mask, eos, pad, 10, 0.9, **kwargs)
    torch.manual_seed(3)
    ours = sample_responses(eos_model, ids, mask, eos, pad, 10, 0.9, **kwargs)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    if how != "greedy":
        assert len(set(ours[1].sum(1).tolist())) > 2, "rows must end at several steps"


def test_log_probs_and_hidden_states_are_those_of_the_full_forward(eos_model, tokenizer, prompts):
    ids, mask, groups = prompts
    torch.manual_seed(0)
    ours = sample_scored_replies(
        eos_model, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, 12, 0.8, prefill_groups=groups
    )
    real = ours.response_mask.bool()
    assert (~real).any() and real[:, 0].all() and real.all(1).any(), "replies of many lengths"
    width = ours.response.shape[1]
    full = torch.cat([ids, ours.response], 1)
    full_mask = torch.cat([mask, ours.response_mask], 1)
    with torch.no_grad():
        logits, hidden = causal_lm_forward(eos_model, full, full_mask, want_hidden=True, logits_to_keep=width + 1)
    expected = torch.log_softmax(logits[:, :-1] / 0.8, -1).gather(-1, ours.response[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.logprobs[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.hidden[real], hidden[:, ids.shape[1] - 1 : -1][real], atol=1e-5, rtol=0)
    # After the reply: exact zeros.
    assert (ours.logprobs[~real] == 0).all() and (ours.hidden[~real] == 0).all()


def test_a_split_prefill_gives_the_unsplit_log_probs(eos_model, tokenizer, prompts):
    ids, mask, groups = prompts
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(5)
    whole = sample_scored_replies(eos_model, ids, mask, eos, pad, 8)
    torch.manual_seed(5)
    split = sample_scored_replies(eos_model, ids, mask, eos, pad, 8, prefill_groups=groups)
    assert torch.equal(whole.response, split.response)
    torch.testing.assert_close(split.logprobs, whole.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.hidden, whole.hidden, atol=1e-5, rtol=0)


def test_sampling_restores_the_models_mode(tiny_model, tokenizer, prompts):
    ids, mask, _ = prompts
    tiny_model.train()
    sample_scored_replies(tiny_model, ids, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, 3)
    assert tiny_model.training


def test_models_with_other_caches_prefill_the_batch_at_once(eos_model, tokenizer, prompts, monkeypatch):
    """A model whose cache layers are not plain `DynamicLayer`s (e.g. sliding-window layers) is not split: its
    groups' caches could not be joined. The same tokens all the same."""
    from iterppo_lightning.models import generation

    monkeypatch.setattr(generation, "DynamicLayer", type("OtherLayer", (), {}))
    ids, mask, groups = prompts
    (response, _), ours = _both(eos_model, tokenizer, ids, mask, 10, 0, 1.0, groups)
    assert torch.equal(ours.response, response)
