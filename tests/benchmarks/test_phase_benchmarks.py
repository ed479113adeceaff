"""The phase benchmarks run end to end at a tiny size and end with a JSON line that adds up (no timing checks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TINY_MODEL = ["--layers", "1", "--dim", "16", "--heads", "2", "--threads", "1"]


def run_benchmark(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=BENCHMARKS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1])


@pytest.mark.parametrize("phase", ["critic", "bc"])
def test_phase_throughput_json_line(phase):
    batch, epochs, warmup = 4, 3, 1
    result = run_benchmark(
        "phase_throughput.py",
        "--phase",
        phase,
        "--episodes",
        "12",
        "--batch",
        str(batch),
        "--epochs",
        str(epochs),
        "--warmup-epochs",
        str(warmup),
        *TINY_MODEL,
    )
    for key in (
        "steps_per_s",
        "real_tokens",
        "computed_tokens",
        "padding_factor",
        "real_tokens_per_epoch",
        "computed_tokens_per_epoch",
        "epoch_wall_s",
        "window_s",
        "outside_share",
        "other_share",
        "validation_share",
        "loadavg_1min_before",
        "torch_threads",
        "args",
    ):
        assert key in result, key
    assert set(result["timings_s"]) == {"forward", "backward", "optimizer_step", "validation", "between_batches"}
    assert result["phase"] == phase and result["args"]["phase"] == phase
    assert result["torch_threads"] == 1

    measured = epochs - warmup
    assert result["measured_epochs"] == measured
    assert len(result["epoch_wall_s"]) == measured
    # Every training batch of the measured epochs is one optimizer step, and none of the warm-up's is counted.
    # A batch holds about `batch` turns in whole rows (a row is a conversation or a turn), at least one row.
    per_epoch = min(math.ceil(result["train_examples"] / batch), result["train_rows"])
    assert result["steps"] == result["batches"] == measured * per_epoch
    assert 0 < result["real_tokens"] <= result["computed_tokens"]
    assert result["padding_factor"] >= 1.0
    assert result["real_tokens_per_epoch"] * measured == pytest.approx(result["real_tokens"])
    # The stages are parts of the measured window.
    assert sum(result["timings_s"].values()) <= result["window_s"]
    assert 0.0 <= result["other_share"] <= result["outside_share"] <= 1.0


def test_ppo_phase_json_line():
    result = run_benchmark(
        "ppo_phase.py",
        *("--vocab", "32", "--batch", "4", "--prompt-len", "8", "--resp-len", "4"),
        *("--ppo-epochs", "1", "--minibatches", "1", "--updates", "1"),
        *TINY_MODEL,
    )
    for key in ("episodes_per_s", "outside_share", "timings_s", "torch_threads", "loadavg_1min_before", "args"):
        assert key in result, key
    assert result["torch_threads"] == 1


def test_phase_throughput_ppo_json_line():
    batch, batches = 4, 2
    result = run_benchmark(
        "phase_throughput.py",
        *("--phase", "ppo", "--episodes", "12", "--batch", str(batch), "--batches", str(batches)),
        *("--warmup-batches", "1", "--bc-steps", "2"),
        *TINY_MODEL,
    )
    for key in (
        "iteration_wall_s",
        "loop_wall_s",
        "episodes_per_s",
        "timings_s",
        "shares",
        "outside_share",
        "tokens",
        "mean_prompt_tokens",
        "mean_response_length",
        "loadavg_1min_before",
        "torch_threads",
        "args",
    ):
        assert key in result, key
    assert result["phase"] == "ppo" and result["args"]["phase"] == "ppo"
    assert result["torch_threads"] == 1
    # Only the measured fit's rollouts are counted (not the warm-up's), each of `batch` episodes.
    assert result["rollouts"] == batches
    assert result["episodes_per_s"] * result["iteration_wall_s"] == pytest.approx(batch * batches)
    assert {"generate", "score_forward", "update_forward", "update_backward", "optimizer_step"} <= set(
        result["timings_s"]
    )
    assert sum(result["timings_s"].values()) <= result["iteration_wall_s"]
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    for stage in ("generation", "scoring", "update"):
        tokens = result["tokens"][stage]
        assert 0 < tokens["real"] <= tokens["computed"], stage
        assert tokens["model_calls"] > 0, stage
    assert result["mean_prompt_tokens"] <= result["mean_prompt_width_padded"]
    assert 1 <= result["mean_response_length"] <= 20  # quickstart's max_new_tokens
