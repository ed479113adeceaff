"""Kinds of agent reply on the embedded simulator, read at the state they answer (what the customer had revealed).

Shared by the benchmarks that ask what a critic makes of each kind (`critic_fit_by_reply.py`) and what kinds a run's
policies write (`reply_kinds_by_iteration.py`):

    wrong_category       recommends a category other than the need the customer revealed
    recommend_full_disc  the revealed category, need and budget both known, with a discount offer
    recommend_full       the same without a discount
    recommend_guess_disc a recommendation made before need or budget is known, with a discount offer
    recommend_guess      the same without one
    ask_again            asks the need or the budget the customer has already revealed
    ask_need, ask_budget, other
"""

from __future__ import annotations

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.reply_parser import parse_reply
from iterppo_lightning.env.scripted_agents import revealed_info

KINDS = (
    "wrong_category",
    "recommend_full_disc",
    "recommend_full",
    "recommend_guess_disc",
    "recommend_guess",
    "ask_again",
    "ask_need",
    "ask_budget",
    "other",
)


def reply_kind(conversation: Conversation, turn: int) -> str:
    """The kind of the reply suggested at `turn`, given what the customer had revealed by then."""
    info = revealed_info(Conversation(conversation.conversation_id, conversation.turns[: turn + 1]))
    reply = parse_reply(conversation.turns[turn].suggestion or "")
    if reply.categories and info.need is not None and reply.categories != {info.need}:
        return "wrong_category"
    if reply.products:
        known = info.need is not None and info.budget is not None
        return ("recommend_full" if known else "recommend_guess") + ("_disc" if reply.offers_discount else "")
    if (reply.asks_need and info.need is not None) or (reply.asks_budget and info.budget is not None):
        return "ask_again"
    if reply.asks_need:
        return "ask_need"
    if reply.asks_budget:
        return "ask_budget"
    return "other"
