"""PPO math for token-level RLHF, as small pure-torch functions.

Every function works on batched tensors of shape ``[batch, response_len]``
(``[B, T]``) together with a ``mask`` of the same shape: ``1`` (or ``True``)
marks a real response token, ``0`` marks padding after EOS. Masks are assumed
right-padded (real tokens first, padding after), which is what a generation
loop produces for the response part. Every reduction respects the mask, and
padding positions never leak into a result, even if they hold ``nan``/``inf``.

Sign conventions
----------------
* Losses are to be *minimised*.
* ``kl = logprobs - ref_logprobs`` (positive when the policy puts more mass on
  the sampled token than the reference); the KL penalty enters the reward as
  ``-kl_coef * kl``.
* ``advantages > 0`` means "the sampled token was better than expected".

No Lightning here: the trainer composes these pieces.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "log_softmax",
    "gather_logprobs",
    "entropy_from_logits",
    "entropy_from_logprobs",
    "per_token_rewards",
    "gae_advantages",
    "policy_loss",
    "value_loss",
    "FixedKLController",
    "AdaptiveKLController",
    "normalize_scores",
    "SCORE_NORMALIZATION_MODES",
    "ADVANTAGE_ESTIMATORS",
    "sequence_returns",
    "group_advantages",
    "group_token_advantages",
    "ensemble_lower_bound",
    "check_solver_settings",
    "KL_ANCHORS",
]

SCORE_NORMALIZATION_MODES: tuple[str, ...] = ("none", "whiten", "center")

ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("gae", "grpo", "rloo", "group_mean")
"""Inner single-turn solvers: PPO with a value head and GAE, or a critic-free group baseline."""

KL_ANCHORS: tuple[str, ...] = ("pi_k", "pi_0")
"""Reference of the KL penalty: the current policy (Theorem 2) or the initial one."""

GRPO_EPS = 1e-4
"""Added to the group std in GRPO's advantage, so a group of equal returns gives 0, not nan."""

_WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------- #
# Masked statistics
# --------------------------------------------------------------------------- #
def _as_float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a floating tensor in ``like``'s dtype/device.

    Why: masks arrive as bool or float; arithmetic needs a float tensor of the
    same dtype as the data so nothing is silently upcast or downcast.
    """
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(device=like.device, dtype=dtype)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x * mask`` over ``dim`` (all elements when ``dim`` is None).

    Why: padding positions may hold garbage (even ``nan``/``inf`` from
    ``log(0)``); ``x * 0`` would still be ``nan`` there, so padding is replaced
    by exact zeros with ``torch.where`` before summing.
    """
    m = _as_float_mask(mask, x)
    xm = torch.where(m != 0, x * m, torch.zeros_like(x))
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    ``dim=None`` averages over every real token in the batch (a scalar); an int
    ``dim`` averages along that dimension (e.g. ``dim=1`` gives one mean per
    row, shape ``[B]``).

    Why: a plain ``x.mean()`` would count padding tokens, so shorter responses
    would get diluted statistics. An all-zero mask (along ``dim``) yields 0
    rather than ``nan`` so an empty row cannot poison a log or a loss.
    """
    m = _as_float_mask(mask, x)
    total = masked_sum(x, m, dim=dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return total / count.clamp_min(torch.finfo(total.dtype).tiny)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all real tokens (scalar).

    With ``unbiased=True`` Bessel's correction ``n / (n - 1)`` is applied, ``n``
    being the number of real tokens. With ``n <= 1`` the correction is
    undefined; the biased value (0 for one token) is returned instead of
    ``inf``/``nan``.

    Why: advantage whitening needs the spread of the real tokens only.
    """
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    centered = x - mean
    var = masked_mean(centered * centered, m)
    if unbiased:
        # torch.where instead of a Python ``if`` keeps it sync-free on GPU.
        n = m.sum()
        var = var * torch.where(n > 1, n / (n - 1).clamp_min(1.0), torch.ones_like(n))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """Standardise ``x`` with masked (real-token) mean and unbiased variance.

    Returns ``(x - mean) / sqrt(var + 1e-8)``; with ``shift_mean=False`` the
    mean is added back (only the scale is normalised, as done for rewards in
    some PPO variants). Padding positions come out exactly 0.

    Why: whitening advantages per batch keeps the policy-gradient step size
    independent of the reward scale; the statistics must ignore padding or
    the zeros there would bias the mean and shrink the variance.

    ``reduce`` (a function summing a tensor over processes) takes the
    statistics over every process's rows instead of this batch's only.
    """
    m = _as_float_mask(mask, x)
    if reduce is None:
        mean = masked_mean(x, m)
        var = masked_var(x, m, unbiased=True)
    else:  # statistics over every process's rows: reduce() sums a tensor over ranks
        sums = reduce(torch.stack([masked_sum(x, m), m.sum()]))
        n = sums[1].clamp_min(torch.finfo(x.dtype).tiny)
        mean = sums[0] / n
        centered = (x - mean) * m
        var = reduce((centered * centered).sum().reshape(1))[0] / n
        var = var * torch.where(sums[1] > 1, sums[1] / (sums[1] - 1).clamp_min(1.0), torch.ones_like(sums[1]))
    whitened = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m != 0, whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- #
