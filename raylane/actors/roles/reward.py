"""The reward role: scores responses with a rule-based verifier picked by name."""

from __future__ import annotations

import torch

from raylane.actors.dispatch import Dispatch, register
from raylane.actors.worker import Worker
from raylane.rlhf.batch import Batch
from raylane.rlhf.rewards import get_reward_fn


class RewardWorker(Worker):
    """``scores`` [B]: ``reward_fn(response_text, ground_truth)`` per row."""

    def __init__(self, reward_fn: str) -> None:
        self.reward_fn = get_reward_fn(reward_fn)

    @register(Dispatch.DP_SHARD)
    def compute_rewards(self, batch: Batch) -> Batch:
        scores = [
            float(self.reward_fn(text, truth))
            for text, truth in zip(batch["response_text"], batch["ground_truth"])
        ]
        return Batch.from_dict({"scores": torch.tensor(scores)})
