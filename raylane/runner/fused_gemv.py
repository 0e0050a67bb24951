"""Batch-1 projections with their neighbours folded in: one kernel instead of two or three per step.

A decode step at batch 1 is bound by the number of kernels per layer more than by bytes (each
launch costs a few microseconds whatever it does). The GEMV of :mod:`raylane.runner.gemv_kernel`
reads each weight once; here the same read also does the work around it:

- prologue ``norm``: the residual add and RMSNorm that precede the projection. Every program
  recomputes the norm of the (tiny) input row, and program 0 stores the new residual stream.
- epilogue ``silu_mul``: gate/up rows ``j`` and ``j + I`` are computed by the same program, which
  stores ``silu(gate) * up`` only.
- epilogue ``rope_kv``: q/k/v rows ``d`` and ``d + D/2`` of a head are computed by the same
  program, which applies the rotary embedding to q and k, stores q, and writes k and v straight into
  their paged KV-cache slot.

Each program owns pairs of rows (``a``, ``a + HALF``) so that an epilogue that combines two output
features has both in registers. Intermediate values are rounded to the model dtype where the
unfused path rounds them, so fp32 agrees to rounding and bf16 closely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raylane.runner.gemv_kernel import gemv_tile

PLAIN, SILU_MUL, ROPE_KV = 0, 1, 2


@triton.jit
def _stream_row(x_ptr, delta_ptr, cols, mask, DELTA: tl.constexpr):
    """The residual stream ``x (+ delta)``, rounded to the model dtype as the unfused add is."""
    h = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if DELTA:
        d = tl.load(delta_ptr + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return h.to(tl.float32)


@triton.jit
def _fused_gemv(
    x_ptr, delta_ptr, stream_ptr, norm_ptr, w_ptr, b_ptr, y_ptr,
    cos_ptr, sin_ptr, pos_ptr, kv_ptr, slot_ptr,
    N, K, stride_w, eps, stride_rope, stride_kv_half, stride_slot,
    HALF: tl.constexpr, NORM: tl.constexpr, DELTA: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    pairs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    rows_a = (pairs // HALF) * (2 * HALF) + pairs % HALF
    rows_b = rows_a + HALF
    mask_a = rows_a < N
    mask_b = rows_b < N
    rstd = 1.0
    if NORM:
        sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            h = _stream_row(x_ptr, delta_ptr, cols, col_mask, DELTA)
            sumsq += h * h
            if pid == 0:
                tl.store(stream_ptr + cols, h.to(dtype), mask=col_mask)
        rstd = tl.rsqrt(tl.sum(sumsq, axis=0) / K + eps)
    acc_a = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        if NORM:
            h = _stream_row(x_ptr, delta_ptr, cols, col_mask, DELTA)
            g = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            # RMSNorm rounds the normalised row, then scales it in the model dtype.
            h = ((h * rstd).to(dtype).to(tl.float32) * g).to(dtype).to(tl.float32)
        else:
            h = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        # Zeros where masked: K need not be a multiple of BLOCK_K (896 and 4,864 in the 0.5 B shape).
        w_mask_a = mask_a[:, None] & col_mask[None, :]
        w_mask_b = mask_b[:, None] & col_mask[None, :]
        w_a = tl.load(w_ptr + rows_a[:, None] * stride_w + cols[None, :], mask=w_mask_a, other=0.0)
        w_b = tl.load(w_ptr + rows_b[:, None] * stride_w + cols[None, :], mask=w_mask_b, other=0.0)
        acc_a += w_a.to(tl.float32) * h[None, :]
        acc_b += w_b.to(tl.float32) * h[None, :]
    y_a = tl.sum(acc_a, axis=1)
    y_b = tl.sum(acc_b, axis=1)
    if HAS_BIAS:
        y_a += tl.load(b_ptr + rows_a, mask=mask_a, other=0.0).to(tl.float32)
        y_b += tl.load(b_ptr + rows_b, mask=mask_b, other=0.0).to(tl.float32)
    # The unfused projection hands its neighbours values in the model dtype.
    y_a = y_a.to(dtype).to(tl.float32)
    y_b = y_b.to(dtype).to(tl.float32)
    if EPILOGUE == 0:
        tl.store(y_ptr + rows_a, y_a.to(dtype), mask=mask_a)
        tl.store(y_ptr + rows_b, y_b.to(dtype), mask=mask_b)
    elif EPILOGUE == 1:
        gate = (y_a * tl.sigmoid(y_a)).to(dtype).to(tl.float32)
        tl.store(y_ptr + pairs, (gate * y_b).to(dtype), mask=mask_b)
    else:
        head = pairs // HALF
        pos = tl.load(pos_ptr).to(tl.int64)
        dim = pairs % HALF
        cos = tl.load(cos_ptr + pos * stride_rope + dim).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_rope + dim).to(tl.float32)
        rotate = head < Q_HEADS + KV_HEADS
        out_a = tl.where(rotate, y_a * cos - y_b * sin, y_a).to(dtype)
        out_b = tl.where(rotate, y_b * cos + y_a * sin, y_b).to(dtype)
        is_q = head < Q_HEADS
        tl.store(y_ptr + rows_a, out_a, mask=is_q & mask_a)
        tl.store(y_ptr + rows_b, out_b, mask=is_q & mask_b)
        # K rows follow the q rows, V rows the k rows; both land in this token's cache slot.
        is_v = head >= Q_HEADS + KV_HEADS
        q_rows = Q_HEADS * 2 * HALF
        kv_rows = KV_HEADS * 2 * HALF
        offset = tl.where(is_v, rows_a - q_rows - kv_rows + stride_kv_half, rows_a - q_rows)
        slot = tl.load(slot_ptr).to(tl.int64)
        kv_mask = (head >= Q_HEADS) & mask_b
        tl.store(kv_ptr + slot * stride_slot + offset, out_a, mask=kv_mask)
        tl.store(kv_ptr + slot * stride_slot + offset + HALF, out_b, mask=kv_mask)


def _stream_like(x: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """The residual-stream output: a row like ``x`` with the norm prologue, else empty."""
    return torch.empty_like(x) if norm_weight is not None else x.new_empty(0)


def _launch(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    half: int,
    epilogue: int,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    heads: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Runs the kernel; returns the new residual stream (empty without the norm prologue)."""
    n, k = weight.shape
    block_n, block_k, num_warps = gemv_tile(n, k)
    block_p = max(1, block_n // 2)
    stream = _stream_like(x, norm_weight)
    x = x.contiguous()
    if rope is None:
        cos = sin = positions = kv_cache = slots = weight
        stride_rope = stride_kv_half = stride_slot = 0
    else:
        cos, sin, positions, slots, kv_cache = rope
        stride_rope, stride_kv_half = cos.stride(0), kv_cache.stride(0)
        stride_slot = kv_cache.shape[-2] * kv_cache.shape[-1]
    pairs = -(-n // 2)
    _fused_gemv[(triton.cdiv(pairs, block_p),)](
        x, delta.contiguous() if delta is not None else x, stream,
        norm_weight if norm_weight is not None else weight, weight, bias if bias is not None else weight, y,
        cos, sin, positions, kv_cache, slots, n, k, weight.stride(0), eps, stride_rope, stride_kv_half, stride_slot,
        HALF=half, NORM=norm_weight is not None, DELTA=delta is not None, HAS_BIAS=bias is not None,
        EPILOGUE=epilogue, Q_HEADS=heads[0], KV_HEADS=heads[1], BLOCK_P=block_p, BLOCK_K=block_k,
        num_warps=num_warps,
    )  # fmt: skip
    return stream


@torch.library.custom_op("raylane::fused_gemv", mutates_args=())
def fused_gemv(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu_mul: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(rms_norm(x + delta)), x + delta)`` of one row ``x`` ([1, K]); see the module doc.

    Without ``norm_weight`` the row is projected as it is and the second output is empty. With
    ``silu_mul`` the weight stacks gate over up ([2I, K]) and the output is ``silu(gate) * up`` ([1, I]).
    """
    n = weight.shape[0]
    # gate/up pairs rows j and j + I; otherwise pairs are neighbouring rows.
    half, epilogue = (n // 2, SILU_MUL) if silu_mul else (1, PLAIN)
    y = x.new_empty(1, half if silu_mul else n)
    return y, _launch(x, delta, norm_weight, eps, weight, bias, y, half, epilogue)


@fused_gemv.register_fake
def _fused_gemv_fake(x, delta, norm_weight, eps, weight, bias, silu_mul):
    n = weight.shape[0]
    return x.new_empty(1, n // 2 if silu_mul else n), _stream_like(x, norm_weight)


@torch.library.custom_op("raylane::fused_qkv_rope_kv", mutates_args=("kv_cache",))
def fused_qkv_rope_kv(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The q/k/v projection of one token with rotary embedding and the KV-cache write folded in.

    ``weight`` stacks q, k and v ([(Hq + 2 Hkv) D, K]). Returns the rotated ``q`` ([1, Hq D]) and the
    residual stream as :func:`fused_gemv` does; k and v go to ``kv_cache`` ([2, blocks, bs, Hkv, D])
    at ``slot_mapping[0]``, ``positions[0]`` selects the rotary angles.
    """
    head_dim = kv_cache.shape[-1]
    y = x.new_empty(1, num_heads * head_dim)
    stream = _launch(
        x, delta, norm_weight, eps, weight, bias, y, head_dim // 2, ROPE_KV,
        rope=(cos_table, sin_table, positions, slot_mapping, kv_cache), heads=(num_heads, num_kv_heads),
    )  # fmt: skip
    return y, stream


@fused_qkv_rope_kv.register_fake
def _fused_qkv_fake(x, delta, norm_weight, eps, weight, bias, cos_table, sin_table, positions, slot_mapping,
                    kv_cache, num_heads, num_kv_heads):  # fmt: skip
    return x.new_empty(1, num_heads * kv_cache.shape[-1]), _stream_like(x, norm_weight)
