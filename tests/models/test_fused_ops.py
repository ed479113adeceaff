"""Fused GELU and AdamW: the same functions as the ops they replace, for new and already saved models."""

from __future__ import annotations

import copy

import torch
from transformers import GPT2LMHeadModel
from transformers.activations import GELUTanh, NewGELUActivation

from iterppo_lightning.models.fused_ops import adamw, fuse_activations
from iterppo_lightning.models.policy_folder import load_policy
from iterppo_lightning.models.source import load_backbone
from iterppo_lightning.models.tiny_lm import TinyLMConfig, build_tiny_causal_lm
from iterppo_lightning.modules.critic import CriticModule


def _activations(model) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (NewGELUActivation, GELUTanh))}


def _unfused(tokenizer) -> GPT2LMHeadModel:
    """A tiny GPT-2 as models were saved before the fused kernel: activation_function "gelu_new"."""
    model = build_tiny_causal_lm(tokenizer, TinyLMConfig(n_layer=2, n_embd=32, n_head=2), seed=3)
    model.config.activation_function = "gelu_new"
    return GPT2LMHeadModel(model.config).eval()


def test_new_tiny_models_use_the_fused_gelu(tokenizer):
    model = build_tiny_causal_lm(tokenizer, TinyLMConfig(n_layer=1, n_embd=16, n_head=2))
    assert model.config.activation_function == "gelu_pytorch_tanh"
    assert _activations(model) == {GELUTanh}


def test_fusing_keeps_the_logits_and_gradients(tokenizer):
    unfused = _unfused(tokenizer)
    fused = fuse_activations(copy.deepcopy(unfused))
    assert _activations(unfused) == {NewGELUActivation} and _activations(fused) == {GELUTanh}
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.randint(5, len(tokenizer), (3, 17))
    out_a, out_b = unfused(input_ids=ids).logits, fused(input_ids=ids).logits
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-5)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, a), b in zip(unfused.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_models_saved_unfused_are_fused_when_loaded(tmp_path, tokenizer):
    folder = tmp_path / "old_policy"
    _unfused(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert '"gelu_new"' in (folder / "config.json").read_text()
    policy, _ = load_policy(folder)
    assert _activations(policy) == {GELUTanh}
    assert _activations(load_backbone(folder)) == {GELUTanh}
    for init_from_policy in (True, False):
        critic = CriticModule(init_from_policy=init_from_policy)
        critic.build(folder)
        assert _activations(critic.backbone) == {GELUTanh}
    # Saved again, the folder records the fused activation.
    policy.save_pretrained(tmp_path / "resaved")
    assert '"gelu_pytorch_tanh"' in (tmp_path / "resaved" / "config.json").read_text()


def test_models_without_gelu_new_are_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU())
    fuse_activations(model)
    assert isinstance(model[1], torch.nn.SiLU)


def test_fused_adamw_takes_the_same_steps_and_shares_its_state_format():
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 3)
    fused = copy.deepcopy(plain)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    opt_fused = adamw(fused.parameters(), lr=1e-2, weight_decay=0.1)
    assert opt_fused.defaults["fused"] is True
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, opt in ((plain, opt_plain), (fused, opt_fused)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    # A state saved by the unfused optimizer (an older run) resumes in the fused one.
    resumed = adamw(copy.deepcopy(plain).parameters(), lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(opt_plain.state_dict())
    assert [s["step"].item() for s in resumed.state.values()] == [5.0, 5.0]


def test_adamw_falls_back_to_the_default_for_parameters_without_a_fused_kernel():
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64, device="meta"))]
    assert not adamw(params, lr=1e-3, weight_decay=0.0).defaults["fused"]


def _trainer(precision: str):
    from types import SimpleNamespace

    return SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=torch.device("cpu")))


def test_a_cpu_bf16_fit_gets_eager_attention_and_a_float32_lm_head_and_gives_them_back(tokenizer):
    from torch import nn

    from iterppo_lightning.models.fused_ops import Float32OutputHead, cpu_bf16_kernels, restore_kernels

    model = build_tiny_causal_lm(tokenizer, TinyLMConfig(n_layer=1, n_embd=32, n_head=2), seed=1)
    assert cpu_bf16_kernels(model, _trainer("32-true")) == []
    changed = cpu_bf16_kernels(model, _trainer("bf16-mixed"))
    assert model.config._attn_implementation == "eager" and type(model.lm_head) is Float32OutputHead
    ids = torch.randint(5, len(tokenizer), (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
        hidden = model.transformer(input_ids=ids).last_hidden_state
    assert logits.dtype == torch.float32
    # The head's product itself is float32: bf16 would round it to 2^-7 of its size.
    torch.testing.assert_close(logits, hidden.float() @ model.lm_head.weight.T, atol=1e-5, rtol=1e-5)
    restore_kernels(changed)
    assert model.config._attn_implementation == "sdpa" and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
