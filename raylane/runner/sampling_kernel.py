"""Gumbel-max sampling fused into two Triton kernels: one read of the logits, no [S, V] temporaries.

Computes exactly what :class:`~raylane.runner.sampler.Sampler` computes when no row truncates
(top-k / top-p off): the same counter-based Gumbel noise (splitmix64 of seed, output index and
vocabulary id), the argmax of ``logits / temperature + noise`` (plain argmax for greedy rows) and
the log-prob of the chosen token under the full-vocabulary log-softmax. The eager version reads
and writes the [S, V] tensor some twenty times, which costs milliseconds at batch 256.

The vocabulary is split into chunks so that even one row spreads over many multiprocessors; the
first kernel reduces each chunk (running max, sum of exponentials, best key and its index), the
second merges the chunks of a row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raylane.runner.programmatic_launch import launch_options, wait_for_previous_kernel

_CHUNK = 4096
_BLOCK = 1024


@triton.jit
def _splitmix64(x):
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _sample_chunks(
    logits_ptr, stride_logits, temperatures_ptr, seeds_ptr, steps_ptr, part_ptr, part_idx_ptr, vocab_size,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature == 0.0
    divisor = tl.where(greedy, 1.0, temperature)
    seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
    step = tl.load(steps_ptr + row).to(tl.uint64, bitcast=True)
    row_hash = _splitmix64(seed + (step + 1) * 0x9E3779B97F4A7C15)

    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], tl.float32)
    best_key = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(chunk * CHUNK, tl.minimum((chunk + 1) * CHUNK, vocab_size), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab_size
        x = tl.load(logits_ptr + row * stride_logits + offs, mask=mask, other=float("-inf")).to(tl.float32)
        scaled = x / divisor
        new_max = tl.maximum(running_max, scaled)
        # Lanes still at -inf would give exp(nan); they contribute nothing.
        rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        term = tl.where(new_max == float("-inf"), 0.0, tl.exp(scaled - new_max))
        running_sum = running_sum * rescale + term
        running_max = new_max
        bits = _splitmix64(row_hash + offs.to(tl.uint64) * 0x9E3779B97F4A7C15) >> 40
        uniform = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        noise = -tl.log(-tl.log(uniform))
        key = tl.where(greedy, x, scaled + noise)
        key = tl.where(mask, key, float("-inf"))
        better = key > best_key  # strict: ties keep the earlier (smaller) vocabulary id
        best_idx = tl.where(better, offs, best_idx)
        best_key = tl.where(better, key, best_key)

    chunk_max = tl.max(running_max, 0)
    chunk_sum = tl.sum(
        tl.where(running_max == float("-inf"), 0.0, running_sum * tl.exp(running_max - chunk_max)), 0
    )
    top = tl.max(best_key, 0)
    top_idx = tl.min(tl.where(best_key == top, best_idx, vocab_size), 0)
    base = row * num_chunks + chunk
    stride = tl.num_programs(0) * num_chunks
    tl.store(part_ptr + base, chunk_max)
    tl.store(part_ptr + stride + base, chunk_sum)
    tl.store(part_ptr + 2 * stride + base, top)
    tl.store(part_idx_ptr + base, top_idx)


@triton.jit
def _sample_merge(
    logits_ptr, stride_logits, temperatures_ptr, part_ptr, part_idx_ptr, tokens_ptr, logprobs_ptr,
    num_chunks, CHUNKS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS_PAD)
    mask = offs < num_chunks
    base = row * num_chunks + offs
    stride = tl.num_programs(0) * num_chunks
    chunk_max = tl.load(part_ptr + base, mask=mask, other=float("-inf"))
    chunk_sum = tl.load(part_ptr + stride + base, mask=mask, other=0.0)
    keys = tl.load(part_ptr + 2 * stride + base, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + base, mask=mask, other=0)
    row_max = tl.max(chunk_max, 0)
    total = tl.sum(tl.where(mask, chunk_sum * tl.exp(chunk_max - row_max), 0.0), 0)
    top = tl.max(keys, 0)
    # Chunks are in vocabulary order, so the first chunk holding the best key has the smallest id.
    token = tl.min(tl.where(keys == top, idx, 2147483647), 0)
    temperature = tl.load(temperatures_ptr + row)
    divisor = tl.where(temperature == 0.0, 1.0, temperature)
    chosen = tl.load(logits_ptr + row * stride_logits + token).to(tl.float32) / divisor
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, chosen - row_max - tl.log(total))


def fused_sample(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [S] int64, logprobs [S] fp32)`` for ``logits`` [S, V] (any float dtype, unit stride)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunks = triton.cdiv(vocab, _CHUNK)
    part = torch.empty((3, rows, chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((rows, chunks), dtype=torch.int32, device=logits.device)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _sample_chunks[(rows, chunks)](
        logits,
        logits.stride(0),
        temperatures,
        seeds,
        steps,
        part,
        part_idx,
        vocab,
        CHUNK=_CHUNK,
        BLOCK=_BLOCK,
        **launch_options(),
    )
    _sample_merge[(rows,)](
        logits, logits.stride(0), temperatures, part, part_idx, tokens, logprobs, chunks,
        CHUNKS_PAD=triton.next_power_of_2(chunks), **launch_options(),
    )  # fmt: skip
    return tokens, logprobs
