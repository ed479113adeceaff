"""LoRA: adapter-only training, pi_k as an adapter snapshot of the same model, merged and adapter exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_chat import save_tiny_chat_model

from iterppo_lightning.models.lora import (
    LoraSettings,
    adapter_parameters,
    adapter_state,
    adapter_weights,
    add_lora,
    add_lora_to_backbone,
    is_lora,
    train_only_adapter,
)
from iterppo_lightning.models.modeling import backbone_hidden, causal_lm_forward
from iterppo_lightning.models.policy_folder import export_policy, saved_adapter_state
from iterppo_lightning.models.source import ModelSource, load_backbone, load_causal_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


@pytest.fixture()
def base(tiny_dir):
    """A fresh tiny chat model + tokenizer."""
    return load_causal_lm(ModelSource(str(tiny_dir)))


@pytest.fixture()
def batch(base):
    _, tokenizer = base
    enc = tokenizer(["hello what do you need", "a cheap phone please"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return causal_lm_forward(model, *batch)[0]


def scramble_adapter(model, seed: int) -> None:
    """Stand-in for training: random adapter weights (B != 0, so the adapter changes the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_only_adapter_parameters_are_trainable(base):
    model, _ = base
    policy = add_lora(model, LoraSettings(r=4))
    assert is_lora(policy) and not is_lora(model.model)
    adapter = adapter_parameters(policy)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable == set(adapter) and all("lora_" in name for name in trainable)
    # "all-linear" leaves the LM head alone (peft excludes the output embeddings).
    assert not any("lm_head" in name for name in adapter)
    policy.requires_grad_(True)  # what a LightningModule's freeze/thaw does
    train_only_adapter(policy)
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable


def test_the_base_is_shared_not_copied(base):
    model, _ = base
    base_count = sum(p.numel() for p in model.parameters())
    base_ptrs = {p.data_ptr() for p in model.parameters()}
    policy = add_lora(model, LoraSettings(r=4))
    adapter_count = sum(p.numel() for p in adapter_parameters(policy).values())
    assert sum(p.numel() for p in policy.parameters()) == base_count + adapter_count
    frozen_ptrs = {p.data_ptr() for p in policy.parameters() if not p.requires_grad}
    assert frozen_ptrs == base_ptrs
    snapshot = adapter_state(policy)
    assert sum(t.numel() for t in snapshot.values()) == adapter_count
    assert all(not t.requires_grad for t in snapshot.values())


def test_fresh_adapter_computes_the_base_model(base, batch):
    model, _ = base
    before = logits_of(model, batch)
    policy = add_lora(model, LoraSettings(r=4))
    torch.testing.assert_close(logits_of(policy, batch), before, atol=0, rtol=0)


def test_adapter_weights_stand_in_for_pi_k_and_restore_the_live_weights(base, batch):
    model, _ = base
    policy = add_lora(model, LoraSettings(r=4, dropout=0.1))
    scramble_adapter(policy, seed=1)  # pi_k: the adapter at the start of the iteration
    policy.eval()
    pi_k_logits = logits_of(policy, batch)
    snapshot = adapter_state(policy)
    scramble_adapter(policy, seed=2)  # the iteration's updates
    live = adapter_state(policy)
    live_logits = logits_of(policy, batch)
    assert not torch.allclose(live_logits, pi_k_logits)

    policy.train()
    with adapter_weights(policy, snapshot):
        assert not torch.is_grad_enabled() and not policy.training  # no graph, no dropout for the reference
        torch.testing.assert_close(logits_of(policy, batch), pi_k_logits, atol=0, rtol=0)
    assert policy.training and torch.is_grad_enabled()
    for name, tensor in adapter_state(policy).items():
        assert torch.equal(tensor, live[name])
    policy.eval()
    torch.testing.assert_close(logits_of(policy, batch), live_logits, atol=0, rtol=0)


def test_adapter_weights_restore_even_on_error(base):
    model, _ = base
    policy = add_lora(model, LoraSettings(r=4))
    snapshot = adapter_state(policy)
    scramble_adapter(policy, seed=3)
    live = adapter_state(policy)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter_weights(policy, snapshot):
            raise RuntimeError("boom")
    assert all(torch.equal(t, live[name]) for name, t in adapter_state(policy).items())


def test_adapter_weights_refuse_a_state_of_another_adapter(base):
    model, _ = base
    policy = add_lora(model, LoraSettings(r=4))
    wrong = {name: t for name, t in list(adapter_state(policy).items())[1:]}
    with pytest.raises(ValueError, match="missing"):
        with adapter_weights(policy, wrong):
            pass


def test_training_with_gradient_checkpointing_reaches_the_adapter(tiny_dir, batch):
    model, _ = load_causal_lm(ModelSource(str(tiny_dir), gradient_checkpointing=True))
    policy = add_lora(model, LoraSettings(r=4))
    scramble_adapter(policy, seed=4)  # B = 0 would zero A's gradient
    policy.train()
    logits, hidden = causal_lm_forward(policy, *batch, want_hidden=True, logits_to_keep=3)
    assert logits.shape[1] == 3 and hidden is not None
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in adapter_parameters(policy).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in policy.parameters() if not p.requires_grad)


