"""Embedded multi-turn sales environment: a rule-based customer with a hidden persona and a noisy business.

Each episode is one conversation. A hidden :class:`Persona` decides what the
customer needs (a category), what it can spend (a tier), whether it only buys
with a discount, and how many messages it tolerates. The agent suggests a
message each turn; in suggested-response mode the business accepts, lightly
edits or rejects the suggestion (sending its own neutral message instead), and
the customer reacts to what was actually sent. The episode ends with one
terminal customer turn: a purchase (outcome 1) or leaving (outcome 0).

The task is built so that planning pays: the customer reveals its need and its
budget only when asked, one per message, while guessing products costs extra
patience. Asking earns no immediate reward, so a myopic agent never asks and
mostly fails; asking need, then budget, then recommending the fitting product
with a discount succeeds almost always.

All the customer's and the business's own text is lower-case with words and
punctuation separated by single spaces, so a small word-level language model can
read and write it. The agent's messages may also be natural text ("I'd recommend
our Premium Laptop!"): env/reply_parser.py reads both.

Determinism: an episode draws every random choice from generators derived only
from its own seed, so its outcome depends on the seed and the messages it is
given, never on batching or on other episodes.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Any

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.env.reply_parser import CATEGORIES, CATEGORY_WORDS, TIERS, ParsedReply, parse_reply

MODES: tuple[str, ...] = ("suggested_response", "agent")

# ---------------------------------------------------------------------------
# Phrase tables. Scripted agents import these to read customer messages back,
# so any wording change here stays in sync with them.
# ---------------------------------------------------------------------------

OPENINGS: tuple[str, ...] = (
    "hi , i am shopping for something new .",
    "hello , can you help me ?",
    "hi there , i could use some advice .",
    "hello , i am thinking about buying something .",
    "hey , what do you have in store ?",
)
"""Opening messages; none reveals the need or the budget."""

NEED_TEMPLATES: tuple[str, ...] = (
    "i am looking for a {word} .",
    "i need a new {word} for work .",
    "i want a good {word} .",
    "i am after a {word} .",
    "a {word} would be nice .",
)
"""How the customer reveals its need; ``{word}`` is the category or one of its synonyms."""

BUDGET_PHRASES: dict[str, tuple[str, ...]] = {
    # Every answer names the tier word in a varied frame: the task is to learn WHEN
    # to ask and recommend, not a paraphrase lexicon (which a 0.5M-parameter model
    # trained for minutes on CPU cannot learn from a few thousand conversations).
    "basic": (
        "i am on a tight budget , basic is fine .",
        "something basic please .",
        "i can not spend a lot , a basic one .",
    ),
    "standard": (
        "something standard , mid range .",
        "a standard price is fine .",
        "nothing too fancy , a standard one .",
    ),
    "premium": ("money is no object , i want premium .", "i want a premium one .", "only premium for me ."),
}
"""How the customer reveals its budget, per tier. Phrases must be distinct across tiers."""

WRONG_CATEGORY = "i do not need a {category} ."
WRONG_TIER = "that is not in my price range ."
TOO_EXPENSIVE = "it is a bit expensive for me ."
TOO_MANY_OPTIONS = "that is too many options ."
TOO_LONG = "that is a lot of text ."
REPEATED = "you already said that ."
EMPTY_REPLY = "hello ? are you there ?"
TOLD_ALREADY = "i told you already ."
DISCOUNT_NOTED = "ok , good to know ."

SMALL_TALK: tuple[str, ...] = ("ok .", "sure .", "hmm , go on .", "i see .")
"""Acknowledgements for messages that move nothing forward."""

PURCHASES: tuple[str, ...] = (
    "great , i will take it !",
    "perfect , i will buy it !",
    "sounds good , i will take it !",
)
"""Terminal messages of a successful conversation (outcome 1)."""

LEAVING = "i have to go . bye ."
"""Appended to the last reaction when the customer runs out of patience or turns."""

BUSINESS_MESSAGES: tuple[str, ...] = (
    "thanks for your patience , let me check something .",
    "one moment please , i will be right with you .",
)
"""Neutral messages the business sends when it rejects a suggestion or the agent abstains."""

EDIT_PREFIXES: tuple[str, ...] = ("sure ! ", "of course ! ")
EDIT_SUFFIXES: tuple[str, ...] = (" thank you !",)


@dataclass
class Persona:
    """The hidden customer profile; agents never see it."""

    need: str
    """Category the customer wants to buy."""
    budget: str
    """The only tier the customer will pay for."""
    price_sensitive: bool
    """Buys only once a discount has been offered."""
    patience: int
    """Patience at the start; each sent message costs 1, mistakes cost more."""
    style: int
    """Index selecting the customer's phrasing variants (its voice)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SimulatorConfig:
    """Knobs of the sales environment."""

    min_patience: int = 3
    """Smallest starting patience a persona can draw."""
    max_patience: int = 5
    """Largest starting patience a persona can draw (inclusive)."""
    price_sensitive_prob: float = 0.5
    """Probability that a persona buys only after a discount is offered."""
    mode: str = "suggested_response"
    """``suggested_response`` (the business may edit or reject the suggestion) or ``agent``
    (the business always sends it)."""
    accept_prob: float = 0.85
    """Suggested-response mode: probability the business sends the suggestion unchanged."""
    edit_prob: float = 0.10
    """Suggested-response mode: probability the business sends a light, meaning-preserving edit."""
    reject_prob: float = 0.05
    """Suggested-response mode: probability the business sends its own neutral message instead."""
    max_reply_words: int = 24
    """Messages with more words than this are not read (and cost extra patience)."""
    max_agent_turns: int = 8
    """The customer leaves after this many business messages, whatever its patience."""
    need_synonym_prob: float = 0.1
    """Chance that the customer names its need with a synonym ("notebook") instead of the category word."""
    wrong_category_penalty: int = 2
    """Extra patience lost when offered a product of a category the customer does not need.

    Other mistakes (wrong tier, repetition, overlong or empty text, too many
    options) cost 1 extra. Pushing an unwanted kind of product annoys more, and
    the higher price keeps blind guessing (the myopic strategy) near 25 % success.
    """

    def __post_init__(self) -> None:
        if self.min_patience < 1:
            raise ValueError(f"min_patience must be >= 1, got {self.min_patience}")
        if self.min_patience > self.max_patience:
            raise ValueError(f"min_patience ({self.min_patience}) must be <= max_patience ({self.max_patience})")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.need_synonym_prob <= 1.0:
            raise ValueError(f"need_synonym_prob must be in [0, 1], got {self.need_synonym_prob}")
        if not 0.0 <= self.price_sensitive_prob <= 1.0:
            raise ValueError(f"price_sensitive_prob must be in [0, 1], got {self.price_sensitive_prob}")
        probs = {
            "accept_prob": self.accept_prob,
            "edit_prob": self.edit_prob,
            "reject_prob": self.reject_prob,
        }
        negative = [name for name, p in probs.items() if p < 0]
        if negative:
            raise ValueError(f"{', '.join(negative)} must be non-negative, got {probs}")
        if abs(sum(probs.values()) - 1.0) > 1e-6:
            raise ValueError(f"accept_prob + edit_prob + reject_prob must sum to 1, got {probs}")
        if self.max_reply_words < 1:
            raise ValueError(f"max_reply_words must be >= 1, got {self.max_reply_words}")
        if self.max_agent_turns < 1:
            raise ValueError(f"max_agent_turns must be >= 1, got {self.max_agent_turns}")
        if self.wrong_category_penalty < 0:
            raise ValueError(f"wrong_category_penalty must be >= 0, got {self.wrong_category_penalty}")


