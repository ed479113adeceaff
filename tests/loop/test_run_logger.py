"""One experiment logger per run: a global step across phases and iterations, metrics namespaced by phase, the
outer loop's numbers under loop/, and a resume that continues after the last step on disk."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from cli_helpers import SMOKE, run_cli

from iterppo_lightning.loop.run_logger import RunLogger, flatten_record, read_metrics_csv
from iterppo_lightning.loop.run_state import RunState

ITERATIONS = 2  # configs/smoke.yaml


def metrics_file(run_dir: Path) -> Path:
    return run_dir / "logs" / "csv" / "metrics.csv"


def steps_by_key(rows: list[dict]) -> dict[str, list[int]]:
    steps = defaultdict(list)
    for row in rows:
        for key in row:
            if key != "step":
                steps[key].append(row["step"])
    return steps


def assert_steps_only_go_forward(rows: list[dict]) -> None:
    """Rows in file order never go back a step, and no metric is logged twice at one step."""
    order = [row["step"] for row in rows]
    assert order == sorted(order), "a step went backwards"
    for key, steps in steps_by_key(rows).items():
        assert all(a < b for a, b in zip(steps, steps[1:])), f"{key} logged twice at one step: {steps}"


def loop_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "loop/policy" in row]


# -- the logger itself -----------------------------------------------------------------------------


def test_phase_loggers_continue_the_run_step_and_namespace_their_metrics(tmp_path):
    run = RunLogger(tmp_path, True)
    bc = run.for_phase("bootstrap")
    for step in range(3):
        bc.log_metrics({"sft/train_loss": 1.0 - step / 10, "epoch": 0}, step)
    critic = run.for_phase("critic")  # a fresh Trainer: its steps start at 0 again
    for step in range(2):
        critic.log_metrics({"critic/train_loss": 0.5}, step)
    critic.finalize("success")
    at = run.log_metrics({"loop/success_rate": 0.25, "loop/nan": float("nan")})
    run.finalize()
    rows = read_metrics_csv(metrics_file(tmp_path))
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4, 5] and at == 5
    assert rows[0] == {"step": 0, "bc/train_loss": 1.0, "bc/epoch": 0.0}
    assert rows[3] == {"step": 3, "critic/train_loss": 0.5}
    assert rows[5] == {"step": 5, "loop/success_rate": 0.25}  # NaN is left out, not written


def test_a_new_logger_on_the_same_run_continues_after_the_last_step_and_drops_a_cut_row(tmp_path):
    state = RunState(seed=0)
    first = RunLogger(tmp_path, True, state=state)
    phase = first.for_phase("critic")
    for step in range(4):
        phase.log_metrics({"critic/train_loss": 0.1 * step, "critic/val_loss": 0.5}, step)
    phase.finalize("success")
    assert state.logger_step == 4
    with metrics_file(tmp_path).open("a") as f:
        f.write("4,0.")  # a row a kill cut short (3 columns: step, critic/train_loss, critic/val_loss)
    resumed = RunLogger(tmp_path, True, state=RunState(seed=0, logger_step=2))  # the state was committed earlier
    assert resumed.next_step == 4  # after the last whole row in the file, never over it
    resumed.for_phase("critic").log_metrics({"critic/train_loss": 9.0, "critic/new_key": 1.0}, 0)
    resumed.finalize()
    rows = read_metrics_csv(metrics_file(tmp_path))
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[-1] == {"step": 4, "critic/train_loss": 9.0, "critic/new_key": 1.0}


def test_logging_off_writes_nothing(tmp_path):
    run = RunLogger(tmp_path, False)
    assert run.for_phase("critic") is False
    run.log_metrics({"loop/success_rate": 0.5})
    run.finalize()
    assert not (tmp_path / "logs").exists()


def test_flatten_record_keeps_finite_numbers_and_splits_intervals():
    record = {
        "iteration": 1,
        "policy": "pi_2",
        "success_rate": 0.5,
        "ci95": [0.25, 0.75],
        "critic": {"val_auroc": float("nan"), "val_brier": 0.2},
        "ppo": {"kl": 0.03},
        "warnings": ["text"],
        "early_stopped": True,
    }
    assert flatten_record(record) == {
        "loop/iteration": 1.0,
        "loop/success_rate": 0.5,
        "loop/ci95_low": 0.25,
        "loop/ci95_high": 0.75,
        "loop/critic/val_brier": 0.2,
        "loop/ppo/kl": 0.03,
    }


# -- a real run --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr  # DeepSpeed's guess: not our business
    return run_dir


def test_a_run_logs_every_phase_and_iteration_at_increasing_steps(logged_run):
    rows = read_metrics_csv(metrics_file(logged_run))
    assert_steps_only_go_forward(rows)
    keys = set(steps_by_key(rows))
    assert {"bc/train_loss", "critic/train_loss", "critic/val_loss", "ppo/kl", "ppo/policy_loss"} <= keys
    # Each phase of each iteration logs after the one before it: two critic fits, two PPO fits, apart.
    critic_steps, ppo_steps = steps_by_key(rows)["critic/val_loss"], steps_by_key(rows)["ppo/kl"]
    assert len(critic_steps) == ITERATIONS and critic_steps[0] < ppo_steps[0] < critic_steps[1] < ppo_steps[-1]


def test_a_run_logs_the_outer_loop_once_per_policy(logged_run):
    rows = loop_rows(read_metrics_csv(metrics_file(logged_run)))
    assert [row["loop/policy"] for row in rows] == [0.0, 1.0, 2.0]  # pi_0, then what iterations 0 and 1 made
    records = [yaml.safe_load(line) for line in (logged_run / "metrics.jsonl").read_text().splitlines()]
    for row, record in zip(rows[1:], records):
        assert row["loop/iteration"] == record["iteration"]
        assert row["loop/success_rate"] == pytest.approx(record["success_rate"])
        assert [row["loop/ci95_low"], row["loop/ci95_high"]] == pytest.approx(record["ci95"])
        assert row["loop/mean_return"] == pytest.approx(record["mean_return"])
        assert row["loop/ope/q_policy"] == pytest.approx(record["ope"]["q_policy"])
        assert row["loop/ppo/kl"] == pytest.approx(record["ppo"]["kl"])
        assert row["loop/critic/val_brier"] == pytest.approx(record["critic"]["val_brier"])
    hparams = yaml.safe_load((logged_run / "logs" / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["loop"]["iterations"] == ITERATIONS  # the run's config, logged once


def test_resume_continues_the_steps_and_logs_what_the_uninterrupted_run_logs(tmp_path, logged_run):
    run_dir = tmp_path / "run"
    killed = run_cli(
        "fit", "--config", str(SMOKE), "--run_dir", str(run_dir), env={"ITERPPO_FAILPOINT": "policy.step@3"}
    )
    assert killed.returncode != 0
    before = read_metrics_csv(metrics_file(run_dir))
    resumed = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = read_metrics_csv(metrics_file(run_dir))
    assert rows[: len(before)] == before  # what was logged before the kill is kept
    assert_steps_only_go_forward(rows)
    reference = loop_rows(read_metrics_csv(metrics_file(logged_run)))
    got = loop_rows(rows)
    assert [row["loop/policy"] for row in got] == [0.0, 1.0, 2.0]
    for mine, theirs in zip(got, reference):
        assert mine["loop/success_rate"] == theirs["loop/success_rate"]
        assert math.isclose(mine.get("loop/ppo/kl", 0.0), theirs.get("loop/ppo/kl", 0.0))


def test_logger_false_turns_the_run_logs_off(tmp_path):
    run_dir = tmp_path / "run"
    args = ("--model.loop.iterations", "1", "--trainer.logger", "false")
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (run_dir / "logs").exists()


def test_a_configured_lightning_logger_gets_the_run_steps_and_the_csv_stays(tmp_path):
    run_dir, mine = tmp_path / "run", tmp_path / "mine"
    logger = f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {mine}, name: x}}}}"
    args = ("--model.loop.iterations", "1", "--trainer.logger", logger)
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = read_metrics_csv(next(mine.rglob("metrics.csv")))
    ours = read_metrics_csv(metrics_file(run_dir))
    assert {row["step"] for row in theirs} == {row["step"] for row in ours}
    assert any("loop/success_rate" in row for row in theirs) and any("ppo/kl" in row for row in theirs)
