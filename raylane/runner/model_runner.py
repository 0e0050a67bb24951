"""Runs one scheduled step: builds the flat token batch and paged metadata, runs the model, samples.

Inputs are built on the host from the scheduler's plan and moved to the device in one go; the
forward pass itself never reads device values back. On CUDA, decode-only steps replay a captured
CUDA graph (:mod:`raylane.runner.cuda_graphs`); prefill and mixed steps run eagerly. The only host
synchronisation per step is reading the sampled token ids and their log-probs, and a step is
split into :meth:`ModelRunner.launch` and :meth:`PendingStep.result` so that the engine can do its
bookkeeping while the device computes, and can launch the next decode step fed from this one's
sampled ids on the device (async scheduling).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from raylane.models import CausalLM
from raylane.runner.attention import (
    PagedAttention,
    PagedAttentionMetadata,
    get_attention_backend,
    resolve_attention_backend,
)
from raylane.runner.sampler import Sampler, SamplingBatch
from raylane.runner.scheduler import ScheduledChunk, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one forward pass produced, in the order of the chunks that sample."""

    sampled_token_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    # seq_id -> log-probs of the prompt tokens this step's chunk predicted.
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)


class PendingStep:
    """A launched step: the device may still be computing; :meth:`result` waits for it."""

    def __init__(
        self,
        tokens: torch.Tensor | None,
        logprobs: torch.Tensor | None,
        prompt_work: list[tuple[ScheduledChunk, torch.Tensor]],
        host: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self._tokens, self._logprobs, self._prompt_work = tokens, logprobs, prompt_work
        # The sampled ids where the device wrote them: a step launched ahead reads its input here.
        self.device_tokens = tokens
        self._event = None
        if tokens is not None and host is not None and tokens.shape[0] <= host[0].shape[0]:
            # Start the copy back now; result() then waits once instead of syncing per tensor.
            n = tokens.shape[0]
            self._tokens = host[0][:n].copy_(tokens, non_blocking=True)
            self._logprobs = host[1][:n].copy_(logprobs, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> StepResult:
        if self._event is not None:
            self._event.synchronize()
        result = StepResult()
        if self._tokens is not None:
            result.sampled_token_ids = self._tokens.tolist()
            result.sampled_logprobs = self._logprobs.tolist()
        for chunk, logits in self._prompt_work:
            result.prompt_logprobs[chunk.seq.seq_id] = ModelRunner._prompt_logprobs(chunk, logits)
        return result


_NUMPY_DTYPES = {torch.long: np.int64, torch.float32: np.float32}


class HostUploader:
    """Moves one step's host inputs to the device in a single copy per dtype.

    On CUDA the values go through a pinned buffer that every step reuses: pinning each small tensor
    anew cost about 0.13 ms apiece, a dozen per prefill step. An event marks when the device has
    taken the last copy, so the buffer is not overwritten while a copy from it may be pending.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging: dict[torch.dtype, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def __call__(self, values: list, dtype: torch.dtype) -> list[torch.Tensor]:
        """Device tensors of ``values`` (each a flat list or a rectangular list of lists), in order."""
        arrays = [np.asarray(v, dtype=_NUMPY_DTYPES[dtype]) for v in values]
        total = sum(a.size for a in arrays)
        if self.device.type != "cuda":
            flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
        else:
            host, copied = self._staging.get(dtype, (None, None))
            if host is None or host.numel() < total:
                host = torch.empty(max(total, 4096), dtype=dtype, pin_memory=True)
                copied = torch.cuda.Event()
                copied.record()
                self._staging[dtype] = (host, copied)
            copied.synchronize()
            np.concatenate([a.ravel() for a in arrays], out=host[:total].numpy())
            flat = host[:total].to(self.device, non_blocking=True)
            copied.record()
        tensors, offset = [], 0
        for a in arrays:
            tensors.append(flat[offset : offset + a.size].view(a.shape))
            offset += a.size
        return tensors


def kv_cache_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers on this rank."""
    attn = model.model.layers[0].self_attn
    per_token = 2 * attn.num_kv_heads * attn.head_dim * torch.tensor([], dtype=dtype).element_size()
    return per_token * block_size * len(model.model.layers)


class ModelRunner:
    """Owns the model and its paged KV cache on one device.

    ``attention_backend`` may be ``auto`` (see :func:`resolve_attention_backend`). With
    ``cuda_graphs`` (CUDA only; ``max_num_seqs`` and ``max_model_len`` then size the captured
    buffers) decode-only steps replay CUDA graphs, whose model forward is ``torch.compile``'d when
    ``compile_decode`` is set; with ``lazy_capture`` a batch size's graph is captured the first time
    it runs; ``programmatic_launch`` (None: where supported) launches the batch-1 graph's kernels
    with PDL (Hopper or newer, Triton backend). On CPU none of these applies and every step runs the eager reference path.
    """

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        attention_backend: str,
        *,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        cuda_graphs: bool = False,
        compile_decode: bool = True,
        lazy_capture: bool = False,
        programmatic_launch: bool | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = next(model.parameters()).device
        # On CUDA one GEMM for q/k/v and one for gate/up reads the weights in fewer, larger passes
        # (batch-1 decode of a 1 B model: -0.2 ms per step). On CPU the strided views they return
        # slow the eager element-wise ops more than the GEMMs gain (tiny model, batch 64: 13 -> 18 ms).
        self._fused = self.device.type == "cuda"
        if self._fused:
            model.fuse_projections()
        self.dtype = next(model.parameters()).dtype
        self.backend = get_attention_backend(resolve_attention_backend(attention_backend, self.device))
        if self.backend.name == "triton":
            # The Triton path also computes batch-1 projections with its GEMV kernel.
            from raylane.runner.gemv_kernel import install

            install()
        self.sampler = Sampler()
        use_graphs = cuda_graphs and self.device.type == "cuda"
        if use_graphs and importlib.util.find_spec("triton") is None:
            logger.warning(
                "CUDA graphs need Triton (the captured step samples with a Triton kernel); running eagerly"
            )
            use_graphs = False
        if use_graphs and (max_num_seqs is None or max_model_len is None):
            raise ValueError("CUDA graphs need max_num_seqs and max_model_len to size their buffers")
        attn = model.model.layers[0].self_attn
        # With graphs, one extra block (the last) is scratch space for the rows that pad a batch.
        shape = (2, num_blocks + int(use_graphs), block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(len(model.model.layers))
        ]
        self._upload = HostUploader(self.device)
        # Pinned buffers the sampled ids and log-probs are copied back into, two in turn: with a
        # step launched ahead, the next step's copy may land before this step's values are read.
        self._host_outs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.device.type == "cuda":
            capacity = max_num_seqs or 256
            self._host_outs = [
                (
                    torch.empty(capacity, dtype=torch.int64, pin_memory=True),
                    torch.empty(capacity, dtype=torch.float32, pin_memory=True),
                )
                for _ in range(2)
            ]
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB), attention backend %r",
            num_blocks,
            block_size,
            num_blocks * kv_cache_block_bytes(model, block_size, self.dtype) / 2**20,
            self.backend.name,
        )
        self.graphs = None
        self._offloaded = False
        if use_graphs:
            from raylane.runner.cuda_graphs import CUDAGraphDecoder

            self.graphs = CUDAGraphDecoder(
                model,
                self.backend,
                self.kv_caches,
                max_num_seqs,
                math.ceil(max_model_len / block_size),
                block_size,
                scratch_block=num_blocks,
                compile_model=compile_decode,
                lazy=lazy_capture,
                programmatic_launch=self._programmatic_launch(programmatic_launch),
            )
            self.graphs.capture()

    def _programmatic_launch(self, wanted: bool | None) -> bool:
        supported = self.backend.name == "triton" and torch.cuda.get_device_capability(self.device)[0] >= 9
        if wanted and not supported:
            logger.warning(
                "programmatic_launch needs the triton attention backend on a Hopper or newer GPU; "
                "launching the decode step's kernels one after another"
            )
        return supported and wanted is not False

    def execute(self, plan: SchedulerOutput) -> StepResult:
        """Run one step and wait for it: ``launch(plan).result()``."""
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, feed: PendingStep | None = None) -> PendingStep:
        """Enqueue one step on the device; the returned handle's ``result()`` reads the samples.

        ``feed`` is a step launched earlier whose sampled tokens, still on the device, are the input
        tokens of this decode-only plan, row for row (async scheduling: the host has not seen them).
        """
        if feed is not None and not (
            plan.is_decode_only
            and feed.device_tokens is not None
            and feed.device_tokens.shape[0] == len(plan.chunks)
        ):
            raise ValueError(
                "a fed step must be decode-only with one input row per token sampled by its feed"
            )
        if self.graphs is not None and self._graph_friendly(plan):
            return self._launch_graph(plan, feed)
        return self._launch_eager(plan, feed)

    def _host_out(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._host_outs:
            return None
        self._host_outs.reverse()
        return self._host_outs[0]

    def _graph_friendly(self, plan: SchedulerOutput) -> bool:
        return (
            plan.is_decode_only
            and len(plan.chunks) <= self.graphs.max_batch
            and not any(
                c.seq.params.prompt_logprobs and c.start < c.seq.num_prompt_tokens for c in plan.chunks
            )
        )

    def _launch_graph(self, plan: SchedulerOutput, feed: PendingStep | None) -> PendingStep:
        self.graphs.prepare(plan.chunks)
        logits, tokens, logprobs = self.graphs.run(len(plan.chunks), feed and feed.device_tokens)
        if any(chunk.seq.params.top_k > 0 or chunk.seq.params.top_p < 1.0 for chunk in plan.chunks):
            # The graph sampled without truncation; redo those rows' sampling on its logits.
            ints, floats = self._sampling_inputs(plan.chunks)
            batch = self._sampling_batch(
                plan.chunks, self._upload(ints, torch.long), self._upload(floats, torch.float32)
            )
            tokens, logprobs = self.sampler(logits, batch)
        return PendingStep(tokens, logprobs, [], self._host_out())

    def _launch_eager(self, plan: SchedulerOutput, feed: PendingStep | None) -> PendingStep:
        bs = self.block_size
        input_ids, positions, slots, pad_index = [], [], [], []
        query_positions, block_tables, seq_lens, query_start = [], [], [], [0]
        logit_rows: list[int] = []
        sample_rows: list[int] = []
        prompt_spans: list[tuple[ScheduledChunk, int, int]] = []  # (chunk, first logit row, count)
        max_q = max(chunk.num_tokens for chunk in plan.chunks)
        width = max(len(chunk.seq.block_table) for chunk in plan.chunks)
        for b, chunk in enumerate(plan.chunks):
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            first = len(input_ids)
            span = range(start, start + n)
            known = seq.token_ids[start : start + n]
            input_ids.extend(known + [0] * (n - len(known)))  # a fed step's ids come from its feed
            positions.extend(span)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in span)
            pad_index.extend(range(b * max_q, b * max_q + n))
            query_positions.append([*span, *([0] * (max_q - n))])
            block_tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
            seq_lens.append(start + n)
            query_start.append(first + n)
            wants_prompt = seq.params.prompt_logprobs and start < seq.num_prompt_tokens
            if wants_prompt:
                # Rows predicting prompt tokens start+1 .. min(end, prompt)-1 (+ the sampling row).
                count = min(start + n, seq.num_prompt_tokens) - start
                prompt_spans.append((chunk, len(logit_rows), count))
                logit_rows.extend(range(first, first + count))
            if chunk.samples:
                if not (wants_prompt and start + n == seq.num_prompt_tokens):
                    logit_rows.append(first + n - 1)
                sample_rows.append(len(logit_rows) - 1)

        sampling_chunks = [chunk for chunk in plan.chunks if chunk.samples]
        ints, floats = self._sampling_inputs(sampling_chunks)
        (slots, block_tables, query_positions, pad_index, seq_lens, query_start, input_ids, positions,
         logit_rows, sample_rows, *sampling_ints) = self._upload(
            [slots, block_tables, query_positions, pad_index, seq_lens, query_start, input_ids, positions,
             logit_rows, sample_rows, *ints], torch.long,
        )  # fmt: skip
        meta = PagedAttentionMetadata(
            slot_mapping=slots,
            block_tables=block_tables,
            query_positions=query_positions,
            query_pad_index=pad_index,
            max_query_len=max_q,
            seq_lens=seq_lens,
            query_start_loc=query_start,
        )
        if feed is not None:
            input_ids = feed.device_tokens.to(torch.long)
        hidden = self.model.hidden_states(
            input_ids, positions, PagedAttention(self.backend, self.kv_caches, meta)
        )
        logits = self.model.compute_logits(hidden[logit_rows]).float()
        tokens = logprobs = None
        if sampling_chunks:
            batch = self._sampling_batch(sampling_chunks, sampling_ints, self._upload(floats, torch.float32))
            tokens, logprobs = self.sampler(logits[sample_rows], batch)
        prompt_work = [(chunk, logits[first : first + count]) for chunk, first, count in prompt_spans]
        return PendingStep(tokens, logprobs, prompt_work, self._host_out())

    def _sampling_inputs(self, chunks: list) -> tuple[list[list[int]], list[list[float]]]:
        """Host values of a sampling batch: ``[top_ks, seeds, steps]`` and ``[temperatures, top_ps]``."""
        vocab = self.model.config.vocab_size
        params = [chunk.seq.params for chunk in chunks]
        ints = [
            [p.top_k if p.top_k > 0 else vocab for p in params],
            [chunk.seq.seed for chunk in chunks],
            # Index of the token being sampled among the outputs (one past the host's for a fed step).
            [chunk.start + chunk.num_tokens - chunk.seq.num_prompt_tokens for chunk in chunks],
        ]
        return ints, [[0.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params]]

    def _sampling_batch(
        self, chunks: list, ints: list[torch.Tensor], floats: list[torch.Tensor]
    ) -> SamplingBatch:
        """The sampling batch of ``chunks`` from its :meth:`_sampling_inputs`, uploaded."""
        params = [chunk.seq.params for chunk in chunks]
        vocab = self.model.config.vocab_size
        return SamplingBatch(
            temperatures=floats[0],
            top_ks=ints[0],
            top_ps=floats[1],
            seeds=ints[1],
            steps=ints[2],
            all_greedy=all(p.greedy for p in params),
            any_top_k=any(0 < p.top_k < vocab for p in params),
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

    def release_memory(self, offload_weights: bool) -> None:
        """Free the KV cache (and move the weights to host memory) while the engine is idle.

        Storage is resized in place so every holder of the cache tensors sees the change. The freed
        blocks go back to PyTorch's caching allocator, where trainers in this process can use them.
        """
        for cache in self.kv_caches:
            cache.untyped_storage().resize_(0)
        self._offloaded = offload_weights and self.device.type != "cpu"
        if self._offloaded:
            if self._fused:
                # The fused tensors would keep the device copy alive; the parameters move one by one.
                self.model.unfuse_projections()
            for param in self.model.parameters():
                param.data = param.data.to("cpu", non_blocking=True)

    def restore_memory(self) -> None:
        """Undo :meth:`release_memory`: reallocate the KV cache and bring the weights back.

        The decode graphs recorded the addresses of the cache and weights. Reallocated at the same
        size once the trainers have freed their transient memory, the cache usually lands where it
        was; the graphs are captured again (about a second for every bucket) only where it did not.
        """
        for cache in self.kv_caches:
            cache.untyped_storage().resize_(cache.numel() * cache.element_size())
            cache.zero_()
        if self._offloaded:
            for param in self.model.parameters():
                param.data = param.data.to(self.device, non_blocking=True)
            if self._fused:
                self.model.fuse_projections()
            self._offloaded = False
        if self.graphs is not None and self.graphs.moved():
            self.graphs.capture()
