"""SIGTERM and SIGINT stop a real `iterppo` subprocess with one line and exit 143 / 130; a bare --resume finishes.

A failpoint with a signal (`ITERPPO_FAILPOINT=critic.step@2:SIGTERM`, utils/failpoints.py) makes the process
signal itself at an exact place, as `kill` or Ctrl-C would there. One run folder is interrupted six times in a
row, each time in another phase and each time continued with the resume command the previous process printed,
so the chain costs about one run more than the uninterrupted reference it must then equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from cli_helpers import ENV, REPO, SMOKE, command, run_cli

from iterppo_lightning.commands.lightning_cli import resume_command
from iterppo_lightning.utils.atomic_io import is_temp_name

pytestmark = pytest.mark.slow


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The same metrics (wall times aside) and final weights as the reference, finished, no temporary left."""

    def metrics(run: Path) -> list[dict]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    def weights(run: Path) -> str:
        return hashlib.sha256((run / "final_policy" / "model.safetensors").read_bytes()).hexdigest()

    assert metrics(run_dir) == metrics(reference)
    assert weights(run_dir) == weights(reference)
    assert [p for p in run_dir.rglob("*") if is_temp_name(p.name)] == []
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["finished"] and state["in_progress"] is None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), cold=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def interrupt_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# (failpoint:signal, exit code, the phase the line must name). Each process counts failpoint hits from 1.
CHAIN = [
    ("sft.step@2:SIGTERM", 143, "in the bootstrap phase (making pi_0, before iteration 0)"),
    ("collect.before_save@1:SIGINT", 130, "in the collection phase of iteration 0"),
    ("critic.step@2:SIGTERM", 143, "in the critic phase of iteration 0"),
    ("policy.step@2:SIGINT", 130, "in the policy phase of iteration 0"),
    ("critic.step@1:SIGINT", 130, "in the critic phase of iteration 1"),
    ("policy.step@2:SIGTERM", 143, "in the policy phase of iteration 1"),
]


def test_interrupts_in_every_phase_then_the_printed_resume_command_gives_the_uninterrupted_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    first = ["fit", "--config", str(SMOKE), "--run_dir", str(run_dir)]
    args = first
    for point, code, where in CHAIN:
        proc = run_cli(*args, env={"ITERPPO_FAILPOINT": point})
        assert proc.returncode == code, f"{point}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        line = interrupt_line(proc.stderr)
        name = point.rpartition(":")[2]
        assert line.startswith(f"iterppo: interrupted ({name}) {where};"), line
        printed = line.partition("Resume with: ")[2]
        assert printed == shlex.join(["iterppo", *first, "--resume"])  # the same command with a bare --resume
        args = shlex.split(printed)[1:]
    finished = run_cli(*args)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_run(run_dir, reference)


def test_an_interrupted_bootstrap_leaves_no_output_and_says_how_to_rerun(tmp_path):
    output = tmp_path / "pi0"
    args = ["bootstrap", "--config", str(SMOKE), "--output", str(output)]
    proc = run_cli(*args, env={"ITERPPO_FAILPOINT": "sft.step@2:SIGINT"})
    assert proc.returncode == 130, proc.stderr[-3000:]
    line = interrupt_line(proc.stderr)
    assert "interrupted (SIGINT) in `iterppo bootstrap`" in line and line.endswith(shlex.join(["iterppo", *args]))
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_sigterm_stops_every_rank_of_a_two_process_run(tmp_path):
    """Both ranks get SIGTERM (as SLURM sends it to every task): one line, exit 143, no process left behind."""
    run_dir = tmp_path / "run"
    two = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(
        [*command(), "fit", "--config", str(SMOKE), "--run_dir", str(run_dir), *two],
        cwd=REPO,
        env={**ENV, "ITERPPO_FAILPOINT": "sft.step@2:SIGTERM"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "in the bootstrap phase" in interrupt_line(proc.stderr)
    leftover = subprocess.run(["pgrep", "-f", f"--run_dir {run_dir}"], capture_output=True, text=True)
    assert leftover.stdout == ""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_sweep_stops_with_one_line(tmp_path, monkeypatch, capsys, signum, code):
    from iterppo_lightning.experiments import sweep

    def interrupted_run(*_args, **_kwargs):
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(sweep, "execute", interrupted_run)
    experiments = [str(REPO / "configs" / "smoke.yaml")]
    # Whatever the handlers were (a background job starts with SIGINT ignored), the sweep puts them back.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert sweep.main(["--experiments", *experiments, "--seeds", "0", "--out", str(tmp_path / "sweep")]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"iterppo sweep: interrupted ({signum.name})"), err
    assert "iterppo sweep --experiments" in err[0]
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_resume_command_drops_any_resume_value_and_names_the_run_dir():
    assert resume_command(["fit", "--config", "c.yaml", "--resume", "false"], "runs/r") == (
        "iterppo fit --config c.yaml --run_dir runs/r --resume"
    )
    assert resume_command(["fit", "--resume=true", "--run_dir", "my run"], "my run") == (
        "iterppo fit --run_dir 'my run' --resume"
    )
    assert resume_command(["fit", "--resume", "--config", "c.yaml"], "r") == (
        "iterppo fit --config c.yaml --run_dir r --resume"
    )
