"""Bad numeric and shape settings are refused before any work, each by its key, all at once (config_checks.py).

The parametrised cases go through `resolve_fit_config` (what `iterppo sweep` checks every experiment with: the
same checks `fit` runs right after parsing, on a parser built once); the real `iterppo fit` then shows that the
command refuses them all at once, with exit 2 and no run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import REPO, SMOKE, run_cli

from iterppo_lightning.commands.lightning_cli import FitConfigError, resolve_fit_config

# (override, the key the message must name). Each one used to be accepted and fail late, or fail in the
# parser with a message that did not name the key, or be silently ignored.
BAD_SETTINGS = [
    (["--data.critic_batch_size", "0"], "data.critic_batch_size"),
    (["--data.policy_batch_size", "-1"], "data.policy_batch_size"),
    (["--data.policy_batches", "0"], "data.policy_batches"),
    (["--data.sft_batch_size", "0"], "data.sft_batch_size"),
    (["--data.gamma", "1.5"], "data.gamma"),
    (["--data.val_fraction", "1.0"], "data.val_fraction"),
    (["--data.max_action_tokens", "0"], "data.max_action_tokens"),
    (["--model.critic.lr", "-1"], "model.critic.lr"),
    (["--model.critic.td_lambda", "2"], "model.critic.td_lambda"),
    (["--model.policy.lr", "0"], "model.policy.lr"),
    (["--model.policy.max_new_tokens", "0"], "model.policy.max_new_tokens"),
    (["--model.policy.temperature", "0"], "model.policy.temperature"),
    (["--model.policy.clip_eps", "-0.2"], "model.policy.clip_eps"),
    (["--model.policy.ppo_epochs", "0"], "model.policy.ppo_epochs"),
    (["--model.bootstrap.model.n_head", "3", "--model.bootstrap.model.n_embd", "128"], "model.bootstrap.model.n_head"),
    (["--model.bootstrap.lr", "-0.001"], "model.bootstrap.lr"),
    (["--model.bootstrap.batch_size", "0"], "model.bootstrap.batch_size"),
    (["--model.bootstrap.model.n_positions", "64"], "model.bootstrap.model.n_positions"),
    (["--model.loop.iterations", "0"], "model.loop.iterations"),
    (["--model.loop.eval_episodes", "-1"], "model.loop.eval_episodes"),
    (["--model.loop.collect_temperature", "0"], "model.loop.collect_temperature"),
    (["--model.loop.explore_prob", "1.5"], "model.loop.explore_prob"),
    (["--model.loop.branch_fraction", "1"], "model.loop.branch_fraction"),
    (["--model.critic.branch_contrast_coef", "-1"], "model.critic.branch_contrast_coef"),
    (["--model.environment.max_agent_turns", "0"], "model.environment.max_agent_turns"),
    (["--model.environment.accept_prob", "0.5"], "model.environment.accept_prob"),
    (["--trainer.max_epochs", "50"], "trainer.max_epochs"),
    (["--trainer.max_steps", "100"], "trainer.max_steps"),
    (["--ckpt_path", "/nonexistent"], "ckpt_path"),
]


@pytest.mark.parametrize("override, key", BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_by_its_key(override, key):
    with pytest.raises(FitConfigError) as refused:
        resolve_fit_config([str(SMOKE)], override)
    assert key in str(refused.value)


def test_the_branch_contrast_without_branches_is_refused_by_both_keys():
    with pytest.raises(FitConfigError) as refused:
        resolve_fit_config([str(SMOKE)], ["--model.critic.branch_contrast_coef", "1"])
    assert "model.critic.branch_contrast_coef 1" in str(refused.value)
    assert "set model.loop.branch_fraction > 0" in str(refused.value)
    resolve_fit_config(
        [str(SMOKE)], ["--model.critic.branch_contrast_coef", "1", "--model.loop.branch_fraction", "0.5"]
    )


def test_every_shipped_config_passes_the_checks():
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        if config.parent.name == "strategy" or (config.parent.name == "experiment" and config.name != "base.yaml"):
            continue  # strategy fragments are not whole configs; experiments are checked on their base below
        resolve_fit_config([str(config)], [])
    base = REPO / "configs" / "experiment" / "base.yaml"
    for experiment in sorted(base.parent.glob("*.yaml")):
        resolve_fit_config([str(base), str(experiment)], [])


def test_fit_lists_every_bad_setting_at_once_before_a_run_folder_exists(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [word for override, _ in BAD_SETTINGS for word in override]
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("iterppo: error:") and "Traceback" not in proc.stderr
    for _, key in BAD_SETTINGS:
        assert key in proc.stderr, key
    assert not run_dir.exists()


def test_a_run_dir_that_is_a_file_is_refused_without_a_traceback(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(a_file))
    assert proc.returncode == 2
    assert "iterppo: error:" in proc.stderr and "is a file, not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert a_file.read_text() == "not a run"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_run_folder_is_refused_without_a_traceback(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(parent / "run"))
    finally:
        parent.chmod(0o700)
    assert proc.returncode == 2
    assert "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_the_run_folder_checks_name_the_problem(tmp_path):
    from iterppo_lightning.commands.config_checks import _run_dir_problems

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "is a file" in _run_dir_problems(str(a_file))[0]
    assert "is a file" in _run_dir_problems(str(a_file / "run"))[0]
    assert _run_dir_problems(str(tmp_path / "new" / "run")) == []
    assert not Path(tmp_path / "new").exists()  # checked without creating anything


def test_a_negative_entropy_coef_is_a_penalty_and_is_accepted_but_not_infinity():
    resolve_fit_config([str(SMOKE)], ["--model.policy.entropy_coef", "-0.05"])
    with pytest.raises(FitConfigError) as refused:
        resolve_fit_config([str(SMOKE)], ["--model.policy.entropy_coef=-inf"])
    assert "entropy_coef" in str(refused.value)  # the parser itself refuses it, under model.policy
