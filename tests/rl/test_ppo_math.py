"""Hand-checked tests for iterppo_lightning.rl.ppo_math.

Every expected value below is worked out by hand in a comment, not produced by
calling the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from iterppo_lightning.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    check_solver_settings,
    ensemble_lower_bound,
    entropy_from_logits,
    entropy_from_logprobs,
    gae_advantages,
    group_advantages,
    group_token_advantages,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_scores,
    paired_difference_loss,
    per_token_rewards,
    policy_loss,
    sequence_returns,
    value_loss,
)

NAN = float("nan")


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_t, atol=atol, rtol=0)


# --------------------------------------------------------------------------- #
# masked statistics
# --------------------------------------------------------------------------- #
# Real tokens: 1, 2, 3, 4. Padding holds 100, -50 and nan and must be ignored.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]])
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_masked_mean_global_and_per_row() -> None:
    # (1+2+3+4)/4 = 2.5 ; rows: (1+2+3)/3 = 2, 4/1 = 4
    close(masked_mean(X, M), 2.5)
    close(masked_mean(X, M, dim=1), [2.0, 4.0])
    # bool mask gives the same answer
    close(masked_mean(X, M.bool()), 2.5)


def test_masked_mean_empty_row_is_zero_not_nan() -> None:
    x = torch.tensor([[1.0, 2.0], [5.0, 7.0]])
    m = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    close(masked_mean(x, m, dim=1), [1.5, 0.0])


def test_masked_var() -> None:
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares sum 2.25+0.25+0.25+2.25 = 5
    # biased 5/4 = 1.25 ; unbiased 5/3
    close(masked_var(X, M, unbiased=False), 1.25)
    close(masked_var(X, M, unbiased=True), 5.0 / 3.0)


def test_masked_whiten_ignores_padding_and_zeros_it() -> None:
    # mean 2.5, unbiased var 5/3, std = sqrt(5/3) = 1.2909944
    # (1-2.5)/1.2909944 = -1.1618950 ; (2-2.5)/1.2909944 = -0.3872983
    out = masked_whiten(X, M)
    close(out, [[-1.1618950, -0.3872983, 0.3872983], [1.1618950, 0.0, 0.0]], atol=1e-5)
    assert not torch.isnan(out).any()
    # shift_mean=False adds the mean (2.5) back on real tokens; padding still 0
    out2 = masked_whiten(X, M, shift_mean=False)
    close(out2, [[1.3381050, 2.1127017, 2.8872983], [3.6618950, 0.0, 0.0]], atol=1e-5)


# --------------------------------------------------------------------------- #
# logits
# --------------------------------------------------------------------------- #
def test_logprobs_hand_value() -> None:
    # logits [0, log 3] -> probs [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25)]])


def test_logprobs_match_categorical() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.distributions.Categorical(logits=logits).log_prob(labels)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)


def test_logprobs_bf16_is_upcast() -> None:
    logits = torch.randn(2, 3, 7).bfloat16()
    labels = torch.zeros(2, 3, dtype=torch.long)
    assert logprobs_from_logits(logits, labels).dtype == torch.float32


def test_entropy_uniform_is_log_v() -> None:
    V = 50
    # any constant logits (even huge ones) give the uniform distribution
    logits = torch.full((2, 3, V), 1000.0)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(V)), atol=1e-4)


def test_entropy_hand_value_and_stability() -> None:
    # probs [1/4, 3/4]: H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor([[[0.0, math.log(3.0)], [1e4, 0.0]]])
    h = entropy_from_logits(logits)
    close(h[0, 0], 0.5623351)
    # a near one-hot distribution: entropy ~ 0 and finite (naive p*log p would give nan)
    assert torch.isfinite(h).all()
    close(h[0, 1], 0.0, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    rnd = torch.randn(4, 9, generator=g)
    torch.testing.assert_close(entropy_from_logits(rnd), torch.distributions.Categorical(logits=rnd).entropy())


def test_entropy_from_logprobs_by_hand() -> None:
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 = 1.0397208
    # p = (1, 0, 0) with log 0 = -inf: H = -(1 * 0) - 0 - 0 = 0, not nan
    logp = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]]))
    close(entropy_from_logprobs(logp), [[1.5 * math.log(2.0), 0.0]])
    # The entropy of the logits the log-softmax came from.
    z = torch.tensor([[0.3, -1.2, 2.0, 0.0]])
    close(entropy_from_logprobs(torch.log_softmax(z, -1)), entropy_from_logits(z))


# --------------------------------------------------------------------------- #
# rewards
# --------------------------------------------------------------------------- #
def test_per_token_rewards_places_score_at_last_real_token() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -0.5, 0.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    score = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = per_token_rewards(score, logprobs, ref, mask, kl_coef=0.1)
    # kl = logprobs - ref, 0 at padding:
    #   row0: [-1+1.5, -2+1, -3+3] = [0.5, -1, 0]
    #   row1: [-1+2, -1+0.5, pad] = [1, -0.5, 0]
    #   row2: all padding -> 0
    close(kl, [[0.5, -1.0, 0.0], [1.0, -0.5, 0.0], [0.0, 0.0, 0.0]])
    # rewards = -0.1*kl, + score at index mask.sum(1)-1 (2 for row0, 1 for row1, none for row2)
    #   row0: [-0.05, 0.1, 0 + 10]
    #   row1: [-0.1, 0.05 + 20, 0]
    close(rewards, [[-0.05, 0.1, 10.0], [-0.1, 20.05, 0.0], [0.0, 0.0, 0.0]], atol=1e-5)


# --------------------------------------------------------------------------- #
# GAE
# --------------------------------------------------------------------------- #
def test_gae_1x3_gamma1() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # gamma=1, lam=0.5, V after last token = 0
    # t=2: delta = 1 + 0 - 0.5 = 0.5        A2 = 0.5
    # t=1: delta = 0 + 0.5 - 0.5 = 0        A1 = 0 + 0.5*0.5 = 0.25
    # t=0: delta = 0 + 0.5 - 0.5 = 0        A0 = 0 + 0.5*0.25 = 0.125
    # returns = A + V = [0.625, 0.75, 1.0]
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.125, 0.25, 0.5]])
    close(ret, [[0.625, 0.75, 1.0]])


def test_gae_2x3_with_padding() -> None:
    # row1 has padding at t=2 holding garbage (99) that must be ignored
    rewards = torch.tensor([[1.0, 0.0, 2.0], [2.0, 3.0, 99.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # gamma=0.5, lam=0.5 -> gamma*lam = 0.25
    # row0:
    #   t=2: delta = 2 + 0       - 3 = -1      A2 = -1
    #   t=1: delta = 0 + 0.5*3   - 2 = -0.5    A1 = -0.5 + 0.25*(-1)    = -0.75
    #   t=0: delta = 1 + 0.5*2   - 1 = 1       A0 = 1 + 0.25*(-0.75)    = 0.8125
    #   returns = [0.8125+1, -0.75+2, -1+3] = [1.8125, 1.25, 2]
    # row1 (last real token t=1, value after it is 0):
    #   t=2: padding -> 0
    #   t=1: delta = 3 + 0.5*0   - 1 = 2       A1 = 2
    #   t=0: delta = 2 + 0.5*1   - 2 = 0.5     A0 = 0.5 + 0.25*2        = 1.0
    #   returns = [3, 3, 0]
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[0.8125, -0.75, -1.0], [1.0, 2.0, 0.0]])
    close(ret, [[1.8125, 1.25, 2.0], [3.0, 3.0, 0.0]])


def test_gae_zero_advantage_on_every_masked_position() -> None:
    # a masked position *before* real tokens must also come out 0
    rewards = torch.tensor([[5.0, 0.0, 1.0]])
    values = torch.tensor([[4.0, 1.0, 1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    # gamma=1, lam=1: t=2: delta = 1 + 0 - 1 = 0 -> A2 = 0
    #                 t=1: delta = 0 + 1 - 1 = 0 -> A1 = 0
    #                 t=0: masked -> 0 (unmasked it would be 0 + 1 - 0 + 0 = 1)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.0, 0.0, 0.0]])
    close(ret, [[0.0, 1.0, 1.0]])


def test_gae_outputs_are_detached() -> None:
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    adv, ret = gae_advantages(torch.zeros(1, 2), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- #
# policy loss
# --------------------------------------------------------------------------- #
def _policy_case() -> tuple[torch.Tensor, ...]:
    ratios = torch.tensor([[1.5, 0.5, 1.5], [0.5, 1.1, 50.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logprobs = ratios.log().clone().requires_grad_(True)
    old = torch.zeros(2, 3)
    return logprobs, old, adv, mask


def test_policy_loss_values_and_clip_frac() -> None:
    logprobs, old, adv, mask = _policy_case()
    # eps = 0.2 ; per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A= 1, r=1.5: max(-1.5, -1.2) = -1.2   clipped term wins  (clipped)
    #   A= 1, r=0.5: max(-0.5, -0.8) = -0.5
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8   clipped term wins  (clipped)
    #   A= 1, r=1.1: max(-1.1, -1.1) = -1.1   inside the range
    #   padding (r=50, A=5) ignored
    # loss = (-1.2 - 0.5 + 1.5 + 0.8 - 1.1)/5 = -0.5/5 = -0.1
    # clip_frac = 2/5 = 0.4 ; ratio_mean = (1.5+0.5+1.5+0.5+1.1)/5 = 1.02
    # approx_kl = mean((r-1) - ln r):
    #   r=1.5: 0.5 - 0.4054651 = 0.0945349 ; r=0.5: -0.5 + 0.6931472 = 0.1931472
    #   r=1.1: 0.1 - 0.0953102 = 0.0046898
    #   (2*0.0945349 + 2*0.1931472 + 0.0046898)/5 = 0.1160108
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    close(loss.detach(), -0.1, atol=1e-5)
    close(stats["clip_frac"], 0.4)
    close(stats["ratio_mean"], 1.02, atol=1e-5)
    close(stats["approx_kl"], 0.1160108, atol=1e-5)
    assert not stats["clip_frac"].requires_grad


def test_policy_loss_gradient_is_zero_on_clipped_tokens() -> None:
    logprobs, old, adv, mask = _policy_case()
    loss, _ = policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    loss.backward()
    # d/dlogp of (-A r)/5 = -A r / 5 on unclipped tokens, 0 on clipped and padding:
    #   [clipped, -(1)(0.5)/5 = -0.1, -(-1)(1.5)/5 = 0.3]
    #   [clipped, -(1)(1.1)/5 = -0.22, padding]
    close(logprobs.grad, [[0.0, -0.1, 0.3], [0.0, -0.22, 0.0]], atol=1e-5)


def test_policy_loss_on_policy_equals_minus_mean_advantage() -> None:
    # ratio = 1 everywhere: loss = -mean(A) over real tokens = -(1 + 2 + 3)/3 = -2
    lp = torch.tensor([[-0.3, -1.2, -0.7, -5.0]])
    adv = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(lp, lp.clone(), adv, mask, clip_eps=0.2)
    close(loss, -2.0)
    close(stats["clip_frac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)


# --------------------------------------------------------------------------- #
# value loss
# --------------------------------------------------------------------------- #
def test_value_loss_clipped_and_unclipped() -> None:
    values = torch.tensor([[0.5, 0.5, 1.1, 7.0]])
    old = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 2.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # c = 0.2, clipped v = old + clip(v - old, -0.2, 0.2)
    #   tok0: v=0.5 -> vc=0.2, R=1: (0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64 -> 0.64 (clip active)
    #   tok1: v=0.5 -> vc=0.2, R=0: 0.25, 0.04                          -> 0.25
    #   tok2: v=1.1 -> vc=1.1, R=2: 0.81, 0.81                          -> 0.81 (equal: not counted)
    #   tok3: padding ignored
    # loss = 0.5 * (0.64 + 0.25 + 0.81)/3 = 0.5 * 1.7/3 = 0.2833333 ; vf_clip_frac = 1/3
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    close(loss, 0.2833333, atol=1e-6)
    close(stats["vf_clip_frac"], 1.0 / 3.0)
    # unclipped: 0.5 * (0.25 + 0.25 + 0.81)/3 = 0.5 * 1.31/3 = 0.2183333
    loss_u, stats_u = value_loss(values, old, returns, mask, clip_range=None)
    close(loss_u, 0.2183333, atol=1e-6)
    close(stats_u["vf_clip_frac"], 0.0)


# --------------------------------------------------------------------------- #
# KL controllers
# --------------------------------------------------------------------------- #
def test_adaptive_kl_controller_direction_and_amount() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL = 12 -> err = 12/6 - 1 = 1, clipped to 0.2 -> mult = 1 + 0.2*256/10000 = 1.00512
    ctl.update(current_kl=12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    # KL = 5.4 -> err = -0.1 (inside the clip) -> mult = 1 - 0.1*256/10000 = 0.99744
    ctl.update(current_kl=5.4, n_steps=256)
    assert ctl.value == pytest.approx(0.100512 * 0.99744, abs=1e-12)
    # KL = 0 -> err = -1 clipped to -0.2 -> mult = 1 - 0.2*1000/10000 = 0.98
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=1000)
    assert ctl.value == pytest.approx(before * 0.98, abs=1e-12)
    # on target -> unchanged
    before = ctl.value
    ctl.update(current_kl=6.0, n_steps=1000)
    assert ctl.value == pytest.approx(before, abs=1e-15)


def test_kl_controllers_state_dict_roundtrip() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)
    resumed = AdaptiveKLController(0.5, target=1.0, horizon=5)
    resumed.load_state_dict(ctl.state_dict())
    assert (resumed.value, resumed.target, resumed.horizon) == (ctl.value, 6.0, 10000.0)
    resumed.update(12.0, 256)
    ctl.update(12.0, 256)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


# --------------------------------------------------------------------------- #
# score normalisation
# --------------------------------------------------------------------------- #
def test_normalize_scores() -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 6.0])
    close(normalize_scores(s, "none"), [1.0, 2.0, 3.0, 6.0])
    # mean 3
    close(normalize_scores(s, "center"), [-2.0, -1.0, 0.0, 3.0])
    # population std = sqrt((4+1+0+9)/4) = sqrt(3.5) = 1.8708287
    # -2/1.8708287 = -1.0690450, -1/.. = -0.5345225, 3/.. = 1.6035675
    close(normalize_scores(s, "whiten"), [-1.0690450, -0.5345225, 0.0, 1.6035675], atol=1e-5)
    # batch of one: whiten gives 0, not nan
    close(normalize_scores(torch.tensor([4.0]), "whiten"), [0.0])


def test_normalize_scores_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'none'.*'whiten'.*'center'"):
        normalize_scores(torch.tensor([1.0]), "zscore")


# --------------------------------------------------------------------------- #
# group baselines (GRPO, RLOO) and the pessimistic ensemble score
# --------------------------------------------------------------------------- #
def test_sequence_return_is_the_kl_penalised_score() -> None:
    # Same rows as test_per_token_rewards_places_score_at_last_real_token:
    #   row0 rewards [-0.05, 0.1, 10] -> 10.05 = 10 - 0.1 * (0.5 - 1 + 0)
    #   row1 rewards [-0.1, 20.05, pad 0] -> 19.95 = 20 - 0.1 * (1 - 0.5)
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, _ = per_token_rewards(torch.tensor([10.0, 20.0]), logprobs, ref, mask, kl_coef=0.1)
    rewards[1, 2] = NAN  # padding never leaks
    close(sequence_returns(rewards, mask), [10.05, 19.95], atol=1e-5)


# Two states x three replies, rows of a state adjacent: returns [1, 2, 6] and [0, 0, 3].
GROUP_RETURNS = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])


def test_grpo_advantage_by_hand() -> None:
    # group 1: mean 3, deviations [-2, -1, 3], sample var (4 + 1 + 9) / 2 = 7, std sqrt(7) = 2.6457513
    #   -> [-2, -1, 3] / (2.6457513 + 1e-4) = [-0.7559, -0.3779, 1.1338]
    # group 2: mean 1, deviations [-1, -1, 2], sample var (1 + 1 + 4) / 2 = 3, std 1.7320508
    #   -> [-1, -1, 2] / (1.7320508 + 1e-4) = [-0.57732, -0.57732, 1.15464]
    s1, s2 = math.sqrt(7) + 1e-4, math.sqrt(3) + 1e-4
    close(group_advantages(GROUP_RETURNS, 3, "grpo"), [-2 / s1, -1 / s1, 3 / s1, -1 / s2, -1 / s2, 2 / s2], atol=1e-6)


def test_rloo_advantage_by_hand() -> None:
    # group 1: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5
    # group 2: 0 - (0+3)/2 = -1.5; 0 - 1.5 = -1.5; 3 - 0 = 3
    close(group_advantages(GROUP_RETURNS, 3, "rloo"), [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_a_group_of_equal_returns_has_zero_advantage_not_nan() -> None:
    # std 0: GRPO divides by eps only, and the centred returns are exactly 0.
    close(group_advantages(torch.tensor([0.7, 0.7]), 2, "grpo"), [0.0, 0.0])
    close(group_advantages(torch.tensor([0.7, 0.7]), 2, "rloo"), [0.0, 0.0])


def test_group_token_advantages_put_the_sequence_advantage_on_every_reply_token() -> None:
    # Two replies to one state, kl_coef 0.5. Reply 1: 3 tokens, kl [0.2, 0.2, 0.0], score 1
    #   -> rewards [-0.1, -0.1, 1.0], P1 = -0.2, R1 = 0.8.
    # Reply 2: 1 token, kl [0.4], score 0 -> rewards [-0.2], P2 = -0.5 * 0.4 = -0.2, R2 = -0.2.
    score = torch.tensor([1.0, 0.0])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, NAN, NAN]])
    ref = torch.tensor([[-1.2, -1.2, -1.0], [-1.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, _ = per_token_rewards(score, logprobs, ref, mask, kl_coef=0.5)
    # RLOO: R1 - R2 = 1.0, R2 - R1 = -1.0, on every real token.
    rloo = group_token_advantages(score, rewards, mask, 2, "rloo")
    close(rloo, [[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]], atol=1e-6)
    # GRPO: scores [1, 0]: mean 0.5, sample std sqrt(0.5) = 0.7071068 -> +-0.5 / (0.7071068 + 1e-4)
    #   = +-0.7070068; penalties [-0.2, -0.2] are equal, so their centred part is 0.
    z = 0.5 / (math.sqrt(0.5) + 1e-4)
    grpo = group_token_advantages(score, rewards, mask, 2, "grpo")
    close(grpo, [[z, z, z], [-z, 0.0, 0.0]], atol=1e-6)
    # group_mean: R = [0.8, -0.2], mean 0.3 -> +-0.5, in Q's units (half of RLOO's difference with G = 2).
    unscaled = group_token_advantages(score, rewards, mask, 2, "group_mean")
    close(unscaled, [[0.5, 0.5, 0.5], [-0.5, 0.0, 0.0]], atol=1e-6)
    assert not rloo.requires_grad and not grpo.requires_grad and not unscaled.requires_grad


def test_group_mean_keeps_the_critics_scale_where_grpo_blows_it_up() -> None:
    # A nearly flat critic: scores 0.51 and 0.49 at one state. GRPO divides by their std (0.01414, plus 1e-4) and
    # gives +-0.702; group_mean keeps the difference it was given: +-0.01. Three replies: returns
    # [0.3, 0.6, 0.9], mean 0.6 -> [-0.3, 0.0, 0.3] = (G - 1) / G x RLOO's [-0.45, 0, 0.45].
    close(group_advantages(torch.tensor([0.51, 0.49]), 2, "grpo"), [0.70214, -0.70214], atol=1e-4)
    close(group_advantages(torch.tensor([0.51, 0.49]), 2, "group_mean"), [0.01, -0.01], atol=1e-6)
    close(group_advantages(torch.tensor([0.3, 0.6, 0.9]), 3, "group_mean"), [-0.3, 0.0, 0.3], atol=1e-6)
    close(group_advantages(torch.tensor([0.3, 0.6, 0.9]), 3, "rloo"), [-0.45, 0.0, 0.45], atol=1e-6)


def test_grpo_standardises_the_score_but_not_the_kl_penalty() -> None:
    # Tied scores (0.5, 0.5): the score part is 0; the penalties -0.01 and -0.03 are only centred
    # (+-0.01), not blown up to +-0.707 by dividing by their own tiny spread.
    score = torch.tensor([0.5, 0.5])
    rewards = torch.tensor([[-0.01, 0.5], [-0.03, 0.5]])  # per-token penalty, then the score on the last token
    mask = torch.ones(2, 2)
    close(group_token_advantages(score, rewards, mask, 2, "grpo"), [[0.01, 0.01], [-0.01, -0.01]], atol=1e-6)


@pytest.mark.parametrize("size, n, method", [(1, 4, "grpo"), (3, 4, "rloo"), (2, 4, "median")])
def test_group_advantages_refuse_bad_groups(size, n, method) -> None:
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(n), size, method)


def test_ensemble_lower_bound_by_hand() -> None:
    # members (rows) x 2 pairs: pair 1 gets 0.2, 0.4, 0.9: mean 0.5, sample var (0.09 + 0.01 + 0.16) / 2 = 0.13
    #   -> 0.5 - 2 * sqrt(0.13) = 0.5 - 0.7211103 = -0.2211103
    # pair 2: all 0.6 -> std 0 -> 0.6
    scores = torch.tensor([[0.2, 0.6], [0.4, 0.6], [0.9, 0.6]])
    close(ensemble_lower_bound(scores, 2.0), [0.5 - 2 * math.sqrt(0.13), 0.6], atol=1e-6)
    close(ensemble_lower_bound(scores, 0.0), [0.5, 0.6], atol=1e-6)
    one = torch.tensor([[0.3, 0.8]])
    assert torch.equal(ensemble_lower_bound(one, 5.0), one[0])  # one member: unchanged, whatever c


@pytest.mark.parametrize(
    "advantage, group_size, anchor, named",
    [
        ("grpo", 1, "pi_k", "model.policy.group_size"),
        ("rloo", 1, "pi_k", "model.policy.group_size"),
        ("gae", 0, "pi_k", "model.policy.group_size"),
        ("ppo", 1, "pi_k", "model.policy.advantage"),
        ("gae", 1, "sft", "model.policy.kl_anchor"),
    ],
)
def test_solver_settings_errors_name_the_key(advantage, group_size, anchor, named) -> None:
    with pytest.raises(ValueError, match=named):
        check_solver_settings(advantage, group_size, anchor)
    check_solver_settings("gae", 4, "pi_0")  # gae with a group is fine


# --------------------------------------------------------------------------- #
# the critic's within-state loss over branch pairs
# --------------------------------------------------------------------------- #
def test_paired_difference_loss_by_hand() -> None:
    # Pair 1: Q says 0.6 - 0.2 = 0.4, the returns 1 - 0 = 1   -> (0.4 - 1)^2 = 0.36
    # Pair 2: Q says 0.4 - 0.3 = 0.1, the returns 0 - 1 = -1  -> (0.1 + 1)^2 = 1.21      mean 0.785
    q_first, q_second = torch.tensor([0.6, 0.4]), torch.tensor([0.2, 0.3])
    g_first, g_second = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(paired_difference_loss(q_first, q_second, g_first, g_second), 0.785)
    # Per member of an ensemble: [N, P] -> [N]; a member whose differences match the returns' loses nothing.
    members_first = torch.stack([q_first, torch.tensor([0.9, 0.0])])
    members_second = torch.stack([q_second, torch.tensor([-0.1, 1.0])])
    close(paired_difference_loss(members_first, members_second, g_first, g_second), [0.785, 0.0])


def test_paired_difference_loss_ignores_what_the_state_is_worth() -> None:
    # Moving both replies' Q by the same amount (a state valued higher or lower) changes nothing.
    q_first, q_second = torch.tensor([0.5, 0.7, 0.1]), torch.tensor([0.2, 0.75, 0.0])
    g_first, g_second = torch.tensor([1.0, 0.0, 0.9]), torch.tensor([0.0, 0.0, 0.0])
    base = paired_difference_loss(q_first, q_second, g_first, g_second)
    shift = torch.tensor([0.3, -0.5, 0.2])
    close(paired_difference_loss(q_first + shift, q_second + shift, g_first, g_second), base.item(), atol=1e-6)
