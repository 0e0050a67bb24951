"""Per-request sampling settings, validated at the edge with messages that say what to change."""

from __future__ import annotations

from dataclasses import dataclass, field

# Below this temperature sampling is greedy (argmax).
GREEDY_TEMPERATURE = 1e-5
# The engine carries seeds and top-k (and counts tokens) in int64 tensors: larger values overflow.
MAX_INT = 2**63 - 1


class SamplingParamError(ValueError):
    """A sampling parameter is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """How to sample one request.

    ``temperature`` 0 means greedy. ``top_k`` <= 0 and ``top_p`` 1 disable truncation. ``seed`` makes
    the sample reproducible whatever else is in the batch. ``logprobs`` asks for the log-prob of each
    sampled token (log-softmax of the temperature-scaled logits over the full vocabulary, before
    top-p/top-k truncation); ``prompt_logprobs`` for the log-prob of each prompt token after the first.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and its valid range."""
        if not _int_in(self.n, 1):
            raise SamplingParamError("n", f"n must be an integer in [1, {MAX_INT}], got {self.n!r}")
        if not self.temperature >= 0:
            raise SamplingParamError(
                "temperature", f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not 0 < self.top_p <= 1:
            raise SamplingParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _int_in(self.top_k, -1) or self.top_k == 0:
            raise SamplingParamError(
                "top_k", f"top_k must be -1 (off) or an integer in [1, {MAX_INT}], got {self.top_k!r}"
            )
        if not _int_in(self.max_tokens, 1):
            raise SamplingParamError(
                "max_tokens", f"max_tokens must be an integer in [1, {MAX_INT}], got {self.max_tokens!r}"
            )
        if self.seed is not None and not _int_in(self.seed, 0):
            raise SamplingParamError(
                "seed", f"seed must be None or an integer in [0, {MAX_INT}], got {self.seed!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamError("stop", f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(_int_in(t, 0) for t in self.stop_token_ids):
            raise SamplingParamError(
                "stop_token_ids",
                f"stop_token_ids must be integers in [0, {MAX_INT}], got {self.stop_token_ids[:8]!r}",
            )


def _int_in(value: object, low: int) -> bool:
    """Whether ``value`` is an int (not a bool) in ``[low, MAX_INT]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT
