"""Render a conversation state s_i (and a suggestion a_i) to model text.

One function serves the critic, the policy, collection and evaluation, so the
text a policy is trained on is the text it is deployed on. Two formats:
- plain (the tiny word-level model): marker tokens, see `render_plain_state`;
- chat (a tokenizer with a chat template): customer = user, message actually
  sent = assistant, with the agent's suggestion noted when the business
  edited or rejected it.
A chat policy's system prompt (`model.system_prompt`) lives in its tokenizer's
chat template (`apply_system_prompt`): every reader of the tokenizer (collection,
the critic, PPO, evaluation, an exported policy's deployer) renders the same text
without passing the prompt around.
Outcome flags are not rendered: in every non-terminal state all o_j are 0
(the episode ends at success), so they carry no information.
"""

from __future__ import annotations

import json

from iterppo_lightning.data.chat_format import ABSTAIN, AGENT, CUSTOMER, EDITED, END, PLAIN_CHAT_TEMPLATE, REJECTED
from iterppo_lightning.data.conversation import Conversation, Turn


def uses_plain_format(tokenizer) -> bool:
    """The tiny word-level models' marker format (no tokenizer, or the plain template) vs a chat model's own
    template."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return not template or template == PLAIN_CHAT_TEMPLATE


def render_suggestion(suggestion: str | None, tokenizer=None) -> str:
    """The agent's reply as the policy writes it, ending with the token generation stops at.

    Plain format: words then `<end>`, abstain is the `<abstain>` token. Chat models: the
    text then the tokenizer's end-of-turn (EOS) token; an abstain is an empty reply.
    """
    text = suggestion.strip() if suggestion and suggestion.strip() else ""
    if uses_plain_format(tokenizer):
        return f"{text or ABSTAIN} {END}"
    return f"{text}{tokenizer.eos_token}"


def _render_past_turn(turn: Turn) -> str:
    text = f"{CUSTOMER} {turn.customer} {AGENT} {render_suggestion(turn.suggestion)}"
    # The state keeps both a_i and m_i; when the business accepted them they are equal.
    if turn.business_action == "edit":
        text += f" {EDITED} {turn.sent}"
    elif turn.business_action == "reject":
        text += f" {REJECTED} {turn.sent}"
    return text


def render_plain_state(conversation: Conversation, turn_index: int) -> str:
    """`<customer> c_1 <agent> a_1 <end> [<edited>|<rejected> m_1] ... <customer> c_i <agent>`."""
    turns = conversation.turns
    parts = [_render_past_turn(t) for t in turns[:turn_index]]
    parts.append(f"{CUSTOMER} {turns[turn_index].customer} {AGENT}")
    return " ".join(parts)


def plain_chat_messages(conversation: Conversation, turn_index: int) -> list[dict]:
    """State s_i as the messages PLAIN_CHAT_TEMPLATE renders (how a deployer calls an exported tiny policy)."""
    messages: list[dict] = []
    for turn in conversation.turns[:turn_index]:
        messages.append({"role": "user", "content": turn.customer})
        messages.append(
            {
                "role": "assistant",
                "content": turn.sent or "",
                "suggestion": turn.suggestion,
                "business_action": turn.business_action,
            }
        )
    messages.append({"role": "user", "content": conversation.turns[turn_index].customer})
    return messages


def render_chat_messages(conversation: Conversation, turn_index: int) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for turn in conversation.turns[:turn_index]:
        messages.append({"role": "user", "content": turn.customer})
        content = turn.sent or ""
        if turn.business_action in ("edit", "reject"):
            content += f"\n(suggested: {turn.suggestion or 'abstain'}; business {turn.business_action}ed)"
        messages.append({"role": "assistant", "content": content})
    messages.append({"role": "user", "content": conversation.turns[turn_index].customer})
    return messages


def render_state(conversation: Conversation, turn_index: int, tokenizer=None) -> str:
    """Model text of state s_i; chat format when the tokenizer has a chat template."""
    if uses_plain_format(tokenizer):
        return render_plain_state(
            conversation, turn_index
        )  # PLAIN_CHAT_TEMPLATE gives the same text, without a Jinja pass
    return tokenizer.apply_chat_template(
        render_chat_messages(conversation, turn_index), tokenize=False, add_generation_prompt=True
    )


SYSTEM_PROMPT_MARK = "{#- iterppo: model.system_prompt -#}"
"""First line of a chat template with a system prompt baked in (how a reader of tokenizer_config / chat_template.jinja
sees where it came from)."""


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal. JSON escapes are Jinja's; braces and % are escaped too, so no text can
    close the surrounding tag."""
    literal = json.dumps(text)
    return literal.replace("{", "\\u007b").replace("}", "\\u007d").replace("%", "\\u0025")


def system_prompt_template(template: str, prompt: str) -> str:
    """`template` with `prompt` as its default system message: a conversation without a system message of its own
    gets one holding `prompt`; one that has its own is rendered as before (the caller's system message wins)."""
    return (
        f"{SYSTEM_PROMPT_MARK}\n"
        "{%- if messages | length == 0 or messages[0]['role'] != 'system' %}"
        "{%- set messages = [{'role': 'system', 'content': " + _jinja_string(prompt) + "}] + messages %}"
        "{%- endif %}" + template
    )


def apply_system_prompt(tokenizer, prompt: str) -> None:
    """Bake `prompt` into `tokenizer`'s chat template (see `system_prompt_template`); `save_pretrained` then writes
    it with the policy, so an exported policy renders its states with the prompt it was trained with.

    The plain format (the tiny word-level models) has no system turn: refused.
    """
    if uses_plain_format(tokenizer):
        raise ValueError("a system prompt needs a chat model's template; the plain (word-level) format has none")
    if not prompt or not prompt.strip():
        raise ValueError("a system prompt must be non-empty text")
    if not isinstance(tokenizer.chat_template, str):
        raise ValueError("a system prompt needs a single chat template (this tokenizer has several, by name)")
    tokenizer.chat_template = system_prompt_template(tokenizer.chat_template, prompt)
