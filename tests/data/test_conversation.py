"""Conversation records: Monte Carlo returns and dict round trips."""

from __future__ import annotations

import pytest

from iterppo_lightning.data.conversation import Conversation, Turn


def _success_conversation() -> Conversation:
    # Three agent turns, then the customer buys: o = [0, 0, 0, 1].
    return Conversation(
        "win",
        [
            Turn("hi", suggestion="what do you need ?", sent="what do you need ?", business_action="accept"),
            Turn("a phone", suggestion="what is your budget ?", sent="what is your budget ?", business_action="accept"),
            Turn("cheap", suggestion="the basic phone", sent="the basic phone !", business_action="edit"),
            Turn("i will take it", outcome=1),
        ],
    )


def _failure_conversation() -> Conversation:
    return Conversation(
        "lose",
        [
            Turn("hi", suggestion=None, sent="hello", business_action="reject"),
            Turn("hmm", suggestion="the top laptop", sent="the top laptop", business_action="accept"),
            Turn("not what i want . i am leaving", outcome=0),
        ],
    )


def test_success_returns_are_discounted_by_customer_turns_until_the_outcome():
    conv = _success_conversation()
    assert conv.success
    assert conv.agent_turns == [0, 1, 2]
    # G_i = sum_j gamma^j o_{i+1+j}: the purchase is 3, 2 and 1 customer messages away.
    assert conv.returns(0.9) == pytest.approx([0.81, 0.9, 1.0])
    assert conv.returns(0.5) == pytest.approx([0.25, 0.5, 1.0])
    assert conv.returns(1.0) == pytest.approx([1.0, 1.0, 1.0])


def test_failure_returns_are_all_zero():
    conv = _failure_conversation()
    assert not conv.success
    assert conv.agent_turns == [0, 1]
    assert conv.returns(0.9) == [0.0, 0.0]


def test_unfinished_conversation_has_a_return_per_agent_turn():
    # The last turn is still pending (nothing sent): it is not an agent turn.
    conv = Conversation("open", [Turn("hi", suggestion="hey", sent="hey", business_action="accept"), Turn("so?")])
    assert conv.agent_turns == [0]
    assert conv.returns(0.9) == [0.0]


def test_dict_round_trip_keeps_every_field():
    conv = _success_conversation()
    conv.iteration, conv.policy_id, conv.metadata = 3, "pi_3", {"persona": {"need": "phone"}, "seed": 7}
    again = Conversation.from_dict(conv.to_dict())
    assert again == conv
    assert again.turns[2].business_action == "edit"


def test_turn_fields_are_the_turn_records_fields_in_order():
    from iterppo_lightning.data.conversation import TURN_FIELDS

    assert TURN_FIELDS == ("customer", "outcome", "suggestion", "sent", "business_action", "timestamp")
    assert set(Turn("hi").__dict__) == set(TURN_FIELDS)
