"""Each phase's precision: the key that sets it, a whole bf16 run on CPU, and values no Trainer accepts."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import SMOKE, fit_refused_before_any_work, run_cli

from iterppo_lightning.distributed import phase_strategies
from iterppo_lightning.distributed.phase_strategies import phase_precision
from iterppo_lightning.modules.critic import CriticModule


def test_a_phase_key_overrides_the_trainers_precision_for_that_phase_only():
    raw = {"trainer": {"precision": "32-true"}, "critic_precision": "bf16-mixed", "bootstrap_precision": None}
    assert phase_precision("critic", raw) == ("critic_precision", "bf16-mixed")
    assert phase_precision("bootstrap", raw) == ("trainer.precision", "32-true")
    assert phase_precision("policy", {}) == ("trainer.precision", "32-true")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_on_a_cpu_that_multiplies_bf16_natively(monkeypatch, native):
    monkeypatch.setattr(phase_strategies, "native_cpu_bf16", lambda: native)
    raw = {"trainer": {"precision": "32-true"}, "critic_precision": "auto"}
    assert phase_precision("critic", raw) == ("critic_precision", "bf16-mixed" if native else "32-true")
    # On an accelerator `auto` leaves the run's own precision (DeepSpeed configs set theirs).
    gpu = {"trainer": {"precision": "16-mixed"}, "critic_precision": "auto"}
    assert phase_precision("critic", gpu, on_cpu=False) == ("critic_precision", "16-mixed")


def test_every_phase_in_bf16_on_cpu_runs_a_whole_fit(tmp_path):
    # PPO clips its gradients, which Lightning's mixed-precision plugin refuses for a fused AdamW.
    run = tmp_path / "run"
    result = run_cli(
        "fit", "--config", str(SMOKE), "--run_dir", str(run), "--model.loop.iterations", "1",
        "--bootstrap_precision", "bf16-mixed", "--critic_precision", "bf16-mixed", "--policy_precision", "bf16-mixed",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert math.isfinite(rows[0]["critic"]["val_loss"])
    assert rows[0]["ppo"]["epochs_run"] > 0 and math.isfinite(rows[0]["ppo"]["policy_loss"])
    # Mixed precision keeps float32 weights: what a run saves loads as before.
    state = torch.load(run / "iteration_0" / "critic.pt", map_location="cpu", weights_only=True)
    tensors = [v for v in state["state_dict"].values() if v.is_floating_point()]
    assert tensors and {t.dtype for t in tensors} == {torch.float32}


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--critic_precision", "bf17"), "critic_precision must be one of"),
        (("--policy_precision", "half", "--bootstrap_precision", "64"), "policy_precision must be one of"),
        (
            (
                "--critic_strategy.class_path", "iterppo_lightning.distributed.cpu_deepspeed.CPUDeepSpeedStrategy",
                "--critic_precision", "bf16-mixed",
            ),
            "critic_strategy: CPUDeepSpeedStrategy runs in float32 only, but critic_precision is 'bf16-mixed'",
        ),
    ],
)  # fmt: skip
def test_a_precision_no_phase_can_run_is_named_before_any_work(tmp_path, flags, named):
    assert named in fit_refused_before_any_work(SMOKE, tmp_path / "run", *flags)


@pytest.mark.parametrize(
    "critic_settings, refused_phases",
    [
        ({}, []),
        ({"aux_next_message_coef": 1.0}, ["critic"]),
        ({"aux_reaction_coef": 1.0}, ["critic"]),
        ({"readout": "reply_surprise"}, ["critic", "policy"]),
    ],
)
def test_zero3_refuses_the_critic_settings_that_read_its_embeddings_outside_the_backbone(
    critic_settings, refused_phases
):
    system = SimpleNamespace(
        policy=SimpleNamespace(lora=None, max_grad_norm=1.0), critic=CriticModule(**critic_settings)
    )
    strategy = SimpleNamespace(config={"zero_optimization": {"stage": 3}})
    for phase in ("critic", "policy"):
        problems = phase_strategies._deepspeed_conflicts(
            f"{phase}_strategy", None, strategy, ("32", "32"), phase, system
        )
        refused = [p for p in problems if "partitions the critic's embeddings" in p]
        assert bool(refused) == (phase in refused_phases), (phase, problems)
