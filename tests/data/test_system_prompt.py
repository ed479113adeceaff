"""model.system_prompt: baked into a chat tokenizer's template, so every reader of the tokenizer renders it, the
saved tokenizer carries it, and the tiny models' plain format refuses it."""

from __future__ import annotations

import pytest
from tiny_chat import train_chat_tokenizer
from transformers import AutoTokenizer

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.data.rendering import SYSTEM_PROMPT_MARK, apply_system_prompt, render_state

SHOP = "You work at a shop. We sell laptops and phones; you can offer a 10% discount."


def _conversation() -> Conversation:
    return Conversation(
        "c",
        [
            Turn("hi", suggestion="what do you need ?", sent="what do you need ?", business_action="accept"),
            Turn("a phone"),
        ],
    )


@pytest.fixture()
def chat_tokenizer():
    return train_chat_tokenizer()


def test_without_a_prompt_the_rendering_is_the_templates_own(chat_tokenizer):
    assert render_state(_conversation(), 1, chat_tokenizer) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nwhat do you need ?<|im_end|>\n"
        "<|im_start|>user\na phone<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_prompt_opens_every_rendered_state(chat_tokenizer):
    before = render_state(_conversation(), 1, chat_tokenizer)
    apply_system_prompt(chat_tokenizer, SHOP)
    assert chat_tokenizer.chat_template.startswith(SYSTEM_PROMPT_MARK)
    for turn in (0, 1):
        assert render_state(_conversation(), turn, chat_tokenizer).startswith(
            f"<|im_start|>system\n{SHOP}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        )
    assert render_state(_conversation(), 1, chat_tokenizer) == f"<|im_start|>system\n{SHOP}<|im_end|>\n" + before


def test_a_callers_own_system_message_replaces_the_prompt(chat_tokenizer):
    apply_system_prompt(chat_tokenizer, SHOP)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "prompt",
    ['say "hi"\nthen {{ stop }} {% endif %} 100% off', "café – naïve ✓", "back\\slash and 'quotes'"],
    ids=["jinja-syntax", "unicode", "escapes"],
)
def test_any_prompt_text_is_rendered_literally(chat_tokenizer, prompt):
    apply_system_prompt(chat_tokenizer, prompt)
    assert render_state(_conversation(), 0, chat_tokenizer).startswith(f"<|im_start|>system\n{prompt}<|im_end|>\n")


def test_the_saved_tokenizer_carries_the_prompt(tmp_path, chat_tokenizer):
    """What an exported policy's deployer loads renders the states the policy was trained on."""
    apply_system_prompt(chat_tokenizer, SHOP)
    chat_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert render_state(_conversation(), 1, reloaded) == render_state(_conversation(), 1, chat_tokenizer)
    assert SHOP in render_state(_conversation(), 1, reloaded)


def test_the_plain_format_and_an_empty_prompt_are_refused(tokenizer, chat_tokenizer):
    with pytest.raises(ValueError, match="plain"):
        apply_system_prompt(tokenizer, SHOP)
    with pytest.raises(ValueError, match="non-empty"):
        apply_system_prompt(chat_tokenizer, "  ")
