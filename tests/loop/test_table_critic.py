"""The table critic: hand-read (state, reply) features and shrunk Monte Carlo means, worked by hand."""

from __future__ import annotations

import pytest

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.env.sales_simulator import SimulatorConfig
from iterppo_lightning.env.scripted_agents import OptimalAgent, recommend
from iterppo_lightning.loop.table_critic import TableCritic, reply_key, state_key

SIM = SimulatorConfig()
OPENING = "hello , can you help me ?"
NEED = "i am looking for a phone ."


def conversation(cid: str, replies: list[str], customers: list[str], outcome: int) -> Conversation:
    """Agent replies answering `customers` in turn, then a terminal customer message with `outcome`."""
    turns = [Turn(customer=c, suggestion=r, sent=r, business_action="accept") for c, r in zip(customers, replies)]
    return Conversation(cid, turns + [Turn(customer="bye", outcome=outcome)])


def test_cells_are_shrunk_means_of_their_returns() -> None:
    ask, guess = OptimalAgent.ASK_NEED, recommend("premium", "laptop")
    rows = [conversation("a", [ask], [OPENING], 1), conversation("b", [guess], [OPENING], 0)]
    critic = TableCritic(SIM, gamma=0.9, prior=4.0).fit(rows)
    assert critic.rows == 2
    # The state cell: (1 + 0 + 4 x 0.5) / (2 + 4) = 0.5 (the overall mean is 0.5). A reply cell with one row:
    # (G + 4 x 0.5) / (1 + 4), so 0.6 for the ask and 0.4 for the guess; a reply never seen gets the state's 0.5.
    q = critic.score_replies(rows[0], 0, [ask, guess, OptimalAgent.ASK_BUDGET])
    assert q == pytest.approx([0.6, 0.4, 0.5])


def test_returns_are_discounted_per_turn() -> None:
    ask = OptimalAgent.ASK_NEED
    rows = [conversation("a", [ask, recommend("standard", "phone")], [OPENING, NEED], 1)]
    critic = TableCritic(SIM, gamma=0.5, prior=1.0).fit(rows)
    # Turn 0's return is 0.5 (the purchase one customer message later), turn 1's 1.0; overall mean 0.75.
    # Turn 0: its state cell (0.5 + 0.75) / 2 = 0.625, its own cell (0.5 + 0.625) / 2 = 0.5625.
    assert critic.score_replies(rows[0], 0, [ask]) == pytest.approx([0.5625])


def test_a_reply_is_read_against_what_the_customer_revealed() -> None:
    row = conversation("a", [OptimalAgent.ASK_NEED, "ok ."], [OPENING, NEED], 0)
    right, wrong = recommend("standard", "phone"), recommend("standard", "laptop")
    assert reply_key(row, 1, right, SIM)[:2] == ("product", "known")
    assert reply_key(row, 1, wrong, SIM)[:2] == ("product", "other")
    assert reply_key(row, 0, right, SIM)[:3] == ("product", "guess", "guess")  # nothing revealed at turn 0
    assert reply_key(row, 1, OptimalAgent.ASK_NEED, SIM)[-1] is True  # asked already: a repeat
    assert reply_key(row, 1, " ".join(["word"] * (SIM.max_reply_words + 1)), SIM) == ("long",)
    assert reply_key(row, 1, None, SIM) == ("abstain",)
    assert state_key(row, 0)[:2] == (False, False) and state_key(row, 1)[:2] == (True, False)


def test_an_empty_table_and_a_bad_prior_are_refused() -> None:
    with pytest.raises(ValueError, match="prior must be > 0"):
        TableCritic(SIM, gamma=0.9, prior=0.0)
    with pytest.raises(ValueError, match="no rows"):
        TableCritic(SIM, gamma=0.9).score_replies(conversation("a", ["ok ."], [OPENING], 0), 0, ["ok ."])
