"""`iterppo validate-data`: check conversation logs before training on them, and summarise them.

    iterppo validate-data logs.jsonl
    iterppo validate-data logs.parquet --known_policy_ids pi_0 pi_1 --json
    iterppo validate-data logs/week_2.jsonl --run_dir runs/shop   # + the checks `fit` makes for the run's next batch
    python -m iterppo_lightning.commands.validate_data runs/x/iteration_0/buffer

Exit codes: 0 the logs are valid, 1 they are not (every kept problem is
printed to stderr), 2 bad arguments. It only reads: nothing is ever written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from jsonargparse import ArgumentParser

from iterppo_lightning.data.log_io import LogReport, LogValidationError, summarize_logs, validate_logs
from iterppo_lightning.data.log_schema import LogProblem

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


def _check_as_next_batch(path: str, run_dir: str) -> list[str]:
    """The lineage checks `fit --data.logs` makes for the run's next iteration; returns its warnings."""
    from pathlib import Path

    from iterppo_lightning.loop.collection import read_log_batch
    from iterppo_lightning.loop.run_state import load_run_state

    state = load_run_state(Path(run_dir))
    k = state.in_progress.iteration if state.in_progress is not None else state.completed_iterations
    return read_log_batch(path, state, Path(run_dir), k).warnings


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
    known = set(args.known_policy_ids) if args.known_policy_ids is not None else None
    try:
        report = validate_logs(args.path, max_problems=args.max_problems, known_policy_ids=known)
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
    warnings: list[str] = []
    if args.run_dir is not None:
        try:
            warnings = _check_as_next_batch(args.path, args.run_dir)
        except LogValidationError as err:
            if args.json:
                print(_problems_json(err.path, report.format, err.problems, err.total))
            _print_problems(err.path, err.problems, err.total)
            return 1
        except RuntimeError as err:  # no run there
            print(f"iterppo validate-data: error: {err}", file=sys.stderr)
            return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    summary = summarize_logs(report.conversations)
    if args.json:
        print(json.dumps({"ok": True, "path": report.path, "format": report.format, **summary}, ensure_ascii=False))
    else:
        print(format_summary(report, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