def persona_prior(config: SimulatorConfig) -> list[tuple[Persona, float]]:
    """Every persona `SalesEpisode` can draw, with the probability it draws it (they sum to 1)."""
    patiences = range(config.min_patience, config.max_patience + 1)
    sensitive = ((True, config.price_sensitive_prob), (False, 1.0 - config.price_sensitive_prob))
    base = 1.0 / (len(CATEGORIES) * len(TIERS) * len(patiences) * len(NEED_TEMPLATES))
    return [
        (Persona(need, budget, flag, patience, style), base * p)
        for need in CATEGORIES
        for budget in TIERS
        for flag, p in sensitive
        for patience in patiences
        for style in range(len(NEED_TEMPLATES))
        if p > 0
    ]


@dataclass
class _CustomerState:
    """What the customer remembers during an episode."""

    patience: int
    need_revealed: bool = False
    budget_revealed: bool = False
    discount_offered: bool = False
    messages_received: int = 0
    last_sent: str | None = None
    """Normalized text of the previous business message, for the repetition rule."""


@dataclass
class _Reaction:
    text: str
    purchased: bool = False


class SalesEpisode:
    """One conversation between the simulated customer and the business."""

    def __init__(
        self, config: SimulatorConfig, seed: int, conversation_id: str, persona: Persona | None = None
    ) -> None:
        """`persona` replaces the one the seed draws (the critic probe's posterior over hidden customers); the
        seed still draws its own first, so the business's and the customer's streams are the seed's either way."""
        self.config = config
        self.seed = seed
        rng = random.Random(seed)
        drawn = Persona(
            need=rng.choice(CATEGORIES),
            budget=rng.choice(TIERS),
            price_sensitive=rng.random() < config.price_sensitive_prob,
            patience=rng.randint(config.min_patience, config.max_patience),
            style=rng.randrange(len(NEED_TEMPLATES)),
        )
        self.persona = drawn if persona is None else persona
        # Separate child streams for the business and the customer: the business's
        # k-th decision is then the same whatever the agent said before, so two
        # policies run on one seed face identical business noise (common random numbers).
        self._business_rng = random.Random(rng.getrandbits(64))
        self._customer_rng = random.Random(rng.getrandbits(64))
        self._state = _CustomerState(patience=self.persona.patience)
        self.done = False
        self.conversation = Conversation(
            conversation_id=conversation_id,
            turns=[Turn(customer=self._customer_rng.choice(OPENINGS))],
            metadata={"persona": self.persona.to_dict(), "seed": seed},
        )

    # ------------------------------------------------------------------ business
    def _business_send(self, suggestion: str | None) -> tuple[str, str]:
        """Return ``(sent, business_action)`` for a suggestion."""
        cfg = self.config
        # Draw every time, even for abstains, so the stream stays aligned across policies.
        u = self._business_rng.random()
        own_message = self._business_rng.choice(BUSINESS_MESSAGES)
        edit_index = self._business_rng.randrange(len(EDIT_PREFIXES) + len(EDIT_SUFFIXES))
        if suggestion is None or not suggestion.strip():
            return own_message, "reject"
        if cfg.mode == "agent" or u < cfg.accept_prob:
            return suggestion, "accept"
        if u < cfg.accept_prob + cfg.edit_prob:
            return self._edit(suggestion, edit_index), "edit"
        return own_message, "reject"

    def _edit(self, suggestion: str, index: int) -> str:
        """A light edit that keeps the meaning and never pushes the message over the word limit."""
        text = suggestion.strip()
        edits = [p + text for p in EDIT_PREFIXES] + [text + s for s in EDIT_SUFFIXES]
        # Try the drawn edit first, then the others: an edit that made the text
        # too long would change what it means to the customer.
        for edited in edits[index:] + edits[:index]:
            if parse_reply(edited).n_words <= self.config.max_reply_words:
                return edited
        # A message already at the limit only gets punctuation, which is not a word.
        return text + " !"

    # ------------------------------------------------------------------ customer
    def _react(self, sent: str) -> _Reaction:
        """The customer's reaction to a business message; updates patience and memory."""
        state, rng = self._state, self._customer_rng
        parsed = parse_reply(sent)
        previous = state.last_sent
        state.last_sent = parsed.normalized
        state.messages_received += 1
        state.patience -= 1

        if parsed.empty:
            state.patience -= 1
            return _Reaction(EMPTY_REPLY)
        if parsed.n_words > self.config.max_reply_words:
            state.patience -= 1
            return _Reaction(TOO_LONG)
        if previous is not None and parsed.normalized == previous:
            state.patience -= 1
            return _Reaction(REPEATED)
        # A discount counts from the moment it is said, including in a message
        # that is then dismissed as too many options.
        state.discount_offered = state.discount_offered or parsed.offers_discount
        if len(parsed.distinct_products) > 1 or len(parsed.categories) > 1 or len(parsed.tiers) > 1:
            state.patience -= 1
            return _Reaction(TOO_MANY_OPTIONS)
        if parsed.product is not None:
            return self._react_to_product(parsed.product)
        if parsed.asks_need or parsed.asks_budget:
            return _Reaction(self._answer_question(parsed))
        if parsed.offers_discount:
            return _Reaction(DISCOUNT_NOTED)
        return _Reaction(rng.choice(SMALL_TALK))

    def _react_to_product(self, product: tuple[str, str]) -> _Reaction:
        state, persona = self._state, self.persona
        tier, category = product
        if category != persona.need:
            state.patience -= self.config.wrong_category_penalty
            return _Reaction(WRONG_CATEGORY.format(category=category))
        if tier != persona.budget:
            state.patience -= 1
            return _Reaction(WRONG_TIER)
        if persona.price_sensitive and not state.discount_offered:
            return _Reaction(TOO_EXPENSIVE)
        return _Reaction(self._customer_rng.choice(PURCHASES), purchased=True)

    def _answer_question(self, parsed: ParsedReply) -> str:
        """Reveal one thing per message: the need first, then the budget."""
        state, persona, rng = self._state, self.persona, self._customer_rng
        if parsed.asks_need and not state.need_revealed:
            state.need_revealed = True
            return self._need_phrase(rng)
        if parsed.asks_budget and not state.budget_revealed:
            state.budget_revealed = True
            phrases = BUDGET_PHRASES[persona.budget]
            return phrases[persona.style % len(phrases)]
        return TOLD_ALREADY

    def _need_phrase(self, rng: random.Random) -> str:
        words = CATEGORY_WORDS[self.persona.need]
        word = rng.choice(words[1:]) if rng.random() < self.config.need_synonym_prob else words[0]
        template = NEED_TEMPLATES[self.persona.style % len(NEED_TEMPLATES)]
        return template.format(word=word)

    # ------------------------------------------------------------------ public
    def fork(self, seed: int) -> SalesEpisode:
        """A copy of the episode as it stands (persona, conversation, what the customer remembers) whose business
        and customer draw from fresh streams of `seed`; this episode is left as it was. From here on the copy
        depends only on `seed` and the messages it is given: the critic probe's common random numbers (forks
        with one `seed` for every reply compared at a state)."""
        twin = copy.copy(self)
        twin._state = copy.copy(self._state)
        conversation = self.conversation
        twin.conversation = Conversation(
            conversation.conversation_id,
            [copy.copy(turn) for turn in conversation.turns],  # step fills in the last turn
            conversation.iteration,
            conversation.policy_id,
            copy.deepcopy(conversation.metadata),
        )
        rng = random.Random(seed)
        twin._business_rng = random.Random(rng.getrandbits(64))
        twin._customer_rng = random.Random(rng.getrandbits(64))
        return twin

    @property
    def patience(self) -> int:
        """The customer's remaining patience (hidden from agents; exposed for tests and analysis)."""
        return self._state.patience

    def step(self, suggestion: str | None) -> None:
        """Apply the agent's suggestion (``None`` abstains) and append the customer's reaction."""
        if self.done:
            raise RuntimeError(f"episode {self.conversation.conversation_id!r} is already finished")
        sent, action = self._business_send(suggestion)
        pending = self.conversation.turns[-1]
        pending.suggestion = suggestion
        pending.sent = sent
        pending.business_action = action

        reaction = self._react(sent)
        if reaction.purchased:
            self.conversation.turns.append(Turn(customer=reaction.text, outcome=1))
            self.done = True
            return
        out_of_patience = self._state.patience <= 0
        out_of_turns = self._state.messages_received >= self.config.max_agent_turns
        if out_of_patience or out_of_turns:
            self.conversation.turns.append(Turn(customer=f"{reaction.text} {LEAVING}"))
            self.done = True
            return
        self.conversation.turns.append(Turn(customer=reaction.text))


class SalesSimulator:
    """Factory of independent, seeded sales episodes."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()

    def new_episode(self, seed: int, conversation_id: str) -> SalesEpisode:
        return SalesEpisode(self.config, seed, conversation_id)
