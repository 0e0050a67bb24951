"""RL algorithms as pure functions over ``[B, T]`` tensors, plus rewards, prompt data and toy tasks.

Workers and controllers call these; nothing here knows about Ray or process groups.
"""

from raylane.rlhf.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    compute_gae,
    discounted_returns,
    grpo_advantages,
    needs_critic,
    rloo_advantages,
)
from raylane.rlhf.data import DatasetError, PromptDataset, PromptExample, PromptLoader, read_jsonl
from raylane.rlhf.kl import KL_ESTIMATORS, AdaptiveKLController, apply_kl_penalty, kl_loss, kl_penalty
from raylane.rlhf.logprobs import entropy_from_logits, log_prob_gap_metrics, log_probs_from_logits
from raylane.rlhf.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    ppo_policy_loss,
    truncated_importance_weights,
    value_loss,
)
from raylane.rlhf.masks import masked_mean, masked_sum, masked_var, masked_whiten, scores_to_token_rewards
from raylane.rlhf.rewards import (
    REWARD_FUNCTIONS,
    compute_reward,
    extract_final_number,
    get_reward_fn,
    register_reward,
)
from raylane.rlhf.staleness import StalenessBound
from raylane.rlhf.tasks import TOY_TASKS, ToyTask, ToyTaskFiles, make_toy_task, register_toy_task
from raylane.rlhf.trajectory import (
    Trajectory,
    TrajectoryGroup,
    concat_samples,
    groups_to_batch,
    sample_tensors,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "REWARD_FUNCTIONS",
    "TOY_TASKS",
    "AdaptiveKLController",
    "AdvantageConfig",
    "DatasetError",
    "PromptDataset",
    "PromptExample",
    "PromptLoader",
    "StalenessBound",
    "ToyTask",
    "ToyTaskFiles",
    "Trajectory",
    "TrajectoryGroup",
    "aggregate_loss",
    "apply_kl_penalty",
    "compute_advantages",
    "compute_gae",
    "compute_reward",
    "concat_samples",
    "discounted_returns",
    "entropy_from_logits",
    "extract_final_number",
    "get_reward_fn",
    "groups_to_batch",
    "grpo_advantages",
    "kl_loss",
    "kl_penalty",
    "log_prob_gap_metrics",
    "log_probs_from_logits",
    "make_toy_task",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "needs_critic",
    "ppo_policy_loss",
    "read_jsonl",
    "register_reward",
    "register_toy_task",
    "rloo_advantages",
    "sample_tensors",
    "scores_to_token_rewards",
    "truncated_importance_weights",
    "value_loss",
]
