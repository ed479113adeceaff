"""Render a conversation state s_i (and a suggestion a_i) to model text.

One function serves the critic, the policy, collection and evaluation, so the
text a policy is trained on is the text it is deployed on. Two formats:
- plain (the tiny word-level model): marker tokens, see `render_plain_state`;
- chat (a tokenizer with a chat template): customer = user, message actually
  sent = assistant, with the agent's suggestion noted when the business
  edited or rejected it.
Outcome flags are not rendered: in every non-terminal state all o_j are 0
(the episode ends at success), so they carry no information.
"""

from __future__ import annotations

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
