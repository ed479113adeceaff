"""`iterppo validate-data`: check conversation logs before training on them, and summarise them.

    iterppo validate-data logs.jsonl
    iterppo validate-data logs.parquet --known_policy_ids pi_0 pi_1 --json
    iterppo validate-data logs/week_2.jsonl --run_dir runs/shop   # + the checks `fit` makes for the run's next batch
    iterppo validate-data logs.jsonl.gz --tokenizer runs/shop/final_policy   # + how much text the tokenizer keeps
    python -m iterppo_lightning.commands.validate_data runs/x/iteration_0/buffer

Exit codes: 0 the logs are valid, 1 they are not (every kept problem is
printed to stderr), 2 bad arguments. Warnings about valid logs (extra fields
kept in metadata, no successes, text the tokenizer cannot represent) go to
stderr and do not change the exit code. It only reads: nothing is ever written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from jsonargparse import ArgumentParser

from iterppo_lightning.data.log_io import LogReport, LogValidationError, summarize_logs, validate_logs
from iterppo_lightning.data.log_schema import DEFAULT_MAX_MESSAGE_CHARS, LogProblem, check_max_message_chars

__all__ = ["main", "build_parser", "format_summary"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="iterppo validate-data",
        description=(
            "Check conversation logs (JSONL, Parquet, or a datasets save_to_disk folder) against "
            "the schema in docs/data.md and print a summary. Writes nothing."
        ),
        default_env=False,
    )
    parser.add_argument("path", type=str, help="a .jsonl/.json file, a .parquet file, or a saved dataset folder")
    parser.add_argument("--max_problems", type=int, default=20, help="how many problems to print (all are counted)")
    parser.add_argument(
        "--known_policy_ids",
        type=str,
        nargs="+",
        default=None,
        help="policy ids the logs may name (e.g. pi_0 pi_1); any other id is a problem",
    )
    parser.add_argument(
        "--run_dir",
        type=str,
        default=None,
        help="also check the logs as the next batch of this run, as `fit --data.logs` would "
        "(file or conversations already trained on, unknown policy ids, logs from another policy)",
    )
    parser.add_argument(
        "--max_message_chars",
        type=int | None,
        default=None,
        help=f"the longest message allowed, in characters, as fit's data.max_message_chars (default: the run's "
        f"setting with --run_dir, else {DEFAULT_MAX_MESSAGE_CHARS})",
    )
    parser.add_argument(
        "--tokenizer",
        type=str,
        default=None,
        help="a policy (or tokenizer) folder: warn when much of the text is its unknown token "
        "(default with --run_dir: the policy the run trains next)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def format_summary(report: LogReport, summary: dict) -> str:
    """The human-readable summary of valid logs: enough to spot an export that is off."""
    s = summary
    policies = ", ".join(f"{pid} ({n})" for pid, n in s["policy_ids"].items())
    span = f"{s['first_timestamp']} .. {s['last_timestamp']}" if s["first_timestamp"] is not None else "no timestamps"
    successes = round(s["outcome_rate"] * s["conversations"])
    lines = [
        f"valid conversation logs: {report.path} ({report.format})",
        f"  conversations      {s['conversations']}",
        f"  turns              {s['turns']}",
        f"  agent turns        {s['agent_turns']} ({s['mean_agent_turns']:.2f} per conversation)",
        f"  outcome rate       {_pct(s['outcome_rate'])} ({successes} of {s['conversations']} end with outcome 1)",
        f"  business actions   accept {_pct(s['accept_rate'])}, edit {_pct(s['edit_rate'])}, "
        f"reject {_pct(s['reject_rate'])}",
        f"  agent abstained    {_pct(s['abstain_rate'])} of agent turns",
        f"  policy ids         {policies}",
        f"  time span          {span}",
    ]
    return "\n".join(lines)


def _print_problems(path: str, problems: list[LogProblem], total: int) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)
    if total > len(problems):
        print(f"... and {total - len(problems)} more (raise --max_problems to see them)", file=sys.stderr)
    print(f"{total} problem(s) in {path}; nothing was written", file=sys.stderr)


def _problems_json(path: str, fmt: str | None, problems: list[LogProblem], total: int) -> str:
    return json.dumps(
        {"ok": False, "path": path, "format": fmt, "total_problems": total, "problems": [asdict(p) for p in problems]},
        ensure_ascii=False,
    )


class _RunSettings:
    """What `fit --data.logs` would use from a run folder: its next iteration, message limit and policy."""

    def __init__(self, run_dir: str):
        import yaml

        from iterppo_lightning.loop.run_state import load_run_state

        self.path = Path(run_dir)
        self.state = load_run_state(self.path)
        progress = self.state.in_progress
        self.iteration = progress.iteration if progress is not None else self.state.completed_iterations
        config_file = self.path / "config.yaml"
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
        config = config if isinstance(config, dict) else {}
        data, model = config.get("data") or {}, config.get("model") or {}
        self.max_message_chars = data.get("max_message_chars", DEFAULT_MAX_MESSAGE_CHARS)
        k, policy_init = self.iteration, model.get("policy_init")
        if k > 0:
            self.policy = self.path / f"iteration_{k - 1}" / "policy"
        else:
            self.policy = Path(policy_init) if policy_init else self.path / "pi_0" / "policy"


def _check_as_next_batch(path: str, run: _RunSettings, max_message_chars: int | None) -> list[str]:
    """The lineage checks `fit --data.logs` makes for the run's next iteration; returns its warnings."""
    from iterppo_lightning.loop.collection import read_log_batch

    batch = read_log_batch(path, run.state, run.path, run.iteration, max_message_chars=max_message_chars)
    return batch.warnings


