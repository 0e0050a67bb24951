"""Masked reductions, whitening, score placement, and log-probs/entropy from logits, against hand values."""

import math
import statistics

import pytest
import torch

from raylane.rlhf import (
    entropy_from_logits,
    log_probs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    scores_to_token_rewards,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # selects 1, 2, 4


def assert_close(actual, expected, atol=1e-6):
    """Elementwise comparison of a tensor with (nested lists of) hand-computed numbers."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_masked_sum_and_mean_use_only_selected_entries():
    assert masked_sum(VALUES, MASK).item() == 7.0
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7 / 3)
    assert masked_mean(VALUES, MASK, dim=-1).tolist() == [1.5, 4.0]
    assert masked_sum(VALUES, MASK, dim=0).tolist() == [5.0, 2.0, 0.0]


def test_masked_mean_of_empty_row_is_zero_and_padding_nan_does_not_leak():
    values = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    assert masked_mean(values, mask, dim=-1).tolist() == [1.0, 0.0]
    assert masked_sum(values, mask).item() == 1.0


def test_masked_var_unbiased_and_biased():
    selected = [1.0, 2.0, 4.0]
    assert masked_var(VALUES, MASK).item() == pytest.approx(statistics.variance(selected))
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(statistics.pvariance(selected))


def test_masked_whiten_zero_mean_unit_std_and_zero_outside_mask():
    mean, std = statistics.mean([1.0, 2.0, 4.0]), statistics.stdev([1.0, 2.0, 4.0])
    out = masked_whiten(VALUES, MASK)
    expected = [[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, 0.0, 0.0]]
    assert_close(out, expected, atol=1e-6)
    kept_mean = masked_whiten(VALUES, MASK, shift_mean=False)
    assert kept_mean[0, 0].item() == pytest.approx((1 - mean) / std + mean, abs=1e-6)
    assert kept_mean[1, 1].item() == 0.0


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match=r"values \(2, 2\)"):
        masked_sum(torch.zeros(2, 2), torch.ones(2, 3))


def test_scores_land_on_the_last_response_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    rewards = scores_to_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert rewards.tolist() == [[0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 3, 0]]


def test_scores_to_token_rewards_rejects_empty_responses_and_bad_shapes():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        scores_to_token_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="expected scores"):
        scores_to_token_rewards(torch.tensor([1.0]), torch.ones(2, 3))


def test_log_probs_match_hand_softmax():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1]])
    z = math.exp(1) + math.exp(2) + math.exp(3)
    expected = [[math.log(math.exp(3) / z), math.log(1 / 3)]]
    assert_close(log_probs_from_logits(logits, tokens), expected, atol=1e-6)


def test_log_probs_temperature_scales_logits_and_upcasts():
    logits = torch.tensor([[[2.0, 4.0]]], dtype=torch.bfloat16)
    out = log_probs_from_logits(logits, torch.tensor([[0]]), temperature=2.0)
    # logits / 2 = [1, 2]; log p(0) = 1 - log(e + e^2)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(1 - math.log(math.exp(1) + math.exp(2)), abs=1e-6)


def test_log_probs_are_differentiable_and_validate_input():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    log_probs_from_logits(logits, torch.tensor([[3]])).sum().backward()
    # d log softmax_3 / d z = onehot(3) - softmax = [-1/4, -1/4, -1/4, 3/4]
    assert_close(logits.grad, [[[-0.25, -0.25, -0.25, 0.75]]])
    with pytest.raises(ValueError, match="vocab dim"):
        log_probs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        log_probs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_entropy_uniform_and_hand_computed():
    assert_close(entropy_from_logits(torch.zeros(2, 3, 4)), [[math.log(4)] * 3] * 2)
    probs = [math.exp(v) / (1 + math.exp(1)) for v in (0.0, 1.0)]
    expected = -sum(p * math.log(p) for p in probs)
    assert entropy_from_logits(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(expected, abs=1e-6)
