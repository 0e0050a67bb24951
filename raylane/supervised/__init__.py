"""Supervised jobs on Ray Train: SFT (``raylane sft``) and reward models (``raylane train-rm``), on the
shared model code and in the RL trainer's checkpoint format."""

from raylane.supervised.config import (
    PreferenceDataConfig,
    RayTrainConfig,
    RewardModelJobConfig,
    SFTDataConfig,
    SFTJobConfig,
    SupervisedJobConfig,
)
from raylane.supervised.data import (
    PreferencePair,
    SFTExample,
    load_preference_pairs,
    load_sft_examples,
    packed_rows,
    padded_rows,
    pair_rows,
    write_toy_preferences,
)
from raylane.supervised.job import run_reward_model_training, run_sft
from raylane.supervised.reward_model import bradley_terry_loss, pair_rewards
from raylane.supervised.sft import completion_nll, greedy_completions

__all__ = [
    "PreferenceDataConfig",
    "PreferencePair",
    "RayTrainConfig",
    "RewardModelJobConfig",
    "SFTDataConfig",
    "SFTExample",
    "SFTJobConfig",
    "SupervisedJobConfig",
    "bradley_terry_loss",
    "completion_nll",
    "greedy_completions",
    "load_preference_pairs",
    "load_sft_examples",
    "packed_rows",
    "padded_rows",
    "pair_rewards",
    "pair_rows",
    "run_reward_model_training",
    "run_sft",
    "write_toy_preferences",
]
