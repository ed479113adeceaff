"""The customer understands natural assistant text: a hand-labelled corpus, the tricky cases, and the customer's
reactions to natural messages (the ones that should sell do, gamed ones still do not)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from iterppo_lightning.env.reply_parser import is_word_format, parse_natural, parse_reply
from iterppo_lightning.env.sales_simulator import (
    DISCOUNT_NOTED,
    REPEATED,
    TOO_EXPENSIVE,
    TOO_LONG,
    TOO_MANY_OPTIONS,
    SalesEpisode,
    SalesSimulator,
    SimulatorConfig,
)
from iterppo_lightning.env.scripted_agents import revealed_info

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "benchmarks" / "reply_agreement.py"
_spec = importlib.util.spec_from_file_location("reply_agreement", BENCHMARK)
agreement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agreement)
CORPUS = agreement.load_corpus(agreement.DEFAULT_CORPUS)


def test_corpus_is_large_and_covers_every_intent() -> None:
    assert len(CORPUS) >= 60
    labels = [agreement.expected_reading(row) for row in CORPUS]
    assert sum(label["asks_need"] for label in labels) >= 10
    assert sum(label["asks_budget"] for label in labels) >= 10
    assert sum(label["offers_discount"] for label in labels) >= 10
    assert sum(bool(label["products"]) for label in labels) >= 20
    assert sum(not any(label.values()) for label in labels) >= 10  # small talk
    # Natural text, not the word format: only the keyword salad is written in it.
    assert sum(is_word_format(row["text"]) for row in CORPUS) <= 1


@pytest.mark.parametrize("row", CORPUS, ids=[row["text"][:40] for row in CORPUS])
def test_corpus_message_reads_as_labelled(row: dict) -> None:
    assert agreement.disagreements(row) == {}


def test_agreement_script_prints_the_rate() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == len(CORPUS)
    assert result["agreement"] >= 0.95
    # The word grammar alone does not understand natural text: that is what the natural grammar is for.
    assert result["word_grammar_agreement"] < 0.8
    assert "all" in proc.stdout and "word only" in proc.stdout


def test_agreement_script_names_a_bad_corpus_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hi"}\nnot json\n{"no_text": 1}\n', encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--corpus", str(corpus)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert f"{corpus}:2: not JSON" in proc.stderr and f"{corpus}:3: needs a string field 'text'" in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------
# Critical cases, spelt out
# ---------------------------------------------------------------------------


def test_negation_cancels_what_it_negates() -> None:
    assert not parse_reply("We don't have a discount today, sorry.").offers_discount
    assert not parse_reply("We don\u2019t have a discount today.").offers_discount  # curly apostrophe
    p = parse_reply("Not the laptop, but the premium tablet.")
    assert p.product == ("premium", "tablet") and p.categories == {"tablet"}
    p = parse_reply("I wouldn't recommend the basic phone; go for the premium phone.")
    assert p.products == [("premium", "phone")] and p.tiers == {"premium"}
    p = parse_reply("The standard laptop doesn't come with a discount.")
    assert p.product == ("standard", "laptop") and not p.offers_discount
    assert parse_reply("No pressure, take your time.") == parse_natural("No pressure, take your time.")


def test_budget_as_a_tier_and_as_a_question() -> None:
    p = parse_reply("Our budget phone is a great value.")
    assert p.product == ("basic", "phone") and not p.asks_budget
    p = parse_reply("Do you have a budget in mind?")
    assert p.asks_budget and not p.tiers and not p.asks_need
    p = parse_reply("Given your budget, the entry level phone makes the most sense.")
    assert p.product == ("basic", "phone") and not p.asks_budget


def test_pro_only_counts_as_a_tier_before_a_product() -> None:
    assert not parse_reply("Let's weigh the pros and cons together.").tiers
    assert not parse_reply("Here's a pro tip: charge it overnight.").tiers
    assert parse_reply("Our Pro headphones are worth it.").product == ("premium", "headphones")


def test_numbers_are_offers_or_questions_only_in_context() -> None:
    assert parse_reply("Our basic phone is $50 off today!").offers_discount
    assert parse_reply("I can take 10% off.").offers_discount
    assert parse_reply("I can give you 15 percent off.").offers_discount
    p = parse_reply("It's $499, and it's our best-selling tablet.")
    assert not (p.offers_discount or p.asks_budget) and p.categories == {"tablet"}
    assert parse_reply("Is $500 too much for you?").asks_budget


def test_hyphenated_tiers_contractions_and_emoji() -> None:
    assert parse_reply("Our mid-range phone would suit you.").product == ("standard", "phone")
    assert parse_reply("The top-of-the-line headphones are amazing.").product == ("premium", "headphones")
    assert parse_reply("How about an entry-level notebook?").product == ("basic", "laptop")
    assert parse_reply("I\u2019d suggest the standard laptop \u2013 it\u2019s great.").product == ("standard", "laptop")
    p = parse_reply("Hey there 👋 what can I help you find?")
    assert p.asks_need and p.n_words == 8  # the emoji is not a word
    assert parse_reply("What's your price range?").asks_budget
    # A contraction is one written word, as a reader counts it.
    assert parse_reply("I'd recommend it").n_words == 3


# ---------------------------------------------------------------------------
# The customer's reactions to natural text
# ---------------------------------------------------------------------------

NATURAL_TIER = {"basic": "Basic", "standard": "Mid-Range", "premium": "Top-of-the-Line"}
NATURAL_CATEGORY = {"laptop": "Notebook", "phone": "Smartphone", "tablet": "Tablet", "headphones": "Headphones"}


def agent_episode(seed: int) -> SalesEpisode:
    return SalesSimulator(SimulatorConfig(mode="agent")).new_episode(seed, f"n{seed}")


def natural_recommendation(tier: str, category: str, discount: bool = True) -> str:
    text = f"I'd recommend our {NATURAL_TIER[tier]} {NATURAL_CATEGORY[category]}!"
    return f"{text} And I can take 10% off today." if discount else text


def test_natural_optimal_dialogue_sells() -> None:
    """Asking need and budget in natural words, then recommending the product the customer revealed, sells."""
    for seed in range(200):
        episode = agent_episode(seed)
        episode.step("Hi! What are you looking for today?")
        episode.step("Great. What's your price range?")
        info = revealed_info(episode.conversation)
        assert (info.need, info.budget) == (episode.persona.need, episode.persona.budget)
        episode.step(natural_recommendation(info.budget, info.need))
        assert episode.done and episode.conversation.success, episode.conversation.turns[-1].customer


def _other(options, taken):
    return next(o for o in options if o != taken)


@pytest.mark.parametrize(
    ("make_message", "reply"),
    [
        # Every product at once, in natural words and under the word limit.
        (lambda p: "Basic Laptop, Mid-Range Phone, Premium Tablet or Pro Headphones, 10% off!", TOO_MANY_OPTIONS),
        # The fitting product and a second tier of it.
        (
            lambda p: f"The {p.budget} or the {_other(('basic', 'standard', 'premium'), p.budget)} {p.need}? 10% off.",
            TOO_MANY_OPTIONS,
        ),
        # The fitting product next to another category.
        (
            lambda p: f"{natural_recommendation(p.budget, p.need)} Or a {_other(('laptop', 'phone'), p.need)}?",
            TOO_MANY_OPTIONS,
        ),
        # The fitting product, negated.
        (lambda p: f"I wouldn't recommend the {p.budget} {p.need}, but there's 10% off.", DISCOUNT_NOTED),
        # The fitting product padded past the word limit.
        (lambda p: natural_recommendation(p.budget, p.need) + " Honestly," + " really" * 24 + " great.", TOO_LONG),
    ],
)
def test_gamed_natural_replies_never_buy(make_message, reply: str) -> None:
    for seed in range(40):
        episode = agent_episode(seed)
        episode.step(make_message(episode.persona))
        assert not episode.conversation.success
        assert episode.conversation.turns[-1].customer.startswith(reply), episode.conversation.turns[-1].customer


def test_negated_discount_does_not_satisfy_a_price_sensitive_customer() -> None:
    seed = next(s for s in range(1000) if agent_episode(s).persona.price_sensitive and agent_episode(s).patience >= 4)
    episode = agent_episode(seed)
    persona = episode.persona
    episode.step("Sorry, we don't have any discounts or deals this week.")
    episode.step(natural_recommendation(persona.budget, persona.need, discount=False))
    assert episode.conversation.turns[-1].customer == TOO_EXPENSIVE and not episode.done


def test_repeating_a_natural_message_in_other_case_and_spacing_is_repetition() -> None:
    episode = agent_episode(3)
    episode.step("What are you looking for?")
    episode.step("  what are you LOOKING for ?")
    assert episode.conversation.turns[-1].customer == REPEATED


def test_any_text_parses_without_error() -> None:
    """Random text over the grammar's own words, punctuation, dashes, quotes and emoji: every message parses, with
    the invariants the customer relies on (a named product is never a need question; counts add up)."""
    pieces = (
        "not no or and the a our premium basic standard top of line mid range laptop phone tablet headphones off "
        "% $ 500 budget price how much what looking for need discount sale promo high end entry level one model "
        "I'd don't can't isn't Let's , . ? ! ; : - \u2013 \u2019 \u201c better price special offer your needs 👋"
    ).split()
    rng = random.Random(0)
    for _ in range(3000):
        text = " ".join(rng.choices(pieces, k=rng.randint(0, 20)))
        text = text.replace(" - ", "-") if rng.random() < 0.5 else text
        parsed = parse_natural(text)
        assert not (parsed.asks_need and parsed.products), text
        assert parsed.empty == (parsed.n_words == 0), text
        assert {c for _, c in parsed.products} <= parsed.categories, text
        assert {t for t, _ in parsed.products} <= parsed.tiers, text
    assert parse_reply("I can give you a better price").offers_discount  # a phrase ending the message
