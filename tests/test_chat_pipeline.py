"""The chat-model path end to end through the real CLI: a chat model as pi_0 and critic backbone, an LLM
customer, LoRA on policy and critic, and a deployable export. A tiny random Llama stands in for SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import REPO, run_cli
from iterppo_lightning.modeling import load_policy
from iterppo_lightning.tiny_chat import save_tiny_chat_model

SMOKE_CHAT = REPO / "configs" / "smoke_chat.yaml"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = save_tiny_chat_model(root / "tiny_llama")
    run_dir = root / "run"
    proc = run_cli("fit", "--config", str(SMOKE_CHAT), "--run_dir", str(run_dir), "--model.base_model.path", str(base))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_the_run_trains_one_iteration_with_an_llm_customer(chat_run):
    record = json.loads((chat_run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["collect"]["episodes"] == 8 and record["eval_episodes"] == 4
    assert "ppo" in record and "critic" in record
    buffer_meta = json.loads((chat_run / "iteration_0" / "metrics.json").read_text())
    assert buffer_meta["iteration"] == 0


def test_lora_changed_the_policy_and_the_export_is_a_plain_hf_folder(chat_run):
    exported = chat_run / "iteration_0" / "policy"
    assert (exported / "lora_adapter" / "adapter_config.json").exists()  # the adapter as trained (resume)
    assert not (exported / "adapter_config.json").exists()  # merged: loads without peft
    before = load_file(chat_run / "pi_0" / "policy" / "model.safetensors")
    after = load_file(exported / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "PPO with LoRA left the merged weights unchanged"
    model, tokenizer = load_policy(exported)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi , i need a phone ."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_conversations_are_rendered_with_the_models_chat_template(chat_run):
    from iterppo_lightning.buffer import load_buffer

    conversations = load_buffer(chat_run / "iteration_0" / "buffer")
    assert all(c.metadata.get("judge") == "marker" for c in conversations)
    assert all(len(c.agent_turns) >= 1 for c in conversations)


@pytest.mark.parametrize(
    "override, named",
    [
        (["--model.base_model.path", "/no/such/model"], "/no/such/model"),
        (["--model.base_model.path", "tests"], "config.json"),
    ],
)
def test_a_bad_model_path_fails_before_any_work(tmp_path, override, named):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(SMOKE_CHAT), "--run_dir", str(run_dir), *override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr
    assert not run_dir.exists()
