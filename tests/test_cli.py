"""End to end through the real `iterppo` command: fit on configs/smoke.yaml, evaluate, and bad input.

The smoke fit runs once per module (a subprocess, like a user's shell). Bad-input cases
call `iterppo_lightning.cli.main(args)` in-process: same parser, same error handling and
exit codes, without paying the package import once more per case.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from cli_helpers import ENV, REPO, SMOKE, run_cli, run_inprocess
from cli_helpers import command as _command
from cli_helpers import last_json_line as _last_json_line
from cli_helpers import tree_fingerprint as _tree_fingerprint

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.models.policy_folder import load_policy

ITERATIONS = 2  # configs/smoke.yaml: model.loop.iterations
EPISODES_PER_ITERATION = 32  # configs/smoke.yaml: model.loop.episodes_per_iteration


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir))
    assert proc.returncode == 0, f"iterppo fit failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return SimpleNamespace(run_dir=run_dir, stdout=proc.stdout, stderr=proc.stderr)


# -- fit ------------------------------------------------------------------------------------------


def test_fit_writes_one_metrics_line_per_iteration(smoke_run):
    lines = (smoke_run.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == ITERATIONS
    for k, line in enumerate(lines):
        record = json.loads(line)  # strict JSON
        assert record["iteration"] == k and record["policy"] == f"pi_{k + 1}"
        rate, (low, high) = record["success_rate"], record["ci95"]
        assert 0 <= low <= rate <= high <= 1
        assert {"val_loss", "val_brier", "val_auroc"} <= set(record["critic"])
        assert {"kl", "policy_loss", "value_loss", "clip_frac", "mean_score"} <= set(record["ppo"])
        assert all(math.isfinite(v) for v in record["ppo"].values())
        seconds = record["seconds"]
        assert set(seconds) >= {"collect", "critic", "policy", "evaluate"}
        assert all(isinstance(v, float) and v >= 0 for v in seconds.values())
        assert record["collect"]["episodes"] == EPISODES_PER_ITERATION


def test_fit_writes_summary_and_learning_curve(smoke_run):
    run_dir = smoke_run.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == ITERATIONS
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["final_success_rate"] == last["success_rate"]
    assert 0 <= summary["initial_success_rate"] <= 1
    assert not Path(summary["final_policy"]).is_absolute()  # relative to the run folder
    final = run_dir / summary["final_policy"]
    assert final.is_dir()
    assert final.resolve() == (run_dir / f"iteration_{ITERATIONS - 1}" / "policy").resolve()
    # final_policy (the link users pass to evaluate) points at the same newest policy.
    assert (run_dir / "final_policy").resolve() == final.resolve()
    assert (run_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["loop"]["iterations"] == ITERATIONS


@pytest.mark.parametrize("k", range(ITERATIONS))
def test_fit_writes_each_iteration_folder(smoke_run, k):
    folder = smoke_run.run_dir / f"iteration_{k}"
    buffer = load_buffer(folder / "buffer")
    assert len(buffer) == EPISODES_PER_ITERATION
    assert {(c.iteration, c.policy_id) for c in buffer} == {(k, f"pi_{k}")}
    assert all(c.turns[-1].terminal for c in buffer), "collected conversations are finished"

    checkpoint = torch.load(folder / "critic.pt", weights_only=False)
    assert any(key.startswith("head.") for key in checkpoint["state_dict"])
    assert checkpoint["hparams"]["loss"] == "bce"

    policy = folder / "policy"
    assert (policy / "config.json").exists() and (policy / "tokenizer.json").exists()
    model, tokenizer = load_policy(policy)
    assert model.config.vocab_size == len(tokenizer)
    assert not [p.name for p in smoke_run.run_dir.rglob(".*tmp*")], "temporary files left behind"


def test_fit_reports_how_many_episodes_pi0_was_evaluated_on(smoke_run):
    line = next(line for line in smoke_run.stdout.splitlines() if line.startswith("pi_0 success"))
    assert "(episodes 32)" in line


# -- evaluate -----------------------------------------------------------------------------------------


def test_evaluate_prints_one_json_result_and_is_deterministic(smoke_run):
    args = [
        "evaluate",
        "--config",
        str(SMOKE),
        "--policy",
        str(smoke_run.run_dir / "final_policy"),
        "--episodes",
        "20",
        "--seed",
        "7",
    ]
    # Two independent processes, run side by side.
    procs = [
        subprocess.Popen(
            [*_command(), *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    first, second = (_last_json_line(out) for out, _ in outs)
    assert first == second, "same policy, config and seed must give the same result"

    assert first["episodes"] == 20
    rate, (low, high) = first["success_rate"], first["ci95"]
    assert 0 <= low <= rate <= high <= 1
    assert rate * 20 == pytest.approx(round(rate * 20))  # a share of 20 episodes
    assert first["mean_turns"] >= 1
    assert first["seed"] == 7


def test_evaluate_a_folder_that_is_not_a_policy_names_it(tmp_path, capsys):
    not_policy = tmp_path / "just_some_folder"
    not_policy.mkdir()
    (not_policy / "notes.txt").write_text("hello")
    res = run_inprocess(capsys, "evaluate", "--config", str(SMOKE), "--policy", str(not_policy), "--episodes", "2")
    assert res.returncode != 0
    assert str(not_policy) in res.stderr
    assert "Traceback" not in res.stderr


def test_evaluate_a_missing_path_names_it(tmp_path, capsys):
    missing = tmp_path / "no_policy_here"
    res = run_inprocess(capsys, "evaluate", "--config", str(SMOKE), "--policy", str(missing))
    assert res.returncode != 0 and str(missing) in res.stderr


def test_evaluate_without_policy_says_what_is_needed(capsys):
    res = run_inprocess(capsys, "evaluate", "--config", str(SMOKE))
    assert res.returncode != 0 and "--policy" in res.stderr


# -- bad input to fit ---------------------------------------------------------------------------------------


def test_fit_refuses_an_existing_run_dir_and_changes_nothing(smoke_run, capsys):
    run_dir = smoke_run.run_dir
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    tree_before = _tree_fingerprint(run_dir)
    res = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--run_dir", str(run_dir))
    assert res.returncode != 0
    assert str(run_dir) in res.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    assert _tree_fingerprint(run_dir) == tree_before


def test_resume_of_a_run_made_before_a_key_existed_counts_the_key_as_its_default(smoke_run, capsys, tmp_path):
    import shutil

    run_dir = tmp_path / "old_run"
    shutil.copytree(smoke_run.run_dir, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["loop"].pop("branch_fraction") == 0.0  # the default, as before the key existed
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    res = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "nothing to resume" in res.stdout + res.stderr


def test_unknown_key_on_the_command_line_is_named(tmp_path, capsys):
    res = run_inprocess(
        capsys, "fit", "--config", str(SMOKE), "--run_dir", str(tmp_path / "run"), "--model.loop.iterationz", "3"
    )
    assert res.returncode != 0
    assert "iterationz" in res.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_the_yaml_is_named(tmp_path, capsys):
    text = SMOKE.read_text()
    assert "    iterations: 2\n" in text
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("    iterations: 2\n", "    iterationz: 2\n"))
    res = run_inprocess(capsys, "fit", "--config", str(typo), "--run_dir", str(tmp_path / "run"))
    assert res.returncode != 0
    assert "iterationz" in res.stderr
    assert not (tmp_path / "run").exists()


def test_wrong_type_is_rejected(tmp_path, capsys):
    res = run_inprocess(
        capsys, "fit", "--config", str(SMOKE), "--run_dir", str(tmp_path / "run"), "--model.loop.iterations", "abc"
    )
    assert res.returncode != 0
    assert "abc" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag, value, named",
    [("--model.loop.iterations", "0", "loop.iterations"), ("--data.gamma", "1.5", "data.gamma")],
)
def test_out_of_range_settings_are_named_before_any_work(tmp_path, capsys, flag, value, named):
    res = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--run_dir", str(tmp_path / "run"), flag, value)
    assert res.returncode != 0
    assert named in res.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_policy_init_fails_without_blocking_the_run_dir(tmp_path, capsys):
    run_dir, missing = tmp_path / "run", tmp_path / "no_pi0"
    res = run_inprocess(
        capsys, "fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--model.policy_init", str(missing)
    )
    assert res.returncode != 0
    assert str(missing) in res.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir()), "a failed start must not make the run_dir unusable"


def test_print_config_shows_the_resolved_yaml(capsys):
    res = run_inprocess(capsys, "fit", "--print_config", "--config", str(SMOKE))
    assert res.returncode == 0, res.stderr
    assert "iterations" in res.stdout
    config = yaml.safe_load(res.stdout)
    assert config["model"]["loop"]["iterations"] == ITERATIONS
    assert config["model"]["policy"]["init_args"]["kl_coef"] == 0.05
    assert config["data"]["policy_batches"] == 2


# -- the table of subcommands -------------------------------------------------------------------------


def test_help_lists_every_subcommand_with_its_purpose(capsys):
    from iterppo_lightning.cli import COMMANDS

    assert list(COMMANDS) == [
        "fit",
        "evaluate",
        "sample",
        "collect",
        "imagine",
        "bootstrap",
        "validate-data",
        "probe-critic",
        "sweep",
        "report",
    ]
    for flag in ("--help", "-h"):
        res = run_inprocess(capsys, flag)
        assert res.returncode == 0, res.stderr
        for name, command in COMMANDS.items():
            rows = [line.split(None, 1) for line in res.stdout.splitlines() if line.strip()]
            assert [name, command.purpose] in rows


def test_no_subcommand_shows_the_table_and_fails(capsys):
    res = run_inprocess(capsys)
    assert res.returncode == 2
    assert "validate-data" in res.stderr and "iterppo: error: no subcommand given" in res.stderr


def test_an_unknown_subcommand_is_named(capsys):
    res = run_inprocess(capsys, "fitt", "--config", str(SMOKE))
    assert res.returncode == 2
    assert "iterppo: error:" in res.stderr and "'fitt'" in res.stderr and "validate-data" in res.stderr


def test_help_validate_data_report_and_probe_critic_help_load_neither_torch_nor_lightning():
    # A fresh interpreter: this test process has imported torch long ago.
    script = """
