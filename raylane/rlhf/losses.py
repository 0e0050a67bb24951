"""PPO surrogate losses for the actor and the critic, and how token losses become one scalar.

All per-token inputs are ``[B, T]`` aligned with a 0/1 ``response_mask``. Losses return
``(loss, metrics)``: ``loss`` is the differentiable scalar to minimise, ``metrics`` holds
detached scalar tensors for logging (kept on device, so computing them costs no host sync).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raylane.registry import Registry
from raylane.rlhf.masks import check_same_shape, masked_mean, masked_sum

LossAggregation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation mode")

# exp() of a log-ratio above ~88 overflows fp32; ratios this far from 1 are clipped anyway.
_MAX_LOG_RATIO = 20.0


@LOSS_AGGREGATIONS.register("token-mean")
def _token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Every response token weighs the same, so long responses dominate the gradient.
    return masked_mean(loss_mat, mask)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Every sequence weighs the same whatever its length (the original GRPO objective).
    seq_losses = masked_mean(loss_mat, mask, dim=-1)
    return masked_mean(seq_losses, (mask.sum(dim=-1) > 0).to(mask.dtype))


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A sequence's loss is its total over tokens, so longer responses weigh more (REINFORCE over trajectories).
    seq_losses = masked_sum(loss_mat, mask, dim=-1)
    return masked_mean(seq_losses, (mask.sum(dim=-1) > 0).to(mask.dtype))


def aggregate_loss(
    loss_mat: torch.Tensor, response_mask: torch.Tensor, mode: str = "token-mean"
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    Modes: ``token-mean`` (mean over all response tokens of the batch), ``seq-mean-token-mean``
    (mean per sequence, then over sequences), ``seq-mean-token-sum`` (sum per sequence, then
    mean over sequences). Sequences without response tokens do not count.
    """
    aggregate = LOSS_AGGREGATIONS.get(mode)
    check_same_shape(response_mask, loss_mat=loss_mat)
    return aggregate(loss_mat, response_mask)


def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, optionally dual-clipped, optionally decoupled.

    Per token, with ``r = exp(log_probs - old_log_probs)`` and advantage ``A``:
    ``loss = max(-A * r, -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))``.
    Dual clip (``clip_ratio_c``, e.g. 3.0; Ye et al. 2020) further bounds the loss of tokens
    with ``A < 0`` by ``-A * clip_ratio_c``, so one very unlikely-now token cannot blow up
    the update.

    Args:
        log_probs: ``[B, T]`` log-probs under the policy being trained (requires grad).
        old_log_probs: ``[B, T]`` log-probs under the policy that sampled the tokens.
        advantages: ``[B, T]``.
        response_mask: ``[B, T]`` 0/1.
        clip_ratio_low, clip_ratio_high: the clip range ``[1 - low, 1 + high]``; a larger
            ``high`` is DAPO's "clip-higher".
        clip_ratio_c: dual-clip bound, > 1, or None for no dual clip.
        loss_agg_mode: see :func:`aggregate_loss`.
        importance_weights: ``[B, T]`` detached weights of each token's loss, or None. Decoupled
            PPO (Hilton et al. 2021; AReaL) passes ``old_log_probs`` of the *proximal* policy (the
            trainer's current one, which the clip keeps the update near) and the truncated ratio
            ``min(pi_prox / pi_behav, cap)`` here, correcting for the older policy that sampled.

    Returns:
        ``(loss, metrics)`` with metrics ``pg_clipfrac`` (fraction of tokens where the clipped
        term is the active one), ``pg_clipfrac_lower`` (fraction where the dual clip bound
        is active) and ``ppo_kl`` (mean of ``old_log_probs - log_probs``, a KL estimate).
    """
    check_same_shape(response_mask, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    if importance_weights is not None:
        check_same_shape(response_mask, importance_weights=importance_weights)
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(
            f"clip_ratio_c must be > 1.0 for the dual clip to bound anything, got {clip_ratio_c}"
        )
    log_ratio = (log_probs - old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    losses = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if clip_ratio_c is not None:
        bound = -advantages * clip_ratio_c
        dual_active = (advantages < 0) & (losses > bound)
        losses = torch.where(dual_active, bound, losses)
    if importance_weights is not None:
        losses = losses * importance_weights
    loss = aggregate_loss(losses, response_mask, loss_agg_mode)
    metrics = {
        "pg_clipfrac": masked_mean(clip_active.float(), response_mask).detach(),
        "pg_clipfrac_lower": masked_mean(dual_active.float(), response_mask).detach(),
        "ppo_kl": masked_mean(-log_ratio, response_mask).detach(),
    }
    return loss, metrics


def truncated_importance_weights(
    proximal_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, cap: float
) -> torch.Tensor:
    """``min(pi_prox / pi_behav, cap)`` per token, detached: the off-policy weight of decoupled PPO."""
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    log_ratio = (proximal_log_probs - behaviour_log_probs).detach().clamp(max=_MAX_LOG_RATIO)
    return log_ratio.exp().clamp(max=cap)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = old_values + clip(values - old_values, -clip_range, clip_range)`` keeps the
    critic from moving far from the values the advantages were computed with; ``clip_range=None``
    gives the plain squared error.

    Args:
        values: ``[B, T]`` predictions of the critic being trained (requires grad).
        old_values: ``[B, T]`` predictions at rollout time.
        returns: ``[B, T]`` regression targets (e.g. GAE returns).
        response_mask: ``[B, T]`` 0/1.

    Returns:
        ``(loss, metrics)`` with ``vf_clipfrac``: fraction of tokens where the clipped error is the larger.
    """
    check_same_shape(response_mask, values=values, old_values=old_values, returns=returns)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        losses, clip_active = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        losses, clip_active = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * aggregate_loss(losses, response_mask, loss_agg_mode)
    return loss, {"vf_clipfrac": masked_mean(clip_active.float(), response_mask).detach()}
