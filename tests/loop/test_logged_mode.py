"""The production path through the real CLI: logs in, one iteration per batch, lineage kept, bad logs refused.

`iterppo collect` makes logs with the simulator (as a business would log its
conversations); `fit --data.logs` trains one iteration on them and exports the
next policy; the next batch, collected with that policy, continues the same run.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from cli_helpers import SMOKE, run_cli, tree_fingerprint

from iterppo_lightning.data.buffer import buffer_conversation_ids
from iterppo_lightning.data.log_io import logs_fingerprint, read_logs, write_logs
from iterppo_lightning.data.rendering import plain_chat_messages
from iterppo_lightning.models.policy_folder import load_policy

EPISODES = 48


def fit_on(run_dir: Path, logs: Path, *extra: str, env=None):
    return run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--data.logs", str(logs), *extra, env=env)


def collect(output: Path, seed: int, policy: Path | None = None):
    args = [
        "collect",
        "--config",
        str(SMOKE),
        "--episodes",
        str(EPISODES),
        "--seed",
        str(seed),
        "--output",
        str(output),
    ]
    if policy is not None:
        args += ["--policy", str(policy)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_state.json").read_text())


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Batch 0 from the scripted agents -> pi_1; batch 1 from pi_1 -> pi_2, in one run_dir."""
    root = tmp_path_factory.mktemp("logged")
    run_dir = root / "run"
    batch0 = root / "batch_0.jsonl"
    collected0 = collect(batch0, seed=0)
    first = fit_on(run_dir, batch0)
    assert first.returncode == 0, first.stderr[-3000:]
    batch1 = root / "batch_1.jsonl"
    collected1 = collect(batch1, seed=1, policy=run_dir / "final_policy")
    second = fit_on(run_dir, batch1)
    assert second.returncode == 0, second.stderr[-3000:]
    return dict(
        root=root,
        run_dir=run_dir,
        batch0=batch0,
        batch1=batch1,
        collected0=collected0,
        collected1=collected1,
        first=first,
        second=second,
    )


def test_collect_writes_valid_logs_in_the_schema(logged_run):
    assert logged_run["collected0"]["policy_id"] == "behaviour"
    assert logged_run["collected0"]["conversations"] == EPISODES
    valid = run_cli("validate-data", str(logged_run["batch0"]))
    assert valid.returncode == 0, valid.stderr
    assert f"conversations      {EPISODES}" in valid.stdout


