"""models/modeling.py: the span means a critic reads its replies through."""

from __future__ import annotations

import math

import pytest
import torch

from iterppo_lightning.models.modeling import reply_means, span_surprise_features, span_token_logprobs


def test_reply_means_hand_worked():
    # Two rows of four positions, one feature each (values 1..8), and a second feature = 10 x the first.
    first = torch.arange(1.0, 9.0).reshape(2, 4)
    hidden = torch.stack([first, 10 * first], dim=-1)
    rows = torch.tensor([0, 0, 1])
    starts = torch.tensor([1, 0, 2])
    ends = torch.tensor([2, 0, 3])
    got = reply_means(hidden, rows, starts, ends)
    # Row 0 positions 1-2: (2 + 3) / 2; row 0 position 0: 1; row 1 positions 2-3: (7 + 8) / 2.
    assert torch.allclose(got, torch.tensor([[2.5, 25.0], [1.0, 10.0], [7.5, 75.0]]))


def test_reply_means_leave_out_masked_positions():
    hidden = torch.arange(1.0, 7.0).reshape(1, 6, 1)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0]])
    got = reply_means(hidden, torch.tensor([0]), torch.tensor([1]), torch.tensor([5]), mask)
    assert torch.allclose(got, torch.tensor([[(2.0 + 4.0 + 5.0) / 3]]))


def test_reply_means_pass_gradients_to_the_span_only():
    hidden = torch.randn(1, 5, 3, requires_grad=True)
    reply_means(hidden, torch.tensor([0]), torch.tensor([1]), torch.tensor([3])).sum().backward()
    expected = torch.zeros(1, 5, 3)
    expected[:, 1:4] = 1.0 / 3
    assert torch.allclose(hidden.grad, expected)


def test_span_token_logprobs_hand_worked():
    # Vocabulary of 2; the output layer is the identity, so the logits at a position are its hidden state.
    hidden = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[1, 0, 1], [0, 1, 0]])
    weight = torch.eye(2)
    means, minima = span_token_logprobs(
        hidden, ids, torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([2, 1]), weight
    )
    half = math.log(0.5)
    # Row 0: token 0 at position 1 from [0, 0] (log 1/2), token 1 at position 2 from [2, 0] (log(1 / (e^2 + 1))).
    far = -math.log(math.exp(2.0) + 1.0)
    # Row 1: token 1 at position 1 from [0, 1]: log(e / (1 + e)).
    near = 1.0 - math.log(1.0 + math.e)
    assert torch.allclose(means, torch.tensor([(half + far) / 2, near]))
    assert torch.allclose(minima, torch.tensor([far, near]))


def test_span_surprise_features_hand_worked():
    # The same two spans as above: row 0's tokens at positions 1 and 2 (log 1/2, then far), row 1's at position 1.
    hidden = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[1, 0, 1], [0, 1, 0]])
    mean_logprob, weighted = span_surprise_features(
        hidden, ids, torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([2, 1]), torch.eye(2)
    )
    half, far, near = math.log(0.5), -math.log(math.exp(2.0) + 1.0), 1.0 - math.log(1.0 + math.e)
    assert torch.allclose(mean_logprob, torch.tensor([(half + far) / 2, near]))
    # Each token's log p times the hidden state AT the token (not the one that predicted it): row 0 reads
    # [2, 0] * half at position 1 and [0, 0] * far at position 2; row 1 reads [0, 0] at position 1.
    assert torch.allclose(weighted, torch.tensor([[half, 0.0], [0.0, 0.0]]))


def test_span_surprise_features_with_a_threshold_hand_worked():
    # The same spans with tau = 1/2: a token at least half likely is no surprise (0); a less likely one counts
    # log p_t - log(1/2).
    hidden = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[1, 0, 1], [0, 1, 0]])
    mean_logprob, weighted = span_surprise_features(
        hidden, ids, torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([2, 1]), torch.eye(2), threshold=0.5
    )
    far = -math.log(math.exp(2.0) + 1.0)  # row 0, position 2: p = 1 / (e^2 + 1), about 0.12
    # Position 1 of row 0 (p = 1/2) and of row 1 (p = e / (1 + e), about 0.73) are at or above tau: 0.
    assert torch.allclose(mean_logprob, torch.tensor([(0.0 + far - math.log(0.5)) / 2, 0.0]))
    # Row 0's only surprise is at position 2, whose own hidden state is [0, 0]: nothing weighted is left.
    assert torch.allclose(weighted, torch.zeros(2, 2))


def test_span_token_logprobs_match_a_full_log_softmax():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(3, 7, 4), torch.randn(5, 4), torch.randn(5)
    ids = torch.randint(0, 5, (3, 7))
    rows, starts, ends = torch.tensor([0, 2, 2]), torch.tensor([2, 1, 4]), torch.tensor([6, 3, 4])
    means, minima = span_token_logprobs(hidden, ids, rows, starts, ends, weight, bias)
    full = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    for i, (r, a, b) in enumerate(zip(rows.tolist(), starts.tolist(), ends.tolist())):
        per_token = torch.stack([full[r, t - 1, ids[r, t]] for t in range(a, b + 1)])
        assert means[i].item() == pytest.approx(per_token.mean().item(), abs=1e-6)
        assert minima[i].item() == pytest.approx(per_token.min().item(), abs=1e-6)
