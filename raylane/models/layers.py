"""Building blocks of the decoder: RMSNorm, rotary embeddings and tensor-parallel linear layers.

Tensor parallelism follows Megatron: column-parallel layers split output features across the
TP group, row-parallel layers split input features and all-reduce their output. Each parallel
layer class declares the dimension each of its parameters is split on (``TP_SHARD_DIMS``) so
that checkpoint loading and weight resharding can cut the full Hugging Face tensor into this
rank's slice. It is declared on the class, not the parameter, so it survives ``to_empty()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

MatVecKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
_matvec_kernels: dict[str, MatVecKernel] = {}


def use_matvec_kernel(device_type: str, kernel: MatVecKernel | None) -> None:
    """Compute single-row linear layers on ``device_type`` with ``kernel(x, weight, bias)`` (None: ``F.linear``).

    Batch-1 decode is a chain of matrix-vector products; the runner installs a GEMV kernel that
    reads the weights faster than the general matrix multiply does at that shape. The kernel serves
    inference only: with autograd on (a trainer in the same process) layers keep ``F.linear``.
    """
    if kernel is None:
        _matvec_kernels.pop(device_type, None)
    else:
        _matvec_kernels[device_type] = kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the installed matrix-vector kernel when ``x`` holds a single row and no
    gradient is being recorded (the kernel has no backward)."""
    kernel = _matvec_kernels.get(x.device.type)
    if kernel is not None and x.numel() == x.shape[-1] and not torch.is_grad_enabled():
        return kernel(x.reshape(1, -1), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Hugging Face Llama does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a precomputed cos/sin table indexed by position id."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        self.build_tables()

    def build_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables, e.g. after the module was created on the meta device."""
        device = device or self.cos_table.device
        if device == torch.device("meta"):
            device = "cpu"
        dim = self.head_dim
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
        )
        kind = (self.scaling or {}).get("rope_type", (self.scaling or {}).get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        elif kind == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_table = emb.cos()
        self.sin_table = emb.sin()

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q``/``k`` of shape ``[*, heads, head_dim]`` at ``positions`` of shape ``[*]``."""
        cos = self.cos_table[positions].unsqueeze(-2)
        sin = self.sin_table[positions].unsqueeze(-2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class TensorParallelGroup:
    """Which TP rank this module is and the process group it all-reduces over (size 1: no TP)."""

    def __init__(self, size: int = 1, rank: int = 0, group: dist.ProcessGroup | None = None) -> None:
        if size > 1 and group is None and not dist.is_initialized():
            raise ValueError("tensor_parallel_size > 1 needs an initialised torch.distributed process group")
        self.size, self.rank, self.group = size, rank, group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


class ColumnParallelLinear(nn.Linear):
    """``y = x W^T + b`` with W split along output features; each rank returns its slice of y."""

    TP_SHARD_DIMS = {"weight": 0, "bias": 0}

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup, what: str
    ) -> None:
        super().__init__(in_features, _divide(out_features, tp.size, what), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """``y = x W^T + b`` with W split along input features; partial sums are all-reduced."""

    # The bias is added once, after the reduction, so every rank holds all of it.
    TP_SHARD_DIMS = {"weight": 1}

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup, what: str
    ) -> None:
        super().__init__(_divide(in_features, tp.size, what), out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class FusedLinear:
    """Several linear layers over the same input, computed as one matrix multiply (inference only).

    The layers' weights (and biases) move into one tensor, stacked along output features, and each
    layer's parameters become views of it. Everything that writes parameters in place by their
    Hugging Face name (checkpoint loading, ``update_weights``, weight sync) therefore keeps writing
    into the fused tensor. It is deliberately not an ``nn.Module``: the fused tensor is no second
    parameter in ``named_parameters()`` or ``state_dict()``. Build it after the model has its final
    device and dtype, since ``.to()`` gives the parameters new storage and breaks the views.
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        biases = [linear.bias is not None for linear in linears]
        if any(biases) != all(biases):
            raise ValueError("FusedLinear needs all or none of the fused layers to have a bias")
        with torch.no_grad():
            self.weight = torch.cat([linear.weight for linear in linears])
            self.bias = torch.cat([linear.bias for linear in linears]) if all(biases) else None
        self.sizes = [linear.weight.shape[0] for linear in linears]
        weights = self.weight.split(self.sizes)
        bias_views = self.bias.split(self.sizes) if self.bias is not None else [None] * len(linears)
        for linear, weight, bias in zip(linears, weights, bias_views, strict=True):
            linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


class SwiGLU(nn.Module):
    """The gated MLP of Llama: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias, tp, "intermediate_size")
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias, tp, "intermediate_size")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp, "intermediate_size")
        self.gate_up: FusedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
