"""Robust keyword interpretation of a sales message (what products it names, what it asks, what it offers).

The simulated customer reads every message the business sends through
:func:`parse_reply`, so this module decides what a message *means* in the
environment. It is deliberately a small, explicit keyword grammar rather than
anything clever: a policy can only learn a reward it can reach, and a grammar
that is easy to state is easy to test for loopholes (see the tests for the
known pitfalls, e.g. "budget" as a tier versus "budget" as a question).

Grammar, in short:

* Text is lower-cased and split into word tokens and punctuation tokens, so
  case, punctuation glued to words and runs of spaces do not matter.
* A *product* is a tier word within the two words before a category word
  ("the premium laptop", "a mid range phone", "the entry level tablet").
  Plural category words count too ("premium laptops").
* Tier synonyms that are ordinary English words elsewhere (budget, cheap,
  entry, mid, top) only count as a tier when attached to a category word;
  the unambiguous ones (basic, standard, premium, midrange, flagship, pro)
  count on their own as well, so "basic or premium ?" names two tiers.
* Tokens that form a product are consumed before intent keywords are read,
  so "the budget laptop" is not a budget question and "mid range" is not a
  price-range question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CATEGORIES: tuple[str, ...] = ("laptop", "phone", "tablet", "headphones")
"""Canonical category names, in catalog order."""

TIERS: tuple[str, ...] = ("basic", "standard", "premium")
"""Canonical tier names, cheapest first."""

CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "laptop": ("laptop", "notebook", "computer"),
    "phone": ("phone", "smartphone", "mobile"),
    "tablet": ("tablet", "slate"),
    "headphones": ("headphones", "earphones", "headset"),
}
"""Words the customer understands for each category; the canonical name comes first."""

TIER_WORDS: dict[str, tuple[str, ...]] = {
    "basic": ("basic", "budget", "cheap", "entry"),
    "standard": ("standard", "mid", "midrange"),
    "premium": ("premium", "pro", "flagship", "top"),
}
"""Words the customer understands for each tier; the canonical name comes first."""

AMBIGUOUS_TIER_WORDS: frozenset[str] = frozenset({"budget", "cheap", "entry", "mid", "top"})
"""Tier words that are common English elsewhere; they only count right before a category."""

ASK_NEED_WORDS: frozenset[str] = frozenset(
    {"looking", "need", "needs", "kind", "interested", "find", "want", "wants", "device", "type", "shopping"}
)
ASK_NEED_BIGRAMS: frozenset[tuple[str, str]] = frozenset({("help", "you")})

ASK_BUDGET_WORDS: frozenset[str] = frozenset({"budget", "spend", "price", "prices", "range", "afford", "cost", "costs"})
# "much" alone is too common ("thank you very much"), so only the question form counts.
ASK_BUDGET_BIGRAMS: frozenset[tuple[str, str]] = frozenset({("how", "much")})

DISCOUNT_WORDS: frozenset[str] = frozenset({"discount", "discounts", "off", "deal", "coupon", "sale", "percent", "%"})

PRODUCT_WINDOW = 2
"""How many words before a category word a tier word may sit and still name a product."""

_TOKEN_RE = re.compile(r"[a-z0-9]+|%|[^\sa-z0-9]")

_CATEGORY_OF: dict[str, str] = {word: cat for cat, words in CATEGORY_WORDS.items() for word in words}
# Plurals and the singular "headphone" so "premium laptops" or "a headphone" still parse.
_CATEGORY_OF.update({word + "s": cat for word, cat in list(_CATEGORY_OF.items()) if not word.endswith("s")})
_CATEGORY_OF["headphone"] = "headphones"
_CATEGORY_OF["earphone"] = "headphones"

_TIER_OF: dict[str, str] = {word: tier for tier, words in TIER_WORDS.items() for word in words}


@dataclass
class ParsedReply:
    """What a message means to the simulated customer."""

    products: list[tuple[str, str]] = field(default_factory=list)
    """Every product mention as canonical ``(tier, category)``, in order (duplicates kept)."""
    categories: set[str] = field(default_factory=set)
    """Canonical categories mentioned, with or without a tier."""
    tiers: set[str] = field(default_factory=set)
    """Canonical tiers mentioned (attached to a category, or an unambiguous tier word)."""
    asks_need: bool = False
    """The message asks what the customer wants (never true when a product is named)."""
    asks_budget: bool = False
    """The message asks how much the customer wants to spend."""
    offers_discount: bool = False
    """The message offers a discount, deal, coupon or sale."""
    n_words: int = 0
    """Number of word tokens (punctuation not counted)."""
    empty: bool = True
    """No word tokens at all (empty, whitespace or punctuation only)."""
    normalized: str = ""
    """Lower-cased tokens joined by single spaces; equal meaning-preserving spellings compare equal."""

    @property
    def distinct_products(self) -> set[tuple[str, str]]:
        return set(self.products)

    @property
    def product(self) -> tuple[str, str] | None:
        """The single product named, or ``None`` when none or several are named."""
        distinct = self.distinct_products
        return next(iter(distinct)) if len(distinct) == 1 else None


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into word and punctuation tokens."""
    return _TOKEN_RE.findall(text.lower())


def normalize(text: str) -> str:
    """Canonical spelling of ``text``: lower-case tokens joined by single spaces."""
    return " ".join(tokenize(text))


def canonical_category(word: str) -> str | None:
    """Canonical category for a category word or synonym (plural accepted), else ``None``."""
    return _CATEGORY_OF.get(word.lower())


def canonical_tier(word: str) -> str | None:
    """Canonical tier for a tier word or synonym, else ``None``."""
    return _TIER_OF.get(word.lower())


def _is_word(token: str) -> bool:
    return token[0].isalnum()


def parse_reply(text: str | None) -> ParsedReply:
    """Interpret ``text`` as the customer does. ``None`` parses like the empty string."""
    tokens = tokenize(text or "")
    words = [t for t in tokens if _is_word(t)]
    parsed = ParsedReply(n_words=len(words), empty=not words, normalized=" ".join(tokens))
    if not words:
        return parsed

    # Product detection works on word positions only, so punctuation between
    # a tier and its category ("premium , laptop") never glues them together.
    consumed = [False] * len(words)
    for j, word in enumerate(words):
        category = _CATEGORY_OF.get(word)
        if category is None:
            continue
        parsed.categories.add(category)
        consumed[j] = True
        # The nearest tier word wins, so "cheap premium laptop" reads as premium.
        for k in range(j - 1, max(-1, j - 1 - PRODUCT_WINDOW), -1):
            tier = _TIER_OF.get(words[k])
            if tier is not None and not consumed[k]:
                parsed.products.append((tier, category))
                parsed.tiers.add(tier)
                for m in range(k, j):
                    consumed[m] = True
                break

    free = [w if not consumed[i] else "" for i, w in enumerate(words)]
    for word in free:
        tier = _TIER_OF.get(word)
        if tier is not None and word not in AMBIGUOUS_TIER_WORDS:
            parsed.tiers.add(tier)

    bigrams = set(zip(free, free[1:]))
    free_set = set(free)
    parsed.asks_need = not parsed.products and bool(free_set & ASK_NEED_WORDS or bigrams & ASK_NEED_BIGRAMS)
    parsed.asks_budget = bool(free_set & ASK_BUDGET_WORDS or bigrams & ASK_BUDGET_BIGRAMS)
    # "%" is not a word token, so discount keywords are checked on all tokens.
    parsed.offers_discount = bool(set(tokens) & DISCOUNT_WORDS)
    return parsed