# Quantities from logits
# --------------------------------------------------------------------------- #
def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision logits to float32.

    Why: ``log_softmax``/``logsumexp`` over a large vocabulary lose too much
    precision in bf16/fp16; the ratio ``exp(logp - old_logp)`` amplifies it.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability of ``labels`` under ``softmax(logits)``.

    ``logits``: ``[B, T, V]``; ``labels``: ``[B, T]`` (int64 token ids).
    Returns ``[B, T]`` (float32 for half-precision input, else logits' dtype).

    Why: PPO needs ``log pi(a_t | s_t)`` of the sampled token only; gathering
    from ``log_softmax`` is the numerically stable way to get it. ``logits``
    must already be aligned with ``labels`` (i.e. shifted by one relative to
    the model input for a causal LM).
    """
    return gather_logprobs(log_softmax(logits), labels)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dim, half-precision logits upcast to float32 first (see ``_upcast``)."""
    return torch.log_softmax(_upcast(logits), dim=-1)


def gather_logprobs(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_probs[..., labels]``: ``[B, T, V]`` and ``[B, T]`` -> ``[B, T]``.

    Why: with the log-softmax at hand (e.g. to read the entropy from it too,
    :func:`entropy_from_logprobs`), the tokens' log-probs need no second pass.
    """
    return torch.gather(log_probs, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of ``softmax(logits)`` over the last dim: ``[B, T, V] -> [B, T]``.

    Uses ``H = logsumexp(z) - sum(softmax(z) * z)``, which never evaluates
    ``log(0)`` and stays finite for very peaked distributions.

    Why: entropy is logged (and optionally used as a bonus) to watch for
    policy collapse.
    """
    z = _upcast(logits)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy from a log-softmax over the last dim: ``[B, T, V] -> [B, T]``.

    ``H = -sum(p * log p)`` with ``p = exp(log p)``; terms with ``p = 0``
    (``log p = -inf``, clamped to the lowest finite float) count 0, not
    ``nan``. Equals :func:`entropy_from_logits` of the logits the log-softmax
    came from.

    Why: PPO already takes the log-softmax over the vocabulary for the
    sampled tokens' log-probs; reading the entropy from it saves a second
    softmax and a logsumexp over ``[B, T, V]``.
    """
    finite = logprobs.clamp(min=torch.finfo(logprobs.dtype).min)
    return -(torch.exp(logprobs) * finite).sum(dim=-1)


# --------------------------------------------------------------------------- #
# Rewards and advantages
# --------------------------------------------------------------------------- #
def last_token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last real token of each row, and whether the row has one.

    Returns ``(index [B] int64, has_token [B] bool)``. For a right-padded mask
    ``index == mask.sum(1) - 1``; rows with no real token get index 0 and
    ``has_token=False``.

    Why: the sequence-level score belongs to the token that ended the
    response, and empty rows must be detectable instead of wrapping to -1.
    """
    real = mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    index = torch.where(real, positions, torch.zeros_like(positions)).amax(dim=1)
    return index.long(), real.any(dim=1)


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-token rewards: KL penalty on every token + score on the last.

    ``score``: ``[B]`` (one scalar per response from the critic/reward model);
    ``logprobs``/``ref_logprobs``/``mask``: ``[B, T]``.

    Returns ``(rewards, kl)``, both ``[B, T]`` and 0 at padding:
    ``kl = logprobs - ref_logprobs`` and
    ``rewards = -kl_coef * kl``, plus ``score[b]`` added at the last real
    token of row ``b``. Rows with an all-zero mask get no score (all zeros).

    Why: the KL term (Ziegler et al. 2019) keeps the policy near the
    reference model per token, while the task reward only exists at the end
    of the response.
    """
    m = _as_float_mask(mask, logprobs)
    kl = torch.where(m != 0, (logprobs - ref_logprobs) * m, torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    index, has_token = last_token_index(mask)
    add = torch.where(
        has_token,
        score.to(device=rewards.device, dtype=rewards.dtype).reshape(-1),
        torch.zeros((), device=rewards.device, dtype=rewards.dtype),
    )
    rewards = rewards.scatter_add(1, index.unsqueeze(1), add.unsqueeze(1))
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over response tokens.

    ``rewards``, ``values``, ``mask``: ``[B, T]``. Backwards recursion

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    with ``V`` after the last real token taken as 0 (the episode ends at
    EOS). Rewards and values at padding are treated as 0 whatever they hold.

    Returns ``(advantages, returns)``, both ``[B, T]``, detached, 0 at
    padding; ``returns = advantages + values`` (the value-function target).

    Why: GAE trades bias for variance via ``lam``; it is computed on detached
    tensors because it is a fixed target for the update, not part of the
    graph. Loops over time only (vectorised over the batch).
    """
    m = _as_float_mask(mask, values)
    zeros = torch.zeros_like(values)
    values = torch.where(m != 0, values.detach() * m, zeros)
    rewards = torch.where(m != 0, rewards.detach().to(values.dtype) * m, zeros)

    T = values.shape[1]
    advantages_reversed: list[torch.Tensor] = []
    last_gae = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    advantages = torch.where(m != 0, advantages, zeros)
    returns = advantages + values
    return advantages, returns


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise), masked mean over tokens.

    ``ratio = exp(logprobs - old_logprobs)``; per token
    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``.

    Returns ``(loss, stats)``: ``loss`` is a scalar with grad; ``stats`` holds
    detached 0-dim tensors:

    * ``clip_frac``: fraction of real tokens where the clipped term is the
      larger one (strictly), i.e. the token gives no gradient;
    * ``approx_kl``: masked mean of ``(ratio - 1) - log(ratio)``, an unbiased,
      always non-negative estimator of KL(old || new) (Schulman's k3);
    * ``ratio_mean``: masked mean of ``ratio``.

    Why: clipping removes the incentive to move the ratio outside
    ``[1 - eps, 1 + eps]``, keeping each update near the sampling policy.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss (to minimise), masked mean over tokens.

    ``0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2)``; with
    ``clip_range=None`` it is plain ``0.5 * (v - R)^2``.

    Returns ``(loss, stats)``; ``stats["vf_clip_frac"]`` (detached 0-dim) is
    the fraction of real tokens where the clipped error is strictly larger
    (0 when unclipped).

    Why: as with the policy, clipping stops the critic from jumping far from
    the values used to compute the advantages in one update.
    """
    err_unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(err_unclipped, mask)
        return loss, {"vf_clip_frac": torch.zeros((), dtype=values.dtype, device=values.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)
    return loss, {"vf_clip_frac": clip_frac}


# --------------------------------------------------------------------------- #
# KL coefficient controllers
# --------------------------------------------------------------------------- #
class FixedKLController:
    """Constant KL coefficient.

    Why: the simplest baseline; shares the interface of
    :class:`AdaptiveKLController` so the trainer can swap them.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state for checkpoint/resume."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    On each update: ``err = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + err * n_steps / horizon``. KL above target raises the
    coefficient, KL below lowers it.

    Why: a fixed coefficient lets KL drift as the reward scale changes; this
    proportional controller steers the measured KL toward ``target``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value: float = float(init_kl_coef)
        self.target: float = float(target)
        self.horizon: float = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` toward the coefficient that yields ``target`` KL.

        ``current_kl``: measured KL of the last batch (e.g. mean over rows of
        the per-sequence summed KL); ``n_steps``: samples in that batch.
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state for checkpoint/resume."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (target/horizon only if present)."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


# --------------------------------------------------------------------------- #
# Score normalisation
# --------------------------------------------------------------------------- #
def normalize_scores(score: torch.Tensor, mode: str, reduce=None) -> torch.Tensor:
    """Per-batch normalisation of the critic scores (shape ``[B]``).

    * ``"none"``: unchanged;
    * ``"center"``: ``x - mean``;
    * ``"whiten"``: ``(x - mean) / (std + 1e-8)``, std the population
      (biased) std over the batch, so a batch of one gives 0, not ``nan``.

    Why: reward-model scores have an arbitrary offset/scale that drifts
    across iterations; normalising per batch keeps the score comparable to
    the KL penalty. Unknown ``mode`` raises ``ValueError``. ``reduce`` (a
    function summing a tensor over processes) takes mean and std over every
    process's scores.
    """
    if mode not in SCORE_NORMALIZATION_MODES:
        raise ValueError(
            f"unknown score normalisation mode {mode!r}; "
            f"allowed: {', '.join(repr(m) for m in SCORE_NORMALIZATION_MODES)}"
        )
    if mode == "none":
        return score
    x = score.float() if not score.is_floating_point() else score
    if reduce is not None:
        sums = reduce(torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype)]))
        mean = sums[0] / sums[1]
        if mode == "center":
            return x - mean
        var = reduce(((x - mean) ** 2).sum().reshape(1))[0] / sums[1]
        return (x - mean) / (var.sqrt() + _WHITEN_EPS)
    mean = x.mean()
    if mode == "center":
        return x - mean
    return (x - mean) / (x.std(unbiased=False) + _WHITEN_EPS)


# --------------------------------------------------------------------------- #
# Group baselines (GRPO, RLOO) and pessimistic ensemble scores
# --------------------------------------------------------------------------- #
def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted return of each reply: the masked sum of its per-token rewards, ``[B, T] -> [B]``.

    With the rewards of :func:`per_token_rewards` this is the KL-penalised
    sequence return ``score - kl_coef * sum_t (logprobs_t - ref_logprobs_t)``.

    Why: GRPO and RLOO treat the whole reply as one action; their advantage is
    built from this one number per reply.
    """
    return masked_sum(rewards, mask, dim=1)


def group_advantages(returns: torch.Tensor, group_size: int, method: str, eps: float = GRPO_EPS) -> torch.Tensor:
    """Sequence advantages from a group baseline, ``[B] -> [B]``.

    Rows ``g * group_size .. (g + 1) * group_size - 1`` are replies to the same
    state (``repeat_interleave`` order). For the returns ``R`` of one group of
    ``G`` replies:

    * ``"grpo"``: ``(R_i - mean(R)) / (std(R) + eps)``, ``std`` the sample
      (Bessel-corrected, ``G - 1``) standard deviation;
    * ``"rloo"``: ``R_i - mean_{j != i} R_j`` (leave-one-out baseline);
    * ``"group_mean"``: ``R_i - mean(R)``: GRPO without the division by the group's std, so the
      advantage stays in the critic's units (a group whose replies Q barely separates gets a small
      advantage, not a unit one). It equals ``(G - 1) / G`` times RLOO's.

    Why: the other replies to the same state estimate its value without a
    learned value head (GRPO: Shao et al. 2024; RLOO: Ahmadian et al. 2024).
    """
    if group_size < 2:
        raise ValueError(f"a group baseline needs group_size >= 2, got {group_size}")
    if returns.shape[0] % group_size:
        raise ValueError(f"{returns.shape[0]} replies do not split into groups of {group_size}")
    grouped = returns.reshape(-1, group_size)
    if method == "grpo":
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        advantages = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    elif method == "rloo":
        others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - others
    elif method == "group_mean":
        advantages = grouped - grouped.mean(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown group baseline {method!r}; allowed: 'grpo', 'rloo', 'group_mean'")
    return advantages.reshape(-1)


def group_token_advantages(
    score: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, group_size: int, method: str
) -> torch.Tensor:
    """Per-token advantages of GRPO/RLOO: each reply's sequence advantage on every one of its tokens.

    ``score``: ``[B]``, the reply's score (Q_k, after any normalisation), as placed in
    ``rewards``; ``rewards``/``mask``: ``[B, T]`` from :func:`per_token_rewards`, so the
    sequence return is ``R_i = score_i + P_i`` with the KL penalty
    ``P_i = -kl_coef * sum_t (logprobs - ref_logprobs)``. Per group of replies to a state:

    * ``"rloo"``: ``A_i = R_i - mean_{j != i} R_j`` (the KL-penalised return, leave-one-out);
    * ``"grpo"``: ``A_i = (score_i - mean(score)) / (std(score) + eps) + (P_i - mean(P))``: the
      score is standardised within the group, the KL penalty is centred but keeps its scale;
    * ``"group_mean"``: ``A_i = R_i - mean(R)``: score and penalty both keep their units.

    Why GRPO does not standardise ``R`` itself: when a group's scores tie, ``std(R)`` is the
    spread of the KL penalty alone, and dividing by it blows tiny KL differences up to unit
    advantages (measured on the rewarded-token task: rate 0.055 -> 0.25 instead of -> 0.9).
    Returns ``[B, T]``, detached, 0 at padding.
    """
    returns = sequence_returns(rewards.detach(), mask)
    if method == "grpo":
        score = score.detach().to(returns.dtype).reshape(-1)
        penalty = (returns - score).reshape(-1, group_size)
        centred_penalty = (penalty - penalty.mean(dim=1, keepdim=True)).reshape(-1)
        advantage = group_advantages(score, group_size, "grpo") + centred_penalty
    else:
        advantage = group_advantages(returns, group_size, method)
    m = _as_float_mask(mask, rewards)
    return torch.where(m != 0, advantage.unsqueeze(1).expand_as(rewards), torch.zeros_like(rewards))


def ensemble_lower_bound(member_scores: torch.Tensor, pessimism: float) -> torch.Tensor:
    """Pessimistic score of an ensemble: ``mean - pessimism * std`` over members, ``[N, B] -> [B]``.

    ``std`` is the sample (Bessel-corrected) standard deviation over the ``N``
    members; one member returns its scores unchanged.

    Why: where the members disagree, Q is uncertain and PPO would exploit its
    errors; a lower confidence bound makes uncertain replies worth less.
    """
    if member_scores.shape[0] == 1:
        return member_scores[0]
    return member_scores.mean(dim=0) - pessimism * member_scores.std(dim=0, unbiased=True)


def paired_difference_loss(
    q_first: torch.Tensor, q_second: torch.Tensor, g_first: torch.Tensor, g_second: torch.Tensor
) -> torch.Tensor:
    """The critic's within-state loss over pairs of replies at one state, ``[..., P] -> [...]``:
    ``mean over pairs of ((q_first - q_second) - (g_first - g_second))^2``.

    ``q_*`` are Q estimates (probabilities), ``g_*`` the two replies' sampled returns. Why: the expectation of
    ``g_first - g_second`` is ``Q(s, a) - Q(s, a')``, so the minimiser is the true difference, and whatever the
    state is worth cancels out of both sides: the loss trains the ranking of replies at a state alone, where a
    Monte Carlo regression spends most of its signal on telling good states from bad ones.
    """
    return ((q_first - q_second) - (g_first - g_second)).pow(2).mean(dim=-1)


def check_solver_settings(advantage: str, group_size: int, kl_anchor: str) -> None:
    """Raise ValueError, naming the config key, for an unknown solver or anchor or a group too small."""
    if advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"model.policy.advantage must be one of {ADVANTAGE_ESTIMATORS}, got {advantage!r}")
    if group_size < 1:
        raise ValueError(f"model.policy.group_size must be >= 1, got {group_size}")
    if advantage != "gae" and group_size < 2:
        raise ValueError(
            f"model.policy.group_size must be >= 2 with model.policy.advantage {advantage!r} (its baseline is the "
            f"other replies sampled for the same state), got {group_size}"
        )
    if kl_anchor not in KL_ANCHORS:
        raise ValueError(f"model.policy.kl_anchor must be one of {KL_ANCHORS}, got {kl_anchor!r}")
