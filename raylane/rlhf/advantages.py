"""Advantage estimators: from token rewards (and values, or sample groups) to per-token advantages.

Inputs are ``[B, T]`` token-level rewards aligned with a 0/1 ``response_mask``. Outcome
estimators (GRPO, RLOO) use one score per sequence, the sum of its token rewards; GAE and
REINFORCE++ use the rewards token by token. Every estimator returns ``(advantages, returns)``,
both ``[B, T]`` and 0 outside the mask; ``returns`` is the critic's regression target for GAE
and equals the advantages for the critic-free estimators.

Positions where the mask is 0 are not steps of the episode: the backward recursions of GAE
and REINFORCE++ pass over them unchanged, which handles right padding and the tool-output
tokens inside multi-turn responses alike. Advantages carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from raylane.registry import Registry
from raylane.rlhf.masks import check_same_shape, masked_whiten

GroupIndex = Sequence[Hashable] | torch.Tensor


@dataclass(frozen=True)
class AdvantageConfig:
    """Knobs of the estimators; each estimator reads only the ones it documents.

    Attributes:
        gamma: discount factor (GAE, REINFORCE++).
        lam: GAE's lambda; 1.0 gives Monte-Carlo returns minus values, 0.0 one-step TD.
        norm_by_std: GRPO divides by the group's standard deviation; False is Dr.GRPO, which
            drops the division because it over-weights groups whose rewards barely differ.
        eps: added to the group standard deviation to avoid dividing by 0 (GRPO).
    """

    gamma: float = 1.0
    lam: float = 1.0
    norm_by_std: bool = True
    eps: float = 1e-6


AdvantageEstimator = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, GroupIndex | None, AdvantageConfig],
    tuple[torch.Tensor, torch.Tensor],
]

# Entries take (token_level_rewards, response_mask, values, group_index, config) and return
# (advantages, returns); register a new estimator with @ADVANTAGE_ESTIMATORS.register("name").
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def _group_ids(group_index: GroupIndex, batch_size: int) -> torch.Tensor:
    """Dense integer ids ``[B]`` (0..G-1) for the group labels (e.g. the prompt uid of each sample)."""
    if len(group_index) != batch_size:
        raise ValueError(f"group_index has {len(group_index)} entries for a batch of {batch_size} sequences")
    if isinstance(group_index, torch.Tensor):
        return torch.unique(group_index, return_inverse=True)[1]
    dense: dict[Hashable, int] = {}
    return torch.tensor([dense.setdefault(label, len(dense)) for label in group_index], dtype=torch.long)


def _group_stats(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample size, mean and unbiased std of the sample's group, each ``[B]``."""
    ids = ids.to(scores.device)
    num_groups = int(ids.max()) + 1
    counts = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, ids, torch.ones_like(scores)
    )
    means = torch.zeros_like(counts).index_add_(0, ids, scores) / counts
    squares = torch.zeros_like(counts).index_add_(0, ids, (scores - means[ids]) ** 2)
    stds = (squares / (counts - 1).clamp(min=1)).sqrt()
    return counts[ids], means[ids], stds[ids]


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, group_index: GroupIndex, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages ``(r - mean_g) / (std_g + eps)`` for scores ``[B]``, returning ``[B]``.

    ``group_index[i]`` labels the prompt sample ``i`` answers; mean and (unbiased) std are
    taken over each group. ``norm_by_std=False`` gives Dr.GRPO's ``r - mean_g``. A group of
    one sample has no baseline and gets advantage 0.
    """
    # A one-sample group is its own mean, so its advantage comes out 0 with no special case.
    _, means, stds = _group_stats(scores, _group_ids(group_index, scores.shape[0]))
    advantages = scores - means
    return advantages / (stds + eps) if norm_by_std else advantages


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_index: GroupIndex) -> torch.Tensor:
    """REINFORCE leave-one-out advantages for scores ``[B]``, returning ``[B]``.

    Each sample's baseline is the mean score of the *other* samples of its group:
    ``A_i = r_i - (sum_g - r_i) / (n_g - 1)``. A group of one sample gets advantage 0.
    """
    sizes, means, _ = _group_stats(scores, _group_ids(group_index, scores.shape[0]))
    baselines = (means * sizes - scores) / (sizes - 1).clamp(min=1)
    return torch.where(sizes > 1, scores - baselines, torch.zeros_like(scores))


@torch.no_grad()
def compute_gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), unwhitened.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` and ``A`` past the last response token taken as 0 and masked positions skipped.

    Args:
        token_level_rewards, values, response_mask: ``[B, T]``.

    Returns:
        ``(advantages, returns)``, ``[B, T]``, with ``returns = advantages + values`` on the mask.
    """
    check_same_shape(response_mask, token_level_rewards=token_level_rewards, values=values)
    valid = response_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    columns = []
    for t in reversed(range(values.shape[1])):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        columns.append(torch.where(valid[:, t], advantage, zero))
    advantages = torch.stack(columns[::-1], dim=1)
    returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


