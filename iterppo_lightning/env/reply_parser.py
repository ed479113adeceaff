"""Keyword interpretation of a sales message (what products it names, what it asks, what it offers).

The simulated customer reads every message the business sends through
:func:`parse_reply`, so this module decides what a message *means* in the
environment. It is deliberately a small, explicit keyword grammar rather than
anything clever: a policy can only learn a reward it can reach, and a grammar
that is easy to state is easy to test for loopholes (see the tests for the
known pitfalls, e.g. "budget" as a tier versus "budget" as a question).

There are two readings, chosen by how a message is written:

* **The word grammar** (:func:`parse_word_format`) reads the *word format*:
  lower-case tokens separated by whitespace, what the word-level model writes
  and every scripted message is ("how about the premium laptop ? i can give
  you 10 % off ."). It is the grammar every result with that model was
  measured with, kept bit for bit (tests/env/test_word_format_compat.py parses
  the scripted agents' messages, messages the word-level model wrote and random
  word salads with a frozen copy of it).
* **The natural grammar** (:func:`parse_natural`) reads everything else: text
  as people and chat models write it ("Hi! What's your price range?", "I'd
  recommend our Premium Laptop, and I can take 10% off."). It reads every
  scripted message as the word grammar does, and agrees with the hand-written
  labels of tests/env/natural_replies.jsonl (`python benchmarks/reply_agreement.py`
  prints the rate).

The word grammar, in short:

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

The natural grammar adds, on top of the same idea (products first, then
intents on the words left over):

* Spelling: curly quotes are straight, contractions are spelt out ("I'd" ->
  "i would", "what's" -> "what is", "don't" -> "do not") and count as one word
  each; a hyphen inside a word joins ("mid-range"), a dash between words or a
  comma, semicolon, colon, "but" end a clause; emoji and other symbols are
  ignored. Several-word tiers read as one tier word (`NATURAL_TIER_PHRASES`:
  "top-of-the-line", "high-end", "entry-level", "mid-tier", "low-cost").
* Products: a tier word within three words before a category word in the same
  clause (`NATURAL_PRODUCT_WINDOW`); more synonyms (`NATURAL_TIER_WORDS`,
  `NATURAL_CATEGORY_WORDS`: "cheapest tablet", "luxury headphones",
  "earbuds"); a coordinated tier names a second product ("the basic or the
  premium tablet" is two). A tier word before a generic noun names a tier
  without a category ("the basic model"); "pro" needs a product after it, so
  "a pro tip" or "pros and cons" name nothing.
* Negation: "not", "no", "never", "without", "nor" cancel the next mention in
  their clause (a product, a category, a tier or an offer) and the mentions
  coordinated with it: "we don't have a discount today" offers nothing, "not
  the laptop, but the premium tablet" names only the tablet.
* Offers: discount words (`DISCOUNT_CUES`: "10% off", "15 percent", "promo
  code", "on sale", "coupon") and offers that name a price ("a better price",
  `DISCOUNT_PHRASES`); "off" after "show", "better", "turn"... is no offer.
* Questions are read sentence by sentence on the words no product, tier or
  offer used. Need cues (`NEED_CUES`, `NEED_PHRASES`: "what brings you in",
  "how can I help you", "what can I get for you") ask the need when no product
  is named. Budget cues split in two: strong ones (`STRONG_BUDGET_CUES`:
  budget, spend, afford; "how much") ask anywhere, weak ones (price, cost,
  pay, "$500", "too much") only in a question or after "your". Phrases that
  would read as the wrong question are read first ("looking to spend" and
  "what kind of budget" ask the budget, not the need; "fits your needs" and
  "given your budget" ask nothing). A statement that offers a discount or
  recommends a product asks nothing ("I could knock a bit off the price"). A
  question offering a choice of categories asks the need ("a phone or a
  tablet?"), one offering a choice of tiers asks the budget.

Gaming does not pay under either grammar: the customer (sales_simulator.py)
dismisses several products, tiers or categories at once, ignores overlong or
repeated messages, and a discount alone sells nothing.
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


def is_word_format(text: str | None) -> bool:
    """Whether ``text`` is in the word format: lower-case tokens separated by whitespace, what the word-level
    model writes and every scripted message is ("how about the premium laptop ? i can give you 10 % off .")."""
    text = text or ""
    return " ".join(text.split()) == normalize(text)


def parse_reply(text: str | None) -> ParsedReply:
    """Interpret ``text`` as the customer does. ``None`` parses like the empty string.

    Text in the word format is read with the word grammar (`parse_word_format`), anything else with the natural
    grammar (`parse_natural`); see the module docstring for why there are two.
    """
    return parse_word_format(text) if is_word_format(text) else parse_natural(text)


def parse_word_format(text: str | None) -> ParsedReply:
    """The word grammar: the reading of a word-format message, unchanged since the first results were measured."""
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


# ---------------------------------------------------------------------------
# The natural reading: text as people and chat models write it
# ---------------------------------------------------------------------------

NATURAL_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "laptop": ("laptop", "notebook", "computer"),
    "phone": ("phone", "smartphone", "mobile", "cellphone"),
    "tablet": ("tablet", "slate"),
    "headphones": ("headphones", "headphone", "earphones", "earphone", "headset", "earbuds", "earbud"),
}
"""Category words of the natural reading (plurals are added)."""

NATURAL_TIER_WORDS: dict[str, tuple[str, ...]] = {
    "basic": (
        "basic",
        "budget",
        "cheap",
        "cheaper",
        "cheapest",
        "entry",
        "affordable",
        "inexpensive",
        "economy",
        "starter",
    ),
    "standard": ("standard", "mid", "midrange", "middle", "regular"),
    "premium": ("premium", "pro", "flagship", "top", "luxury", "deluxe"),
}
"""One-word tiers of the natural reading."""

NATURAL_TIER_PHRASES: dict[tuple[str, ...], str] = {
    ("top", "of", "the", "line"): "premium",
    ("top", "of", "the", "range"): "premium",
    ("high", "end"): "premium",
    ("higher", "end"): "premium",
    ("top", "end"): "premium",
    ("top", "tier"): "premium",
    ("mid", "range"): "standard",
    ("mid", "tier"): "standard",
    ("mid", "level"): "standard",
    ("mid", "priced"): "standard",
    ("middle", "of", "the", "range"): "standard",
    ("entry", "level"): "basic",
    ("low", "end"): "basic",
    ("lower", "end"): "basic",
    ("low", "cost"): "basic",
    ("low", "priced"): "basic",
    ("budget", "friendly"): "basic",
}
"""Several-word tiers ("top-of-the-line", "mid-range"): hyphens read as spaces, a phrase reads as one tier word."""

NATURAL_UNAMBIGUOUS_TIER_WORDS: frozenset[str] = frozenset(
    {"basic", "standard", "premium", "midrange", "flagship", "deluxe"}
)
"""Tier words that name a tier on their own; every other tier word (and "pro": "a pro tip") needs a category or a
generic product noun right after it. Several-word tiers always count."""

GENERIC_PRODUCT_NOUNS: frozenset[str] = frozenset(
    {"option", "options", "model", "models", "one", "ones", "version", "versions", "tier", "line", "edition"}
)
"""Nouns that stand for a product of no named category: "the basic model" names the basic tier."""

NATURAL_PRODUCT_WINDOW = 3
"""Words a tier may sit before its category in the natural reading ("premium noise cancelling headphones")."""

NEGATORS: frozenset[str] = frozenset({"not", "no", "never", "without", "nor"})
"""A negator cancels the next mention in its clause ("we do not have a discount", "not the laptop, but ...")."""

DISCOUNT_CUES: frozenset[str] = frozenset(
    (
        "discount discounts discounted deal deals coupon coupons sale promo promos promotion promotions "
        "voucher vouchers rebate rebates markdown clearance percent % off"
    ).split()
)
DISCOUNT_PHRASES: frozenset[tuple[str, ...]] = frozenset(
    {
        ("special", "offer"),
        ("special", "price"),
        ("special", "pricing"),
        ("better", "price"),
        ("lower", "price"),
        ("reduced", "price"),
        ("price", "cut"),
        ("price", "drop"),
    }
)
"""Offers that name a price ("a better price"): the price in them is part of the offer, not a budget question."""
OFF_NOT_DISCOUNT: frozenset[str] = frozenset(
    (
        "turn turned switch switched show showing log logged sign signed kick kicked well better head "
        "headed set shut drop dropped pay paid off"
    ).split()
)
"""Words after which "off" is not a price reduction ("show off", "better off")."""

NEED_CUES: frozenset[str] = frozenset(
    (
        "looking need needs kind interested interests find want wants device devices type shopping gadget "
        "gadgets particular specific"
    ).split()
)
NEED_PHRASES: frozenset[tuple[str, ...]] = frozenset(
    {
        ("help", "you"),
        ("can", "i", "help"),
        ("brings", "you"),
        ("do", "for", "you"),
        ("get", "for", "you"),
        ("use", "it", "for"),
        ("using", "it", "for"),
        ("assist", "you"),
    }
)
STRONG_BUDGET_CUES: frozenset[str] = frozenset({"budget", "budgets", "spend", "spending", "afford"})
"""Budget words that ask the budget anywhere outside an offer."""
WEAK_BUDGET_CUES: frozenset[str] = frozenset(
    {"price", "prices", "pricing", "cost", "costs", "pay", "paying", "maximum", "max", "$"}
)
"""Budget words that ask only in a question or after "your" ("the laptop costs $900" asks nothing)."""
BUDGET_PHRASES: frozenset[tuple[str, ...]] = frozenset(
    {("how", "much"), ("too", "much"), ("price", "range"), ("price", "point")}
    | {
        (verb, "to", goal)
        for verb in ("looking", "want", "wants", "like", "hoping", "willing", "planning", "need", "able", "prepared")
        for goal in ("spend", "pay")
    }
    | {(noun, "of", goal) for noun in ("kind", "type", "sort") for goal in ("budget", "price", "prices")}
)
"""Budget questions whose words would otherwise read as need cues ("looking to spend", "what kind of budget")."""
NOT_A_QUESTION_PHRASES: frozenset[tuple[str, ...]] = frozenset(
    {
        (verb, "your", noun)
        for verb in ("fit", "fits", "suit", "suits", "meet", "meets", "match", "matches")
        for noun in ("needs", "need", "budget")
    }
    | {(verb, "your", "budget") for verb in ("given", "within", "for", "with", "under")}
    | {("no", "need"), ("time", "you", "need"), ("tight", "budget")}
)
"""Phrases with a need or budget word that ask nothing ("it will fit your needs", "no need to rush")."""

CLAUSE_BREAKS: frozenset[str] = frozenset({",", ";", ".", "!", "?", ":", "but", "instead", "however"})
SENTENCE_BREAKS: frozenset[str] = frozenset({".", "!", "?", ";", "\n"})
_COORDINATION: frozenset[str] = frozenset({"or", "and", "nor"})
_DETERMINERS: frozenset[str] = frozenset({"the", "a", "an", "our", "my", "your", "this", "that", "any"})

_CONTRACTIONS: dict[str, tuple[str, ...]] = {
    "won't": ("will", "not"),
    "can't": ("can", "not"),
    "shan't": ("shall", "not"),
    "ain't": ("is", "not"),
    "let's": ("let", "us"),
}
_CONTRACTION_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("n't", "not"),
    ("'re", "are"),
    ("'ve", "have"),
    ("'ll", "will"),
    ("'d", "would"),
    ("'m", "am"),
    ("'s", "is"),
)
_QUOTES = str.maketrans(
    {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'", "\u201c": '"', "\u201d": '"'}
)
_DASH_RE = re.compile(r"\s-+\s|[\u2013\u2014]")
"""A spaced hyphen or an en/em dash separates clauses; a hyphen inside a word ("mid-range") joins words."""
_NATURAL_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\n|\S")

_NATURAL_CATEGORY_OF: dict[str, str] = {}
for _category, _words in NATURAL_CATEGORY_WORDS.items():
    for _word in _words:
        _NATURAL_CATEGORY_OF[_word] = _category
        _NATURAL_CATEGORY_OF[_word if _word.endswith("s") else _word + "s"] = _category
_NATURAL_TIER_OF: dict[str, str] = {word: tier for tier, words in NATURAL_TIER_WORDS.items() for word in words}
_NATURAL_TIER_OF.update({"_".join(phrase): tier for phrase, tier in NATURAL_TIER_PHRASES.items()})
_LONGEST_TIER_PHRASE = max(len(phrase) for phrase in NATURAL_TIER_PHRASES)


def natural_tokens(text: str) -> list[str]:
    """Lower-cased tokens of ``text`` with curly quotes made straight; a word keeps its apostrophe ("what's")."""
    return _NATURAL_TOKEN_RE.findall(text.translate(_QUOTES).lower())


def _reading_words(token: str) -> tuple[str, ...]:
    """What a written word reads as: contractions spelt out ("I'd" -> "i would", "don't" -> "do not")."""
    if "'" not in token:
        return (token,)
    if token in _CONTRACTIONS:
        return _CONTRACTIONS[token]
    for suffix, expansion in _CONTRACTION_SUFFIXES:
        if token.endswith(suffix) and len(token) > len(suffix):
            return (token[: -len(suffix)], expansion)
    return tuple(part for part in token.split("'") if part)


def _reading_stream(text: str) -> list[str]:
    """Words and break marks the natural grammar reads: contractions spelt out, several-word tiers merged into one
    word, a hyphen inside a word dropped, dashes turned into clause breaks, other punctuation kept as breaks."""
    stream: list[str] = []
    for token in natural_tokens(_DASH_RE.sub(" , ", text)):
        if token[0].isalnum():
            stream.extend(_reading_words(token))
        elif token in ("%", "$", "\n") or token in CLAUSE_BREAKS:
            stream.append(token)
        # Anything else (a hyphen in a word, quotes, emoji, brackets) separates nothing.
    merged: list[str] = []
    i = 0
    while i < len(stream):
        for size in range(_LONGEST_TIER_PHRASE, 1, -1):
            phrase = tuple(stream[i : i + size])
            if phrase in NATURAL_TIER_PHRASES:
                merged.append("_".join(phrase))
                i += size
                break
        else:
            merged.append(stream[i])
            i += 1
    return merged


def _is_break(token: str) -> bool:
    return token in CLAUSE_BREAKS or token == "\n"


def _phrase_at(words: list[str], i: int, phrases: frozenset[tuple[str, ...]]) -> int:
    """Length of the longest phrase of ``phrases`` starting at ``words[i]``, 0 when none does."""
    for size in (4, 3, 2):
        phrase = tuple(words[i : i + size])
        if len(phrase) == size and phrase in phrases:
            return size
    return 0


@dataclass
class _Mention:
    """Something a message names, a negator may cancel: a product, a bare category, a bare tier or a discount."""

    kind: str
    start: int
    end: int
    """Stream positions ``start..end`` inclusive."""
    value: tuple[str, str] | str = ""
    negated: bool = False


def parse_natural(text: str | None) -> ParsedReply:
    """The natural reading of ``text`` (see the module docstring); ``None`` parses like the empty string."""
    text = text or ""
    tokens = natural_tokens(text)
    n_words = sum(1 for t in tokens if t[0].isalnum())
    parsed = ParsedReply(n_words=n_words, empty=n_words == 0, normalized=" ".join(t for t in tokens if t != "\n"))
    if not n_words:
        return parsed
    stream = _reading_stream(text)
    used = [False] * len(stream)  # positions read as part of a product, tier, offer or phrase
    # Products first, so their tier words are no questions ("the budget laptop"), then bare tiers, then offers.
    mentions = _read_products(stream, used) + _read_bare_tiers(stream, used) + _read_offers(stream, used)
    mentions.sort(key=lambda m: m.start)
    _apply_negation(stream, mentions)
    for mention in mentions:
        if mention.negated:
            continue
        if mention.kind == "product":
            tier, category = mention.value
            parsed.products.append((tier, category))
            parsed.tiers.add(tier)
            parsed.categories.add(category)
        elif mention.kind == "category":
            parsed.categories.add(mention.value)
        elif mention.kind == "tier":
            parsed.tiers.add(mention.value)
        else:
            parsed.offers_discount = True
    asks_need = asks_budget = False
    start = 0
    for end in range(len(stream) + 1):
        if end < len(stream) and stream[end] not in SENTENCE_BREAKS:
            continue
        need, budget = _sentence_questions(stream, used, mentions, start, end)
        asks_need, asks_budget = asks_need or need, asks_budget or budget
        start = end + 1
    parsed.asks_need = asks_need and not parsed.products
    parsed.asks_budget = asks_budget
    return parsed


def _read_products(stream: list[str], used: list[bool]) -> list[_Mention]:
    """Products and bare categories: a tier word within `NATURAL_PRODUCT_WINDOW` words before a category word, in
    the same clause; a tier coordinated with it ("the basic or the premium tablet") names a second product."""
    mentions: list[_Mention] = []
    for j, word in enumerate(stream):
        category = _NATURAL_CATEGORY_OF.get(word)
        if category is None:
            continue
        used[j] = True
        tier_at = None
        for k in range(j - 1, max(-1, j - 1 - NATURAL_PRODUCT_WINDOW), -1):
            if (
                _is_break(stream[k])
                or stream[k] in _COORDINATION
                or stream[k] in NEGATORS
                or stream[k] in _NATURAL_CATEGORY_OF
            ):
                break
            if stream[k] in _NATURAL_TIER_OF and not used[k]:
                tier_at = k
                break
        if tier_at is None:
            mentions.append(_Mention("category", j, j, category))
            continue
        for m in range(tier_at, j + 1):
            used[m] = True
        mentions.extend(_coordinated_products(stream, used, tier_at, category))
        mentions.append(_Mention("product", tier_at, j, (_NATURAL_TIER_OF[stream[tier_at]], category)))
    return mentions


def _coordinated_products(stream: list[str], used: list[bool], tier_at: int, category: str) -> list[_Mention]:
    """Products named by tiers coordinated before the one at ``tier_at``: "basic or the" in "the basic or the
    premium tablet". Each covers its tier word up to its conjunction."""
    found: list[_Mention] = []
    k = tier_at - 1
    while True:
        conjunction = _skip_determiners(stream, k)
        if conjunction < 1 or stream[conjunction] not in _COORDINATION:
            return found
        k_tier = _skip_determiners(stream, conjunction - 1)
        if k_tier < 0 or stream[k_tier] not in _NATURAL_TIER_OF or used[k_tier]:
            return found
        for m in range(k_tier, conjunction + 1):
            used[m] = True
        found.insert(0, _Mention("product", k_tier, conjunction, (_NATURAL_TIER_OF[stream[k_tier]], category)))
        k = k_tier - 1


