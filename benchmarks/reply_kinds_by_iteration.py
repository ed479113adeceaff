"""What a run's policies write, iteration by iteration: the share of each kind of reply in each collected batch.

Where PPO takes the policy shows where the critic was wrong: a kind whose share grows while success falls is one
Q_k rated above its worth. Kinds are read at the state each reply answers (`benchmarks/_reply_kinds.py`); the batch
of iteration k was collected by pi_k. Also printed per batch: conversations, agent turns per conversation, the
success rate of the batch, and the mean Monte Carlo return of the `ask_again` replies.

    python benchmarks/reply_kinds_by_iteration.py --run_dir RUN

Prints a table (one row per iteration) and, last, one JSON line (`iterations`: a list of those rows).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import yaml
from _reply_kinds import KINDS, reply_kind

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.loop.run_dir import RunFolder

SHORT = {
    "wrong_category": "wrong",
    "recommend_full_disc": "full+d",
    "recommend_full": "full",
    "recommend_guess_disc": "guess+d",
    "recommend_guess": "guess",
    "ask_again": "again",
    "ask_need": "a_need",
    "ask_budget": "a_bud",
    "other": "other",
}


def batch_row(conversations: list, iteration: int, gamma: float) -> dict:
    kinds: Counter[str] = Counter()
    again_returns: list[float] = []
    for conversation in conversations:
        for turn, g in zip(conversation.agent_turns, conversation.returns(gamma)):
            kind = reply_kind(conversation, turn)
            kinds[kind] += 1
            if kind == "ask_again":
                again_returns.append(g)
    turns = sum(kinds.values())
    return {
        "iteration": iteration,
        "conversations": len(conversations),
        "turns_per_conversation": turns / len(conversations),
        "success": sum(c.success for c in conversations) / len(conversations),
        "shares": {kind: kinds[kind] / turns for kind in KINDS},
        "ask_again_mean_return": sum(again_returns) / len(again_returns) if again_returns else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="a run on the embedded simulator")
    args = parser.parse_args()
    run = Path(args.run_dir)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    folder = RunFolder(run, (config.get("model") or {}).get("policy_init"))
    gamma = float((config.get("data") or {}).get("gamma", 0.9))
    rows, k = [], 0
    while folder.buffer_dir(k).is_dir():
        batch = [c for c in load_buffer(folder.buffer_dir(k)) if c.iteration == k]
        if batch:
            rows.append(batch_row(batch, k, gamma))
        k += 1
    if not rows:
        parser.error(f"{run} has no collected batch (no iteration_K/buffer)")
    print(f"share of each kind of reply in the batch pi_k collected, {run}")
    print(
        f"{'k':>2}{'convs':>7}{'turns':>7}{'success':>9}" + "".join(f"{SHORT[k]:>8}" for k in KINDS) + f"{'G again':>9}"
    )
    for row in rows:
        g = row["ask_again_mean_return"]
        print(
            f"{row['iteration']:>2}{row['conversations']:>7}{row['turns_per_conversation']:>7.2f}{row['success']:>9.3f}"
            + "".join(f"{row['shares'][k]:>8.3f}" for k in KINDS)
            + (f"{g:>9.3f}" if g is not None else f"{'-':>9}")
        )
    print(json.dumps({"run_dir": str(run), "iterations": rows}))


if __name__ == "__main__":
    main()