def _vocabulary_warning(report: LogReport, tokenizer_dir: str) -> str | None:
    from transformers import AutoTokenizer

    from iterppo_lightning.data.vocabulary import unknown_token_warning

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return unknown_token_warning(report.conversations, tokenizer, report.path)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 valid, 1 invalid, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on bad arguments (2)
        return int(exit_.code or 0)
    if args.max_problems < 0:
        print(f"iterppo validate-data: error: --max_problems must be >= 0, got {args.max_problems}", file=sys.stderr)
        return 2
    try:
        check_max_message_chars(args.max_message_chars, "--max_message_chars")
        run = _RunSettings(args.run_dir) if args.run_dir is not None else None
    except (ValueError, RuntimeError) as err:  # RuntimeError: no run there
        print(f"iterppo validate-data: error: {err}", file=sys.stderr)
        return 2
    limit = args.max_message_chars
    if limit is None:
        limit = run.max_message_chars if run is not None else DEFAULT_MAX_MESSAGE_CHARS
    tokenizer = args.tokenizer or (str(run.policy) if run is not None and run.policy.is_dir() else None)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        print(f"iterppo validate-data: error: --tokenizer {tokenizer!r} is not a folder", file=sys.stderr)
        return 2
    known = set(args.known_policy_ids) if args.known_policy_ids is not None else None
    try:
        report = validate_logs(
            args.path, max_problems=args.max_problems, known_policy_ids=known, max_message_chars=limit
        )
    except LogValidationError as err:
        if args.json:
            print(_problems_json(err.path, None, err.problems, err.total))
        _print_problems(err.path, err.problems, err.total)
        return 1
    if not report.ok:
        if args.json:
            print(_problems_json(report.path, report.format, report.problems, report.total_problems))
        _print_problems(report.path, report.problems, report.total_problems)
        return 1
    warnings = list(report.warnings)
    if run is not None:
        try:
            # The same checks again with the run's lineage; its warnings include the report's.
            warnings = _check_as_next_batch(args.path, run, limit)
        except LogValidationError as err:
            if args.json:
                print(_problems_json(err.path, report.format, err.problems, err.total))
            _print_problems(err.path, err.problems, err.total)
            return 1
    if tokenizer is not None:
        unknown = _vocabulary_warning(report, tokenizer)
        warnings += [unknown] if unknown is not None else []
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    summary = summarize_logs(report.conversations)
    if args.json:
        result = {"ok": True, "path": report.path, "format": report.format, **summary, "warnings": warnings}
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(format_summary(report, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
