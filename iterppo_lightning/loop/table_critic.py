"""A critic that reads the dialogue as the simulator does: Q(s, a) by table lookup of hand-read features.

A diagnostic of the embedded simulator, not a method for logs (`iterppo probe-critic --critic table`, and
`model.loop.table_critic` as PPO's reward model). It is fit on
the same Monte Carlo returns as Q_k (iteration k's training conversations, the validation split left out), but it
perceives each state and reply perfectly, through the simulator's own parsers: what the customer has revealed,
what the agent already offered, and what a reply asks or recommends against that. What it still cannot do is see
more data. So its probe numbers bound what a pointwise Monte Carlo critic can learn from this buffer, and the gap
between it and Q_k is what Q_k's representation loses (docs/critic.md, "How much the data allows").

The estimate is a shrunk cell mean. A (state, reply) cell's Monte Carlo returns are averaged with `prior`
pseudo-observations of its state cell's mean, which is in turn shrunk towards the mean of every row: a cell with
no rows gets its state's value, a state with no rows the overall one. Deterministic: no seed, no training.

`TableRewardCritic` lets PPO use it as its reward model (model.loop.table_critic): the same policy phase, with Q
from the table instead of Q_k, so a run's final success says what perfect perception of the same data is worth.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.reply_parser import parse_reply
from iterppo_lightning.env.sales_simulator import (
    EMPTY_REPLY,
    LEAVING,
    REPEATED,
    TOO_LONG,
    TOO_MANY_OPTIONS,
    WRONG_CATEGORY,
    WRONG_TIER,
    SimulatorConfig,
)
from iterppo_lightning.env.scripted_agents import RevealedInfo, revealed_info

_COMPLAINTS = (WRONG_TIER, REPEATED, TOO_LONG, TOO_MANY_OPTIONS, EMPTY_REPLY)
"""Customer reactions to a mistake; each costs patience the state does not otherwise show."""
_WRONG_CATEGORY_HEAD = WRONG_CATEGORY.split("{")[0]


def state_key(conversation: Conversation, turn: int) -> tuple:
    """What the customer has revealed and what the conversation has cost so far, at state s_turn."""
    prefix = Conversation(conversation.conversation_id, conversation.turns[: turn + 1])
    info = revealed_info(prefix)
    earlier = prefix.turns[:turn]
    complaints = sum(
        t.customer.removesuffix(" " + LEAVING).strip() in _COMPLAINTS or t.customer.startswith(_WRONG_CATEGORY_HEAD)
        for t in prefix.turns
    )
    return (
        info.need is not None,
        info.budget is not None,
        info.price_sensitive_hint,
        any(parse_reply(t.sent).offers_discount for t in earlier),
        min(turn, 4),
        min(complaints, 2),
    )


def _relation(named: set[str], known: str | None, rejected: set[str]) -> str:
    """How what a reply names relates to what the customer revealed: the one it asked for, another, or a guess."""
    if known is not None:
        return "known" if named == {known} else "other"
    return "rejected" if named & rejected else "guess"


def reply_key(conversation: Conversation, turn: int, text: str | None, simulator: SimulatorConfig) -> tuple:
    """What a reply does at state s_turn, read against what the customer has revealed."""
    if text is None:
        return ("abstain",)
    parsed = parse_reply(text)
    prefix = Conversation(conversation.conversation_id, conversation.turns[: turn + 1])
    repeated = any(parse_reply(t.sent).normalized == parsed.normalized for t in prefix.turns[:turn])
    if parsed.empty:
        return ("empty",)
    if parsed.n_words > simulator.max_reply_words:
        return ("long",)
    if len(parsed.distinct_products) > 1:
        return ("products", parsed.offers_discount, repeated)
    info: RevealedInfo = revealed_info(prefix)
    if parsed.product is not None:
        tier, category = parsed.product
        return (
            "product",
            _relation({category}, info.need, info.rejected),
            _relation({tier}, info.budget, info.rejected),
            parsed.offers_discount,
            repeated,
        )
    if parsed.asks_need or parsed.asks_budget:
        return ("ask", parsed.asks_need, parsed.asks_budget, parsed.offers_discount, repeated)
    if parsed.categories:
        return ("category", _relation(parsed.categories, info.need, info.rejected), parsed.offers_discount, repeated)
    return ("other", parsed.offers_discount, repeated)


class TableCritic:
    """Q(s, a) as a shrunk mean of Monte Carlo returns per (state_key, reply_key) cell."""

    def __init__(self, simulator: SimulatorConfig, gamma: float, prior: float = 4.0):
        if prior <= 0:
            raise ValueError(f"prior must be > 0, got {prior}")
        self.simulator, self.gamma, self.prior = simulator, gamma, prior
        self._cells: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])  # key -> [sum, count]
        self._states: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._overall = [0.0, 0.0]

    def fit(self, conversations: Iterable[Conversation]) -> TableCritic:
        """Add every agent turn's (state, reply, Monte Carlo return) row; returns self."""
        for conversation in conversations:
            for turn, g in zip(conversation.agent_turns, conversation.returns(self.gamma)):
                s = state_key(conversation, turn)
                a = reply_key(conversation, turn, conversation.turns[turn].suggestion, self.simulator)
                for acc in (self._cells[(s, a)], self._states[s], self._overall):
                    acc[0] += g
                    acc[1] += 1
        return self

    @property
    def rows(self) -> int:
        return int(self._overall[1])

    def _shrunk(self, acc: list[float] | None, towards: float) -> float:
        total, n = acc if acc is not None else (0.0, 0.0)
        return (total + self.prior * towards) / (n + self.prior)

    def score_replies(self, conversation: Conversation, turn: int, texts: list[str | None]) -> list[float]:
        """Q of each reply in `texts` at state s_turn of `conversation`."""
        if not self.rows:
            raise ValueError("the table critic has no rows: fit it on conversations with agent turns first")
        overall = self._overall[0] / self._overall[1]
        s = state_key(conversation, turn)
        v = self._shrunk(self._states.get(s), overall)
        return [
            self._shrunk(self._cells.get((s, reply_key(conversation, turn, text, self.simulator))), v) for text in texts
        ]


class TableRewardCritic(nn.Module):
    """The table critic as PPO's reward model: `score` has the CriticModule's signature plus the rows' logged
    states, which PolicyModule passes to a critic whose `needs_states` is True (as for the oracle critic)."""

    needs_states = True

    def __init__(self, table: TableCritic, tokenizer, conversations: list[Conversation], prompt_lengths: dict):
        """`prompt_lengths[(conversation id, turn)]`: the tokens of each logged state as the policy batches hold it
        (TurnExample.prompt_ids), where a rollout row's reply starts."""
        super().__init__()
        self.table, self.tokenizer = table, tokenizer
        self.conversations = {c.conversation_id: c for c in conversations}
        self.prompt_lengths = dict(prompt_lengths)

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: list[tuple[str, int]], rollout: int = 0
    ) -> torch.Tensor:
        """Q of each row [state; reply] (any padding): [n] float on the rows' device; `rollout` is unused (the
        table has no randomness)."""
        if len(states) != input_ids.shape[0]:
            raise ValueError(f"{len(states)} states for {input_ids.shape[0]} rows")
        q = []
        for row, mask, (cid, turn) in zip(input_ids, attention_mask, states):
            tokens = row[mask.bool()].tolist()[self.prompt_lengths[(cid, turn)] :]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip() or None  # as the simulator reads it
            q.extend(self.table.score_replies(self.conversations[cid], turn, [text]))
        return torch.tensor(q, dtype=torch.float32, device=input_ids.device)
