"""Reductions over the response tokens of a padded batch.

Every RL tensor in raylane is laid out ``[B, T]``: one row per sequence, one column per
response position, with a 0/1 ``response_mask`` marking the positions that are real
response tokens (padding and, in multi-turn data, tool/observation tokens are 0). These
helpers reduce over the masked positions only, so padding never leaks into a statistic.
"""

from __future__ import annotations

import torch


def check_same_shape(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming every tensor whose shape differs from ``mask``'s."""
    wrong = [f"{name} {tuple(t.shape)}" for name, t in tensors.items() if t.shape != mask.shape]
    if wrong:
        raise ValueError(
            f"shape mismatch: expected every tensor to match response_mask {tuple(mask.shape)}, "
            f"got {', '.join(wrong)}"
        )


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1; over all elements, or along ``dim``.

    ``values`` and ``mask`` have the same shape. Masked-out entries are dropped with
    ``where`` rather than multiplied by 0, so a NaN or inf in padding cannot poison the sum.
    """
    check_same_shape(mask, values=values)
    selected = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (0 where nothing is selected).

    With ``dim=None`` the result is a scalar; with ``dim=-1`` on ``[B, T]`` input it is the
    per-sequence mean ``[B]``.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    # An empty selection (e.g. a sequence with no response tokens) averages to 0, not NaN.
    return masked_sum(values, mask, dim) / count.clamp(min=1).to(values.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``values`` (a scalar).

    ``unbiased`` applies Bessel's correction ``n / (n - 1)``; with a single selected entry
    there is nothing to correct and the variance is 0.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum().to(values.dtype)
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the masked entries to zero mean and unit variance; masked-out entries become 0.

    With ``shift_mean=False`` the values are only scaled by the standard deviation and keep
    their mean (some PPO variants want advantages rescaled but not re-centred).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def scores_to_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place one outcome score per sequence ``[B]`` on its last response token, giving ``[B, T]``.

    This is the usual bridge from a verifier's per-sequence score to the token-level reward
    tensor that KL shaping and the advantage estimators take.
    """
    if scores.dim() != 1 or response_mask.dim() != 2 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"expected scores [B] and response_mask [B, T], got {tuple(scores.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    lengths = response_mask.sum(dim=-1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no response tokens; every scored sequence needs at least one")
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    # The last response token is the highest position where the mask is set (works for holes too).
    last = torch.where(response_mask.bool(), positions, -1).amax(dim=-1)
    rewards = torch.zeros(response_mask.shape, dtype=scores.dtype, device=scores.device)
    rewards[torch.arange(scores.shape[0], device=scores.device), last] = scores
    return rewards
