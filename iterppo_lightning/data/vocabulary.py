"""How much of a batch's text a tokenizer cannot represent (its unknown token).

A word-level tokenizer (the tiny one trained on the simulator, models/tiny_lm.py) maps
every word outside its vocabulary, capitalised words and emoji included, to one unknown
token: the models then see the same token for "Refund" and "🙂", and nothing fails. Byte-level
tokenizers (GPT-2's, SmolLM2's) have no unknown token and never lose text this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iterppo_lightning.data.conversation import Conversation

__all__ = ["UnknownTokens", "count_unknown_tokens", "unknown_token_warning", "WARN_AT_UNKNOWN_SHARE"]

WARN_AT_UNKNOWN_SHARE = 0.01
"""Warn when at least this share of a batch's tokens is unknown. Logs written with capitals or emoji lose far more
(every sentence's first word); a few rare words the simulator's customers use are below it."""


@dataclass(frozen=True)
class UnknownTokens:
    tokens: int
    """Tokens of every message (customer, suggestion, sent) of the batch."""
    unknown: int
    """Of those, how many are the tokenizer's unknown token."""
    example: str | None
    """The first text that became the unknown token (a word, for a word-level tokenizer)."""

    @property
    def share(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0


def _messages(conversations: list[Conversation]) -> list[str]:
    return [
        text
        for conv in conversations
        for turn in conv.turns
        for text in (turn.customer, turn.suggestion, turn.sent)
        if text  # None (abstain, terminal turn) and "" hold no tokens
    ]


def count_unknown_tokens(conversations: list[Conversation], tokenizer: Any) -> UnknownTokens:
    """Unknown tokens among every message's tokens; (0, 0, None) for a tokenizer without an unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    texts = _messages(conversations)
    # Byte-level tokenizers (GPT-2's) name their end token as the unknown one, though no text maps to it.
    doubles = unk in {getattr(tokenizer, name, None) for name in ("eos_token_id", "bos_token_id", "pad_token_id")}
    if unk is None or doubles or not texts:
        return UnknownTokens(0, 0, None)
    offsets = bool(getattr(tokenizer, "is_fast", False))  # slow tokenizers cannot say where a token came from
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    tokens = unknown = 0
    example = None
    for n, ids in enumerate(encoded["input_ids"]):
        tokens += len(ids)
        for position, token in enumerate(ids):
            if token != unk:
                continue
            unknown += 1
            if example is None and offsets:
                start, end = encoded["offset_mapping"][n][position]
                example = texts[n][start:end] or None
    return UnknownTokens(tokens, unknown, example)


def unknown_token_warning(conversations: list[Conversation], tokenizer: Any, source: str) -> str | None:
    """A one-line warning when at least WARN_AT_UNKNOWN_SHARE of the batch's tokens are the tokenizer's unknown
    token; None otherwise."""
    found = count_unknown_tokens(conversations, tokenizer)
    if not found.unknown or found.share < WARN_AT_UNKNOWN_SHARE:
        return None
    example = f", e.g. {found.example!r}" if found.example else ""
    return (
        f"{source}: {100 * found.share:.2f}% of the tokens ({found.unknown:,} of {found.tokens:,}) are the tokenizer's "
        f"unknown token {tokenizer.unk_token!r}{example}: the models cannot tell those words apart. The tiny "
        "word-level tokenizer knows only the (lower-case) words of the simulator text it was trained on; for real "
        "logs use a pretrained model (model.base_model, docs/data.md) or normalise the text."
    )
