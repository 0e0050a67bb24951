"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket.

A decode-only step (every sequence adds one token) has the same shapes every time for a given
batch size, so it is captured once per bucket and then replayed. Its inputs live in fixed-capacity
device buffers (block tables at the full width ``ceil(max_model_len / block_size)``) that the host
refreshes with one copy per step; a batch is padded up to the next bucket with rows that write to
and read from a scratch KV block no sequence owns. The captured region is the whole device side of
the step — the model forward (``torch.compile``'d unless disabled: it fuses the norms, rotary
embedding and activations that eager mode runs as hundreds of tiny kernels), the logits and the
fused sampler — so a step costs one host-to-device copy, one replay and one read of the tokens.

Buckets are captured at start-up, or each on its first use (``lazy``): start-up then compiles and
captures only what the engine's own warm-up steps need.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from raylane.models import CausalLM
from raylane.runner.attention import AttentionBackend, PagedAttention, PagedAttentionMetadata
from raylane.runner.scheduler import ScheduledChunk
from raylane.runner.sequence import Sequence

logger = logging.getLogger(__name__)

_INT_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "seeds", "steps")


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: powers of two up to 16, then every multiple of 16, then the max."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_num_seqs]
    sizes += range(16, max_num_seqs, 16)
    return [*sizes, max_num_seqs]


def decode_logits(
    model: CausalLM,
    backend: AttentionBackend,
    kv_caches: list[torch.Tensor],
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_pad_index: torch.Tensor,
) -> torch.Tensor:
    """Logits of one decode step (one query per sequence): the function captured in each graph."""
    meta = PagedAttentionMetadata(
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        query_positions=positions[:, None],
        query_pad_index=query_pad_index,
        max_query_len=1,
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
    )
    hidden = model.hidden_states(input_ids, positions, PagedAttention(backend, kv_caches, meta))
    return model.compute_logits(hidden)


class DecodeBuffers:
    """The inputs of one decode step: pinned host staging and device buffers with the same layout.

    Integer fields share one buffer (and the block tables follow them), so one copy uploads them.
    """

    def __init__(self, max_batch: int, width: int, device: torch.device) -> None:
        size = len(_INT_FIELDS) * max_batch + max_batch * width
        self.host_ints = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        self.host_floats = torch.zeros(max_batch, dtype=torch.float32, pin_memory=True)
        self.device_ints = torch.zeros(size, dtype=torch.int64, device=device)
        self.device_floats = torch.zeros(max_batch, dtype=torch.float32, device=device)
        host_np = self.host_ints.numpy()
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, torch.Tensor] = {}
        for i, name in enumerate(_INT_FIELDS):
            span = slice(i * max_batch, (i + 1) * max_batch)
            self.host[name] = host_np[span]
            self.device[name] = self.device_ints[span]
        tables = slice(len(_INT_FIELDS) * max_batch, size)
        self.host["block_tables"] = host_np[tables].reshape(max_batch, width)
        self.device["block_tables"] = self.device_ints[tables].view(max_batch, width)
        self.host["temperatures"] = self.host_floats.numpy()
        self.device["temperatures"] = self.device_floats

    def upload(self) -> None:
        self.device_ints.copy_(self.host_ints, non_blocking=True)
        self.device_floats.copy_(self.host_floats, non_blocking=True)