@torch.no_grad()
def discounted_returns(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over the response tokens, ``[B, T] -> [B, T]``."""
    check_same_shape(response_mask, token_level_rewards=token_level_rewards)
    valid = response_mask.bool()
    zero = torch.zeros((), dtype=token_level_rewards.dtype, device=token_level_rewards.device)
    running = torch.zeros_like(token_level_rewards[:, 0])
    columns = []
    for t in reversed(range(token_level_rewards.shape[1])):
        running = torch.where(valid[:, t], token_level_rewards[:, t] + gamma * running, running)
        columns.append(torch.where(valid[:, t], running, zero))
    return torch.stack(columns[::-1], dim=1)


def _sequence_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(response_mask.bool(), token_level_rewards, 0.0).sum(dim=-1)


def _broadcast(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return per_sequence.unsqueeze(-1) * response_mask.to(per_sequence.dtype)


def _require(value: object, what: str, estimator: str) -> None:
    if value is None:
        raise ValueError(f"advantage estimator {estimator!r} needs {what}")


@ADVANTAGE_ESTIMATORS.register("gae")
@ADVANTAGE_ESTIMATORS.register("ppo")
def _gae_estimator(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor | None,
    group_index: GroupIndex | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    _require(values, "values (a critic)", "gae")
    advantages, returns = compute_gae(rewards, values, response_mask, config.gamma, config.lam)
    # Whitened advantages keep the policy step size independent of the reward scale (standard PPO).
    return masked_whiten(advantages, response_mask), returns


@ADVANTAGE_ESTIMATORS.register("grpo")
def _grpo_estimator(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor | None,
    group_index: GroupIndex | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    _require(group_index, "group_index (which prompt each sample answers)", "grpo")
    scores = _sequence_scores(rewards, response_mask)
    advantages = _broadcast(
        grpo_advantages(scores, group_index, config.norm_by_std, config.eps), response_mask
    )
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("rloo")
def _rloo_estimator(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor | None,
    group_index: GroupIndex | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    _require(group_index, "group_index (which prompt each sample answers)", "rloo")
    advantages = _broadcast(
        rloo_advantages(_sequence_scores(rewards, response_mask), group_index), response_mask
    )
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus")
def _reinforce_plus_plus_estimator(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor | None,
    group_index: GroupIndex | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    # REINFORCE++ (Hu 2025): the KL penalty is already in the token rewards; the batch-level
    # whitening of the returns plays the role of a baseline without a critic or groups.
    returns = discounted_returns(rewards, response_mask, config.gamma)
    return masked_whiten(returns, response_mask), returns


def needs_critic(estimator: str) -> bool:
    """Whether the estimator registered under ``estimator`` needs a critic's ``values`` (GAE)."""
    return ADVANTAGE_ESTIMATORS.get(estimator) is _gae_estimator


def compute_advantages(
    estimator: str,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_index: GroupIndex | None = None,
    config: AdvantageConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns ``[B, T]`` with the estimator registered under ``estimator``.

    Estimators:
        ``gae`` (alias ``ppo``): GAE with ``values`` ``[B, T]`` from a critic; advantages whitened over the batch.
        ``grpo``: group-normalised outcome advantages; needs ``group_index`` ``[B]``.
        ``rloo``: leave-one-out outcome advantages; needs ``group_index`` ``[B]``.
        ``reinforce_plus_plus``: discounted token returns, whitened over the batch.

    Args:
        token_level_rewards: ``[B, T]`` rewards (scores and any KL penalty already applied).
        response_mask: ``[B, T]`` 0/1.
        values: ``[B, T]`` critic values at rollout time (``gae`` only).
        group_index: ``B`` labels, equal for samples of the same prompt (``grpo``, ``rloo``).
        config: discount, lambda and normalisation knobs; defaults to :class:`AdvantageConfig`.
    """
    estimate = ADVANTAGE_ESTIMATORS.get(estimator)
    check_same_shape(response_mask, token_level_rewards=token_level_rewards)
    if values is not None:
        check_same_shape(response_mask, values=values)
    return estimate(token_level_rewards, response_mask, values, group_index, config or AdvantageConfig())
