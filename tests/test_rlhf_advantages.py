"""Advantage estimators against hand-worked numbers and plain per-row Python loops."""

import statistics

import pytest
import torch

from raylane.rlhf import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    compute_gae,
    discounted_returns,
    grpo_advantages,
    rloo_advantages,
)


def assert_close(actual, expected, atol=1e-6):
    """Elementwise comparison of a tensor with (nested lists of) hand-computed numbers."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def loop_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE over each row's first ``length`` tokens (right padding), one token at a time."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[b][t + 1] if t + 1 < length else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
    return advantages


def right_padded_mask(lengths, width):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A2 = 1 - .7; A1 = (.7 - .6) + A2; A0 = (.6 - .5) + A1: Monte-Carlo return 1 minus V.
    assert_close(advantages, [[0.5, 0.4, 0.3]])
    assert_close(returns, [[1.0, 1.0, 1.0]])
    advantages, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta2 = .3, delta1 = .9*.7 - .6 = .03, delta0 = .9*.6 - .5 = .04; gamma*lam = .72
    assert_close(advantages, [[0.04 + 0.72 * (0.03 + 0.72 * 0.3), 0.03 + 0.72 * 0.3, 0.3]])


def test_gae_matches_python_loop_on_padded_batch():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1]
    rewards = torch.randn(4, 7, generator=generator)
    values = torch.randn(4, 7, generator=generator)
    mask = right_padded_mask(lengths, 7)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.95, lam=0.9)
    expected = loop_gae(rewards.tolist(), values.tolist(), lengths, 0.95, 0.9)
    assert_close(advantages, expected, atol=1e-5)
    assert_close(returns, ((torch.tensor(expected) + values) * mask).tolist(), atol=1e-5)


def test_gae_skips_masked_positions_and_ignores_padding_garbage():
    rewards = torch.tensor([[0.0, 5.0, 1.0, float("nan")]])
    values = torch.tensor([[0.5, 9.0, 0.7, float("nan")]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # The hole at t=1 is not a step: the episode is (r=0, V=.5) then (r=1, V=.7).
    assert_close(advantages, [[0.5, 0.0, 0.3, 0.0]])
    assert_close(returns, [[1.0, 0.0, 1.0, 0.0]])


def test_gae_estimator_whitens_advantages_and_keeps_raw_returns():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4], [0.1, 0.3]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages, returns = compute_advantages(
        "gae", rewards, mask, values=values, config=AdvantageConfig(gamma=1.0, lam=1.0)
    )
    raw = [0.8, 0.6, -0.1]  # row 0: A1 = 1 - .4, A0 = .4 - .2 + .6; row 1: A0 = 0 - .1
    mean, std = statistics.mean(raw), statistics.stdev(raw)
    assert_close(
        advantages, [[(0.8 - mean) / std, (0.6 - mean) / std], [(-0.1 - mean) / std, 0.0]], atol=1e-5
    )
    assert_close(returns, [[1.0, 1.0], [0.0, 0.0]])


def test_grpo_group_normalisation_with_interleaved_groups():
    # group a = [1, 0, 1, 1]: mean .75, unbiased std .5; group b = [0, 0]: no spread; c alone.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    groups = ["a", "b", "a", "a", "b", "a", "c"]
    advantages = grpo_advantages(scores, groups)
    assert_close(advantages, [0.5, 0.0, -1.5, 0.5, 0.0, 0.5, 0.0], atol=1e-5)
    dr_grpo = grpo_advantages(scores, groups, norm_by_std=False)
    assert_close(dr_grpo, [0.25, 0.0, -0.75, 0.25, 0.0, 0.25, 0.0])
    by_tensor = grpo_advantages(scores, torch.tensor([7, 3, 7, 7, 3, 7, 9]))
    assert torch.equal(by_tensor, advantages)


def test_grpo_estimator_sums_token_rewards_and_broadcasts_over_the_mask():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 7.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # Sequence scores 1, 1 (the 7.0 is padding), 0: mean 2/3, unbiased std sqrt(1/3).
    advantages, returns = compute_advantages(
        "grpo", rewards, mask, group_index=[0, 0, 0], config=AdvantageConfig(eps=0.0)
    )
    high, low = (1 - 2 / 3) / (1 / 3) ** 0.5, (0 - 2 / 3) / (1 / 3) ** 0.5
    assert_close(advantages, [[high, high, 0.0], [high, high, 0.0], [low, low, low]])
    assert torch.equal(advantages, returns)


def test_rloo_leave_one_out_baseline():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 4.0, 3.0])
    groups = ["a", "a", "a", "a", "b", "b", "c"]
    # a: baselines (0+1+1)/3, (1+1+1)/3, ...; b: each other's score; c: alone.
    assert_close(rloo_advantages(scores, groups), [1 / 3, -1.0, 1 / 3, 1 / 3, -2.0, 2.0, 0.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages, _ = compute_advantages(
        "rloo", torch.tensor([[0.0, 2.0], [4.0, 0.0]]), mask, group_index=["x", "x"]
    )
    assert_close(advantages, [[-2.0, -2.0], [2.0, 0.0]])


def test_discounted_returns_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert discounted_returns(rewards, mask, gamma=0.5).tolist() == [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]


def test_reinforce_plus_plus_whitens_returns_over_the_batch():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = compute_advantages("reinforce_plus_plus", rewards, mask)
    assert returns.tolist() == [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]
    mean, std = statistics.mean([1, 1, 1, 2, 2]), statistics.stdev([1, 1, 1, 2, 2])
    low, high = (1 - mean) / std, (2 - mean) / std
    assert_close(advantages, [[low, low, low], [high, high, 0.0]], atol=1e-5)


def test_estimator_errors_are_actionable():
    rewards, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown advantage estimator 'gea'; valid names: gae, grpo"):
        compute_advantages("gea", rewards, mask)
    with pytest.raises(ValueError, match="'gae' needs values"):
        compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="'grpo' needs group_index"):
        compute_advantages("grpo", rewards, mask)
    with pytest.raises(ValueError, match="group_index has 3 entries for a batch of 2"):
        compute_advantages("rloo", rewards, mask, group_index=[0, 0, 1])
    with pytest.raises(ValueError, match=r"values \(2, 2\)"):
        compute_advantages("gae", rewards, mask, values=torch.zeros(2, 2))
    assert ADVANTAGE_ESTIMATORS.names() == ["gae", "grpo", "ppo", "reinforce_plus_plus", "rloo"]