def test_merged_export_is_a_plain_model_with_the_same_logits(base, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = base
    policy = add_lora(model, LoraSettings(r=4))
    scramble_adapter(policy, seed=5)
    policy.eval()
    expected = logits_of(policy, batch)
    live = adapter_state(policy)
    folder = export_policy(policy, tokenizer, tmp_path / "merged", merge=True)
    assert not (folder / "adapter_config.json").exists() and (folder / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert not is_lora(reloaded) and type(reloaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)
    # The live adapter is untouched (the merge ran on a copy).
    assert is_lora(policy) and all(torch.equal(t, live[name]) for name, t in adapter_state(policy).items())
    torch.testing.assert_close(logits_of(policy, batch), expected, atol=0, rtol=0)


# peft reads model.is_gradient_checkpointing, deprecated in transformers 5.x.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_adapter_export_reloads_with_peft(base, tiny_dir, batch, tmp_path):
    from peft import PeftModel

    model, tokenizer = base
    policy = add_lora(model, LoraSettings(r=4))
    scramble_adapter(policy, seed=6)
    policy.eval()
    expected = logits_of(policy, batch)
    folder = export_policy(policy, tokenizer, tmp_path / "adapter", merge=False)
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    fresh, _ = load_causal_lm(ModelSource(str(tiny_dir)))
    reloaded = PeftModel.from_pretrained(fresh, folder)
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)


def test_backbone_lora_for_the_critic(tiny_dir, batch):
    backbone = add_lora_to_backbone(load_backbone(tiny_dir), LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    assert is_lora(backbone)
    adapter = adapter_parameters(backbone)
    assert adapter and all(("q_proj" in n or "v_proj" in n) for n in adapter)
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == set(adapter)
    scramble_adapter(backbone, seed=7)
    hidden = backbone_hidden(backbone, *batch)
    assert hidden.shape == (*batch[0].shape, backbone.config.hidden_size)
    head(hidden[:, -1]).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is not None for p in adapter.values())


def test_add_lora_twice_is_refused(base):
    model, _ = base
    policy = add_lora(model, LoraSettings(r=4))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(policy, LoraSettings(r=4))


@pytest.mark.parametrize("bad", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}])
def test_invalid_settings(bad):
    with pytest.raises(ValueError, match="lora\\."):
        LoraSettings(**bad)


# -- kl_anchor pi_0 with LoRA: pi_0 is an adapter state of the same model ---------------------------------


def test_saved_adapter_state_reads_a_saved_adapter_or_gives_zeros_for_the_plain_base(base, tiny_dir, batch, tmp_path):
    model, tokenizer = base
    trained = add_lora(model, LoraSettings(r=4))
    scramble_adapter(trained, seed=8)
    saved = adapter_state(trained)
    folder = export_policy(trained, tokenizer, tmp_path / "pi_0_adapter", merge=False)

    fresh = add_lora(load_causal_lm(ModelSource(str(tiny_dir)))[0], LoraSettings(r=4))
    live = adapter_state(fresh)
    state = saved_adapter_state(fresh, folder)
    assert state.keys() == saved.keys() and all(torch.equal(state[n], saved[n]) for n in saved)
    assert all(torch.equal(t, live[n]) for n, t in adapter_state(fresh).items()), "the live adapter must be put back"

    # A plain folder (pi_0 saved as the base itself): a zero adapter, which computes the base exactly.
    zeros = saved_adapter_state(fresh, tiny_dir)
    assert all(not t.any() for t in zeros.values())
    base_logits = logits_of(load_causal_lm(ModelSource(str(tiny_dir)))[0], batch)
    scramble_adapter(fresh, seed=9)
    fresh.eval()
    with adapter_weights(fresh, zeros):
        torch.testing.assert_close(logits_of(fresh, batch), base_logits, atol=0, rtol=0)


class _FrozenCritic(torch.nn.Module):
    def score(self, ids, mask, reply_starts=None):
        return torch.zeros(ids.shape[0])


@pytest.mark.parametrize("anchor", ["pi_k", "pi_0"])
def test_lora_reference_is_pi_k_or_stays_pi_0(base, tiny_dir, batch, anchor):
    from iterppo_lightning.modules.policy import PolicyModule

    model, tokenizer = base
    module = PolicyModule(lora=LoraSettings(r=4), kl_anchor=anchor)
    module.attach(model, tokenizer)
    module.attach_critic(_FrozenCritic())
    pi0 = adapter_state(module.policy)
    if anchor == "pi_0":
        module.pin_reference()
    module.setup("fit")  # iteration 0: the reference is pi_0 either way
    assert all(torch.equal(module._reference_adapter[n], pi0[n]) for n in pi0)
    scramble_adapter(module.policy, seed=10)  # iteration 0's PPO updates: the policy is pi_1
    pi1 = adapter_state(module.policy)
    module.setup("fit")  # iteration 1
    expected = pi1 if anchor == "pi_k" else pi0
    assert all(torch.equal(module._reference_adapter[n], expected[n]) for n in expected)
    if anchor == "pi_0":
        # A restarted process has pi_1 live and takes pi_0 back from pi_0's folder: here the plain base,
        # so a zero adapter, which computes what pi_0's fresh adapter (B = 0) computed.
        restarted = PolicyModule(lora=LoraSettings(r=4), kl_anchor="pi_0")
        restarted.attach(load_causal_lm(ModelSource(str(tiny_dir)))[0], tokenizer)
        scramble_adapter(restarted.policy, seed=10)
        restarted.pin_reference(tiny_dir)
        restarted.attach_critic(_FrozenCritic())
        restarted.setup("fit")
        ids, mask = batch
        torch.testing.assert_close(
            restarted._reference_logits(ids, mask, 0), module._reference_logits(ids, mask, 0), atol=0, rtol=0
        )