def test_each_batch_of_logs_is_one_iteration_with_its_lineage(logged_run):
    run_dir = logged_run["run_dir"]
    state = state_of(run_dir)
    assert state["completed_iterations"] == 2
    sources = [entry["source"] for entry in state["lineage"]]
    assert [s["sha256"] for s in sources] == [
        logs_fingerprint(logged_run["batch0"]),
        logs_fingerprint(logged_run["batch1"]),
    ]
    assert sources[0]["policy_ids"] == {"behaviour": EPISODES}
    assert sources[1]["policy_ids"] == {"pi_1": EPISODES}
    # The buffers hold exactly the logged conversations: none lost, none twice.
    for k, batch in enumerate((logged_run["batch0"], logged_run["batch1"])):
        logged_ids = [c.conversation_id for c in read_logs(batch)]
        assert buffer_conversation_ids(run_dir / f"iteration_{k}" / "buffer") == logged_ids
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_logs_from_another_policy_than_the_last_exported_are_flagged(logged_run):
    first, second = logged_run["first"], logged_run["second"]
    assert "come from behaviour (48), not from pi_0" in first.stdout + first.stderr
    assert "not from pi_1" not in second.stdout + second.stderr
    records = [json.loads(line) for line in (logged_run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert any("not from pi_0" in w for w in records[0]["warnings"])
    assert not any("come from" in w for w in records[1].get("warnings", []))


def test_the_exported_policy_is_a_deployable_hf_folder_with_its_lineage(logged_run):
    policy_dir = logged_run["run_dir"] / "final_policy"
    card = json.loads((policy_dir / "iterppo_policy.json").read_text())
    assert card["policy_id"] == "pi_2" and card["parent"] == "pi_1"
    assert card["trained_on"]["sha256"] == logs_fingerprint(logged_run["batch1"])
    model, tokenizer = load_policy(policy_dir)
    conversation = read_logs(logged_run["batch1"])[0]
    prompt = tokenizer.apply_chat_template(
        plain_chat_messages(conversation, 0), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_the_off_policy_estimate_is_recorded_next_to_the_true_rate(logged_run):
    record = json.loads((logged_run["run_dir"] / "iteration_1" / "metrics.json").read_text())
    ope = record["ope"]
    assert 0.0 <= ope["q_policy"] <= 1.0 and 0.0 <= ope["q_logged"] <= 1.0
    assert ope["states"] == EPISODES
    assert ope["logged_return"] == pytest.approx(
        sum(c.returns(0.9)[0] for c in read_logs(logged_run["batch1"])) / EPISODES
    )
    assert "mean_return" in record and "success_rate" in record


def test_the_same_logs_twice_are_refused_and_change_nothing(logged_run):
    run_dir = logged_run["run_dir"]
    before = tree_fingerprint(run_dir)
    again = fit_on(run_dir, logged_run["batch1"])
    assert again.returncode == 1
    assert "already trained on in iteration 1" in again.stderr
    assert tree_fingerprint(run_dir) == before


def test_the_same_conversations_in_another_file_are_refused(logged_run, tmp_path):
    copy = tmp_path / "batch_0_again.parquet"
    write_logs(read_logs(logged_run["batch0"]), copy)
    before = tree_fingerprint(logged_run["run_dir"])
    proc = fit_on(logged_run["run_dir"], copy)
    assert proc.returncode == 1
    assert "already trained on in iteration 0" in proc.stderr and f"{copy}:row 1: conversation_id" in proc.stderr
    assert tree_fingerprint(logged_run["run_dir"]) == before


def test_an_unknown_policy_id_is_refused_after_the_first_batch(logged_run, tmp_path):
    conversations = read_logs(logged_run["batch1"])
    for i, conv in enumerate(conversations):
        conv.policy_id, conv.conversation_id = "pi_9", f"new-{i}"
    path = tmp_path / "stranger.jsonl"
    write_logs(conversations, path)
    proc = fit_on(logged_run["run_dir"], path)
    assert proc.returncode == 1
    assert "unknown policy id 'pi_9'" in proc.stderr and "line 1" in proc.stderr and "policy_id" in proc.stderr


def test_bad_logs_fail_before_any_work_and_create_no_run_dir(tmp_path, logged_run):
    lines = logged_run["batch0"].read_text().splitlines()
    record = json.loads(lines[2])
    record["turns"][0]["outcome"] = "yes"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
    run_dir = tmp_path / "run"
    proc = fit_on(run_dir, bad)
    assert proc.returncode == 1
    assert f"{bad}:line 3: turns[0].outcome" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("point", ["sft.step@5", "policy.step@1"])  # while bootstrapping pi_0; mid PPO
def test_an_interrupted_logged_iteration_resumes_on_its_own_batch(tmp_path, logged_run, point):
    run_dir = tmp_path / "run"
    killed = fit_on(run_dir, logged_run["batch0"], env={"ITERPPO_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL
    refused = fit_on(run_dir, logged_run["batch1"])
    assert refused.returncode == 2 and "--resume" in refused.stderr
    # --resume without --data.logs finishes the interrupted iteration on the batch it started with.
    resumed = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert state_of(run_dir)["completed_iterations"] == 1
    reference = [json.loads(line) for line in (logged_run["run_dir"] / "metrics.jsonl").read_text().splitlines()][0]
    got = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    for record in (reference, got):
        record.pop("seconds")
    assert got == reference


def test_validate_data_with_run_dir_makes_the_checks_fit_would_make(logged_run, tmp_path):
    run_dir = logged_run["run_dir"]
    used = run_cli("validate-data", str(logged_run["batch1"]), "--run_dir", str(run_dir))
    assert used.returncode == 1 and "already trained on in iteration 1" in used.stderr
    fresh = tmp_path / "from_scripted_agents.jsonl"
    collect(fresh, seed=7)
    ok = run_cli("validate-data", str(fresh), "--run_dir", str(run_dir))
    assert ok.returncode == 0, ok.stderr
    assert "come from behaviour (48), not from pi_2" in ok.stderr
    missing = run_cli("validate-data", str(fresh), "--run_dir", str(tmp_path / "no_run"))
    assert missing.returncode == 2 and "holds no run" in missing.stderr


def test_resume_of_a_logged_run_between_batches_waits_for_the_next_batch(logged_run):
    run_dir = logged_run["run_dir"]
    before = tree_fingerprint(run_dir)
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--resume", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "give the next one with --data.logs" in proc.stdout + proc.stderr
    assert state_of(run_dir)["completed_iterations"] == 2  # never simulated its own data
    after = tree_fingerprint(run_dir)
    assert {k: v for k, v in after.items() if k != "run_state.json" and not k.startswith("summary")} == {
        k: v for k, v in before.items() if k != "run_state.json" and not k.startswith("summary")
    }


def test_logs_of_another_runs_policy_are_refused(logged_run, tmp_path):
    conversations = read_logs(logged_run["batch1"])
    assert all(c.metadata["policy_run_id"] == state_of(logged_run["run_dir"])["run_id"] for c in conversations)
    for i, conv in enumerate(conversations):
        conv.conversation_id = f"elsewhere-{i}"
        conv.metadata["policy_run_id"] = "another-run"
    path = tmp_path / "another_run.jsonl"
    write_logs(conversations, path)
    proc = fit_on(logged_run["run_dir"], path)
    assert proc.returncode == 1
    assert f"{path}:line 1: metadata.policy_run_id" in proc.stderr and "another run" in proc.stderr
