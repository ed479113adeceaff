"""The baselines and variants of docs/variants.md, end to end on configs/smoke.yaml overrides.

Each variant is one `fit` through the real command line: in-process (`cli.main`, no package
import per run) for the runs that are only read, and in a process of its own
(cli_helpers.run_cli: this checkout's code) for the runs killed with SIGKILL and their
resumes. The maths is tested by hand in test_ppo_math.py,
test_critic_module.py and test_critic_targets.py; here the question is the wiring: the config
key reaches the code, the run writes what the variant promises, and a killed run resumes to
exactly the uninterrupted result.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, SMOKE, run_cli, run_inprocess

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.data.datamodule import in_validation
from iterppo_lightning.utils.atomic_io import is_temp_name

pytestmark = pytest.mark.slow

EPISODES, ITERATIONS, GAMMA, VAL_FRACTION = (
    32,
    2,
    0.9,
    0.1,
)  # configs/smoke.yaml (data defaults for gamma, val_fraction)

VARIANTS = {
    "default": [],
    "grpo": ["--model.policy.advantage", "grpo", "--model.policy.group_size", "2"],
    "rloo": ["--model.policy.advantage", "rloo", "--model.policy.group_size", "2"],
    "kl_pi0": ["--model.policy.kl_anchor", "pi_0"],
    "ensemble": ["--model.critic.ensemble_size", "2", "--model.critic.pessimism", "1.0"],
    "offline": ["--model.loop.offline", "true"],
    "filtered_bc": ["--model.algorithm", "filtered_bc"],
}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`iterppo ARGS` in a process of its own, this checkout's code (cli_helpers.run_cli)."""
    return run_cli(*args, env=env, timeout=600)


def cli_inprocess(*args: str) -> int:
    """`iterppo ARGS` in this process (stdout/stderr go to pytest's capture); returns the exit code."""
    from iterppo_lightning.cli import main

    argv, sys.argv = sys.argv, ["iterppo"]
    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return 0


def fit_args(run_dir: Path, overrides: list[str]) -> list[str]:
    return ["fit", "--config", str(SMOKE), "--run_dir", str(run_dir), *overrides]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """64 conversations of the scripted behaviour agent (it succeeds sometimes; the smoke pi_0 never does)."""
    out = tmp_path_factory.mktemp("logs") / "batch_0.jsonl"
    assert (
        cli_inprocess("collect", "--config", str(SMOKE), "--episodes", "64", "--seed", "0", "--output", str(out)) == 0
    )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, logs):
    """Uninterrupted runs, made on first use: runs("grpo") -> its run_dir."""
    root, made = tmp_path_factory.mktemp("variants"), {}
    all_variants = {
        **VARIANTS,
        "filtered_bc_logs": ["--model.algorithm", "filtered_bc", "--data.logs", str(logs)],
        "myopic_logs": ["--model.critic.target", "myopic", "--data.logs", str(logs)],
    }

    def get(name: str) -> Path:
        if name not in made:
            run_dir = root / name
            assert cli_inprocess(*fit_args(run_dir, all_variants[name])) == 0, (
                f"{name}: fit failed (its output is above)"
            )
            made[name] = run_dir
        return made[name]

    get.overrides = all_variants
    return get


# -- every mode records the conversation budget ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("default", [32, 64]),
        ("filtered_bc", [32, 64]),
        ("offline", [64, 64]),  # everything up front: episodes_per_iteration * iterations, once
        ("filtered_bc_logs", [64]),  # one iteration per batch of logs
    ],
)
def test_every_iteration_records_the_conversations_collected_so_far(runs, name, expected):
    assert [r["conversations_collected"] for r in records(runs(name))] == expected


# -- GRPO / RLOO ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_solvers_train_the_policy_but_never_the_value_head(runs, name):
    run_dir = runs(name)
    for r in records(run_dir):
        assert "value_loss" not in r["ppo"] and r["ppo"]["policy_loss"] == r["ppo"]["policy_loss"]
        assert 0 <= r["success_rate"] <= 1
    # pi_0's value head is fresh (zeros); grpo/rloo export it untouched.
    heads = [
        torch.load(run_dir / p / "value_head.pt", weights_only=True)
        for p in ("pi_0/policy", "iteration_0/policy", "iteration_1/policy")
    ]
    assert all(torch.equal(h["weight"], heads[0]["weight"]) and torch.equal(h["bias"], heads[0]["bias"]) for h in heads)
    assert digest(run_dir / "iteration_1" / "policy" / "model.safetensors") != digest(
        run_dir / "pi_0" / "policy" / "model.safetensors"
    )
    default = torch.load(runs("default") / "iteration_1" / "policy" / "value_head.pt", weights_only=True)
    assert default["weight"].abs().sum() > 0, "the gae run trains its value head (the contrast)"


# -- KL anchor pi_0 ------------------------------------------------------------------------------------------------


