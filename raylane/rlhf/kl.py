"""KL regularisation towards a reference policy: per-token estimators, and their two uses.

The KL between the policy and the reference is estimated per sampled token from the two
log-probs (Schulman, "Approximating KL divergence"). It enters training either as a penalty
subtracted from the token rewards before advantages are computed (:func:`apply_kl_penalty`,
classic RLHF PPO) or as a loss term added to the actor loss (:func:`kl_loss`, GRPO).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raylane.registry import Registry
from raylane.rlhf.losses import aggregate_loss
from raylane.rlhf.masks import check_same_shape, masked_mean

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")

# k3 grows like exp(ref - logp): one token the reference finds far likelier would dominate
# the whole batch's penalty and gradient, so its value is capped.
_K3_MAX = 10.0
# Outside +-(cap + 1) k3 is above the cap whatever the sign, so clamping the log-ratio there
# changes no value; it keeps exp() finite, so the zero gradient of a capped
# or masked token never meets an infinite one in the backward pass (0 x inf = NaN).
_K3_MAX_LOG_RATIO = _K3_MAX + 1.0


@KL_ESTIMATORS.register("k1")
def _k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    # log(p / q): unbiased, high variance, can be negative per token.
    return log_probs - ref_log_probs


@KL_ESTIMATORS.register("k2")
@KL_ESTIMATORS.register("mse")
def _k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    # 0.5 * log(p / q)^2: biased, low variance, always >= 0.
    return 0.5 * (log_probs - ref_log_probs) ** 2


@KL_ESTIMATORS.register("k3")
@KL_ESTIMATORS.register("low_var_kl")
def _k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    # q/p - 1 - log(q/p): unbiased, low variance, always >= 0.
    log_ratio = (ref_log_probs - log_probs).clamp(-_K3_MAX_LOG_RATIO, _K3_MAX_LOG_RATIO)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=_K3_MAX)


@KL_ESTIMATORS.register("abs")
def _abs(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return (log_probs - ref_log_probs).abs()


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` between the policy and the reference.

    Estimators: ``k1`` = ``logp - ref``; ``k2`` (alias ``mse``) = ``0.5 (logp - ref)^2``;
    ``k3`` (alias ``low_var_kl``) = ``exp(ref - logp) - (ref - logp) - 1``, capped at 10;
    ``abs`` = ``|logp - ref|``.
    """
    estimate = KL_ESTIMATORS.get(estimator)
    check_same_shape(log_probs, ref_log_probs=ref_log_probs)
    return estimate(log_probs, ref_log_probs)


def apply_kl_penalty(
    token_level_scores: torch.Tensor,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL in the reward: ``rewards = scores - kl_coef * KL`` on every response token.

    Args:
        token_level_scores: ``[B, T]`` task rewards (usually the verifier score on the last
            response token, see :func:`~raylane.rlhf.masks.scores_to_token_rewards`).
        log_probs, ref_log_probs: ``[B, T]`` rollout-policy and reference log-probs.
        response_mask: ``[B, T]`` 0/1; the penalty is applied on masked positions only.
        kl_coef: penalty weight (fixed, or the current value of an :class:`AdaptiveKLController`).

    Returns:
        ``(token_level_rewards, metrics)``; ``metrics["kl"]`` is the batch mean of the
        per-sequence mean KL, the quantity an adaptive controller tracks.
    """
    check_same_shape(
        response_mask, token_level_scores=token_level_scores, log_probs=log_probs, ref_log_probs=ref_log_probs
    )
    kl = kl_penalty(log_probs, ref_log_probs, estimator) * response_mask.to(log_probs.dtype)
    rewards = token_level_scores - kl_coef * kl
    seq_kl = masked_mean(kl, response_mask, dim=-1)
    return rewards, {"kl": seq_kl.mean().detach()}


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k3",
    loss_agg_mode: str = "token-mean",
) -> torch.Tensor:
    """KL in the loss: the aggregated per-token KL, to add to the actor loss times a coefficient.

    ``log_probs`` ``[B, T]`` carries the gradient; ``ref_log_probs`` is treated as constant.
    """
    check_same_shape(response_mask, log_probs=log_probs, ref_log_probs=ref_log_probs)
    return aggregate_loss(
        kl_penalty(log_probs, ref_log_probs.detach(), estimator), response_mask, loss_agg_mode
    )


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards ``target_kl`` (Ziegler et al. 2019).

    After each step, ``update(current_kl, n_steps)`` scales ``value`` by
    ``1 + clip(current_kl / target_kl - 1, -0.2, 0.2) * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be > 0, got {target_kl} and {horizon}")
        self.value = init_kl_coef
        self.target_kl = target_kl
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
