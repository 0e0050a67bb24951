"""Continuous-batching scheduler with chunked prefill under a per-step token budget.

Each step first gives every running decode its one token (Sarathi: decodes never wait behind a
long prefill), then spends what is left of the budget on prefill chunks, oldest request first.
When a decode needs a KV block and none is free, the newest running sequence is preempted: its
blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from raylane.runner.block_manager import BlockManager
from raylane.runner.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    """Tokens ``[start, start + num_tokens)`` of ``seq`` are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled after it.

        A step launched ahead computes the position of a token not yet on the host, one past the end.
        """
        return self.start + self.num_tokens >= len(self.seq)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_decode_only(self) -> bool:
        return all(chunk.num_tokens == 1 and chunk.samples for chunk in self.chunks)


class Scheduler:
    """Decides which tokens of which sequences the next forward pass computes."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop to make room
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + 1):
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
                scheduled.add(seq.seq_id)
                budget -= 1

        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if num_tokens == 0:
                break
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens):
                break
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens

        # Sequences whose prefix another sequence is computing right now sit out this step, but do
        # not hold back those behind them (GRPO: the other prompts' first samples go ahead).
        skipped = 0
        while len(self.waiting) > skipped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[skipped]
            if self.block_manager.should_wait_for_prefix(seq):
                skipped += 1
                continue
            cached = self.block_manager.allocate_cached_prefix(seq)
            seq.num_computed_tokens = cached
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            fits_whole = num_tokens == seq.num_uncomputed_tokens
            if not (fits_whole or self.enable_chunked_prefill) or not self.block_manager.allocate(
                seq, cached + num_tokens
            ):
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                break
            del self.waiting[skipped]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, cached, num_tokens))
            out.num_cached_tokens += cached
            budget -= num_tokens
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        logger.debug("preempting sequence %s (%d tokens) for recompute", seq.seq_id, len(seq))
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def mark_computed(self, out: SchedulerOutput) -> None:
        """After the forward pass: advance each sequence and publish its completed blocks."""
        for chunk in out.chunks:
            if chunk.seq.is_finished:
                continue  # stopped while a step launched ahead computed its row
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.block_manager.register_computed_blocks(chunk.seq)
