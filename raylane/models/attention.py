"""How a forward pass attends: the model asks an *attention context* and does not care which.

Training passes a :class:`DenseAttention` (padded ``[B, L]`` batches or packed variable-length
sequences); the runner passes its paged-KV-cache context. Both implement ``attend``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.nn import functional as F


class AttentionContext(Protocol):
    """What a decoder layer calls to turn rotated q/k/v into attention output."""

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q: ``[*, Hq, D]``, k/v: ``[*, Hkv, D]`` over the same leading dims; returns ``[*, Hq, D]``."""
        ...


def expand_kv_heads(x: torch.Tensor, num_q_heads: int, head_dim_axis: int) -> torch.Tensor:
    """Repeat each KV head for the query heads that share it (grouped-query attention)."""
    groups = num_q_heads // x.shape[head_dim_axis]
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim_axis)


class DenseAttention:
    """Causal attention over whole sequences, for training and log-prob recomputation.

    Inputs are ``[B, L, H, D]``. ``attention_mask`` (``[B, L]``, 1 = real token) masks padding;
    ``segment_ids`` (``[B, L]``) keeps packed sequences from attending to each other.
    """

    def __init__(
        self, attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None
    ) -> None:
        self.mask = self._build_mask(attention_mask, segment_ids)

    @staticmethod
    def _build_mask(
        attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        if attention_mask is None and segment_ids is None:
            return None
        ref = attention_mask if attention_mask is not None else segment_ids
        length = ref.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool, device=ref.device).tril()[None]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if attention_mask is not None:
            keep = attention_mask.bool()
            allowed = allowed & keep[:, None, :]
            # A padding query that sees nothing would give NaN; let it see itself instead.
            allowed = allowed | torch.eye(length, dtype=torch.bool, device=ref.device)[None]
        return allowed[:, None]

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        num_heads = q.shape[-2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k = expand_kv_heads(k, num_heads, 1)
        v = expand_kv_heads(v, num_heads, 1)
        if self.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale)
        return out.transpose(1, 2)


def segment_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed sequences restart their position ids at 0; number the segments from those restarts."""
    return (position_ids == 0).cumsum(dim=-1)
