"""Paged-attention backends behind one interface; ``torch`` is the exact reference."""

from raylane.runner.attention import torch_sdpa as _torch_sdpa  # noqa: F401  (registers "torch")
from raylane.runner.attention.base import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    PagedAttention,
    PagedAttentionMetadata,
    get_attention_backend,
    register_attention_backend,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "PagedAttention",
    "PagedAttentionMetadata",
    "get_attention_backend",
    "register_attention_backend",
]
