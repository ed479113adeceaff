"""Batched text generation from chat messages with any HF chat model (LLM customer, judge, imagined dialogues).

The messages of every conversation are rendered with the tokenizer's chat
template, left-padded into one batch, and sampled with `generate` and the KV
cache; a reply ends at the tokenizer's EOS (end-of-turn) token.
"""

from __future__ import annotations

import torch

from iterppo_lightning.models.generation import sample_responses
from iterppo_lightning.models.modeling import position_ids_from_mask

Messages = list[dict[str, str]]


def require_chat_template(tokenizer, role: str = "") -> None:
    """Refuse a tokenizer without a chat template (`role` names which model, in the message)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        which = f"the {role} tokenizer" if role else "tokenizer"
        raise ValueError(f"{which} {name!r} has no chat template; a chat model is needed here")


def _encode_chats(tokenizer, conversations: list[Messages], max_prompt_tokens: int, device) -> dict:
    """Render with the chat template (ending in the assistant's turn) and left-pad into one batch."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    return tokenizer(
        texts,
        add_special_tokens=False,
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        return_tensors="pt",
    ).to(device)


@torch.no_grad()
def generate_chat(
    model,
    tokenizer,
    conversations: list[Messages],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 16,
    max_prompt_tokens: int = 1024,
) -> list[str]:
    """One assistant reply per conversation (stripped text, special tokens removed)."""
    require_chat_template(tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    device = next(model.parameters()).device
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        enc = _encode_chats(tokenizer, conversations[start : start + batch_size], max_prompt_tokens, device)
        response, _ = sample_responses(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            max_new_tokens,
            temperature,
            greedy,
        )
        replies.extend(text.strip() for text in tokenizer.batch_decode(response, skip_special_tokens=True))
    return replies


@torch.no_grad()
def yes_probability(
    model,
    tokenizer,
    conversations: list[Messages],
    batch_size: int = 16,
    yes: str = "yes",
    no: str = "no",
    max_prompt_tokens: int = 1024,
) -> list[float]:
    """P(yes) / (P(yes) + P(no)) for the first reply token: a judge's answer to a yes/no question."""
    require_chat_template(tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    # A judge may open with "Yes" or " yes": pool the first tokens of every casing/spacing.
    yes_ids = _first_token_ids(tokenizer, yes)
    no_ids = _first_token_ids(tokenizer, no) - yes_ids
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(conversations), batch_size):
        enc = _encode_chats(tokenizer, conversations[start : start + batch_size], max_prompt_tokens, device)
        # Left padding: positions from the mask, as generate uses them.
        logits = model(**enc, position_ids=position_ids_from_mask(enc["attention_mask"])).logits[:, -1].float()
        probs = logits.softmax(dim=-1)
        p_yes = probs[:, sorted(yes_ids)].sum(1)
        p_no = probs[:, sorted(no_ids)].sum(1)
        out.extend((p_yes / (p_yes + p_no).clamp(min=1e-12)).tolist())
    return out


def _first_token_ids(tokenizer, word: str) -> set[int]:
    variants = {word.lower(), word.capitalize(), " " + word.lower(), " " + word.capitalize()}
    return {tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in variants}