import contextlib, io, sys
from iterppo_lightning.cli import main
for name in ("", "validate-data", "report", "sweep", "probe-critic"):
    args = [name, "--help"] if name else ["--help"]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
        except SystemExit as exit_:
            assert exit_.code in (0, None), (args, exit_.code)
import iterppo_lightning.commands.validate_data, iterppo_lightning.experiments.report
print(sorted(m for m in ("torch", "lightning", "pytorch_lightning", "transformers") if m in sys.modules))
"""
    command = [sys.executable, "-c", script]
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_runs_the_same_command():
    command = [sys.executable, "-m", "iterppo_lightning", "--help"]
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "validate-data" in proc.stdout and "bootstrap" in proc.stdout


def test_fit_help_describes_fit(capsys):
    from iterppo_lightning.cli import COMMANDS

    res = run_inprocess(capsys, "fit", "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())  # argparse wraps the description
    assert " ".join(COMMANDS["fit"].purpose.split()) in text
    assert "hand the module back" not in text  # IterPPOTrainer.fit's docstring is about DeepSpeed, not the command


def test_bootstrap_is_a_subcommand_with_its_output_argument(capsys):
    res = run_inprocess(capsys, "bootstrap", "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "--output OUTPUT" in text and "a new folder (never overwritten)" in text
    assert "Make pi_0 alone" in text
