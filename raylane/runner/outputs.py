"""What the engine returns for each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample of a request, cumulative so far (not a delta).

    ``logprobs`` holds the log-prob of each sampled token when asked for. ``weight_versions`` holds
    the weight version that produced each token; ``weight_version`` is the latest of them.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None
    weight_versions: list[int] = field(default_factory=list)

    @property
    def weight_version(self) -> int | None:
        return self.weight_versions[-1] if self.weight_versions else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[float] | None = None


@dataclass
class EngineStats:
    """Counters of the engine's life so far, plus the current cache occupancy."""

    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_prompt_tokens_computed: int
    num_cached_prompt_tokens: int
    num_generated_tokens: int
    num_steps: int
    # Decode steps launched before the previous step's tokens reached the host (async scheduling).
    num_steps_launched_ahead: int = 0
