"""The LLM customer behind a real local chat server, through the real CLI: `collect`, and a `fit` whose server goes
down in the middle of a collection round, fails cleanly, and resumes to the result of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from chat_server import ChatServer
from cli_helpers import SMOKE, last_json_line, run_cli

from iterppo_lightning.env.chat_endpoint import request_seed
from iterppo_lightning.env.episodes import episode_seeds

ENDPOINT_SEED = 11
COLLECTED = 8


def write_config(path: Path, base_url: str, **model_overrides) -> Path:
    """smoke.yaml at a smaller budget, its customer played over HTTP by the scripted server."""
    cfg = yaml.safe_load(SMOKE.read_text())
    model = cfg["model"]
    model["llm_customer"] = {"judge": "marker", "max_agent_turns": 4}
    model["customer_endpoint"] = {
        "base_url": base_url,
        "model": "scripted",
        "timeout_s": 5,
        "max_retries": 1,
        "backoff_s": 0.01,
        "concurrency": 4,
        "seed": ENDPOINT_SEED,
    }
    # The scripted customer's words are not the simulator's phrases: clone every successful conversation.
    model["bootstrap"].update(episodes=100, curriculum_steps=0)
    model["loop"].update(iterations=1, episodes_per_iteration=COLLECTED, eval_episodes=4)
    cfg["data"].update(critic_batch_size=8, policy_batch_size=4)
    model.update(model_overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_collect_writes_valid_logs_from_the_endpoint_customer(tmp_path):
    with ChatServer() as server:
        config = write_config(tmp_path / "config.yaml", server.base_url)
        out = tmp_path / "logs.jsonl"
        proc = run_cli("collect", "--config", str(config), "--output", str(out), "--episodes", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert summary["conversations"] == 6 and summary["outcome_rate"] > 0
    assert len(server.requests) == summary["agent_turns"]  # one request per customer reply
    records = [json.loads(line) for line in out.read_text().splitlines()]
    replies = {turn["customer"] for record in records for turn in record["turns"][1:]}
    assert replies <= {f"i need a {r['metadata']['persona']['need']} ." for r in records} | {
        f"my budget is {r['metadata']['persona']['budget']} ." for r in records
    } | {"hmm , tell me more .", "great , i will take it [BUY]"}
    assert run_cli("validate-data", str(out)).returncode == 0


def test_collect_against_a_server_that_hangs_mid_run_writes_nothing_then_succeeds(tmp_path):
    hanging = {"from": 5}  # requests from the 6th on never answer, until the server is fixed
    with ChatServer(fail=lambda n, payload: "hang" if n >= hanging["from"] else None) as server:
        config = write_config(tmp_path / "config.yaml", server.base_url)
        timeout = ["--model.customer_endpoint.timeout_s", "0.3"]
        out = tmp_path / "logs.jsonl"
        args = ("collect", "--config", str(config), "--output", str(out), "--episodes", "4", *timeout)
        failed = run_cli(*args)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        url = f"{server.base_url}/chat/completions"
        assert f"customer endpoint {url}: no answer within timeout_s=0.3 s" in failed.stderr
        assert "gave up after 2 attempts" in failed.stderr
        assert not out.exists() and list(tmp_path.iterdir()) == [config]  # nothing half-written
        hanging["from"] = 10**9
        proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json_line(proc.stdout)["conversations"] == 4


def test_inconsistent_customer_settings_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VARIABLE", raising=False)
    with ChatServer() as server:
        config = write_config(
            tmp_path / "config.yaml",
            server.base_url,
            customer_model={"path": "some/model"},
            judge_endpoint={"base_url": server.base_url, "model": "judge", "api_key_env": "NO_SUCH_KEY_VARIABLE"},
        )
        out = tmp_path / "logs.jsonl"
        proc = run_cli("collect", "--config", str(config), "--output", str(out), "--episodes", "2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "iterppo: error:" in err
    assert "model.customer_model or model.customer_endpoint" in err  # every problem, at once
    assert "model.judge_endpoint.api_key_env names the environment variable NO_SUCH_KEY_VARIABLE" in err
    assert "model.judge_endpoint is set but model.llm_customer.judge is 'marker'" in err
    assert server.requests == [] and not out.exists()


def failing_collection_round(seed: int = 0):
    """fail(n, payload): HTTP 503 for the second round of iteration 0's collection, while `down` is set."""
    collected = episode_seeds("collect", seed, 0, COLLECTED)
    second_round = {request_seed(ENDPOINT_SEED, s, 2) for s in collected}
    state = {"down": True}

    def fail(n: int, payload: dict):
        return 503 if state["down"] and payload.get("seed") in second_round else None

    return fail, state


def without_times(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")
    return records


@pytest.mark.slow
def test_a_server_down_mid_collection_fails_cleanly_and_the_run_resumes(tmp_path):
    with ChatServer() as server:
        config = write_config(tmp_path / "config.yaml", server.base_url)
        reference = tmp_path / "reference"
        proc = run_cli("fit", "--config", str(config), "--run_dir", str(reference))
        assert proc.returncode == 0, proc.stderr[-3000:]

    fail, state = failing_collection_round()
    with ChatServer(fail=fail) as server:
        config = write_config(tmp_path / "config.yaml", server.base_url)
        run_dir = tmp_path / "run"
        failed = run_cli("fit", "--config", str(config), "--run_dir", str(run_dir))
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert failed.stderr.strip().splitlines()[-1].startswith("iterppo: error: customer endpoint")
        assert f"customer endpoint {server.base_url}/chat/completions: HTTP 503" in failed.stderr
        assert "gave up after 2 attempts" in failed.stderr
        # pi_0 was committed; nothing of iteration 0 was: no buffer, no temporary files left behind.
        assert (run_dir / "pi_0" / "policy").is_dir()
        assert not (run_dir / "iteration_0" / "buffer").exists()
        assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
        json.loads((run_dir / "run_state.json").read_text())

        state["down"] = False  # the server is back
        resumed = run_cli("fit", "--config", str(config), "--run_dir", str(run_dir), "--resume", "true")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_times(run_dir) == without_times(reference)
