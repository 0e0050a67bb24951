"""One sequence being generated: its tokens, KV blocks, progress and sampled log-probs."""

from __future__ import annotations

import enum

from raylane.runner.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A prompt plus the tokens sampled for it so far.

    ``num_computed_tokens`` counts tokens whose KV is in the cache; the scheduler advances it in
    chunks (prefill) or one at a time (decode) and resets it on preemption (recompute).
    """

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        arrival: int,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.arrival = arrival
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.cache_blocks = True
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float] = []
        self.weight_versions: list[int] = []
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
