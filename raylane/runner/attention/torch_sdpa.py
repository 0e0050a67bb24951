"""The reference backend: gather each sequence's cached K/V and run PyTorch SDPA with a causal mask.

Exact and device-agnostic; every faster backend is tested against it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from raylane.runner.attention.base import AttentionBackend, PagedAttentionMetadata, register_attention_backend


@register_attention_backend("torch")
class TorchSDPABackend(AttentionBackend):
    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: PagedAttentionMetadata, scale: float
    ) -> torch.Tensor:
        num_seqs, width = meta.block_tables.shape
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        num_heads = q.shape[1]
        max_q = meta.max_query_len
        # [B, W, bs, Hkv, D] -> [B, Hkv, W * bs, D]: every sequence's keys laid out by position.
        keys = kv_cache[0][meta.block_tables].reshape(num_seqs, width * block_size, num_kv_heads, head_dim)
        values = kv_cache[1][meta.block_tables].reshape(num_seqs, width * block_size, num_kv_heads, head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        padded = q.new_zeros(num_seqs * max_q, num_heads, head_dim)
        padded.index_copy_(0, meta.query_pad_index, q)
        padded = padded.view(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)
        key_positions = torch.arange(width * block_size, device=q.device)
        mask = key_positions[None, None, :] <= meta.query_positions[:, :, None]
        out = F.scaled_dot_product_attention(
            padded, keys, values, attn_mask=mask[:, None], scale=scale, enable_gqa=num_heads != num_kv_heads
        )
        return out.transpose(1, 2).reshape(num_seqs * max_q, num_heads, head_dim)[meta.query_pad_index]
