"""Typed conversation records in the paper's suggested-response form.

A conversation is a list of turns. Turn i holds the customer message c_i, the
outcome flag o_i observed with it, the agent's suggestion a_i (``None`` is an
explicit abstain) and the message m_i the business actually sent. The last
turn of a finished conversation is terminal: the customer's closing message
and the outcome, with no suggestion and nothing sent.

State s_i (what the policy sees before suggesting a_i) is every turn before i
in full plus c_i and o_i. Reward R(s_i) = o_i.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_args, get_type_hints

BUSINESS_ACTIONS = ("accept", "edit", "reject", "none")


@dataclass
class Turn:
    customer: str
    """Customer message c_i."""
    outcome: int = 0
    """Outcome flag o_i (1 = the business goal was reached with this message)."""
    suggestion: str | None = None
    """Agent suggestion a_i; ``None`` means the agent abstained (or the turn is terminal)."""
    sent: str | None = None
    """Message m_i the business actually sent; ``None`` on a terminal turn."""
    business_action: str = "none"
    """How the business treated the suggestion: accept, edit, reject, or none (terminal)."""
    timestamp: str | None = None
    """When the customer message arrived (ISO 8601), if the logs record it."""

    @property
    def terminal(self) -> bool:
        return self.sent is None


TURN_FIELDS = tuple(f.name for f in fields(Turn))
"""A turn's fields in order: the keys of a logged turn (docs/data.md) and the columns of a stored one."""


def _stored_type(hint: Any) -> type:
    """``str | None`` -> ``str``: the type a stored column holds (every column is nullable)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if args else hint


TURN_FIELD_TYPES: dict[str, type] = {name: _stored_type(get_type_hints(Turn)[name]) for name in TURN_FIELDS}
"""Each turn field's value type (``str`` or ``int``), from `Turn`'s annotations: what the storage formats'
schemas (data/buffer.py, data/log_io.py) are built from, each with its own map from type to column type."""


@dataclass
class Conversation:
    conversation_id: str
    turns: list[Turn] = field(default_factory=list)
    iteration: int = 0
    """Outer iteration whose policy produced the suggestions."""
    policy_id: str = ""
    """Identifier of the policy that made the suggestions (e.g. ``pi_0``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form: persona for simulated conversations, source for logs."""

    @property
    def success(self) -> bool:
        return any(t.outcome for t in self.turns)

    @property
    def agent_turns(self) -> list[int]:
        """Indices of turns where the agent acted (a message was sent)."""
        return [i for i, t in enumerate(self.turns) if not t.terminal]

    def rewards(self) -> list[int]:
        return [t.outcome for t in self.turns]

    def returns(self, gamma: float) -> list[float]:
        """Monte Carlo return G_i for every agent turn i, in ``agent_turns`` order.

        G_i = sum_{j>=0} gamma^j * o_{i+1+j}: the outcome that follows action a_i,
        discounted by how many customer messages later it arrives.
        """
        outcomes = self.rewards()
        out = []
        for i in self.agent_turns:
            g, discount = 0.0, 1.0
            for o in outcomes[i + 1 :]:
                g += discount * o
                discount *= gamma
            out.append(g)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Conversation:
        turns = [Turn(**t) for t in d["turns"]]  # older records without a timestamp get None
        return cls(
            conversation_id=d["conversation_id"],
            turns=turns,
            iteration=int(d.get("iteration", 0)),
            policy_id=d.get("policy_id", ""),
            metadata=dict(d.get("metadata") or {}),
        )
