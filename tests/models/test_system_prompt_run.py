"""A chat policy trained with model.system_prompt against the embedded simulator: pi_0 and every exported policy
render their states with the prompt, so `evaluate`, `collect` and `sample` on an exported policy read what the policy
was trained on. The run loads the model in bfloat16 (base_model.dtype), as configs/sales_smollm2_sim.yaml does: the
critic's and PPO's float32 heads read the bfloat16 hidden states."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import REPO, last_json_line, run_cli
from tiny_chat import save_tiny_chat_model

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.data.rendering import render_state
from iterppo_lightning.models.policy_folder import load_policy

SMOKE_CHAT = REPO / "configs" / "smoke_chat.yaml"
SHOP = 'You sell laptops, phones, tablets and headphones (basic, standard, premium); a 10% "discount" exists.'


def prompted_fit(run_dir, base) -> tuple[str, ...]:
    """`fit` of the smoke chat config on the tiny base model, with the simulator's customer, the prompt, bfloat16."""
    return (
        "fit",
        "--config",
        str(SMOKE_CHAT),
        "--run_dir",
        str(run_dir),
        "--model.base_model.path",
        str(base),
        "--model.llm_customer",
        "null",
        "--model.system_prompt",
        SHOP,
        "--model.base_model.dtype",
        "bfloat16",
    )


@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompted")
    base = save_tiny_chat_model(root / "tiny_llama")
    run_dir = root / "run"
    proc = run_cli(*prompted_fit(run_dir, base))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_pi0_and_the_exported_policy_render_states_with_the_prompt(prompted_run):
    conversation = load_buffer(prompted_run / "iteration_0" / "buffer")[0]
    for folder in (prompted_run / "pi_0" / "policy", prompted_run / "final_policy"):
        _, tokenizer = load_policy(folder)
        text = render_state(conversation, 0, tokenizer)
        assert text.startswith(f"<|im_start|>system\n{SHOP}<|im_end|>\n<|im_start|>user\n"), folder


def test_the_bfloat16_run_trained_the_critic_and_the_policy(prompted_run):
    record = json.loads((prompted_run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["collect"]["episodes"] == 8
    assert all(v == v for v in (record["critic"]["val_loss"], record["ppo"]["policy_loss"]))  # finite, not NaN


def test_the_base_models_own_folder_is_left_without_it(prompted_run):
    base = prompted_run.parent / "tiny_llama"
    assert SHOP not in json.dumps([p.read_text() for p in base.iterdir() if p.suffix in (".json", ".jinja")])


def test_evaluate_reads_the_exported_policy_with_its_prompt(prompted_run):
    proc = run_cli(
        "evaluate",
        "--config",
        str(SMOKE_CHAT),
        "--model.llm_customer",
        "null",
        "--policy",
        str(prompted_run / "final_policy"),
        "--episodes",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert last_json_line(proc.stdout)["episodes"] == 4


def test_a_run_killed_in_the_critic_phase_resumes_to_the_same_result(tmp_path, prompted_run):
    """SIGKILL after pi_0 (with its prompt) is saved: the resumed run reads pi_0 back from the run folder, so the
    prompt is neither lost nor applied twice, and it ends where the uninterrupted run did."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    args = prompted_fit(run_dir, prompted_run.parent / "tiny_llama")
    killed = run_cli(*args, env={"ITERPPO_FAILPOINT": "critic.step@1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def without_times(path) -> list[dict]:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            r.pop("seconds")
        return records

    assert without_times(run_dir) == without_times(prompted_run)
    adapter = ("iteration_0", "policy", "lora_adapter", "adapter_model.safetensors")
    ours, reference = load_file(run_dir.joinpath(*adapter)), load_file(prompted_run.joinpath(*adapter))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    _, tokenizer = load_policy(run_dir / "final_policy")
    assert tokenizer.chat_template.count(SHOP[:20]) == 1