def test_kl_anchor_pi0_changes_nothing_in_iteration_0_and_measures_kl_to_pi0_after(runs):
    anchored, default = records(runs("kl_pi0")), records(runs("default"))
    for r in anchored + default:
        r.pop("seconds")
    assert anchored[0] == default[0]  # in iteration 0, pi_k is pi_0
    # Iteration 1 starts from pi_1: its KL to pi_0 is larger than its KL to pi_1 (0 at the first rollout).
    assert anchored[1]["ppo"]["kl"] > default[1]["ppo"]["kl"]


# -- a pessimistic critic ensemble ---------------------------------------------------------------------------------


def test_the_ensemble_is_saved_in_critic_pt_with_every_member(runs):
    run_dir = runs("ensemble")
    for k in range(ITERATIONS):
        saved = torch.load(run_dir / f"iteration_{k}" / "critic.pt", weights_only=False)
        assert saved["hparams"]["ensemble_size"] == 2 and saved["hparams"]["pessimism"] == 1.0
        assert any(key.startswith("extra_members.0.backbone.") for key in saved["state_dict"])
        assert not torch.equal(saved["state_dict"]["head.weight"], saved["state_dict"]["extra_members.0.head.weight"])
    for r in records(run_dir):
        assert r["critic"]["ensemble_size"] == 2 and 0 <= r["critic"]["val_brier"] <= 1
        assert r["critic"]["pessimism"] == 1.0 and "ppo" in r


# -- the myopic critic ---------------------------------------------------------------------------------------------


def test_the_myopic_critic_trains_on_the_current_turns_reward_and_validates_on_mc(runs):
    run_dir = runs("myopic_logs")
    record = records(run_dir)[0]
    conversations = load_buffer(run_dir / "iteration_0" / "buffer")
    train, val, mc_only = [], [], []
    for c in conversations:
        for _turn, g_mc, g_now in zip(c.agent_turns, c.returns(GAMMA), c.returns(0.0)):
            (val if in_validation(c.conversation_id, VAL_FRACTION, 0) else train).append(
                g_mc if in_validation(c.conversation_id, VAL_FRACTION, 0) else g_now
            )
            mc_only.append(g_mc)
    expected = sum(train + val) / len(train + val)
    assert record["critic"]["target"] == "myopic" and record["critic"]["fits"] == 1
    assert record["critic"]["mean_target"] == pytest.approx(expected, abs=1e-6)
    assert abs(expected - sum(mc_only) / len(mc_only)) > 1e-3, "the logs must tell the myopic and the MC targets apart"


# -- filtered behaviour cloning ------------------------------------------------------------------------------------


def test_filtered_bc_clones_the_successful_conversations_and_fits_no_critic(runs):
    run_dir = runs("filtered_bc_logs")
    record = records(run_dir)[0]
    conversations = load_buffer(run_dir / "iteration_0" / "buffer")
    successes = [c for c in conversations if c.success]
    assert 0 < len(successes) < len(conversations)
    cloned = sum(len(c.agent_turns) for c in successes if not in_validation(c.conversation_id, VAL_FRACTION, 0))
    assert record["bc"]["successful"] == len(successes) and record["bc"]["examples"] == cloned > 0
    assert record["bc"]["train_loss"] > 0
    assert "critic" not in record and "ppo" not in record
    assert record.get("ope", {}).get("q_policy") is None  # no Q_k, no estimate
    assert not (run_dir / "iteration_0" / "critic.pt").exists()
    assert 0 <= record["success_rate"] <= 1 and record["seconds"]["policy"] > 0
    exported = run_dir / "iteration_0" / "policy"
    assert digest(exported / "model.safetensors") != digest(run_dir / "pi_0" / "policy" / "model.safetensors")
    card = json.loads((exported / "iterppo_policy.json").read_text())
    assert card["algorithm"] == "filtered_bc" and card["policy_id"] == "pi_1"


def test_filtered_bc_without_a_success_keeps_pi_k_and_says_so(runs):
    run_dir = runs("filtered_bc")  # the smoke pi_0 never sells
    for k, r in enumerate(records(run_dir)):
        assert r["collect"]["success_rate"] == 0 and r["bc"]["examples"] == 0
        assert any("no successful conversation" in w for w in r["warnings"])
        assert digest(run_dir / f"iteration_{k}" / "policy" / "model.safetensors") == digest(
            run_dir / "pi_0" / "policy" / "model.safetensors"
        )


# -- fully offline -------------------------------------------------------------------------------------------------


def test_offline_collects_the_whole_budget_once_and_reuses_buffer_0_and_q0(runs):
    run_dir = runs("offline")
    first, second = records(run_dir)
    assert len(load_buffer(run_dir / "iteration_0" / "buffer")) == EPISODES * ITERATIONS
    assert not (run_dir / "iteration_1" / "buffer").exists() and not (run_dir / "iteration_1" / "critic.pt").exists()
    assert second["collect"]["episodes"] == 0 and second["seconds"]["collect"] == 0
    assert second["critic"]["fits"] == 0 and second["critic"]["reused_from_iteration"] == 0
    assert {k: v for k, v in second["critic"].items() if k != "reused_from_iteration"} == {**first["critic"], "fits": 0}
    # The same PPO phase every iteration (policy_batches rollouts), from pi_k, evaluated every iteration.
    assert "ppo" in first and "ppo" in second and "success_rate" in first and "success_rate" in second
    pi = [
        digest(run_dir / p / "model.safetensors") for p in ("pi_0/policy", "iteration_0/policy", "iteration_1/policy")
    ]
    assert len(set(pi)) == 3


