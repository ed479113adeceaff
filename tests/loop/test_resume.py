"""Kill a real `iterppo fit` with SIGKILL at named points, resume it, and get the uninterrupted run back.

Each case sets ITERPPO_FAILPOINT (failpoints.py) so the subprocess kills itself at
an exact place: mid bootstrap, mid collection, between a buffer's write and its
rename, mid critic fit, between critic.pt's write and rename, mid PPO, between
the policy folder's write and rename, and between run_state.json's write and
rename. `fit --resume` must then finish with metrics equal to the uninterrupted
run (exactly: every step reseeds from (seed, iteration, step), so only wall
times differ), the same conversations in every buffer (none lost, none twice),
the same final weights, and no temporary file left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import signal
from pathlib import Path

import pytest
from cli_helpers import SMOKE, run_cli, run_inprocess

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.utils.atomic_io import is_temp_name

ITERATIONS = 2


def metrics_without_times(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    return records


def buffers(run_dir: Path) -> list[list[dict]]:
    return [[c.to_dict() for c in load_buffer(run_dir / f"iteration_{k}" / "buffer")] for k in range(ITERATIONS)]


def weights_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "final_policy" / "model.safetensors").read_bytes()).hexdigest()


def temporaries(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if is_temp_name(p.name)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    # A fresh interpreter (its own hash seed), unlike the forked runs it is compared with: see cli_forkserver.py.
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), cold=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert metrics_without_times(run_dir) == metrics_without_times(reference)
    assert buffers(run_dir) == buffers(reference)
    assert weights_digest(run_dir) == weights_digest(reference)
    assert temporaries(run_dir) == []
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["completed_iterations"] == ITERATIONS and state["in_progress"] is None and state["finished"]


# (failpoint, what was interrupted). @N = the N-th time the point is reached in the process.
KILL_POINTS = [
    ("run_state.before_rename@1", "the run's very first commit"),
    ("sft.step@5", "behaviour cloning of pi_0"),
    ("collect.before_save@2", "collection of iteration 1, before its buffer is written"),
    ("buffer.before_rename@1", "buffer write of iteration 0 (written, not yet renamed)"),
    ("critic.step@3", "critic fit of iteration 0"),
    ("critic_save.before_rename@2", "critic checkpoint write of iteration 1"),
    ("policy.step@3", "PPO of iteration 1"),
    ("policy_save.before_rename@2", "policy export of iteration 1"),
    ("run_state.before_rename@5", "a commit of run_state.json"),
]


@pytest.mark.parametrize("point, where", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, reference, point, where):
    run_dir = tmp_path / "run"
    killed = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), env={"ITERPPO_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL, (
        f"not killed at {point} ({where}): rc {killed.returncode}\n{killed.stderr[-2000:]}"
    )
    state_file = run_dir / "run_state.json"
    if state_file.exists():  # absent only when killed in the very first commit
        state = json.loads(state_file.read_text())
        assert state["completed_iterations"] < ITERATIONS or not state["finished"]

    resumed = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, reference)


def test_an_interrupted_run_is_not_restarted_by_accident(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), env={"ITERPPO_FAILPOINT": "critic.step@2"})
    again = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir))
    assert again.returncode == 2
    assert "--resume" in again.stderr


def test_resume_refuses_a_changed_config_and_names_the_key(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), env={"ITERPPO_FAILPOINT": "critic.step@2"})
    before = (run_dir / "run_state.json").read_text()
    changed = run_cli(
        "fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true", "--model.policy.lr", "0.5"
    )
    assert changed.returncode == 2
    assert "model.policy.init_args.lr" in changed.stderr and "--allow_config_change" in changed.stderr
    assert (run_dir / "run_state.json").read_text() == before


def test_resume_of_a_finished_run_changes_nothing(reference, capsys):
    before = (reference / "metrics.jsonl").read_text()
    done = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(reference), "--resume", "true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing to resume" in done.stdout + done.stderr
    assert (reference / "metrics.jsonl").read_text() == before


def test_resume_on_an_empty_run_dir_starts_the_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(run_dir, reference)


# -- numerical faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point, phase, iteration",
    [
        ("critic.loss@2", "critic phase", "iteration 0"),
        ("policy.loss@10", "policy phase", "iteration 1"),
        ("sft.loss@3", "bootstrap phase", "before iteration 0"),
    ],
)
def test_a_nan_loss_stops_the_phase_names_it_and_keeps_the_last_good_state(
    tmp_path, reference, point, phase, iteration
):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), env={"ITERPPO_INJECT_NAN": point})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert phase in proc.stderr and iteration in proc.stderr and "step" in proc.stderr
    state = json.loads((run_dir / "run_state.json").read_text())
    if iteration == "iteration 1":
        # pi_1 was committed before the fault; it is still the newest exported policy.
        assert state["completed_iterations"] == 1
        assert (run_dir / "final_policy").resolve() == (run_dir / "iteration_0" / "policy").resolve()
    else:
        assert state["completed_iterations"] == 0
    # Once the cause is gone, the run resumes from the last good state to the same result.
    resumed = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(run_dir, reference)


# -- a full disk ----------------------------------------------------------------------------------------


def test_a_full_disk_gives_a_clear_error_and_leaves_the_last_state_intact(tmp_path, reference, capsys, monkeypatch):
    import torch

    import iterppo_lightning.loop.run_dir as run_dir_module  # it writes critic.pt and the optimizer state

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith(".tmp.pt") and "iteration_1" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(run_dir_module.torch, "save", full_disk)
    run_dir = tmp_path / "run"
    proc = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--run_dir", str(run_dir))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and "--resume" in proc.stderr
    state = json.loads((run_dir / "run_state.json").read_text())
    assert (
        state["completed_iterations"] == 1
        and state["in_progress"]["collected"]
        and not state["in_progress"]["critic_fitted"]
    )
    assert not (run_dir / "iteration_1" / "critic.pt").exists()
    assert temporaries(run_dir) == []
    monkeypatch.undo()
    resumed = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(run_dir, reference)


def test_a_finished_run_is_extended_by_raising_iterations(tmp_path, reference):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, symlinks=True)
    proc = run_cli(
        "fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true", "--model.loop.iterations", "3"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = metrics_without_times(run_dir)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert records[:2] == metrics_without_times(reference)
