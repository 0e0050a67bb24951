"""The admission rules of one served model, shared by the OpenAI HTTP and the gRPC mappings.

Every check here is cheap and runs before a prompt is tokenized, so an oversized or fan-out
request is refused in microseconds and never reaches the engine. A text prompt is refused by its
length alone when it cannot fit the context: no token of the vocabulary is longer than
``max_token_chars`` characters, so a text of more than ``(max_model_len - 1) * max_token_chars``
characters has more tokens than the model accepts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raylane.runner.sampling_params import SamplingParamError, SamplingParams
from raylane.serving.config import RequestLimits
from raylane.serving.errors import BadRequestError

# OpenAI's upper bound; the engine itself accepts any temperature >= 0.
MAX_TEMPERATURE = 2.0

if TYPE_CHECKING:
    from raylane.runner.async_engine import AsyncLLMEngine


class Admission:
    """Check requests for one engine against `RequestLimits`; failures raise `BadRequestError`."""

    def __init__(self, limits: RequestLimits, engine: AsyncLLMEngine) -> None:
        self.limits = limits
        self.max_model_len = engine.max_model_len
        self.max_waiting_seqs = engine.max_waiting_seqs
        self.max_tokens = min(limits.max_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
        tokenizer = engine.tokenizer
        longest = max(map(len, tokenizer.backend.get_vocab())) if tokenizer is not None else 0
        self.max_prompt_chars = (engine.max_model_len - 1) * max(longest, 1)

    def sampling_params(self, num_prompts: int = 1, **fields: Any) -> SamplingParams:
        """`SamplingParams` of a request for ``num_prompts`` prompts, checked against the engine's
        ranges and these limits."""
        try:
            params = SamplingParams(**fields)
        except SamplingParamError as exc:
            raise BadRequestError(str(exc), param=exc.field) from None
        self.check_sampling(params, num_prompts)
        return params

    def check_sampling(self, params: SamplingParams, num_prompts: int = 1) -> None:
        """The request's sampling parameters, for ``num_prompts`` prompts, are within the limits."""
        limits = self.limits
        if params.temperature > MAX_TEMPERATURE:
            raise BadRequestError(
                f"temperature must be in [0, {MAX_TEMPERATURE}], got {params.temperature}",
                param="temperature",
            )
        sequences = params.n * num_prompts
        if sequences > limits.max_sequences:
            raise BadRequestError(
                f"the request asks for {sequences} completions (n={params.n} for {num_prompts} prompt(s)); "
                f"at most {limits.max_sequences} are allowed per request: lower n or split the request",
                param="n",
            )
        if self.max_waiting_seqs is not None and sequences > self.max_waiting_seqs:
            raise BadRequestError(
                f"the request asks for {sequences} completions but this model queues at most "
                f"{self.max_waiting_seqs} sequences (max_waiting_seqs); it could never be scheduled: lower n",
                param="n",
            )
        if len(params.stop) > limits.max_stop_sequences:
            raise BadRequestError(
                f"at most {limits.max_stop_sequences} stop sequences are allowed, got {len(params.stop)}",
                param="stop",
            )
        if any(len(stop) > limits.max_stop_chars for stop in params.stop):
            raise BadRequestError(
                f"a stop sequence may have at most {limits.max_stop_chars} characters", param="stop"
            )
        if len(params.stop_token_ids) > limits.max_stop_token_ids:
            raise BadRequestError(
                f"at most {limits.max_stop_token_ids} stop token ids are allowed, got {len(params.stop_token_ids)}",
                param="stop_token_ids",
            )
        if params.max_tokens > self.max_tokens:
            raise BadRequestError(
                f"max_tokens is {params.max_tokens} but this model generates at most {self.max_tokens} "
                f"tokens (context length {self.max_model_len}); lower max_tokens",
                param="max_tokens",
            )

    def check_prompt(self, prompt: str | list[int], param: str = "prompt") -> None:
        """A prompt (text or token ids) is not certain to overflow the context; no tokenizing."""
        if isinstance(prompt, str):
            too_long = len(prompt) > self.max_prompt_chars
            size = f"{len(prompt)} characters"
        else:
            too_long = len(prompt) >= self.max_model_len
            size = f"{len(prompt)} tokens"
        if too_long:
            raise BadRequestError(
                f"the prompt ({size}) exceeds the maximum context length of {self.max_model_len} tokens "
                "(prompt plus at least one new token): shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
