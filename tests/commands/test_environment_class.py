"""A user's own environment, given by class_path in YAML, through fit, evaluate, collect and sample; and the settings
that make no sense with one are refused by key before any run folder exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import REPO, last_json_line, run_cli, run_inprocess

TESTS = Path(__file__).resolve().parents[1]
GAME = {"class_path": "guess_env.NumberGuess", "init_args": {"low": 1, "high": 4, "max_turns": 3}}


def tiny_config(folder: Path, model_dir: Path, **model_overrides) -> Path:
    """A one-iteration config on the number-guessing game, the tiny chat model as pi_0."""
    model = {
        "base_model": {"path": str(model_dir)},
        "environment_class": GAME,
        "critic": {"lr": 0.001},
        "policy": {"lr": 0.001, "ppo_epochs": 1, "minibatches": 2, "max_new_tokens": 6},
        "loop": {
            "iterations": 1,
            "episodes_per_iteration": 8,
            "eval_episodes": 4,
            "critic_epochs": 1,
            "max_prompt_tokens": 128,
        },
        **model_overrides,
    }
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "model": model,
        "data": {
            "critic_batch_size": 8,
            "policy_batch_size": 4,
            "policy_batches": 2,
            "max_prompt_tokens": 128,
            "max_action_tokens": 6,
        },
    }
    path = folder / "game.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_chat import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def game_run(tmp_path_factory, tiny_model) -> Path:
    """`iterppo fit` in a process of its own, the user's module found on PYTHONPATH as a user's would be."""
    folder = tmp_path_factory.mktemp("game")
    run_dir = folder / "run"
    res = run_cli(
        "fit", "--config", str(tiny_config(folder, tiny_model)), "--run_dir", str(run_dir),
        env={"PYTHONPATH": str(TESTS)}, cold=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_fit_trains_one_iteration_on_the_users_environment(game_run):
    summary = json.loads((game_run / "summary.json").read_text())
    assert (game_run / summary["final_policy"]).is_dir()
    saved = yaml.safe_load((game_run / "config.yaml").read_text())
    assert saved["model"]["environment_class"] == GAME  # evaluate/sample/collect --run_dir read it back
    from iterppo_lightning.data.buffer import load_buffer

    buffer = load_buffer(next(game_run.glob("iteration_0/buffer")))
    assert len(buffer) == 8
    for conv in buffer:
        assert conv.turns[0].customer == "guess a number from 1 to 4 ."
        assert conv.turns[-1].terminal and set(conv.metadata["persona"]) == {"target"}
        assert all(t.business_action == "accept" for t in conv.turns[:-1])


def test_evaluate_and_sample_play_the_users_environment(game_run, capsys):
    res = run_inprocess(capsys, "evaluate", "--run_dir", str(game_run), "--episodes", "5", "--seed", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    result = last_json_line(res.stdout)
    assert result["episodes"] == 5 and 0.0 <= result["success_rate"] <= 1.0
    res = run_inprocess(capsys, "sample", "--run_dir", str(game_run), "-n", "2", "--seed", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("guess a number from 1 to 4 .") == 2
    assert "persona (hidden from the agent): target" in res.stdout


def test_collect_writes_logs_of_the_users_environment_and_needs_a_policy(game_run, capsys, tmp_path):
    out = tmp_path / "game_logs.jsonl"
    policy = str(game_run / "final_policy")
    res = run_inprocess(capsys, "collect", "--run_dir", str(game_run), "--policy", policy, "--episodes", "3",
                        "--output", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["turns"][0]["customer"] == "guess a number from 1 to 4 ." for r in rows)
    res = run_inprocess(capsys, "collect", "--run_dir", str(game_run), "--episodes", "3",
                        "--output", str(tmp_path / "other.jsonl"))  # fmt: skip
    assert res.returncode != 0 and "give --policy DIR" in res.stderr
    assert not (tmp_path / "other.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"llm_customer": {"judge": "marker"}}, "give either model.environment_class"),
        ({"environment": {"max_patience": 4}}, "remove model.environment"),
        ({"loop": {"iterations": 1, "critic_probe": {"states": 4}}}, "remove model.loop.critic_probe"),
        ({"loop": {"iterations": 1, "oracle_critic": {"continuations": 2}}}, "remove model.loop.oracle_critic"),
        ({"loop": {"iterations": 1, "branch_fraction": 0.5}}, "set model.loop.branch_fraction 0"),
        ({"environment_class": {"class_path": "no_such_module.Env"}}, "cannot import 'no_such_module'"),
        ({"base_model": None}, "model.environment_class needs pi_0 from model.base_model"),
    ],
)
def test_settings_that_make_no_sense_with_the_users_environment_are_refused_by_key(
    tmp_path, capsys, tiny_model, overrides, named
):
    config = tiny_config(tmp_path, tiny_model, **overrides)
    run_dir = tmp_path / "run"
    res = run_inprocess(capsys, "fit", "--config", str(config), "--run_dir", str(run_dir))
    assert res.returncode != 0
    assert named in res.stderr, res.stderr[-3000:]
    assert not run_dir.exists()


def test_every_refusal_is_listed_at_once(tmp_path, capsys, tiny_model):
    config = tiny_config(
        tmp_path, tiny_model, llm_customer={"judge": "marker"}, loop={"iterations": 1, "branch_fraction": 0.5}
    )
    res = run_inprocess(capsys, "evaluate", "--config", str(config), "--policy", str(REPO), "--episodes", "2")
    assert res.returncode != 0
    assert "give either model.environment_class" in res.stderr and "branch_fraction 0" in res.stderr