class CUDAGraphDecoder:
    """Captures the decode step for each bucket and replays it for decode-only batches.

    With ``lazy`` a bucket is captured on its first replay instead of at start-up.
    """

    def __init__(
        self,
        model: CausalLM,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        width: int,
        block_size: int,
        scratch_block: int,
        compile_model: bool,
        lazy: bool = False,
        programmatic_launch: bool = False,
    ) -> None:
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.programmatic_launch = programmatic_launch
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = decode_buckets(max_num_seqs)
        self.max_batch = self.buckets[-1]
        device = kv_caches[0].device
        self.buffers = DecodeBuffers(self.max_batch, width, device)
        self._bucket_of = [next(b for b in self.buckets if b >= n) for n in range(self.max_batch + 1)]
        self._index = torch.arange(self.max_batch + 1, device=device)
        # Per row: (sequence, its block-table list, entries copied). Block tables only ever grow by
        # appending, and a freed sequence gets a new list, so this identifies what the row holds.
        self._rows: list[tuple[Sequence, list[int], int] | None] = [None] * self.max_batch
        # A module-level function, not a bound method: the compiled wrapper must not hold `self`, or the
        # reference cycle would keep the KV cache alive after the engine is dropped.
        self._forward = torch.compile(decode_logits, fullgraph=True) if compile_model else decode_logits
        self.lazy = lazy
        self._pool = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._captured_addresses: list[int] = []
        self.num_replays = 0
        self.num_captures = 0
        self._pad(0, self.max_batch)

    def _step(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Imported here: this module is importable without Triton (CPU installs), its use is not.
        from raylane.runner.sampling_kernel import fused_sample

        dev = self.buffers.device
        args = (
            dev["input_ids"][:n],
            dev["positions"][:n],
            dev["slot_mapping"][:n],
            dev["block_tables"][:n],
            dev["seq_lens"][:n],
            self._index[: n + 1],
            self._index[:n],
        )
        if n > 1:
            # One compiled graph serves every bucket above 1 (size 1 is always specialised).
            for arg in args:
                torch._dynamo.mark_dynamic(arg, 0)
        logits = self._forward(self.model, self.backend, self.kv_caches, *args)
        tokens, logprobs = fused_sample(logits, dev["temperatures"][:n], dev["seeds"][:n], dev["steps"][:n])
        return logits, tokens, logprobs

    def _addresses(self) -> list[int]:
        """Where the tensors each graph reads live: the KV cache and the model's weights and buffers."""
        tensors = [*self.kv_caches, *self.model.parameters(), *self.model.buffers()]
        return [tensor.data_ptr() for tensor in tensors]

    def moved(self) -> bool:
        """Whether the KV cache or the weights are no longer where the graphs recorded them."""
        return self._addresses() != self._captured_addresses

    @torch.inference_mode()
    def capture(self) -> None:
        """(Re)capture: every bucket, largest first; when lazy, only the buckets captured before."""
        buckets = sorted(self._graphs) if self.lazy else self.buckets
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle()
        self.buffers.upload()
        self._capture(reversed(buckets))
        self.num_captures += 1
        logger.info("captured decode CUDA graphs for batch sizes %s", sorted(self._graphs))

    def _capture(self, buckets) -> None:
        """Warm up (compiling on a shape's first call) and capture ``buckets`` with the uploaded inputs.

        The warm-up step computes what the replay computes next, so running it on a real step's
        inputs (a lazy capture) writes the same KV entries the replay writes again.
        """
        from raylane.runner.programmatic_launch import programmatic_launch

        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        # Each engine compiles its own model; do not let earlier engines in this process use up the
        # recompile budget of this function and silently drop a later one to eager mode.
        with config.patch(**{limit: max(64, getattr(config, limit))}):
            for n in buckets:
                # Batch 1's kernels are so short that launching each only when the one before it has
                # drained costs 12 % of the step on an H200; larger batches lost with PDL (batch 256).
                with programmatic_launch(self.programmatic_launch and n == 1):
                    self._step(n)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool):
                        outputs = self._step(n)
                self._graphs[n] = (graph, *outputs)
        torch.cuda.synchronize()
        self._captured_addresses = self._addresses()

    def _pad(self, start: int, stop: int) -> None:
        """Rows [start, stop) become padding: one token at position 0 in the scratch block."""
        host = self.buffers.host
        for name in ("input_ids", "positions", "seeds", "steps"):
            host[name][start:stop] = 0
        host["temperatures"][start:stop] = 0.0
        host["seq_lens"][start:stop] = 1
        host["slot_mapping"][start:stop] = self.scratch_block * self.block_size
        host["block_tables"][start:stop, 0] = self.scratch_block
        self._rows[start:stop] = [None] * (stop - start)

    def prepare(self, chunks: list[ScheduledChunk]) -> None:
        """Fill the host buffers for one decode step (each chunk computes one token of its sequence)."""
        seqs = [chunk.seq for chunk in chunks]
        n = len(seqs)
        host = self.buffers.host
        bs = self.block_size
        positions = np.fromiter((chunk.start for chunk in chunks), dtype=np.int64, count=n)
        lengths = positions + 1
        # A step launched ahead computes a token the host does not have yet: its id is copied in on
        # the device by run(); the stale id written here is overwritten.
        host["input_ids"][:n] = [seq.token_ids[-1] for seq in seqs]
        host["positions"][:n] = positions
        host["seq_lens"][:n] = lengths
        last_blocks = np.fromiter(
            (seq.block_table[pos] for seq, pos in zip(seqs, (positions // bs).tolist())),
            dtype=np.int64,
            count=n,
        )
        host["slot_mapping"][:n] = last_blocks * bs + positions % bs
        host["seeds"][:n] = [seq.seed for seq in seqs]
        host["steps"][:n] = lengths - np.fromiter(
            (seq.num_prompt_tokens for seq in seqs), dtype=np.int64, count=n
        )
        host["temperatures"][:n] = [0.0 if seq.params.greedy else seq.params.temperature for seq in seqs]
        tables = host["block_tables"]
        rows = self._rows
        for i, seq in enumerate(seqs):
            table = seq.block_table
            row = rows[i]
            if row is not None and row[0] is seq and row[1] is table:
                if row[2] != len(table):
                    tables[i, row[2] : len(table)] = table[row[2] :]
                    rows[i] = (seq, table, len(table))
            else:
                tables[i, : len(table)] = table
                rows[i] = (seq, table, len(table))
        self._pad(n, self._bucket_of[n])

    def run(
        self, n: int, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upload the prepared inputs and replay; returns ``(logits, tokens, logprobs)`` of the n rows.

        ``input_ids`` (on the device) replace the prepared ids: the tokens a previous step sampled.
        """
        self.buffers.upload()
        if input_ids is not None:
            self.buffers.device["input_ids"][:n].copy_(input_ids)
        bucket = self._bucket_of[n]
        if bucket not in self._graphs:
            self._capture([bucket])
        graph, logits, tokens, logprobs = self._graphs[bucket]
        graph.replay()
        self.num_replays += 1
        return logits[:n], tokens[:n], logprobs[:n]
