"""The word format parses exactly as it did before the natural reading existed.

Every result measured with the word-level model (its runs, the scripted agents' rates, the critic probes)
depends on how the simulated customer reads a word-format message. `FrozenWordGrammar` below is a verbatim copy
of `parse_reply` (tables included) as it was when the only reading was the word grammar; these tests parse
with both, field by field, the scripted agents' messages over many seeds, 2000 messages the word-level model
wrote in collected runs (`word_format_messages.txt`: the 300 most frequent of about 29,000 distinct messages
from the buffers of tiny-model runs, and a seeded sample of the rest) and random word salads over their
vocabulary. The frozen copy is never to be edited: if a test here fails, the change to the parser changes
existing results.
"""

from __future__ import annotations

import random
import re
from dataclasses import astuple
from pathlib import Path

import pytest

from iterppo_lightning.env.reply_parser import (
    CATEGORY_WORDS,
    TIER_WORDS,
    ParsedReply,
    is_word_format,
    parse_natural,
    parse_reply,
)
from iterppo_lightning.env.sales_simulator import EDIT_PREFIXES, EDIT_SUFFIXES, SalesSimulator, SimulatorConfig
from iterppo_lightning.env.scripted_agents import BehaviourAgent, MyopicAgent, OptimalAgent, play_episode

MODEL_MESSAGES = Path(__file__).with_name("word_format_messages.txt")


class FrozenWordGrammar:
    """The reply parser's grammar and tables, copied unchanged from before the natural reading."""

    CATEGORY_WORDS = {
        "laptop": ("laptop", "notebook", "computer"),
        "phone": ("phone", "smartphone", "mobile"),
        "tablet": ("tablet", "slate"),
        "headphones": ("headphones", "earphones", "headset"),
    }
    TIER_WORDS = {
        "basic": ("basic", "budget", "cheap", "entry"),
        "standard": ("standard", "mid", "midrange"),
        "premium": ("premium", "pro", "flagship", "top"),
    }
    AMBIGUOUS_TIER_WORDS = frozenset({"budget", "cheap", "entry", "mid", "top"})
    ASK_NEED_WORDS = frozenset(
        {"looking", "need", "needs", "kind", "interested", "find", "want", "wants", "device", "type", "shopping"}
    )
    ASK_NEED_BIGRAMS = frozenset({("help", "you")})
    ASK_BUDGET_WORDS = frozenset({"budget", "spend", "price", "prices", "range", "afford", "cost", "costs"})
    ASK_BUDGET_BIGRAMS = frozenset({("how", "much")})
    DISCOUNT_WORDS = frozenset({"discount", "discounts", "off", "deal", "coupon", "sale", "percent", "%"})
    PRODUCT_WINDOW = 2
    TOKEN_RE = re.compile(r"[a-z0-9]+|%|[^\sa-z0-9]")

    def __init__(self) -> None:
        self.category_of = {word: cat for cat, words in self.CATEGORY_WORDS.items() for word in words}
        self.category_of.update({w + "s": cat for w, cat in list(self.category_of.items()) if not w.endswith("s")})
        self.category_of["headphone"] = "headphones"
        self.category_of["earphone"] = "headphones"
        self.tier_of = {word: tier for tier, words in self.TIER_WORDS.items() for word in words}

    def parse(self, text: str | None) -> ParsedReply:
        tokens = self.TOKEN_RE.findall((text or "").lower())
        words = [t for t in tokens if t[0].isalnum()]
        parsed = ParsedReply(n_words=len(words), empty=not words, normalized=" ".join(tokens))
        if not words:
            return parsed
        consumed = [False] * len(words)
        for j, word in enumerate(words):
            category = self.category_of.get(word)
            if category is None:
                continue
            parsed.categories.add(category)
            consumed[j] = True
            for k in range(j - 1, max(-1, j - 1 - self.PRODUCT_WINDOW), -1):
                tier = self.tier_of.get(words[k])
                if tier is not None and not consumed[k]:
                    parsed.products.append((tier, category))
                    parsed.tiers.add(tier)
                    for m in range(k, j):
                        consumed[m] = True
                    break
        free = [w if not consumed[i] else "" for i, w in enumerate(words)]
        for word in free:
            tier = self.tier_of.get(word)
            if tier is not None and word not in self.AMBIGUOUS_TIER_WORDS:
                parsed.tiers.add(tier)
        bigrams = set(zip(free, free[1:]))
        free_set = set(free)
        parsed.asks_need = not parsed.products and bool(
            free_set & self.ASK_NEED_WORDS or bigrams & self.ASK_NEED_BIGRAMS
        )
        parsed.asks_budget = bool(free_set & self.ASK_BUDGET_WORDS or bigrams & self.ASK_BUDGET_BIGRAMS)
        parsed.offers_discount = bool(set(tokens) & self.DISCOUNT_WORDS)
        return parsed


