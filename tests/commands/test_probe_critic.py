"""The critic probe end to end: a smoke `fit` with model.loop.critic_probe, then `iterppo probe-critic` on it.

One fit per module (a process of its own, like a user's shell) serves both halves: the loop records the probe in
metrics.jsonl and its table, and the command, given the same settings, prints the same numbers from the saved
critic, policy and buffer without writing anything. The bad-input cases run the command in-process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cli_helpers import SMOKE, last_json_line, run_cli, run_inprocess, tree_fingerprint

PROBE = ["--model.loop.critic_probe.states", "4", "--model.loop.critic_probe.continuations", "2"]
PROBE += ["--model.loop.critic_probe.policy_samples", "1"]
ITERATIONS = 2  # configs/smoke.yaml
KEYS = {"within_state_corr", "corr_se", "pairwise_acc", "spread_ratio", "bias", "mae", "within_state_error"}
KEYS |= {"true_se", "true_split_corr", "corr_ceiling", "discount_decision", "ask_decision", "by_move"}
KEYS |= {"category_decision", "policy_samples_only"}


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("probe") / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), *PROBE)
    assert proc.returncode == 0, f"iterppo fit failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(run_dir=run_dir, stdout=proc.stdout, records=records)


def test_the_loop_records_the_probe_for_every_iteration(probed_run) -> None:
    assert len(probed_run.records) == ITERATIONS
    for record in probed_run.records:
        probe = record["critic_probe"]
        assert KEYS <= set(probe)
        assert probe["states"] == 4 and probe["continuations"] == 2 and probe["policy_samples"] == 1
        assert probe["candidates"] >= 4 * 6
        assert record["seconds"]["critic_probe"] > 0
    header = next(line for line in probed_run.stdout.splitlines() if line.startswith("iter"))
    assert "qcorr" in header and "qpair" in header
    saved = yaml.safe_load((probed_run.run_dir / "config.yaml").read_text())
    assert saved["model"]["loop"]["critic_probe"]["states"] == 4


def test_the_probe_changes_nothing_else_in_the_run(probed_run, tmp_path) -> None:
    # It draws only from its own seeded streams: without it, every other number of the run is the same.
    plain = tmp_path / "plain"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(plain))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def rest(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("critic_probe", "seconds")}

    records = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert [rest(r) for r in records] == [rest(r) for r in probed_run.records]


def test_the_command_prints_the_loops_numbers_and_writes_nothing(probed_run, capsys) -> None:
    before = tree_fingerprint(probed_run.run_dir)
    for k in range(ITERATIONS):
        res = run_inprocess(capsys, "probe-critic", "--run_dir", str(probed_run.run_dir), "--iteration", str(k))
        assert res.returncode == 0, res.stderr[-3000:]
        printed = last_json_line(res.stdout)
        assert printed["run_dir"] == str(probed_run.run_dir) and printed["iteration"] == k
        recorded = probed_run.records[k]["critic_probe"]
        assert {key: printed[key] for key in recorded} == recorded  # the run's settings: the run's numbers
        assert "within-state corr" in res.stdout and "discount_decision" in res.stdout
    assert tree_fingerprint(probed_run.run_dir) == before


def test_the_command_takes_other_settings(probed_run, capsys) -> None:
    args = ["probe-critic", "--run_dir", str(probed_run.run_dir), "--iteration", "0", "--states", "2"]
    res = run_inprocess(capsys, *args, "--seed", "5", "--persona", "logged")
    assert res.returncode == 0, res.stderr[-3000:]
    printed = last_json_line(res.stdout)
    assert (printed["states"], printed["seed"], printed["persona"], printed["continuations"]) == (2, 5, "logged", 2)


def test_the_command_probes_the_table_critic_on_the_same_states(probed_run, capsys) -> None:
    before = tree_fingerprint(probed_run.run_dir)
    args = ["probe-critic", "--run_dir", str(probed_run.run_dir), "--iteration", "1"]
    res = run_inprocess(capsys, *args, "--critic", "table")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the table critic fit on" in res.stdout
    table = last_json_line(res.stdout)
    learned = probed_run.records[1]["critic_probe"]
    assert table["critic"] == "table" and KEYS <= set(table)
    # The same states, candidates and ground truth; only Q differs.
    for key in ("states", "candidates", "mean_true", "true_spread", "stages"):
        assert table[key] == learned[key], key
    assert table["mean_q"] != learned["mean_q"]
    assert 0.0 <= table["mean_q"] <= 1.0
    assert tree_fingerprint(probed_run.run_dir) == before


def test_command_errors_name_the_problem(probed_run, tmp_path, capsys) -> None:
    def error(*args: str) -> str:
        res = run_inprocess(capsys, "probe-critic", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stdout == ""
        return res.stderr

    run = str(probed_run.run_dir)
    assert "no such folder" in error("--run_dir", str(tmp_path / "missing"), "--iteration", "0")
    assert "holds no run" in error("--run_dir", str(tmp_path), "--iteration", "0")
    for k in ("2", "-1"):
        assert f"--iteration {k} is out of range" in error("--run_dir", run, "--iteration", k)
    assert "iterations 0..1" in error("--run_dir", run, "--iteration", "2")
    assert "--run_dir" in error("--iteration", "0")  # a missing argument
    assert "invalid choice: 'random'" in error("--run_dir", run, "--iteration", "0", "--persona", "random")
    assert "invalid choice: 'oracle'" in error("--run_dir", run, "--iteration", "0", "--critic", "oracle")
    assert "states must be >= 1" in error("--run_dir", run, "--iteration", "0", "--states", "0")

    # The same run, but on logs or with an LLM customer: no simulator to replay.
    for name, edit in (("logs", "data"), ("llm", "model")):
        copy = tmp_path / name
        copy.mkdir()
        shutil.copy(probed_run.run_dir / "run_state.json", copy)
        config = yaml.safe_load((probed_run.run_dir / "config.yaml").read_text())
        if edit == "data":
            config["data"]["logs"] = "logs.jsonl"
        else:
            config["model"]["llm_customer"] = {"judge": "marker"}
        (copy / "config.yaml").write_text(yaml.safe_dump(config))
        message = error("--run_dir", str(copy), "--iteration", "0")
        assert ("trains on logs" if name == "logs" else "LLM customer") in message
        assert "no ground truth" in message


def test_fit_refuses_the_probe_on_logs_before_any_work(probed_run, tmp_path, capsys) -> None:
    run_dir = tmp_path / "logged"
    logs = str(probed_run.run_dir / "iteration_0" / "buffer")
    res = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--data.logs", logs, *PROBE)
    assert res.returncode == 2
    assert "model.loop.critic_probe" in res.stderr and "data.logs" in res.stderr
    assert not Path(run_dir).exists()
