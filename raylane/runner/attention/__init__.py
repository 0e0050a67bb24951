"""Paged-attention backends behind one interface; ``torch`` is the exact reference."""

import importlib.util

from raylane.runner.attention import torch_sdpa as _torch_sdpa  # noqa: F401  (registers "torch")
from raylane.runner.attention.base import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    PagedAttention,
    PagedAttentionMetadata,
    get_attention_backend,
    register_attention_backend,
    resolve_attention_backend,
)

# The Triton kernels need the `triton` package, which CPU-only installs of PyTorch lack.
if importlib.util.find_spec("triton") is not None:
    from raylane.runner.attention import triton_paged as _triton_paged  # noqa: F401  (registers "triton")

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "PagedAttention",
    "PagedAttentionMetadata",
    "get_attention_backend",
    "register_attention_backend",
    "resolve_attention_backend",
]
