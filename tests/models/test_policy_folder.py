"""models.policy_folder: the one module that knows a saved policy folder's files, writing and reading them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_chat import save_tiny_chat_model
from torch import nn

from iterppo_lightning.models.lora import LoraSettings, adapter_parameters, adapter_state, add_lora, is_lora
from iterppo_lightning.models.policy_folder import (
    LORA_ADAPTER_DIR,
    POLICY_CARD_FILE,
    VALUE_HEAD_FILE,
    check_policy_dir,
    lora_adapter_dir,
    lora_base_of,
    read_card,
    read_policy_folder,
    write_policy_folder,
)
from iterppo_lightning.models.source import ModelSource, load_causal_lm


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_policy_folder_round_trips(tmp_path, tiny_model, tokenizer):
    head = nn.Linear(tiny_model.config.hidden_size, 1)
    card = {"policy_id": "pi_1", "parent": "pi_0"}
    path = write_policy_folder(tmp_path / "policy", tiny_model, tokenizer, value_head=head, card=card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"], "no temporary folder may remain"
    assert (path / POLICY_CARD_FILE).read_text() == json.dumps(card, indent=2, sort_keys=True) + "\n"
    assert read_card(path) == card and lora_adapter_dir(path) is None
    assert check_policy_dir(path) == path and lora_base_of(path) == str(path.resolve())

    saved = read_policy_folder(path, trainable_adapter=True)  # nothing to resume: the model is the base
    assert _same(_state(saved.model), _state(tiny_model)) and _same(_state(saved.value_head), _state(head))
    assert saved.tokenizer.get_vocab() == tokenizer.get_vocab() and saved.tokenizer.padding_side == "left"
    assert saved.lora_base == str(path.resolve())


def test_a_folder_without_card_or_value_head(tmp_path, tiny_model, tokenizer):
    path = write_policy_folder(tmp_path / "policy", tiny_model, tokenizer)
    assert not (path / POLICY_CARD_FILE).exists() and not (path / VALUE_HEAD_FILE).exists()
    assert read_card(path) is None and read_policy_folder(path).value_head is None


def test_a_failed_write_leaves_the_old_folder(tmp_path, tiny_model, tokenizer, monkeypatch):
    path = write_policy_folder(tmp_path / "policy", tiny_model, tokenizer, card={"policy_id": "old"})

    class Broken(nn.Linear):
        def state_dict(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_policy_folder(path, tiny_model, tokenizer, value_head=Broken(2, 1), card={"policy_id": "new"})
    assert read_card(path) == {"policy_id": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


def _trained_adapter(tiny_dir: Path):
    model, tokenizer = load_causal_lm(ModelSource(str(tiny_dir)))
    policy = add_lora(model, LoraSettings(r=4))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in adapter_parameters(policy).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return policy, tokenizer


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("merge", [True, False])
def test_a_lora_folder_resumes_the_adapter_on_its_base(tmp_path, tiny_dir, merge):
    policy, tokenizer = _trained_adapter(tiny_dir)
    card = {"policy_id": "pi_1", "lora_base": str(tiny_dir.resolve())}
    path = write_policy_folder(tmp_path / "policy", policy, tokenizer, card=card, merge=merge)
    assert lora_adapter_dir(path) == (path / LORA_ADAPTER_DIR if merge else path)
    assert lora_base_of(path) == str(tiny_dir.resolve())
    check_policy_dir(path)

    saved = read_policy_folder(path, trainable_adapter=True)
    assert is_lora(saved.model) and saved.lora_base == str(tiny_dir.resolve())
    expected = adapter_state(policy)
    assert all(torch.equal(t, expected[n]) for n, t in adapter_state(saved.model).items())
    assert all(p.requires_grad for p in adapter_parameters(saved.model).values())

    if merge:  # without LoRA in the run, a merged export is a plain model: the base of any new adapter
        plain = read_policy_folder(path)
        assert not is_lora(plain.model) and plain.lora_base == str(path.resolve())


def test_an_adapter_without_a_recorded_base_is_refused(tmp_path, tiny_dir):
    policy, tokenizer = _trained_adapter(tiny_dir)
    path = write_policy_folder(tmp_path / "policy", policy, tokenizer, merge=False)
    with pytest.raises(ValueError, match="lora_base"):
        check_policy_dir(path)