# -- fully online: no code, only settings -------------------------------------------------------------------------


def test_fully_online_is_many_small_iterations(tmp_path):
    run_dir = tmp_path / "online"
    assert (
        cli_inprocess(
            *fit_args(
                run_dir,
                [
                    "--model.loop.iterations",
                    "3",
                    "--model.loop.episodes_per_iteration",
                    "8",
                    "--data.policy_batches",
                    "1",
                ],
            )
        )
        == 0
    )
    assert [r["conversations_collected"] for r in records(run_dir)] == [8, 16, 24]


# -- kill anywhere, resume, same run -------------------------------------------------------------------------------


def assert_same_run(run_dir: Path, reference: Path) -> None:
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records(run_dir)) == strip(records(reference))
    for buffer in sorted(reference.glob("iteration_*/buffer")):
        rel = buffer.relative_to(reference)
        assert [c.to_dict() for c in load_buffer(run_dir / rel)] == [c.to_dict() for c in load_buffer(buffer)]
    assert digest(run_dir / "final_policy" / "model.safetensors") == digest(
        reference / "final_policy" / "model.safetensors"
    )
    assert [str(p) for p in run_dir.rglob("*") if is_temp_name(p.name)] == []
    assert json.loads((run_dir / "run_state.json").read_text())["in_progress"] is None


@pytest.mark.parametrize(
    "name, point",
    [
        ("ensemble", "policy.step@1"),  # iteration 0's PPO: Q_0 (both members) comes back from critic.pt
        ("offline", "policy.step@3"),  # iteration 1's PPO: buffer 0 and Q_0 come back from iteration 0
        ("kl_pi0", "policy.step@3"),  # iteration 1's PPO: the reference comes back from pi_0's folder
        ("filtered_bc_logs", "policy_save.before_rename@2"),  # pi_1 cloned, not yet exported: cloned again
    ],
)
def test_a_killed_variant_resumes_to_the_uninterrupted_run(tmp_path, runs, name, point):
    reference = runs(name)
    run_dir = tmp_path / "run"
    args = fit_args(run_dir, runs.overrides[name])
    killed = cli(*args, env={"ITERPPO_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL, (
        f"not killed at {point}: rc {killed.returncode}\n{killed.stderr[-2000:]}"
    )
    resumed = cli(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, reference)


def test_kl_anchor_pi0_with_lora_resumes_to_the_uninterrupted_run(tmp_path):
    """LoRA: pi_0 is the policy's own base under pi_0's adapter state; a restarted process reads it from pi_0's
    folder."""
    from tiny_chat import save_tiny_chat_model

    base = save_tiny_chat_model(tmp_path / "tiny_llama")
    overrides = [
        "--model.base_model.path",
        str(base),
        "--model.loop.iterations",
        "2",
        "--model.policy.kl_anchor",
        "pi_0",
    ]
    chat = ["fit", "--config", str(REPO / "configs" / "smoke_chat.yaml")]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert cli_inprocess(*chat, "--run_dir", str(reference), *overrides) == 0
    killed = cli(
        *chat, "--run_dir", str(run_dir), *overrides, env={"ITERPPO_FAILPOINT": "policy.step@3"}
    )  # iteration 1's PPO
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = cli(*chat, "--run_dir", str(run_dir), *overrides, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, reference)


# -- bad settings: named, before any run_dir exists ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["--model.policy.advantage", "grpo"], "model.policy.group_size"),
        (["--model.policy.advantage", "rloo", "--model.policy.group_size", "1"], "model.policy.group_size"),
        (["--model.policy.advantage", "ppo"], "model.policy.advantage"),
        (["--model.policy.kl_anchor", "sft"], "model.policy.kl_anchor"),
        (["--model.critic.ensemble_size", "0"], "model.critic.ensemble_size"),
        (["--model.critic.ensemble_size", "2", "--model.critic.pessimism", "-1"], "model.critic.pessimism"),
        (["--model.critic.pessimism", "0.5"], "model.critic.ensemble_size"),
        (["--model.critic.target", "oracle"], "critic.target"),
        (["--model.algorithm", "dpo"], "model.algorithm"),
        (["--model.loop.offline", "true", "--data.logs", "logs.jsonl"], "model.loop.offline"),
        (["--model.loop.offline", "true", "--data.pool_weights", "[1.0, 0.5]"], "data.pool_weights"),
        (["--model.filtered_bc.epochs", "0"], "model.filtered_bc.epochs"),
    ],
)
def test_bad_variant_settings_are_named_before_any_run_dir_exists(tmp_path, capsys, overrides, named):
    run_dir = tmp_path / "run"
    res = run_inprocess(capsys, *fit_args(run_dir, overrides))
    assert res.returncode == 2, res.stderr[-2000:]
    assert named in res.stderr
    assert not run_dir.exists()
