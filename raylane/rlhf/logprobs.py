"""Per-token log-probabilities and entropies from a model's logits.

These are the trainer's recompute of what the runner reported at sampling time: the
log-softmax over the full vocabulary of the temperature-scaled logits, in fp32, before any
top-p / top-k truncation (see DESIGN.md). Computing them the same way on both sides is
what makes the PPO ratio exactly 1 on the first update of a fresh rollout.
"""

from __future__ import annotations

import torch

from raylane.rlhf.masks import masked_mean


def _scaled_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    # bf16 logits lose the small differences that log-softmax depends on: upcast first.
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def log_probs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each token under the logits that predicted it.

    Args:
        logits: ``[..., V]`` scores; ``logits[b, t]`` must be the output that predicts
            ``tokens[b, t]`` (the caller shifts by one position: the model's output at
            position ``p`` predicts the token at ``p + 1``).
        tokens: ``[...]`` integer token ids, same leading shape as ``logits``.
        temperature: the sampling temperature the tokens were drawn with.

    Returns:
        fp32 ``[...]`` log-probs, differentiable with respect to ``logits``.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be tokens' shape {tuple(tokens.shape)} plus a vocab dim"
        )
    scaled = _scaled_fp32(logits, temperature)
    # gather - logsumexp avoids materialising a second [..., V] tensor for the full log-softmax.
    picked = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at each position: ``[..., V] -> [...]``, fp32.

    ``H = logsumexp(z) - sum(softmax(z) * z)``, which needs no log of small probabilities.
    """
    scaled = _scaled_fp32(logits, temperature)
    probs = torch.softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)


def log_prob_gap_metrics(
    sampled: torch.Tensor, recomputed: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the trainer's recomputed log-probs are from the ones the runner sampled with, over the
    response tokens: mean absolute gap, and the share of tokens whose probability ratio
    ``exp(recomputed - sampled)`` lies outside [0.9, 1.1] (the figure RL users report)."""
    gap = recomputed - sampled
    ratio = gap.exp()
    outside = ((ratio < 0.9) | (ratio > 1.1)).float()
    return {
        "rollout/log_prob_gap": float(masked_mean(gap.abs(), mask)),
        "rollout/ratio_outside_10pct": float(masked_mean(outside, mask)),
    }
