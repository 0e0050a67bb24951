"""Matrix-vector product for batch-1 decode: ``y = x W^T (+ b)`` with one row of ``x``.

At batch 1 every projection is a GEMV whose time is the read of ``W``. cuBLAS launches few
thread blocks for the narrow projections of a small model (q/k/v and o of a 1 B model have 2-3 k
output features) and splits long reductions into a second kernel; here each program reduces
``BLOCK_N`` whole rows of ``W``, so even 2,048 outputs spread over hundreds of programs, in one
kernel. Registered as the ``raylane::gemv`` custom op so ``torch.compile`` and CUDA graphs treat it
as one opaque call; :func:`install` routes the model's single-row linear layers through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raylane.models import use_matvec_kernel
from raylane.runner.programmatic_launch import launch_options, wait_for_previous_kernel


@triton.jit
def _weight_tile(w_ptr, rows, row_mask, stride_w, start, K, BLOCK_K: tl.constexpr):
    """Columns ``[start, start + BLOCK_K)`` of the program's rows of ``W``, with the columns and their mask."""
    cols = start + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_mask[:, None] & col_mask[None, :])
    return w, cols, col_mask


@triton.jit
def _gemv(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # No kernel of the step writes the weights, so their first tile is read before waiting for the
    # kernel that computes x (with programmatic launch, while that kernel still runs). The wait
    # stays outside the loop, so no load of x from a later tile can be scheduled before it.
    w, cols, col_mask = _weight_tile(w_ptr, rows, row_mask, stride_w, 0, K, BLOCK_K)
    wait_for_previous_kernel(USE_PDL)
    acc = w.to(tl.float32) * tl.load(x_ptr + cols, mask=col_mask).to(tl.float32)[None, :]
    for start in range(BLOCK_K, K, BLOCK_K):
        w, cols, col_mask = _weight_tile(w_ptr, rows, row_mask, stride_w, start, K, BLOCK_K)
        acc += w.to(tl.float32) * tl.load(x_ptr + cols, mask=col_mask).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv_tile(n: int, k: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for an ``n x k`` weight (swept by probe_gemv.py: on an H100
    for the 1 B shape, on an H200 with programmatic launch for the tall ones)."""
    block_k = min(2048, triton.next_power_of_2(k))
    if k > 2048:
        # Long rows (the down projection): four rows a program, read by four warps. Fewer than 1,024
        # rows make few programs (a 0.5 B model's 896 make 224, for 132 multiprocessors on an H200),
        # so each reads wider K-tiles to keep enough loads in flight (H200: 1.4x for 896 x 4864; for
        # 2048 x 8192 the 2,048-wide tile is 1.08x the two-row one it replaced).
        return 4, 4096 if n < 1024 else 2048, 4
    if n > 4096:
        # Tall and narrow (gate/up, the LM head): four rows a program, each read in four K-tiles by
        # two warps, keep more loads in flight than one wide tile (H200: 1.15-1.5x the bandwidth).
        return 4, max(256, block_k // 4), 2
    return 2, min(block_k, 1024), 4


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of shape ``[1, K]`` and a weight with contiguous rows."""
    n, k = weight.shape
    block_n, block_k, num_warps = tile or gemv_tile(n, k)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **launch_options(),
    )  # fmt: skip
    return y


@torch.library.custom_op("raylane::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`gemv` as an op that ``torch.compile`` keeps whole (``F.linear`` for strided weights)."""
    if weight.stride(1) != 1:
        return torch.nn.functional.linear(x, weight, bias)
    return gemv(x.contiguous(), weight, bias)


@gemv_op.register_fake
def _gemv_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(1, weight.shape[0])


def install() -> None:
    """Compute single-row linear layers on CUDA with the GEMV kernel."""
    use_matvec_kernel("cuda", gemv_op)
