"""PolicyModule: reference reset per fit, PPO moves the policy towards what Q rewards, save/load, sampling masks."""

from __future__ import annotations

import copy
import inspect

import lightning as L
import pytest
import torch
from conftest import ends_often, make_trainer
from torch import nn

from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.data.padding import pad_left
from iterppo_lightning.models.generation import sample_responses, truncate_after_eos
from iterppo_lightning.models.modeling import causal_lm_forward
from iterppo_lightning.models.policy_folder import VALUE_HEAD_FILE, load_policy
from iterppo_lightning.modules.policy import PolicyModule, Rollout
from iterppo_lightning.rl import ppo_math as pm

REWARDED_WORD = "bonus"  # in the vocabulary, never in a simulator prompt


class TokenCritic(nn.Module):
    """A fixed Q: 1.0 when the rewarded token appears in the (real tokens of the) row, else 0.0."""

    def __init__(self, token_id: int):
        super().__init__()
        self.token_id = token_id
        self.unused = nn.Parameter(torch.zeros(1))  # so freezing has something to freeze

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_starts=None) -> torch.Tensor:
        return ((input_ids == self.token_id) & attention_mask.bool()).any(dim=1).float()


class ConstantCritic(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def score(self, input_ids, attention_mask, reply_starts=None):
        return torch.full((input_ids.shape[0],), self.value)


def _policy_dm(tokenizer, conversations, batch_size=8, batches=2) -> TrajectoryDataModule:
    dm = TrajectoryDataModule(
        val_fraction=0.0, policy_batch_size=batch_size, policy_batches=batches, max_prompt_tokens=64
    )
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    dm.use_phase("policy")
    return dm


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _module(model, tokenizer, critic=None, **kwargs) -> PolicyModule:
    kwargs = {"ppo_epochs": 1, "minibatches": 1, "max_new_tokens": 6, "lr": 1e-3, **kwargs}
    module = PolicyModule(**kwargs)
    module.attach(model, tokenizer)
    module.attach_critic(critic if critic is not None else TokenCritic(tokenizer.convert_tokens_to_ids(REWARDED_WORD)))
    return module


# -- the KL anchor ------------------------------------------------------------------------------


class _Snapshots(L.Callback):
    def __init__(self):
        self.start: dict = {}
        self.end: dict = {}

    def on_train_start(self, trainer, module):  # after the module's on_fit_start
        self.start = {"reference": _state(module.reference), "policy": _state(module.policy)}

    def on_train_end(self, trainer, module):
        self.end = {"reference": _state(module.reference), "policy": _state(module.policy)}


def test_each_fit_resets_the_reference_to_the_current_policy(tiny_model, tokenizer, conversations):
    torch.manual_seed(0)
    module = _module(tiny_model, tokenizer)
    dm = _policy_dm(tokenizer, conversations)

    first = _Snapshots()
    make_trainer(callbacks=[first]).fit(module, datamodule=dm)
    assert _same(first.start["reference"], first.start["policy"])
    assert not _same(first.end["policy"], first.start["policy"]), "PPO must update the policy"
    assert _same(first.end["reference"], first.start["reference"]), "the reference must not move during a fit"

    # Between fits the policy changes (as it does when pi_(k+1) is made); the next fit anchors to it.
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    changed = _state(module.policy)
    second = _Snapshots()
    make_trainer(callbacks=[second]).fit(module, datamodule=dm)
    assert _same(second.start["reference"], changed)
    assert _same(second.end["reference"], changed)
    assert not _same(second.end["policy"], changed)
    assert not any(p.requires_grad for p in module.reference.parameters())


class _OptimizerStateAtStart(L.Callback):
    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            state = trainer.optimizers[0].state
            self.steps = [int(s["step"]) for s in state.values() if "step" in s]


@pytest.mark.parametrize("keep", [True, False])
def test_keep_optimizer_state_carries_adam_moments_to_the_next_fit(tiny_model, tokenizer, conversations, keep):
    torch.manual_seed(0)
    module = _module(tiny_model, tokenizer, keep_optimizer_state=keep)
    dm = _policy_dm(tokenizer, conversations)
    make_trainer().fit(module, datamodule=dm)
    probe = _OptimizerStateAtStart()
    make_trainer(callbacks=[probe]).fit(module, datamodule=dm)
    if keep:
        # 2 rollouts x 1 epoch x 1 minibatch = 2 Adam steps in the first fit.
        assert probe.steps and set(probe.steps) == {2}
    else:
        assert probe.steps == []


def test_kl_to_the_reference_is_zero_before_any_update(tiny_model, tokenizer, conversations):
    torch.manual_seed(0)
    module = _module(tiny_model, tokenizer)
    batch = next(iter(_policy_dm(tokenizer, conversations).train_dataloader()))
    rollout = module.make_rollout(batch["input_ids"], batch["attention_mask"])
    assert rollout.seq_kl.abs().max().item() < 1e-5
    assert rollout.responses.shape[1] <= module.max_new_tokens
    # Advantages are whitened over real reply tokens only; padding stays exactly 0.
    assert (rollout.advantages[rollout.response_mask == 0] == 0).all()


def test_a_rollout_is_typed_and_its_rows_slice_every_field_alike(tiny_model, tokenizer, conversations):
    torch.manual_seed(0)
    module = _module(tiny_model, tokenizer, critic=ConstantCritic(0.5))
    batch = next(iter(_policy_dm(tokenizer, conversations).train_dataloader()))
    rollout = module.make_rollout(batch["input_ids"], batch["attention_mask"])
    assert isinstance(rollout, Rollout)
    b, p = batch["input_ids"].shape
    r = rollout.responses.shape[1]
    assert (rollout.batch_size, rollout.prompt_len) == (b, p)
    assert rollout.query_responses.shape == rollout.attention_mask.shape == (b, p + r)
    assert torch.equal(rollout.query_responses[:, :p], batch["input_ids"])
    for name in ("response_mask", "logprobs", "values", "advantages", "returns"):
        assert getattr(rollout, name).shape == (b, r), name
    for name in ("scores", "seq_kl", "ended"):
        assert getattr(rollout, name).shape == (b,), name
    assert rollout.query_responses.dtype == rollout.responses.dtype == torch.long
    assert rollout.logprobs.dtype == torch.float32 and rollout.ended.dtype == torch.bool
    index = torch.tensor([b - 1, 0])
    mb = rollout.rows(index)
    assert mb.batch_size == 2 and mb.prompt_len == p
    for name in Rollout.__dataclass_fields__:
        assert torch.equal(getattr(mb, name), getattr(rollout, name)[index]), name


def test_every_hyperparameter_is_a_typed_attribute():
    module = PolicyModule(lr=0.5, clip_eps=0.1, max_new_tokens=7, target_kl=0.02, advantage="rloo", group_size=3)
    assert set(module.hparams) == set(inspect.signature(PolicyModule.__init__).parameters) - {"self"}
    for key, value in module.hparams.items():
        assert getattr(module, key) == value, key
    assert (module.lr, module.max_new_tokens, module.target_kl, module.group_size) == (0.5, 7, 0.02, 3)


def test_fit_without_a_critic_is_refused(tiny_model, tokenizer, conversations):
    module = PolicyModule(max_new_tokens=4)
    module.attach(tiny_model, tokenizer)
    with pytest.raises(RuntimeError, match="attach_critic"):
        make_trainer().fit(module, datamodule=_policy_dm(tokenizer, conversations))


def test_attach_critic_freezes_it(tokenizer):
    critic = TokenCritic(5)
    critic.train()
    PolicyModule().attach_critic(critic)
    assert not critic.unused.requires_grad and not critic.training


# -- PPO learns what Q rewards ----------------------------------------------------------------------


def _rewarded_rate(model, tokenizer, prompts, mask, max_new_tokens, seed=123) -> float:
    token = tokenizer.convert_tokens_to_ids(REWARDED_WORD)
    torch.manual_seed(seed)
    response, resp_mask = sample_responses(
        model, prompts, mask, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens
    )
    return ((response == token) & resp_mask.bool()).any(dim=1).float().mean().item()


def _ppo_run(
    tokenizer, conversations, kl_coef: float, states: int = 32, **policy_kwargs
) -> tuple[float, float, PolicyModule]:
    from conftest import TINY_SHAPE

    from iterppo_lightning.models.tiny_lm import build_tiny_causal_lm

    model = build_tiny_causal_lm(tokenizer, TINY_SHAPE, seed=0)
    dm = _policy_dm(tokenizer, conversations, batch_size=states, batches=16)
    examples = dm.train_examples
    prompts, mask = pad_left([examples[i % len(examples)].prompt_ids for i in range(256)], tokenizer.pad_token_id)
    assert not (prompts == tokenizer.convert_tokens_to_ids(REWARDED_WORD)).any(), "the reward must come from the reply"
    before = _rewarded_rate(model, tokenizer, prompts, mask, 8)
    torch.manual_seed(0)
    module = _module(model, tokenizer, ppo_epochs=4, minibatches=2, kl_coef=kl_coef, max_new_tokens=8, **policy_kwargs)
    make_trainer().fit(module, datamodule=dm)
    return before, _rewarded_rate(model, tokenizer, prompts, mask, 8), module


def test_ppo_increases_the_frequency_of_the_rewarded_token(tokenizer, conversations):
    before, after, module = _ppo_run(tokenizer, conversations, kl_coef=0.01)
    assert before < 0.15
    assert after > before + 0.3, f"rewarded-token rate {before:.3f} -> {after:.3f}"
    stats = module.fit_stats
    assert stats["mean_score"] > before  # the rollouts' mean Q rose over the fit
    assert stats["kl"] > 0
    assert {"policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl_coef", "ended_frac"} <= set(stats)


def test_a_strong_kl_penalty_keeps_the_policy_at_the_reference(tokenizer, conversations):
    before, after, _ = _ppo_run(tokenizer, conversations, kl_coef=1.0)
    assert abs(after - before) < 0.1, f"rewarded-token rate {before:.3f} -> {after:.3f} despite kl_coef=1"


def _next_token_entropy(model, prompts, mask) -> float:
    """Mean entropy (nats) of the policy's first reply token over the prompts."""
    with torch.no_grad():
        logits = model(input_ids=prompts, attention_mask=mask).logits[:, -1].float()
    return pm.entropy_from_logits(logits).mean().item()


@pytest.mark.parametrize("entropy_coef", [0.0, -5.0])
def test_a_negative_entropy_coef_sharpens_the_policy_and_zero_leaves_it(tokenizer, conversations, entropy_coef):
    from conftest import TINY_SHAPE

    from iterppo_lightning.models.tiny_lm import build_tiny_causal_lm

    model = build_tiny_causal_lm(tokenizer, TINY_SHAPE, seed=0)
    dm = _policy_dm(tokenizer, conversations, batch_size=16, batches=4)
    examples = dm.train_examples
    prompts, mask = pad_left([examples[i % len(examples)].prompt_ids for i in range(64)], tokenizer.pad_token_id)
    before = _next_token_entropy(model, prompts, mask)
    torch.manual_seed(0)
    # A constant critic: every reply scores the same, so the only push on the policy is the entropy term.
    module = _module(
        model,
        tokenizer,
        critic=ConstantCritic(0.5),
        ppo_epochs=4,
        minibatches=2,
        kl_coef=0.0,
        entropy_coef=entropy_coef,
        max_new_tokens=8,
    )
    make_trainer().fit(module, datamodule=dm)
    after = _next_token_entropy(model, prompts, mask)
    if entropy_coef < 0:
        assert after < before - 0.1, f"entropy {before:.3f} -> {after:.3f} under a penalty"
    else:
        assert abs(after - before) < 0.05, f"entropy {before:.3f} -> {after:.3f} with nothing to learn"


def test_non_finite_scores_stop_training_without_corrupting_the_weights(tiny_model, tokenizer, conversations):
    module = _module(tiny_model, tokenizer, critic=ConstantCritic(float("nan")))
    before = _state(module.policy)
    with pytest.raises(FloatingPointError, match="non-finite"):
        make_trainer().fit(module, datamodule=_policy_dm(tokenizer, conversations))
    assert all(torch.isfinite(v).all() for v in _state(module.policy).values()), "NaN weights after the error"
    assert _same(_state(module.policy), before)


# -- log-probs match the sampler ------------------------------------------------------------------------


def test_log_probs_match_the_distribution_generate_samples_from(tiny_model, tokenizer, conversations):
    batch = next(iter(_policy_dm(tokenizer, conversations, batch_size=6, batches=1).train_dataloader()))
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    assert (prompt_mask == 0).any(), "the batch must contain left padding"
    torch.manual_seed(0)
    out = tiny_model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        top_k=0,
        max_new_tokens=5,
        min_new_tokens=5,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    response = out.sequences[:, prompt_ids.shape[1] :]
    gen_logprobs = (
        torch.stack([torch.log_softmax(s, -1) for s in out.logits], 1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    )
    full = torch.cat([prompt_ids, response], 1)
    full_mask = torch.cat([prompt_mask, torch.ones_like(response)], 1)
    module = _module(tiny_model, tokenizer)
    logprobs, values, _ = module._policy_outputs(full, full_mask, prompt_ids.shape[1], response)
    assert logprobs.shape == values.shape == response.shape
    assert torch.allclose(logprobs, gen_logprobs, atol=1e-4)


# -- sampling masks ------------------------------------------------------------------------------------------


def test_truncate_after_eos_hand_example():
    eos, pad = 5, 0
    response = torch.tensor([[7, 5, 8, 5], [7, 8, 9, 6], [5, 7, 7, 7], [7, 7, 7, 5]])
    ids, mask = truncate_after_eos(response, eos, pad)
    assert ids.tolist() == [[7, 5, 0, 0], [7, 8, 9, 6], [5, 0, 0, 0], [7, 7, 7, 5]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_sampled_responses_are_masked_up_to_the_first_eos(tiny_model, tokenizer, conversations):
    batch = next(iter(_policy_dm(tokenizer, conversations, batch_size=64, batches=1).train_dataloader()))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tiny_model.train()
    torch.manual_seed(0)
    response, mask = sample_responses(tiny_model, batch["input_ids"], batch["attention_mask"], eos, pad, 12)
    assert tiny_model.training, "sampling must restore the model's mode"
    assert response.shape[1] <= 12 and mask.shape == response.shape
    ended = 0
    for row, m in zip(response.tolist(), mask.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        if eos in row:
            ended += 1
            assert n == row.index(eos) + 1  # up to and including the first <end>
            assert all(t == pad for t in row[n:])
        else:
            assert n == len(row)
    assert 0 < ended < len(response), "the seeded sample must contain rows that end and rows that do not"


def test_greedy_sampling_is_deterministic(tiny_model, tokenizer, conversations):
    batch = next(iter(_policy_dm(tokenizer, conversations).train_dataloader()))
    args = (tiny_model, batch["input_ids"], batch["attention_mask"], tokenizer.eos_token_id, tokenizer.pad_token_id, 6)
    a = sample_responses(*args, greedy=True)
    torch.manual_seed(99)
    b = sample_responses(*args, greedy=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- save / load ------------------------------------------------------------------------------------------------


def test_save_then_load_round_trips_weights_tokenizer_and_value_head(tmp_path, tiny_model, tokenizer):
    module = _module(tiny_model, tokenizer)
    with torch.no_grad():
        module.value_head.weight.normal_()
        module.value_head.bias.fill_(0.25)
    path = module.save(tmp_path / "policy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"], "no temporary folder may remain"
    assert (path / "config.json").exists() and (path / VALUE_HEAD_FILE).exists()

    model, tok = load_policy(path)
    assert _same(_state(model), _state(tiny_model))
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        "left",
    )

    again = PolicyModule()
    again.load(path)
    assert _same(_state(again.value_head), _state(module.value_head))
    assert _same(_state(again.policy), _state(tiny_model))
    assert _same(_state(again.reference), _state(tiny_model))
    ids = torch.tensor([tokenizer("<customer> hi <agent>", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    assert torch.allclose(causal_lm_forward(again.policy, ids, mask)[0], causal_lm_forward(tiny_model, ids, mask)[0])


def test_save_replaces_an_older_policy_at_the_same_path(tmp_path, tiny_model, tokenizer):
    module = _module(tiny_model, tokenizer)
    module.save(tmp_path / "policy")
    with torch.no_grad():
        tiny_model.transformer.wte.weight.add_(1.0)
    module.save(tmp_path / "policy")
    model, _ = load_policy(tmp_path / "policy")
    assert torch.equal(model.transformer.wte.weight, tiny_model.transformer.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_a_fresh_value_head_starts_at_zero(tiny_model, tokenizer):
    module = PolicyModule()
    module.attach(tiny_model, tokenizer)
    assert module.value_head.weight.abs().sum() == 0 and module.value_head.bias.abs().sum() == 0


def test_load_policy_on_a_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_policy"
    with pytest.raises(FileNotFoundError, match="no_such_policy"):
        load_policy(missing)


def test_load_policy_on_an_empty_folder_names_it_and_what_is_missing(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir") as err:
        load_policy(empty)
    assert "config.json" in str(err.value) and "tokenizer" in str(err.value)


def test_load_policy_on_a_folder_without_weights_says_so(tmp_path, tiny_model, tokenizer):
    path = _module(tiny_model, tokenizer).save(tmp_path / "policy")
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match="weights"):
        load_policy(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"score_norm": "zscore"}, "score_norm"),
        ({"ppo_epochs": 0}, "ppo_epochs"),
        ({"advantage": "grpo"}, "model.policy.group_size"),
        ({"advantage": "rloo", "group_size": 1}, "model.policy.group_size"),
        ({"group_size": 0}, "model.policy.group_size"),
        ({"advantage": "reinforce", "group_size": 2}, "model.policy.advantage"),
        ({"kl_anchor": "sft"}, "model.policy.kl_anchor"),
        ({"length_group_cost": -1.0}, "policy.length_group_cost"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyModule(**kwargs)


def test_max_iteration_kl_ends_the_policy_phase_once_the_drift_passes_it(tokenizer, conversations):
    """Rollout 1 samples from pi_k itself (KL 0); after one update the next rollout's KL to pi_k is > 0."""
    _, _, capped = _ppo_run(tokenizer, conversations, kl_coef=0.01, max_iteration_kl=1e-9)
    # Flagged at rollout 2; Lightning may finish one more step after `should_stop` is set.
    assert 2 <= capped._rollouts <= 3
    assert capped.fit_stats["stopped_on_iteration_kl"] > 0
    _, _, uncapped = _ppo_run(tokenizer, conversations, kl_coef=0.01)
    assert uncapped._rollouts == 16
    assert "stopped_on_iteration_kl" not in uncapped.fit_stats


# -- GRPO / RLOO: a group of replies per state, no value head -------------------------------------------


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_rollouts_sample_group_size_replies_per_state_and_use_the_group_baseline(
    tiny_model, tokenizer, conversations, advantage
):
    torch.manual_seed(0)
    kl_coef, group = 0.1, 4
    module = _module(
        tiny_model,
        tokenizer,
        advantage=advantage,
        group_size=group,
        kl_coef=kl_coef,
        whiten_advantages=False,
        max_new_tokens=8,
    )
    batch = next(iter(_policy_dm(tokenizer, conversations, batch_size=6).train_dataloader()))
    with torch.no_grad():  # move the policy off the reference so the KL term is not 0
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = module.make_rollout(batch["input_ids"], batch["attention_mask"])
    prompt_len = batch["input_ids"].shape[1]
    # policy_batch_size states x group_size replies, the replies to one state on adjacent rows.
    assert rollout.responses.shape[0] == 6 * group
    assert torch.equal(rollout.query_responses[:, :prompt_len], batch["input_ids"].repeat_interleave(group, dim=0))
    # The advantages, computed here from their definitions (docs/variants.md) on the rollout's scores and KL.
    score = rollout.scores.reshape(6, group)
    penalty = (-kl_coef * rollout.seq_kl).reshape(6, group)
    assert rollout.seq_kl.abs().max() > 1e-3
    if advantage == "grpo":
        expected = (
            (score - score.mean(1, keepdim=True)) / (score.std(1, keepdim=True) + 1e-4)
            + penalty
            - penalty.mean(1, keepdim=True)
        )
    else:
        returns = score + penalty
        expected = returns - (returns.sum(1, keepdim=True) - returns) / (group - 1)
    mask = rollout.response_mask.float()
    torch.testing.assert_close(rollout.advantages, expected.reshape(-1, 1) * mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_solvers_never_train_the_value_head(tiny_model, tokenizer, conversations, advantage):
    torch.manual_seed(0)
    module = _module(tiny_model, tokenizer, advantage=advantage, group_size=2, vf_coef=10.0)
    with torch.no_grad():
        module.value_head.weight.normal_()
    head, policy = _state(module.value_head), _state(module.policy)
    make_trainer().fit(module, datamodule=_policy_dm(tokenizer, conversations))
    assert _same(_state(module.value_head), head), "grpo/rloo must leave the value head untouched (vf_coef ignored)"
    assert not _same(_state(module.policy), policy)
    assert "value_loss" not in module.fit_stats and "vf_clip_frac" not in module.fit_stats
    assert module.fit_stats["policy_loss"] == module.fit_stats["policy_loss"]  # finite, logged


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_solvers_increase_the_frequency_of_the_rewarded_token(tokenizer, conversations, advantage):
    # 8 states x 4 replies = 32 rollout rows, as many as the GAE test's 32 states x 1.
    before, after, module = _ppo_run(
        tokenizer, conversations, kl_coef=0.01, states=8, advantage=advantage, group_size=4
    )
    assert before < 0.15
    assert after > before + 0.3, f"{advantage}: rewarded-token rate {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_solvers_keep_the_kl_penalty_in_the_reward(tokenizer, conversations, advantage):
    before, after, _ = _ppo_run(tokenizer, conversations, kl_coef=1.0, states=8, advantage=advantage, group_size=4)
    assert abs(after - before) < 0.1, f"{advantage}: rewarded-token rate {before:.3f} -> {after:.3f} despite kl_coef=1"


# -- KL anchor pi_0 -------------------------------------------------------------------------------------------


def test_kl_anchor_pi0_keeps_the_reference_at_pi0_across_fits(tiny_model, tokenizer, conversations):
    torch.manual_seed(0)
    module = _module(tiny_model, tokenizer, kl_anchor="pi_0")
    pi0 = _state(module.policy)
    module.pin_reference()
    dm = _policy_dm(tokenizer, conversations)
    first = _Snapshots()
    make_trainer(callbacks=[first]).fit(module, datamodule=dm)
    pi1 = _state(module.policy)
    assert not _same(pi1, pi0)
    second = _Snapshots()
    make_trainer(callbacks=[second]).fit(module, datamodule=dm)
    # pi_k would have reset the reference to pi_1 here; pi_0 keeps it at pi_0.
    assert _same(second.start["reference"], pi0) and _same(second.end["reference"], pi0)
    assert not _same(second.start["policy"], pi0)


def test_pin_reference_from_a_saved_pi0_after_a_restart(tmp_path, tiny_model, tokenizer, conversations):
    torch.manual_seed(0)
    module = _module(tiny_model, tokenizer, kl_anchor="pi_0")
    pi0 = _state(module.policy)
    module.save(tmp_path / "pi_0")
    make_trainer().fit(module, datamodule=_policy_dm(tokenizer, conversations))
    module.save(tmp_path / "pi_1")
    restarted = PolicyModule(kl_anchor="pi_0")
    restarted.load(tmp_path / "pi_1")  # a fresh process loads pi_k: its reference is pi_k ...
    assert not _same(_state(restarted.reference), pi0)
    restarted.pin_reference(tmp_path / "pi_0")  # ... until pi_0 is pinned from the run's pi_0 folder
    assert _same(_state(restarted.reference), pi0)
    assert _same(_state(restarted.policy), _state(module.policy))
    assert not any(p.requires_grad for p in restarted.reference.parameters())


# -- length groups: the split forwards change only the padding ----------------------------------------------
# A module with length_group_cost None runs every forward over the whole padded batch (one group); with 0.0 it
# splits as far as the padding allows. Both must give the rollout, the losses and the gradients of the unsplit
# computation (the plain forwards `_policy_outputs`, `_reference_logits`, `critic.score` over the padded batch),
# to float rounding: 1e-5.
TOL = 1e-5


def _random_critic(model, tmp_path):
    from iterppo_lightning.modules.critic import CriticModule

    critic = CriticModule(init_from_policy=False)
    model.save_pretrained(tmp_path / "critic_base")
    critic.build(tmp_path / "critic_base")
    with torch.no_grad():  # a zero head would score every reply 0.5
        critic.head.weight.normal_(0.0, 1.0)
    return critic


@pytest.fixture()
def whole_and_split(tiny_model, tokenizer, conversations, tmp_path):
    """One batch of 16 prompts and two equal modules on it (unsplit / split), with a random critic."""
    ends_often(tiny_model, tokenizer)
    critic = _random_critic(tiny_model, tmp_path)
    settings = dict(
        critic=critic, max_new_tokens=8, score_norm="whiten", entropy_coef=0.01, ppo_epochs=2, minibatches=2
    )
    modules = {
        name: _module(copy.deepcopy(tiny_model), tokenizer, length_group_cost=cost, **settings)
        for name, cost in (("whole", None), ("split", 0.0))
    }
    torch.manual_seed(0)
    batch = next(iter(_policy_dm(tokenizer, conversations, batch_size=16, batches=1).train_dataloader()))
    return modules, batch


def _moved_away_from_the_reference(module: PolicyModule) -> PolicyModule:
    """The policy as after some updates (seeded noise on every weight): the rollout then runs the reference."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return module


def _rollouts(modules, batch) -> dict[str, Rollout]:
    out = {}
    for name, module in modules.items():
        torch.manual_seed(1)
        out[name] = module.make_rollout(batch["input_ids"], batch["attention_mask"])
    return out


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=0)


def test_a_split_rollout_equals_the_unsplit_computation(whole_and_split):
    modules, batch = whole_and_split
    for module in modules.values():
        _moved_away_from_the_reference(module)
    rollouts = _rollouts(modules, batch)
    whole, split = rollouts["whole"], rollouts["split"]
    prompt_lengths = batch["attention_mask"].sum(1)
    reply_lengths = whole.response_mask.sum(1)
    # The batch has prompts and replies of many lengths, and the split module really splits it.
    assert len(set(prompt_lengths.tolist())) > 4 and len(set(reply_lengths.tolist())) > 3
    groups = modules["split"]._groups(list(range(16)), prompt_lengths.tolist(), reply_lengths.tolist(), True)
    assert len(groups) > 3
    assert any(g.prompt_width < whole.prompt_len and g.reply_width < whole.responses.shape[1] for g in groups)

    # The same replies (generation's split prefill does not change the draws), the same rollout to 1e-5.
    assert torch.equal(split.responses, whole.responses) and torch.equal(split.response_mask, whole.response_mask)
    for name in ("logprobs", "values", "advantages", "returns", "scores", "seq_kl"):
        _close(getattr(split, name), getattr(whole, name))

    # And both equal the plain forwards over the padded batch (log-probs and values are read from the sampling
    # passes; the reference and Q_k ran on trimmed groups).
    module, real = modules["whole"], whole.response_mask.bool()
    full, full_mask, width = whole.query_responses, whole.attention_mask, whole.responses.shape[1]
    with torch.no_grad():
        logprobs, values, _ = module._policy_outputs(full, full_mask, whole.prompt_len, whole.responses)
        ref = pm.logprobs_from_logits(module._reference_logits(full, full_mask, width + 1)[:, :-1], whole.responses)
        score = module.critic.score(full, full_mask)
    for rollout in (whole, split):
        _close(rollout.logprobs[real], logprobs[real])
        _close(rollout.values[real], values[real])
        _close(rollout.seq_kl, ((logprobs - ref) * real).sum(1))
        _close(rollout.scores, score)
        assert (rollout.logprobs[~real] == 0).all() and (rollout.values[~real] == 0).all()
    assert whole.seq_kl.abs().min() > 1e-3, "the reference forwards ran"


def test_until_the_first_update_the_reference_log_probs_are_the_policys_own(whole_and_split, tokenizer, conversations):
    """pi_k is the reference at the start of a fit: its log-probs serve as the reference's, so the first rollout's
    KL is exactly 0 (as when both came from the same forward) and no reference forward runs; after the first
    optimizer step the reference runs."""
    modules, batch = whole_and_split
    module = modules["split"]
    calls = []
    module.reference.register_forward_pre_hook(lambda *_: calls.append(1))
    first = module.make_rollout(batch["input_ids"], batch["attention_mask"])
    assert (first.seq_kl == 0).all() and not calls
    make_trainer().fit(module, datamodule=_policy_dm(tokenizer, conversations, batch_size=16, batches=1))
    assert module.fit_stats["kl"] == 0.0 and not calls  # one rollout: the fit's first
    module.make_rollout(batch["input_ids"], batch["attention_mask"])  # the updated policy against pi_k
    assert calls


def test_split_update_forwards_give_the_unsplit_losses_and_gradients(whole_and_split):
    modules, batch = whole_and_split
    module = _moved_away_from_the_reference(modules["split"])
    rollout = _rollouts({"split": module}, batch)["split"]
    torch.manual_seed(2)
    idx = torch.randperm(16)[:8]  # a minibatch in random order, as ppo_update draws them
    mb = rollout.rows(idx)
    prompt_lengths = rollout.attention_mask[:, : rollout.prompt_len].sum(1).tolist()
    reply_lengths = rollout.response_mask.sum(1).tolist()
    params = [p for p in module.policy.parameters()] + list(module.value_head.parameters())

    def loss_and_grads(split: bool):
        if split:
            groups = module._groups(idx.tolist(), prompt_lengths, reply_lengths, True)
            assert len(groups) > 2
            logprobs, values, entropies = module._grouped_policy_outputs(rollout, groups)
        else:
            logprobs, values, logits = module._policy_outputs(
                mb.query_responses, mb.attention_mask, mb.prompt_len, mb.responses
            )
            entropies = pm.entropy_from_logits(logits)
        mask = mb.response_mask
        pg, pg_stats = pm.policy_loss(logprobs, mb.logprobs, mb.advantages, mask, module.clip_eps)
        vf, _ = pm.value_loss(values, mb.values, mb.returns, mask, module.value_clip)
        entropy = pm.masked_mean(entropies, mask)
        loss = pg + module.vf_coef * vf - module.entropy_coef * entropy
        grads = torch.autograd.grad(loss, params)
        real = mask.bool()
        return {
            "logprobs": logprobs.detach()[real],
            "values": values.detach()[real],
            "entropy": entropy.detach(),
            "loss": loss.detach(),
            "approx_kl": pg_stats["approx_kl"],
            "clip_frac": pg_stats["clip_frac"],
        }, grads

    whole, whole_grads = loss_and_grads(False)
    split, split_grads = loss_and_grads(True)
    for key in whole:
        _close(split[key], whole[key])
    assert any(g.abs().max() > 1e-3 for g in whole_grads), "the test needs real gradients"
    for a, b in zip(split_grads, whole_grads):
        _close(a, b)


def test_a_split_fit_trains_like_an_unsplit_one(whole_and_split, tokenizer, conversations):
    """One rollout and 2 x 2 clipped updates: the same statistics and weights.

    Weights to 1e-4, not 1e-5: Adam divides by the root of the squared-gradient average, so a last-bit
    difference in a gradient that is nearly 0 moves that weight by up to ~lr * 1e-2 (see
    tests/distributed/test_zero_pipeline.py); a wrong gradient would differ by ~lr = 1e-3 everywhere.
    """
    modules, _ = whole_and_split
    stats, weights = {}, {}
    for name, module in modules.items():
        torch.manual_seed(3)
        make_trainer().fit(module, datamodule=_policy_dm(tokenizer, conversations, batch_size=16, batches=1))
        stats[name], weights[name] = module.fit_stats, _state(module.policy)
    assert stats["whole"].keys() == stats["split"].keys()
    for key in stats["whole"]:
        assert stats["split"][key] == pytest.approx(stats["whole"][key], abs=TOL), key
    moved = max((weights["whole"][k] - module.reference.state_dict()[k]).abs().max() for k in weights["whole"])
    assert moved > 1e-4
    for k in weights["whole"]:
        torch.testing.assert_close(weights["split"][k], weights["whole"][k], atol=1e-4, rtol=0)
