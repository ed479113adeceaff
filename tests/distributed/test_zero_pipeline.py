"""`iterppo fit` on two CPU processes with DeepSpeed ZeRO-3 in every phase (configs/smoke_zero3_cpu.yaml).

What a user relies on:
* the parameters really are partitioned (each process holds half of every phase's parameters and optimizer state);
* the result does not depend on the number of processes: the 2-process ZeRO-3 run equals a 1-process run without
  DeepSpeed (same seed, same global batches) within a stated tolerance;
* the exported policies are plain Hugging Face folders;
* a run killed mid-PPO resumes under ZeRO-3 to exactly the uninterrupted result, optimizer state included (it
  goes through the sharded ZeRO checkpoints), and a resume with another number of processes is refused.

Tolerance: buffers, evaluation results and conversation counts are compared exactly; weights within 1e-4 absolute
(measured: <= 2.7e-5). Not bit-exact because each rank sums its half of a batch and ZeRO then reduces the
gradients over gloo, so fp32 sums run in another order; Adam turns last-bit gradient differences into
differences of up to ~lr * 1e-2 on parameters whose gradient is near zero. A wrong gradient scale, a rank
training on the wrong rows or a missing reduction gives differences > 1e-3 after one step.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from cli_helpers import REPO, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CONFIG = str(REPO / "configs" / "smoke_zero3_cpu.yaml")
KEEP = ["--model.policy.keep_optimizer_state", "true", "--model.critic.keep_optimizer_state", "true"]
ONE_PROCESS = ["--trainer.devices", "1", "--trainer.strategy", "auto"]
WEIGHT_TOL = 1e-4


def fit(run_dir: Path, *extra: str, env: dict | None = None):
    return run_cli("fit", "--config", CONFIG, "--run_dir", str(run_dir), *KEEP, *extra, timeout=600, env=env)


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    ok(fit(run, *ONE_PROCESS))
    return run


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("zero3") / "run"
    ok(fit(run))
    return run


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def critic_diff(a: Path, b: Path) -> float:
    sa = torch.load(a, weights_only=False)["state_dict"]
    sb = torch.load(b, weights_only=False)["state_dict"]
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def test_parameters_and_optimizer_state_are_partitioned(zero3):
    for record in metrics(zero3):
        for phase in ("critic", "policy"):
            shard = record["sharding"][phase]
            assert shard["world_size"] == 2 and shard["zero_stage"] == 3 and shard["zero3"] == 1.0
            # ceil(n / 2) elements of every parameter: just over half of the total.
            assert 0.5 <= shard["held_fraction"] < 0.5 + 1e-3
            assert shard["param_elements_held"] < shard["param_elements"]
    policy = metrics(zero3)[0]["sharding"]["policy"]
    critic = metrics(zero3)[0]["sharding"]["critic"]
    # The policy phase also holds (its shards of) the frozen reference and Q_k: about 3x the critic's elements.
    assert policy["param_elements"] > 2.5 * critic["param_elements"]
    # Adam's two moments + the fp32 partition, of half the trainable elements.
    assert critic["optimizer_state_elements"] == pytest.approx(3 * critic["param_elements"] / 2, rel=1e-3)


def test_two_zero3_processes_match_one_process(single, zero3):
    assert max_weight_diff(single / "pi_0" / "policy", zero3 / "pi_0" / "policy") < WEIGHT_TOL
    for k in range(2):
        it_a, it_b = single / f"iteration_{k}", zero3 / f"iteration_{k}"
        # Rank 0 collects with the same pi_k and the same seeds: the very same conversations.
        assert (
            datasets.load_from_disk(str(it_a / "buffer")).to_list()
            == datasets.load_from_disk(str(it_b / "buffer")).to_list()
        )
        assert critic_diff(it_a / "critic.pt", it_b / "critic.pt") < WEIGHT_TOL
        assert max_weight_diff(it_a / "policy", it_b / "policy") < WEIGHT_TOL
    for a, b in zip(metrics(single), metrics(zero3)):
        for key in ("success_rate", "ci95", "mean_return", "mean_turns"):  # true success on the same customers
            assert a[key] == b[key], key
        assert a["collect"] == b["collect"]
        assert a["critic"]["val_loss"] == pytest.approx(b["critic"]["val_loss"], rel=1e-4)
        assert a["ppo"]["kl"] == pytest.approx(b["ppo"]["kl"], abs=1e-4)
    assert "sharding" not in metrics(single)[0]


def test_exported_policy_is_a_plain_hf_folder(zero3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zero3 / "final_policy")
    assert not any(hasattr(p, "ds_id") for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n > 0 and all(p.numel() > 0 for p in model.parameters())  # consolidated, not a rank's empty placeholders


def test_killed_zero3_run_resumes_exactly_and_refuses_another_world_size(zero3, tmp_path):
    run = tmp_path / "run"
    killed = fit(run, env={"ITERPPO_FAILPOINT": "policy.step@3"})  # first PPO step of iteration 1, on both ranks
    assert killed.returncode != 0
    assert (run / "iteration_0" / "policy_zero" / "iterppo_zero.json").exists()

    config_before = (run / "config.yaml").read_bytes()
    refused = fit(run, "--resume", "true", "--allow_config_change", "true", *ONE_PROCESS)
    assert refused.returncode == 2
    assert "written by 2 processes, this run has 1" in refused.stderr and "trainer.devices" in refused.stderr
    assert (run / "config.yaml").read_bytes() == config_before  # a refused resume changes nothing

    ok(fit(run, "--resume", "true"))
    for k in range(2):
        assert max_weight_diff(zero3 / f"iteration_{k}" / "policy", run / f"iteration_{k}" / "policy") == 0.0
        assert critic_diff(zero3 / f"iteration_{k}" / "critic.pt", run / f"iteration_{k}" / "critic.pt") == 0.0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(metrics(run)) == strip(metrics(zero3))


def test_bad_strategy_settings_fail_before_any_work(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        "fit", "--config", CONFIG, "--run_dir", str(run),
        "--policy_strategy", "deepspeed_stage_3",
        "--critic_strategy.class_path", "iterppo_lightning.distributed.cpu_deepspeed.CPUDeepSpeedStrategy",
        "--critic_strategy.init_args.stage", "1",
        "--critic_strategy.init_args.config", '{"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2}',
        "--bootstrap_strategy", "ddp_spawn",
        "--model.critic.readout", "reply_logprob",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr
    assert "policy_strategy is 'deepspeed_stage_3', which needs CUDA GPUs" in err
    assert "critic_strategy.init_args.stage is 1 but its config's zero_optimization.stage is 3" in err
    assert "critic_strategy: the DeepSpeed config sets gradient_accumulation_steps" in err
    assert "bootstrap_strategy is 'ddp_spawn'" in err
    assert "critic_strategy: ZeRO-3 partitions the critic's embeddings" in err
    assert not run.exists()


def test_more_devices_than_exist_is_refused(tmp_path):
    result = run_cli(
        "fit", "--config", CONFIG, "--run_dir", str(tmp_path / "run"), "--trainer.accelerator", "cuda", timeout=300
    )
    assert result.returncode == 2
    assert "iterppo: error:" in result.stderr and "cuda" in result.stderr.lower()
    assert not (tmp_path / "run").exists()
