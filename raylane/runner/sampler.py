"""Token sampling on the device: temperature, top-k, top-p, per-request seeds, log-probs.

Randomness comes from a counter-based hash of (request seed, output index, vocabulary id), turned
into Gumbel noise: a request's sample depends only on its own seed and logits, never on which
other requests share the batch, and no per-request generator state lives on the host.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

# On CUDA the untruncated path runs as one fused Triton reduction (raylane.runner.sampling_kernel).
_HAS_TRITON = importlib.util.find_spec("triton") is not None

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # Logical shift on int64: torch's >> is arithmetic for signed values.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape [S, V] determined by each row's (seed, step) alone."""
    row = _splitmix64(seeds + (steps + 1) * _GOLDEN)
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _shift_right(_splitmix64(row[:, None] + vocab[None, :] * _GOLDEN), 40)
    uniform = (bits.float() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform))


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors, plus host flags that pick the code path."""

    temperatures: torch.Tensor  # [S] float; 0 for greedy rows
    top_ks: torch.Tensor  # [S] int64; vocab size when off
    top_ps: torch.Tensor  # [S] float; 1 when off
    seeds: torch.Tensor  # [S] int64
    steps: torch.Tensor  # [S] int64, index of the token being sampled in the output
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool


def _truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if batch.any_top_k:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        remove |= ranks >= batch.top_ks[:, None]
    if batch.any_top_p:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Drop a token once the tokens ranked above it already cover top_p; the first always stays.
        remove |= (probs.cumsum(dim=-1) - probs) >= batch.top_ps[:, None]
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class Sampler:
    """Samples one token per row of logits and reports its log-prob."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(token_ids [S], logprobs [S])`` for ``logits`` [S, V] (computed in fp32)."""
        if logits.is_cuda and _HAS_TRITON and not (batch.any_top_k or batch.any_top_p):
            from raylane.runner.sampling_kernel import fused_sample

            return fused_sample(logits, batch.temperatures, batch.seeds, batch.steps)
        logits = logits.float()
        greedy = batch.temperatures == 0
        scaled = logits / torch.where(greedy, 1.0, batch.temperatures)[:, None]
        # The log-prob the trainer recomputes: full-vocabulary log-softmax, before truncation.
        logprobs = scaled.log_softmax(dim=-1)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            truncated = _truncate(scaled, batch) if (batch.any_top_k or batch.any_top_p) else scaled
            sampled = (truncated + gumbel_noise(batch.seeds, batch.steps, logits.shape[-1])).argmax(dim=-1)
            tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
        return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
