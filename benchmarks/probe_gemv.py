"""Batch-1 projections of a bench_runner shape: cuBLAS (``F.linear``) against the Triton GEMV.

At batch 1 a decode step is a chain of matrix-vector products whose speed is the bandwidth they
reach reading the weights. Each shape is timed from a CUDA graph that runs it over enough weight
copies (>= 400 MB) that no weight is still in the L2 cache when it is read again, as in a real
step. Prints GB/s of ``F.linear``, of the tile ``gemv_tile`` picks, and of the best tile swept.

    python benchmarks/probe_gemv.py [--shape qwen-0.5b] [--programmatic-launch] [--only down] [--block-n 1 2 4] [--warps 2 4]

``--programmatic-launch`` launches the GEMVs as the batch-1 decode graph does on Hopper: each one
starts while the one before it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools

import torch
import triton
import triton.testing
from bench_runner import PRESETS  # this script's folder is on sys.path

from raylane.runner.gemv_kernel import gemv, gemv_tile
from raylane.runner.programmatic_launch import programmatic_launch


def projections(preset: str) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each batch-1 GEMV of a bench_runner preset, q/k/v and
    gate/up fused as the runner fuses them on CUDA."""
    shape = PRESETS[preset]
    hidden, heads, kv_heads = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim, intermediate = hidden // heads, shape["intermediate_size"]
    return {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o": (hidden, heads * head_dim),
        "gate_up": (2 * intermediate, hidden),
        "down": (hidden, intermediate),
        "lm_head": (shape["vocab_size"], hidden),
    }


def per_weight_us(fn, x, weights) -> float:
    """Microseconds per weight of ``fn(x, w)`` over all ``weights``, replayed from a CUDA graph."""

    def run_all():
        for weight in weights:
            fn(x, weight)

    return 1e3 * triton.testing.do_bench_cudagraph(run_all, rep=100) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["llama-1b", "qwen-0.5b"], default="llama-1b")
    parser.add_argument("--programmatic-launch", action="store_true")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["qkv", "o", "gate_up", "down", "lm_head"],
        help="sweep these projections only (default: all)",
    )
    parser.add_argument("--block-n", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="rows a program")
    parser.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = projections(args.shape)
    if args.only:
        shapes = {name: shapes[name] for name in args.only}
    with programmatic_launch(True) if args.programmatic_launch else contextlib.nullcontext():
        sweep(shapes, args.block_n, args.warps)


def sweep(shapes: dict[str, tuple[int, int]], block_ns: list[int], warps: list[int]) -> None:
    print(f"{'shape':<8} {'MB':>6} {'cuBLAS GB/s':>12} {'gemv_tile GB/s':>15} {'best GB/s':>10}  best tile")
    for name, (n, k) in shapes.items():
        mb = n * k * 2 / 1e6
        weights = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(max(1, int(400 // mb)))
        ]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        reference = torch.nn.functional.linear(x, weights[0])
        cublas = per_weight_us(torch.nn.functional.linear, x, weights)
        picked = per_weight_us(functools.partial(gemv, bias=None), x, weights)
        best = None
        for tile in itertools.product(block_ns, (256, 512, 1024, 2048, 4096, 8192), warps):
            if tile[0] * tile[1] > 16384 or tile[1] > max(triton.next_power_of_2(k), 256):
                continue
            torch.testing.assert_close(gemv(x, weights[0], None, tile), reference, rtol=2e-2, atol=2e-2)
            us = per_weight_us(functools.partial(gemv, bias=None, tile=tile), x, weights)
            if best is None or us < best[0]:
                best = (us, tile)
        print(f"{name:<8} {mb:>6.1f} {mb / cublas * 1e3:>12.0f} {mb / picked * 1e3:>15.0f} {mb / best[0] * 1e3:>10.0f}"
              f"  {best[1]} (picked {gemv_tile(n, k)}); us: cuBLAS {cublas:.2f}, picked {picked:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
