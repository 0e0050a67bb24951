"""Runs one scheduled step: builds the flat token batch and paged metadata, runs the model, samples.

Inputs are built on the host from the scheduler's plan and moved to the device in one go; the
forward pass itself never reads device values back (decode is therefore CUDA-graph capturable).
The only host synchronisation per step is reading the sampled token ids and their log-probs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from raylane.models import CausalLM
from raylane.runner.attention import PagedAttention, PagedAttentionMetadata, get_attention_backend
from raylane.runner.sampler import Sampler, SamplingBatch
from raylane.runner.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one forward pass produced, in the order of the chunks that sample."""

    sampled_token_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    # seq_id -> log-probs of the prompt tokens this step's chunk predicted.
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)


def kv_cache_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers on this rank."""
    attn = model.model.layers[0].self_attn
    per_token = 2 * attn.num_kv_heads * attn.head_dim * torch.tensor([], dtype=dtype).element_size()
    return per_token * block_size * len(model.model.layers)


class ModelRunner:
    """Owns the model and its paged KV cache on one device."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, attention_backend: str) -> None:
        self.model = model
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.backend = get_attention_backend(attention_backend)
        self.sampler = Sampler()
        attn = model.model.layers[0].self_attn
        shape = (2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(len(model.model.layers))
        ]
        self._pin = self.device.type == "cuda"
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB)",
            num_blocks,
            block_size,
            num_blocks * kv_cache_block_bytes(model, block_size, self.dtype) / 2**20,
        )

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.tensor(data, dtype=dtype)
        if self._pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepResult:
        bs = self.block_size
        input_ids, positions, slots, pad_index = [], [], [], []
        query_positions, block_tables = [], []
        logit_rows: list[int] = []
        sample_rows: list[int] = []
        prompt_spans: list[tuple[int, int, int]] = []  # (seq_id, first logit row, count)
        max_q = max(chunk.num_tokens for chunk in plan.chunks)
        width = max(len(chunk.seq.block_table) for chunk in plan.chunks)
        for b, chunk in enumerate(plan.chunks):
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            first = len(input_ids)
            span = range(start, start + n)
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(span)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in span)
            pad_index.extend(range(b * max_q, b * max_q + n))
            query_positions.append([*span, *([0] * (max_q - n))])
            block_tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
            wants_prompt = seq.params.prompt_logprobs and start < seq.num_prompt_tokens
            if wants_prompt:
                # Rows predicting prompt tokens start+1 .. min(end, prompt)-1 (+ the sampling row).
                count = min(start + n, seq.num_prompt_tokens) - start
                prompt_spans.append((seq.seq_id, len(logit_rows), count))
                logit_rows.extend(range(first, first + count))
            if chunk.samples:
                if not (wants_prompt and start + n == seq.num_prompt_tokens):
                    logit_rows.append(first + n - 1)
                sample_rows.append(len(logit_rows) - 1)

        meta = PagedAttentionMetadata(
            slot_mapping=self._to_device(slots, torch.long),
            block_tables=self._to_device(block_tables, torch.long),
            query_positions=self._to_device(query_positions, torch.long),
            query_pad_index=self._to_device(pad_index, torch.long),
            max_query_len=max_q,
        )
        hidden = self.model.hidden_states(
            self._to_device(input_ids, torch.long),
            self._to_device(positions, torch.long),
            PagedAttention(self.backend, self.kv_caches, meta),
        )
        logits = self.model.compute_logits(hidden[self._to_device(logit_rows, torch.long)]).float()
        result = StepResult()
        sampling_chunks = [chunk for chunk in plan.chunks if chunk.samples]
        if sampling_chunks:
            batch = self._sampling_batch(sampling_chunks)
            rows = self._to_device(sample_rows, torch.long)
            tokens, logprobs = self.sampler(logits[rows], batch)
            result.sampled_token_ids = tokens.tolist()
            result.sampled_logprobs = logprobs.tolist()
        for seq_id, first_row, count in prompt_spans:
            chunk = next(c for c in plan.chunks if c.seq.seq_id == seq_id)
            result.prompt_logprobs[seq_id] = self._prompt_logprobs(
                chunk, logits[first_row : first_row + count]
            )
        return result

    def _sampling_batch(self, chunks: list) -> SamplingBatch:
        vocab = self.model.config.vocab_size
        params = [chunk.seq.params for chunk in chunks]
        top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
        return SamplingBatch(
            temperatures=self._to_device([0.0 if p.greedy else p.temperature for p in params], torch.float32),
            top_ks=self._to_device(top_ks, torch.long),
            top_ps=self._to_device([p.top_p for p in params], torch.float32),
            seeds=self._to_device([chunk.seq.seed for chunk in chunks], torch.long),
            steps=self._to_device([chunk.seq.num_output_tokens for chunk in chunks], torch.long),
            all_greedy=all(p.greedy for p in params),
            any_top_k=any(k < vocab for k in top_ks),
            any_top_p=any(p.top_p < 1.0 for p in params),
        )

    @staticmethod
    def _prompt_logprobs(chunk, logits: torch.Tensor) -> list[float]:
        """Log-probs of the prompt tokens predicted by these rows (temperature-scaled, like sampled ones)."""
        seq, start = chunk.seq, chunk.start
        temperature = 1.0 if seq.params.greedy else seq.params.temperature
        end = min(start + 1 + logits.shape[0], seq.num_prompt_tokens)
        targets = torch.tensor(seq.token_ids[start + 1 : end], dtype=torch.long, device=logits.device)
        rows = logits[: targets.shape[0]]
        return (rows / temperature).log_softmax(-1).gather(1, targets[:, None]).squeeze(1).tolist()

    @torch.no_grad()
    def load_weights(self, named_tensors) -> list[str]:
        return self.model.load_weights(
            ((name, t.to(self.device, self.dtype)) for name, t in named_tensors), strict=False
        )
