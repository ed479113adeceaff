"""State rendering: the exact plain text the tiny model reads, and the chat-template path."""

from __future__ import annotations

import pytest

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.data.rendering import render_chat_messages, render_plain_state, render_state, render_suggestion


def _conversation() -> Conversation:
    return Conversation(
        "r",
        [
            Turn("hi", suggestion="what do you need ?", sent="what do you need ?", business_action="accept"),
            Turn(
                "a phone", suggestion="what is your budget ?", sent="so , what is your budget ?", business_action="edit"
            ),
            Turn("cheap please", suggestion=None, sent="thanks for stopping by .", business_action="reject"),
            Turn("ok", suggestion="the top laptop", sent="we have many products .", business_action="reject"),
            Turn("anything else ?"),
        ],
    )


def test_plain_state_exact_string():
    text = render_state(_conversation(), 4)
    assert text == (
        "<customer> hi <agent> what do you need ? <end>"
        " <customer> a phone <agent> what is your budget ? <end> <edited> so , what is your budget ?"
        " <customer> cheap please <agent> <abstain> <end> <rejected> thanks for stopping by ."
        " <customer> ok <agent> the top laptop <end> <rejected> we have many products ."
        " <customer> anything else ? <agent>"
    )


def test_plain_state_of_the_first_turn_and_of_a_two_turn_prefix():
    conv = _conversation()
    assert render_state(conv, 0) == "<customer> hi <agent>"
    assert render_plain_state(conv, 2) == (
        "<customer> hi <agent> what do you need ? <end>"
        " <customer> a phone <agent> what is your budget ? <end> <edited> so , what is your budget ?"
        " <customer> cheap please <agent>"
    )


def test_a_state_is_a_prefix_of_the_next_state():
    # What the policy saw at turn i is literally inside what it sees at turn i+1.
    conv = _conversation()
    for i in range(len(conv.turns) - 1):
        assert render_state(conv, i + 1).startswith(render_state(conv, i))


@pytest.mark.parametrize(
    "suggestion, expected",
    [
        ("  buy the phone  ", "buy the phone <end>"),
        (None, "<abstain> <end>"),
        ("", "<abstain> <end>"),
        ("   ", "<abstain> <end>"),
    ],
)
def test_render_suggestion(suggestion, expected):
    assert render_suggestion(suggestion) == expected


def test_word_tokenizer_gets_the_plain_format(tokenizer):
    from iterppo_lightning.data.chat_format import PLAIN_CHAT_TEMPLATE

    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    conv = _conversation()
    assert render_state(conv, 3, tokenizer) == render_plain_state(conv, 3)
    # Every marker is one token of the word-level tokenizer (none becomes <unk>).
    ids = tokenizer(render_state(conv, 3, tokenizer), add_special_tokens=False)["input_ids"]
    assert (
        tokenizer.unk_token_id
        not in tokenizer("<customer> <agent> <end> <edited> <rejected> <abstain>", add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<agent>")


TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    tokenizer.chat_template = TEMPLATE
    text = render_state(_conversation(), 4, tokenizer)
    assert text == (
        "[user] hi\n"
        "[assistant] what do you need ?\n"
        "[user] a phone\n"
        "[assistant] so , what is your budget ?\n(suggested: what is your budget ?; business edited)\n"
        "[user] cheap please\n"
        "[assistant] thanks for stopping by .\n(suggested: abstain; business rejected)\n"
        "[user] ok\n"
        "[assistant] we have many products .\n(suggested: the top laptop; business rejected)\n"
        "[user] anything else ?\n"
        "[assistant]"
    )


def test_chat_messages_alternate_and_end_with_the_current_customer_message():
    messages = render_chat_messages(_conversation(), 2)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    # The assistant content is what the business SENT (m_i), not the suggestion.
    assert messages[1]["content"] == "what do you need ?"
    assert messages[3]["content"].startswith("so , what is your budget ?")
    assert messages[-1] == {"role": "user", "content": "cheap please"}


def test_the_tiny_tokenizers_chat_template_renders_exactly_the_training_text(conversations, tokenizer):
    """An exported tiny policy is deployable: apply_chat_template gives the text it was trained on."""
    from iterppo_lightning.data.rendering import plain_chat_messages, render_plain_state

    checked = 0
    for conv in conversations:
        for i in conv.agent_turns:
            messages = plain_chat_messages(conv, i)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert text == render_plain_state(conv, i)
            checked += 1
    actions = {t.business_action for c in conversations for t in c.turns}
    assert checked > 50 and {"accept", "edit", "reject"} <= actions


def test_the_chat_template_survives_save_and_reload(tmp_path, tokenizer, conversations):
    from transformers import AutoTokenizer

    from iterppo_lightning.data.rendering import plain_chat_messages, render_state

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    conv = next(c for c in conversations if len(c.agent_turns) > 2)
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.apply_chat_template(
        plain_chat_messages(conv, 2), tokenize=False, add_generation_prompt=True
    ) == render_state(conv, 2, tokenizer)


def test_the_tiny_tokenizer_uses_the_plain_format_tokens():
    from iterppo_lightning.data import chat_format
    from iterppo_lightning.models.tiny_lm import train_word_tokenizer

    tokenizer = train_word_tokenizer(["hello there"])
    assert tokenizer.chat_template == chat_format.PLAIN_CHAT_TEMPLATE
    assert tokenizer.eos_token == chat_format.END and tokenizer.pad_token == chat_format.PAD
    assert set(chat_format.SPECIAL_TOKENS) <= set(tokenizer.get_vocab())
