"""Reply kinds (benchmarks/_reply_kinds.py) read at the state each reply answers, and the two scripts built on them
run end to end on a finished smoke run with JSON lines that add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import SMOKE, run_cli

from iterppo_lightning.data.conversation import Conversation, Turn

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from _reply_kinds import KINDS, reply_kind  # noqa: E402


def conversation(*exchanges: tuple[str, str]) -> Conversation:
    """(customer message, agent reply) pairs, then the customer leaving."""
    turns = [Turn(customer=c, suggestion=a, sent=a, business_action="accept") for c, a in exchanges]
    return Conversation("c", [*turns, Turn(customer="i have to go . bye .")])


@pytest.mark.parametrize(
    ("exchanges", "kinds"),
    [
        # Asking the need twice: the second time the customer has said it.
        (
            [
                ("hello , can you help me ?", "what are you looking for ?"),
                ("i want a good tablet .", "what are you looking for ?"),
            ],
            ["ask_need", "ask_again"],
        ),
        # Another category than the one asked for, then the right one with need and budget known, with a discount.
        (
            [
                ("i am after a phone .", "how about the premium laptop ?"),
                ("i do not need a laptop .", "what is your budget ?"),
                ("something basic please .", "how about the basic phone ? i can give you 10 % off ."),
            ],
            ["wrong_category", "ask_budget", "recommend_full_disc"],
        ),
        # A recommendation before anything is known is a guess; small talk is other.
        (
            [
                ("hi there , i could use some advice .", "how about the standard tablet ?"),
                ("ok .", "it is a nice day today ."),
            ],
            ["recommend_guess", "other"],
        ),
    ],
)
def test_reply_kinds_read_what_the_customer_had_said(exchanges, kinds) -> None:
    c = conversation(*exchanges)
    assert [reply_kind(c, t) for t in c.agent_turns] == kinds
    assert set(kinds) <= set(KINDS)


def run_script(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_scripts_on_a_finished_run(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    iterations = run_script("reply_kinds_by_iteration.py", "--run_dir", str(run_dir))["iterations"]
    assert [row["iteration"] for row in iterations] == [0, 1]  # configs/smoke.yaml: 2 iterations
    for row in iterations:
        assert row["conversations"] > 0 and sum(row["shares"].values()) == pytest.approx(1.0)
    fit = run_script("critic_fit_by_reply.py", "--run_dir", str(run_dir), "--iteration", "1")
    assert sum(cell["n"] for cell in fit["kinds"].values()) == fit["turns"] > 0
    for cell in fit["kinds"].values():
        assert 0.0 <= cell["mean_q"] <= 1.0 and 0.0 <= cell["mean_return"] <= 1.0
    # Q_0 on the next policy's batch: the turns are iteration 1's, the critic iteration 0's.
    ahead = run_script("critic_fit_by_reply.py", "--run_dir", str(run_dir), "--iteration", "0", "--on_iteration", "1")
    assert (ahead["iteration"], ahead["on_iteration"], ahead["turns"]) == (0, 1, fit["turns"])
    assert {k: c["mean_return"] for k, c in ahead["kinds"].items()} == {
        k: c["mean_return"] for k, c in fit["kinds"].items()
    }
