"""Step metrics the controller derives from a batch."""

from __future__ import annotations

import math

import pytest
import torch

from raylane.rlhf import log_prob_gap_metrics


def test_log_prob_gap_counts_tokens_whose_ratio_leaves_ten_percent():
    sampled = torch.zeros(2, 4)
    # Ratios exp(gap): 1.0, 1.05, 1.2 (outside), 0.85 (outside); 0.5 (outside) sits at a masked position.
    recomputed = torch.tensor(
        [[0.0, math.log(1.05), math.log(1.2), math.log(0.85)], [math.log(0.5), 0.0, 0.0, 0.0]]
    )
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    metrics = log_prob_gap_metrics(sampled, recomputed, mask)
    assert metrics["rollout/ratio_outside_10pct"] == pytest.approx(2 / 6)
    expected_gap = (math.log(1.05) + math.log(1.2) - math.log(0.85)) / 6
    assert metrics["rollout/log_prob_gap"] == pytest.approx(expected_gap)
