"""The chat-model path end to end through the real CLI: a chat model as pi_0 and critic backbone, an LLM
customer, LoRA on policy and critic, and a deployable export. A tiny random Llama stands in for SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, fit_refused_before_any_work, run_cli
from safetensors.torch import load_file
from tiny_chat import save_tiny_chat_model

from iterppo_lightning.models.policy_folder import load_policy

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
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi , i need a phone ."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_conversations_are_rendered_with_the_models_chat_template(chat_run):
    from iterppo_lightning.data.buffer import load_buffer

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
    assert named in fit_refused_before_any_work(SMOKE_CHAT, tmp_path / "run", *override)


def test_a_killed_chat_run_with_lora_resumes_to_the_same_result(tmp_path, chat_run):
    base = json.loads((chat_run / "pi_0" / "policy" / "iterppo_policy.json").read_text())["source"]
    run_dir = tmp_path / "run"
    args = ("fit", "--config", str(SMOKE_CHAT), "--run_dir", str(run_dir), "--model.base_model.path", base)
    killed = run_cli(*args, env={"ITERPPO_FAILPOINT": "policy.step@1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def without_times(path: Path) -> list[dict]:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            r.pop("seconds")
        return records

    assert without_times(run_dir) == without_times(chat_run)
    ours = load_file(run_dir / "iteration_0" / "policy" / "lora_adapter" / "adapter_model.safetensors")
    reference = load_file(chat_run / "iteration_0" / "policy" / "lora_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_imagined_conversations_clone_pi0_and_train_iteration_0(tmp_path, chat_run, capsys, monkeypatch):
    """`iterppo imagine` -> DIR/buffer; then `bootstrap.buffer` clones the base model on it and
    `--data.logs` trains iteration 0 on it. The LLM is stubbed for imagine (a random tiny model
    writes nothing parseable); everything after it is real."""
    from cli_helpers import run_inprocess
    from env.test_imagine import StubLLM

    import iterppo_lightning.env.imagine as imagine

    base = json.loads((chat_run / "pi_0" / "policy" / "iterppo_policy.json").read_text())["source"]
    monkeypatch.setattr(imagine, "generate_chat", StubLLM(n_personas=3))
    out = tmp_path / "imagined"
    proc = run_inprocess(
        capsys,
        "imagine",
        "--config",
        str(SMOKE_CHAT),
        "--model.base_model.path",
        base,
        "--output",
        str(out),
        "--personas",
        "3",
        "--dialogues_per_persona",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["parsed"] > 0 and (out / "buffer").is_dir() and (out / "imagine_report.json").exists()
    valid = run_cli("validate-data", str(out / "buffer"))
    assert valid.returncode == 0, valid.stderr

    run_dir = tmp_path / "run"
    fit = run_cli(
        "fit",
        "--config",
        str(SMOKE_CHAT),
        "--run_dir",
        str(run_dir),
        "--model.base_model.path",
        base,
        "--model.bootstrap.buffer",
        str(out / "buffer"),
        "--model.bootstrap.epochs",
        "1",
        "--data.logs",
        str(out / "buffer"),
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["lineage"][0]["source"]["policy_ids"] == {"imagined": summary["parsed"]}
    # pi_0 is the base model behaviour-cloned on the imagined suggestions, not the base itself.
    cloned = load_file(run_dir / "pi_0" / "policy" / "model.safetensors")
    original = load_file(Path(base) / "model.safetensors")
    assert any(not torch.equal(cloned[k], original[k]) for k in original)


def test_imagine_with_a_model_that_writes_nothing_usable_says_so(tmp_path, chat_run):
    base = json.loads((chat_run / "pi_0" / "policy" / "iterppo_policy.json").read_text())["source"]
    out = tmp_path / "imagined"
    proc = run_cli(
        "imagine",
        "--config",
        str(SMOKE_CHAT),
        "--model.base_model.path",
        base,
        "--output",
        str(out),
        "--personas",
        "2",
        "--dialogues_per_persona",
        "1",
    )
    assert proc.returncode == 2
    assert "iterppo: error:" in proc.stderr
    assert not (out / "buffer").exists()


def test_an_adapter_export_is_evaluated_on_its_recorded_base(tmp_path, chat_run):
    base = json.loads((chat_run / "pi_0" / "policy" / "iterppo_policy.json").read_text())["source"]
    run_dir = tmp_path / "run"
    proc = run_cli(
        "fit",
        "--config",
        str(SMOKE_CHAT),
        "--run_dir",
        str(run_dir),
        "--model.base_model.path",
        base,
        "--model.policy.lora.merge_on_export",
        "false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = run_dir / "iteration_0" / "policy"
    assert (exported / "adapter_config.json").exists() and not (exported / "model.safetensors").exists()
    assert (run_dir / "pi_0" / "policy" / "model.safetensors").exists()  # pi_0 is always a full folder
    card = json.loads((exported / "iterppo_policy.json").read_text())
    assert card["lora_base"] == str((run_dir / "pi_0" / "policy").resolve())
    ev = run_cli(
        "evaluate",
        "--config",
        str(SMOKE_CHAT),
        "--model.base_model.path",
        base,
        "--policy",
        str(exported),
        "--episodes",
        "2",
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["episodes"] == 2