def _skip_determiners(stream: list[str], k: int) -> int:
    """The last position at or before ``k`` that is not a determiner ("the", "our"); -1 when none is."""
    while k >= 0 and stream[k] in _DETERMINERS:
        k -= 1
    return k


def _read_bare_tiers(stream: list[str], used: list[bool]) -> list[_Mention]:
    """Tiers without a category: a tier word before a generic product noun ("the basic model"), an unambiguous tier
    word, or a several-word tier, on its own."""
    mentions: list[_Mention] = []
    for i, word in enumerate(stream):
        tier = _NATURAL_TIER_OF.get(word)
        if tier is None or used[i]:
            continue
        generic = i + 1 < len(stream) and stream[i + 1] in GENERIC_PRODUCT_NOUNS
        if generic or word in NATURAL_UNAMBIGUOUS_TIER_WORDS or "_" in word:
            used[i] = True
            if generic:
                used[i + 1] = True
            mentions.append(_Mention("tier", i, i + generic, tier))
    return mentions


def _read_offers(stream: list[str], used: list[bool]) -> list[_Mention]:
    """Discounts: offer phrases first (their "price" is no question), then single cues."""
    mentions: list[_Mention] = []
    for i in range(len(stream)):
        size = 0 if used[i] else _phrase_at(stream, i, DISCOUNT_PHRASES)
        if size:
            for m in range(i, i + size):
                used[m] = True
            mentions.append(_Mention("discount", i, i + size - 1))
    for i, word in enumerate(stream):
        if used[i] or word not in DISCOUNT_CUES:
            continue
        if word == "off" and i > 0 and stream[i - 1] in OFF_NOT_DISCOUNT:
            continue
        used[i] = True
        mentions.append(_Mention("discount", i, i))
    return mentions


