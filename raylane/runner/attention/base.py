"""The paged-attention interface and the registry of backends that implement it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class PagedAttentionMetadata:
    """Where this step's tokens sit in the paged KV cache and what each may attend to.

    Shapes: ``slot_mapping`` [T] (cache slot each new token's K/V is written to), ``block_tables``
    [B, W] (block ids per sequence, padded), ``query_positions`` [B, Q] (position of each query in its
    sequence, queries padded to ``max_query_len`` = Q), ``query_pad_index`` [T] (row of each token in
    the flattened [B * Q] padded layout), ``seq_lens`` [B] (tokens in the cache after this step, i.e.
    the position of the last query plus one) and ``query_start_loc`` [B + 1] (offset of each
    sequence's first query in the flat [T] batch). All are device tensors, so the forward pass never
    syncs. The reference backend needs the first four; kernels that walk the block table use the last two.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_positions: torch.Tensor
    query_pad_index: torch.Tensor
    max_query_len: int
    seq_lens: torch.Tensor | None = None
    query_start_loc: torch.Tensor | None = None


def _write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


# Traced as one opaque op that mutates the whole layer in place: written as an in-place copy into a
# view of the cache, torch.compile's functionalisation materialises a copy of the whole layer (14 GiB
# for a large cache) on every step. Eager steps call the function itself, skipping the op dispatch.
write_kv = torch.library.custom_op("raylane::write_kv", mutates_args=("kv_cache",))(_write_kv)


class AttentionBackend:
    """Writes the new K/V into the cache and attends over the cached keys of each sequence."""

    name = "base"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PagedAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Store this step's K/V, then attend; a backend may fuse the two (one op per layer)."""
        self.write_kv(kv_cache, k, v, meta)
        return self.attend(q, kv_cache, meta, scale)

    def write_kv(
        self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedAttentionMetadata
    ) -> None:
        """Store ``k``/``v`` ([T, Hkv, D]) at ``meta.slot_mapping`` of ``kv_cache`` ([2, N, bs, Hkv, D])."""
        write = write_kv if torch.compiler.is_compiling() else _write_kv
        write(kv_cache, k, v, meta.slot_mapping)

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: PagedAttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Causal attention of ``q`` ([T, Hq, D]) over each sequence's cached keys; returns [T, Hq, D]."""
        raise NotImplementedError


ATTENTION_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_attention_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        ATTENTION_BACKENDS[name] = cls
        return cls

    return wrap


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend ``name`` stands for on ``device``: ``auto`` is ``triton`` on CUDA (when Triton is
    installed) and the exact ``torch`` reference everywhere else."""
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" and "triton" in ATTENTION_BACKENDS else "torch"


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()


class PagedAttention:
    """The attention context the runner hands the model: paged KV cache plus this step's metadata."""

    def __init__(
        self, backend: AttentionBackend, kv_caches: list[torch.Tensor], meta: PagedAttentionMetadata
    ) -> None:
        self.backend, self.kv_caches, self.meta = backend, kv_caches, meta

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv_caches[layer_idx], self.meta, scale)
