"""The batch-1 decode step with fused kernels: the forward the batch-1 CUDA graph captures.

Each fusion is a name of :data:`~raylane.runner.config.DecodeFusion`, switched on by ``EngineOptions.decode_fusions``
and independent of the others, so each one's effect can be measured alone (see
:mod:`raylane.runner.fused_gemv` for the kernels):

- ``norm_gemv``: the residual add and RMSNorm before q/k/v, before gate/up and before the LM head
  run inside those projections (no separate norm kernel);
- ``qkv_rope_kv``: the q/k/v projection applies the rotary embedding and writes k/v to the cache;
  attention then only reads (no rotary kernel, no KV-write kernel);
- ``gate_up_silu``: the gate/up projection stores ``silu(gate) * up`` (no activation kernel).

The model must have fused projections (:meth:`~raylane.models.CausalLM.fuse_projections`) and the
``triton`` attention backend; batches above one keep the unfused forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from raylane.models import CausalLM
from raylane.models.layers import RMSNorm
from raylane.runner.attention import AttentionBackend, PagedAttention
from raylane.runner.attention.triton_paged import paged_decode
from raylane.runner.cuda_graphs import decode_metadata
from raylane.runner.fused_gemv import fused_gemv, fused_qkv_rope_kv


def _project(
    op: Callable, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm, fuse_norm: bool, *args
) -> tuple[torch.Tensor, torch.Tensor]:
    """``op`` on ``norm(x + delta)``: returns its output and the residual stream ``x + delta``."""
    if fuse_norm:
        return op(x, delta, norm.weight, norm.eps, *args)
    stream = x if delta is None else x + delta
    return op(norm(stream), None, None, 0.0, *args)[0], stream


def fused_decode_logits(
    model: CausalLM,
    backend: AttentionBackend,
    kv_caches: list[torch.Tensor],
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    fusions: tuple[str, ...],
) -> torch.Tensor:
    """Logits ([1, V]) of one decode step of one sequence, with ``fusions`` (DecodeFusion names)."""
    fuse_norm = "norm_gemv" in fusions
    decoder = model.model
    rotary = decoder.rotary_emb
    meta = decode_metadata(
        positions, slot_mapping, block_tables, seq_lens, query_start_loc, query_start_loc[:1]
    )
    x, delta = decoder.embed_tokens(input_ids), None
    for layer, kv_cache in zip(decoder.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        if "qkv_rope_kv" in fusions:
            q, x = _project(
                fused_qkv_rope_kv, x, delta, layer.input_layernorm, fuse_norm, attn.qkv.weight, attn.qkv.bias,
                rotary.cos_table, rotary.sin_table, positions, slot_mapping, kv_cache, attn.num_heads,
                attn.num_kv_heads,
            )  # fmt: skip
            out = paged_decode(
                q.view(1, attn.num_heads, attn.head_dim), kv_cache, block_tables, seq_lens, attn.scale
            )
        else:
            qkv, x = _project(
                fused_gemv, x, delta, layer.input_layernorm, fuse_norm, attn.qkv.weight, attn.qkv.bias, False
            )
            q, k, v = qkv.split(attn.qkv.sizes, dim=-1)
            q, k = rotary(
                positions,
                q.view(1, attn.num_heads, attn.head_dim),
                k.view(1, attn.num_kv_heads, attn.head_dim),
            )
            v = v.view(1, attn.num_kv_heads, attn.head_dim)
            out = PagedAttention(backend, kv_caches, meta).attend(attn.layer_idx, q, k, v, attn.scale)
        delta = attn.o_proj(out.reshape(1, -1))
        silu_mul = "gate_up_silu" in fusions
        act, x = _project(
            fused_gemv, x, delta, layer.post_attention_layernorm, fuse_norm, mlp.gate_up.weight, mlp.gate_up.bias,
            silu_mul,
        )  # fmt: skip
        if not silu_mul:
            gate, up = act.split(mlp.gate_up.sizes, dim=-1)
            act = F.silu(gate) * up
        delta = mlp.down_proj(act)
    logits, _ = _project(fused_gemv, x, delta, decoder.norm, fuse_norm, model.lm_head.weight, None, False)
    return logits
