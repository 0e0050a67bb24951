"""The worker roles of an RL job: policy trainer, reference, critic, rollout and reward."""

from raylane.roles.config import (
    ActorConfig,
    CriticConfig,
    OptimConfig,
    PolicyLossConfig,
    RolloutConfig,
    TrainConfig,
)
from raylane.roles.critic import Critic
from raylane.roles.policy import PolicyTrainer, Reference
from raylane.roles.reward import RewardWorker
from raylane.roles.rollout import Rollout
from raylane.roles.training import build_optimizer, optimizer_steps, resolve_train_dtype, shard_model

__all__ = [
    "ActorConfig",
    "Critic",
    "CriticConfig",
    "OptimConfig",
    "PolicyLossConfig",
    "PolicyTrainer",
    "Reference",
    "RewardWorker",
    "Rollout",
    "RolloutConfig",
    "TrainConfig",
    "build_optimizer",
    "optimizer_steps",
    "resolve_train_dtype",
    "shard_model",
]
