"""Agreement of the simulator's reading of a message with hand-written labels, on a corpus of natural replies.

Each line of the corpus (default `tests/env/natural_replies.jsonl`) is one realistic assistant message and what
it means: the products it recommends, the categories and tiers it names (by default those of its products),
whether it asks the need, asks the budget, offers a discount. A message agrees when every field of
`parse_reply` matches its label. The table gives the rate per split (`first`: the messages written together
with the natural grammar; `second`: written after it, measured once as they were, then used to fix what they
showed, see docs/architecture.md) and, for comparison, the rate of the word grammar alone (`parse_word_format`,
what reads the word-level model's lower-case format). The last line is one JSON object (`agreement`, `agreed`,
`cases`, `by_split`, `word_grammar_agreement`, `misses`).

    python benchmarks/reply_agreement.py [--corpus PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from iterppo_lightning.env.reply_parser import ParsedReply, parse_reply, parse_word_format

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "tests" / "env" / "natural_replies.jsonl"
FIELDS = ("products", "categories", "tiers", "asks_need", "asks_budget", "offers_discount")


def load_corpus(path: Path) -> list[dict]:
    """The labelled messages; a line that is not a JSON object with `text` stops with its line number."""
    rows = []
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{path}:{number}: not JSON ({error.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            problems.append(f"{path}:{number}: needs a string field 'text'")
            continue
        rows.append(row)
    if problems:
        raise ValueError("\n".join(problems))
    return rows


def expected_reading(row: dict) -> dict:
    """The label of a corpus row in the form `reading` gives; categories and tiers default to the products'."""
    products = {tuple(p) for p in row.get("products", [])}
    return {
        "products": products,
        "categories": set(row.get("categories", {c for _, c in products})),
        "tiers": set(row.get("tiers", {t for t, _ in products})),
        "asks_need": bool(row.get("asks_need", False)),
        "asks_budget": bool(row.get("asks_budget", False)),
        "offers_discount": bool(row.get("offers_discount", False)),
    }


def reading(parsed: ParsedReply) -> dict:
    """The fields of a parse the labels describe (products as a set: repeating one is still one)."""
    return {
        "products": parsed.distinct_products,
        "categories": parsed.categories,
        "tiers": parsed.tiers,
        "asks_need": parsed.asks_need,
        "asks_budget": parsed.asks_budget,
        "offers_discount": parsed.offers_discount,
    }


def disagreements(row: dict, parse: Callable[[str], ParsedReply] = parse_reply) -> dict[str, tuple]:
    """Field -> (expected, got) for every field where `parse` reads `row['text']` differently from its label."""
    expected, got = expected_reading(row), reading(parse(row["text"]))
    return {name: (expected[name], got[name]) for name in FIELDS if expected[name] != got[name]}


def score(rows: list[dict], parse: Callable[[str], ParsedReply] = parse_reply) -> dict:
    """Agreement overall and per split, and the messages that disagree with their fields."""
    misses = [{"text": row["text"], "fields": sorted(d)} for row in rows if (d := disagreements(row, parse))]
    missed = {m["text"] for m in misses}
    by_split: dict[str, dict[str, float | int]] = {}
    for row in rows:
        split = by_split.setdefault(row.get("split", "first"), {"cases": 0, "agreed": 0})
        split["cases"] += 1
        split["agreed"] += row["text"] not in missed
    for split in by_split.values():
        split["agreement"] = split["agreed"] / split["cases"]
    agreed = len(rows) - len(misses)
    return {
        "agreement": agreed / len(rows),
        "agreed": agreed,
        "cases": len(rows),
        "by_split": by_split,
        "misses": misses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args(argv)
    try:
        rows = load_corpus(args.corpus)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.corpus} holds no messages", file=sys.stderr)
        return 2
    result = score(rows)
    word_grammar = score(rows, parse_word_format)
    for miss in result["misses"]:
        print(f"MISS {miss['text']!r}: {', '.join(miss['fields'])}")
    print(f"{'split':<10}{'cases':>7}{'agreed':>8}{'rate':>8}")
    for name, split in sorted(result["by_split"].items()):
        print(f"{name:<10}{split['cases']:>7}{split['agreed']:>8}{split['agreement']:>8.1%}")
    print(f"{'all':<10}{result['cases']:>7}{result['agreed']:>8}{result['agreement']:>8.1%}")
    print(f"{'word only':<10}{word_grammar['cases']:>7}{word_grammar['agreed']:>8}{word_grammar['agreement']:>8.1%}")
    print(json.dumps({**result, "word_grammar_agreement": word_grammar["agreement"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