FROZEN = FrozenWordGrammar()


def scripted_messages() -> tuple[list[str], list[str]]:
    """Every distinct message of the scripted agents' conversations over many seeds, in both simulator modes, as
    ``(business, customer)``: what the word-level model is trained on and imitates."""
    messages: set[str] = set()
    customer: set[str] = set()
    for mode in ("suggested_response", "agent"):
        simulator = SalesSimulator(SimulatorConfig(mode=mode))
        agents = (BehaviourAgent(), BehaviourAgent(skip_known_questions=True), MyopicAgent(), OptimalAgent())
        for agent in agents:
            for seed in range(300):
                for turn in play_episode(agent, simulator, seed, "c").turns:
                    messages.update(m for m in (turn.suggestion, turn.sent) if m is not None)
                    customer.add(turn.customer)
    # Every recommendation the behaviour agent can phrase, with each discount clause and each business edit.
    agent = BehaviourAgent()
    for template in agent.RECOMMEND:
        for tier_word in (w for words in TIER_WORDS.values() for w in words):
            for category_word in (w for words in CATEGORY_WORDS.values() for w in words):
                base = template.format(product=f"{tier_word} {category_word}")
                for text in [base, *(f"{base} {clause}" for clause in agent.DISCOUNT)]:
                    messages.update([text, *(p + text for p in EDIT_PREFIXES), *(text + s for s in EDIT_SUFFIXES)])
    return sorted(messages), sorted(customer)


def model_messages() -> list[str]:
    return MODEL_MESSAGES.read_text(encoding="utf-8").splitlines()


def word_salads(messages: list[str], count: int = 5000) -> list[str]:
    """Random sequences of 1 to 30 tokens of the messages' vocabulary (the word-level model can write any)."""
    vocabulary = sorted({token for message in messages for token in message.split()})
    rng = random.Random(0)
    return [" ".join(rng.choices(vocabulary, k=rng.randint(1, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def scripted_business() -> list[str]:
    return scripted_messages()[0]


@pytest.fixture(scope="module")
def scripted(scripted_business: list[str]) -> list[str]:
    return scripted_business + scripted_messages()[1]


def assert_parsed_as_before(messages: list[str]) -> None:
    changed = [m for m in messages if astuple(parse_reply(m)) != astuple(FROZEN.parse(m))]
    assert not changed, f"{len(changed)} of {len(messages)} word-format messages parse differently: {changed[:5]}"


def test_scripted_messages_parse_as_before(scripted: list[str]) -> None:
    assert len(scripted) > 5000
    assert all(is_word_format(m) for m in scripted)
    assert_parsed_as_before(scripted)


def test_word_level_model_messages_parse_as_before() -> None:
    messages = model_messages()
    assert len(messages) == 2000
    assert all(is_word_format(m) for m in messages)
    assert_parsed_as_before(messages)


def test_random_word_format_text_parses_as_before(scripted: list[str]) -> None:
    salads = word_salads(scripted + model_messages())
    assert all(is_word_format(m) for m in salads)
    assert_parsed_as_before(salads)


@pytest.mark.parametrize("text", ["", "   ", None, "? ! .", "  what is  your budget ? ", "edited 🙂"])
def test_edge_cases_parse_as_before(text: str | None) -> None:
    assert is_word_format(text)
    assert astuple(parse_reply(text)) == astuple(FROZEN.parse(text))


def test_natural_reading_understands_the_scripted_messages(scripted_business: list[str]) -> None:
    """The natural grammar reads every scripted business message as the word grammar does (what it names, asks
    and offers), so a message means the same to the customer whichever way it is written. (Customer phrases such
    as "i do not need a laptop" are read differently on purpose: the natural grammar knows negation.)"""

    def meaning(parsed: ParsedReply) -> tuple:
        return (
            parsed.distinct_products,
            parsed.categories,
            parsed.tiers,
            parsed.asks_need,
            parsed.asks_budget,
            parsed.offers_discount,
            parsed.n_words,
        )

    differ = [m for m in scripted_business if meaning(parse_natural(m)) != meaning(FROZEN.parse(m))]
    assert not differ, differ[:5]
