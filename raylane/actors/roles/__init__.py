"""The worker roles of an RL job: policy trainer, reference, critic, rollout and reward."""

from raylane.actors.roles.config import (
    ActorConfig,
    CriticConfig,
    OptimConfig,
    PolicyLossConfig,
    RolloutConfig,
    TrainConfig,
)
from raylane.actors.roles.critic import Critic
from raylane.actors.roles.policy import PolicyTrainer, Reference
from raylane.actors.roles.reward import RewardWorker
from raylane.actors.roles.rollout import Rollout

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
]