def _apply_negation(stream: list[str], mentions: list[_Mention]) -> None:
    """Mark negated mentions (``mentions`` in stream order): a negator cancels the first mention after it in its
    clause, and the mentions coordinated with that one ("no sale or discount")."""
    for i, word in enumerate(stream):
        if word not in NEGATORS:
            continue
        previous_end = None
        for mention in mentions:
            if mention.start <= i:
                continue
            if any(_is_break(t) for t in stream[i : mention.start]):
                break
            if previous_end is not None:
                between = stream[previous_end + 1 : mention.start]
                if not between or not all(t in _COORDINATION or t in _DETERMINERS for t in between):
                    break
            mention.negated = True
            previous_end = mention.end


def _sentence_questions(
    stream: list[str], used: list[bool], mentions: list[_Mention], start: int, end: int
) -> tuple[bool, bool]:
    """Whether ``stream[start:end]`` (one sentence) asks the need and whether it asks the budget."""
    is_question = end < len(stream) and stream[end] == "?"
    inside = [m for m in mentions if start <= m.start < end and not m.negated]
    if not is_question and any(m.kind in ("discount", "product") for m in inside):
        # "I could knock a bit off the price", "given your budget, the basic phone is best": a statement that
        # offers or recommends is not asking, whatever budget or need word it uses.
        return False, False
    words = [stream[i] if not used[i] else "" for i in range(start, end)]
    need = budget = False
    i = 0
    while i < len(words):
        if size := _phrase_at(words, i, NOT_A_QUESTION_PHRASES):
            i += size
            continue
        if size := _phrase_at(words, i, BUDGET_PHRASES):
            weak = words[i : i + size] in (["too", "much"], ["price", "range"], ["price", "point"])
            budget = budget or not weak or is_question or (i > 0 and words[i - 1] == "your")
            i += size
            continue
        if size := _phrase_at(words, i, NEED_PHRASES):
            need = True
            i += size
            continue
        word = words[i]
        if word in NEED_CUES:
            need = True
        elif word in STRONG_BUDGET_CUES:
            budget = True
        elif word in WEAK_BUDGET_CUES and (is_question or (i > 0 and words[i - 1] == "your")):
            budget = True
        i += 1
    # A question offering a choice asks what the choice is about: "would you prefer a phone or a tablet?" the
    # need, "are you thinking affordable or high-end?" the budget (tier words of any kind count here).
    if is_question and "or" in stream[start:end] and not any(m.kind in ("product", "discount") for m in inside):
        categories = {m.value for m in inside if m.kind == "category"}
        tier_words = [w for w in stream[start:end] if w in _NATURAL_TIER_OF]
        need = need or (len(categories) > 1 and not tier_words)
        budget = budget or (len(tier_words) > 1 and not categories)
    return need, budget
