"""OpenAI completions and chat completions on top of one `AsyncLLMEngine`.

`OpenAIServing` turns validated requests (`raylane.serving.protocol`) into engine requests and
the engine's outputs into OpenAI responses or server-sent-event strings. It knows nothing of
HTTP or Ray Serve, so it runs the same inside a replica, a test or a benchmark.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from raylane.serving.admission import Admission
from raylane.serving.errors import BadRequestError, ServingError
from raylane.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from raylane.serving.streaming import DeltaTracker, admit, collect, merge

if TYPE_CHECKING:
    from raylane.runner import RequestOutput, SamplingParams
    from raylane.runner.async_engine import AsyncLLMEngine
    from raylane.serving.metrics import TimedStream

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


def fingerprint(weight_version: int) -> str:
    """`system_fingerprint` of a response: the policy version that sampled its last token."""
    return f"raylane-weights-v{weight_version}"


def _engine_failure(exc: Exception) -> ServingError:
    return ServingError(f"generation failed: {exc}")


class OpenAIServing:
    """Serve OpenAI completion and chat requests for one model with one engine.

    ``tokens_per_chunk``: tokens gathered into one streamed event after the first (see `merge`)."""

    def __init__(
        self, engine: AsyncLLMEngine, model_name: str, admission: Admission, tokens_per_chunk: int = 1
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.admission = admission
        self.tokens_per_chunk = tokens_per_chunk

    # ------------------------------------------------------------------ shared

    def _sampling_params(
        self,
        request: CompletionRequest | ChatCompletionRequest,
        max_tokens: int,
        logprobs: bool,
        num_prompts: int = 1,
    ) -> SamplingParams:
        return self.admission.sampling_params(
            num_prompts,
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            max_tokens=max_tokens,
            stop=request.stop or [],
            stop_token_ids=request.stop_token_ids or [],
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
        )

    async def _chat_prompt(self, request: ChatCompletionRequest) -> tuple[list[int], int]:
        """Token ids of the chat-templated prompt and the max_tokens to use."""
        messages = request.chat_messages()
        self.admission.check_prompt("".join(m["content"] for m in messages), param="messages")
        # Templating and tokenizing take time in proportion to the text: off the event loop.
        return await asyncio.to_thread(self._tokenize_chat, messages, request.requested_max_tokens)

    def _tokenize_chat(self, messages: list[dict[str, str]], max_tokens: int | None) -> tuple[list[int], int]:
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise BadRequestError(str(exc), param="messages") from None
        # The template already writes any BOS token; adding special tokens again would double it.
        token_ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        room = self.engine.max_model_len - len(token_ids)
        if room < 1:
            raise BadRequestError(
                f"the chat prompt is {len(token_ids)} tokens; this model accepts at most "
                f"{self.engine.max_model_len - 1} so there is room for an answer; shorten the messages",
                param="messages",
                code="context_length_exceeded",
            )
        return token_ids, min(room, self.admission.max_tokens) if max_tokens is None else max_tokens

    def _version(self, version: int | None) -> int:
        # A completion that has no token yet carries no version: report the engine's.
        return self.engine.weight_version if version is None else version

    def _usage(self, finals: list[RequestOutput]) -> UsageInfo:
        return UsageInfo.of(
            sum(len(out.prompt_token_ids) for out in finals),
            sum(len(c.token_ids) for out in finals for c in out.outputs),
        )

    def _token_strings(self, token_ids: list[int]) -> list[str]:
        return [self.engine.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    def _completion_logprobs(
        self, token_ids: list[int], logprobs: list[float] | None, offset: int
    ) -> CompletionLogprobs:
        tokens = self._token_strings(token_ids)
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=list(logprobs or []), text_offset=offsets)

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[float] | None) -> ChatChoiceLogprobs:
        return ChatChoiceLogprobs(
            content=[
                ChatTokenLogprob(token=token, logprob=lp)
                for token, lp in zip(self._token_strings(token_ids), logprobs or [], strict=False)
            ]
        )

    # ------------------------------------------------------------------ completions

    async def _admit_completion(self, request: CompletionRequest) -> tuple[str, list[TimedStream]]:
        prompts = request.prompts()
        params = self._sampling_params(
            request, request.max_tokens, logprobs=request.logprobs is not None, num_prompts=len(prompts)
        )
        for prompt in prompts:
            self.admission.check_prompt(prompt)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        return request_id, await admit(self.engine, prompts, params, request_id)

    async def create_completion(self, request: CompletionRequest) -> CompletionResponse:
        """A complete (non-streaming) completion response."""
        request_id, streams = await self._admit_completion(request)
        try:
            finals = await collect(streams)
        except Exception as exc:
            raise _engine_failure(exc) from exc
        choices = [
            CompletionChoice(
                index=p * request.n + c.index,
                text=c.text,
                logprobs=self._completion_logprobs(c.token_ids, c.logprobs, 0)
                if request.logprobs is not None
                else None,
                finish_reason=c.finish_reason,
            )
            for p, out in enumerate(finals)
            for c in out.outputs
        ]
        version = max(self._version(c.weight_version) for out in finals for c in out.outputs)
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            system_fingerprint=fingerprint(version),
            choices=choices,
            usage=self._usage(finals),
        )

    async def stream_completion(self, request: CompletionRequest) -> AsyncIterator[str]:
        """Admit the request (raising client errors now) and return its server-sent events."""
        request_id, streams = await self._admit_completion(request)
        return self._completion_events(request, request_id, streams)

    async def _completion_events(
        self, request: CompletionRequest, request_id: str, streams: list[TimedStream]
    ) -> AsyncIterator[str]:
        trackers = [DeltaTracker(request.stop or []) for _ in streams]
        text_offsets: dict[int, int] = {}
        finals: list[Any] = [None] * len(streams)
        try:
            async for p, output in merge(streams, self.tokens_per_chunk):
                finals[p] = output
                events = []
                for delta in trackers[p].deltas(output.outputs):
                    index = p * request.n + delta.index
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self._completion_logprobs(
                            delta.token_ids, delta.logprobs, text_offsets.get(index, 0)
                        )
                    text_offsets[index] = text_offsets.get(index, 0) + len(delta.text)
                    choice = CompletionChoice(
                        index=index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                    events.append(
                        sse(
                            CompletionResponse(
                                id=request_id,
                                model=self.model_name,
                                system_fingerprint=fingerprint(self._version(delta.weight_version)),
                                choices=[choice],
                            )
                        )
                    )
                if all(final is not None and final.finished for final in finals):
                    if request.include_usage_in_stream:
                        usage = CompletionResponse(
                            id=request_id, model=self.model_name, choices=[], usage=self._usage(finals)
                        )
                        events.append(sse(usage))
                    events.append(SSE_DONE)
                if events:
                    yield "".join(events)
        except Exception as exc:
            error = exc if isinstance(exc, ServingError) else _engine_failure(exc)
            yield sse(error.to_dict()) + SSE_DONE

    # ------------------------------------------------------------------ chat

    async def _admit_chat(self, request: ChatCompletionRequest) -> tuple[str, TimedStream]:
        if request.requested_max_tokens is not None:
            # Checked before the prompt is tokenized; the default fills what the prompt leaves.
            self._sampling_params(request, request.requested_max_tokens, logprobs=request.logprobs)
        token_ids, max_tokens = await self._chat_prompt(request)
        params = self._sampling_params(request, max_tokens, logprobs=request.logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        (stream,) = await admit(self.engine, [token_ids], params, request_id)
        return request_id, stream

    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        """A complete (non-streaming) chat completion response."""
        request_id, stream = await self._admit_chat(request)
        try:
            (final,) = await collect([stream])
        except Exception as exc:
            raise _engine_failure(exc) from exc
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._chat_logprobs(c.token_ids, c.logprobs) if request.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in final.outputs
        ]
        version = max(self._version(c.weight_version) for c in final.outputs)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            system_fingerprint=fingerprint(version),
            choices=choices,
            usage=self._usage([final]),
        )

    async def stream_chat_completion(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """Admit the request (raising client errors now) and return its server-sent events."""
        request_id, stream = await self._admit_chat(request)
        return self._chat_events(request, request_id, stream)

    async def _chat_events(
        self, request: ChatCompletionRequest, request_id: str, stream: TimedStream
    ) -> AsyncIterator[str]:
        def chunk(choice: ChatChunkChoice, version: int | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=request_id,
                    model=self.model_name,
                    system_fingerprint=None if version is None else fingerprint(version),
                    choices=[choice],
                )
            )

        yield "".join(
            chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
            for i in range(request.n)
        )
        tracker = DeltaTracker(request.stop or [])
        try:
            async for _, output in merge([stream], self.tokens_per_chunk):
                events = []
                for delta in tracker.deltas(output.outputs):
                    logprobs = (
                        self._chat_logprobs(delta.token_ids, delta.logprobs) if request.logprobs else None
                    )
                    content = ChatDelta(content=delta.text) if delta.text else ChatDelta()
                    choice = ChatChunkChoice(
                        index=delta.index, delta=content, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                    events.append(chunk(choice, self._version(delta.weight_version)))
                if output.finished:
                    if request.include_usage_in_stream:
                        usage = ChatCompletionChunk(
                            id=request_id, model=self.model_name, choices=[], usage=self._usage([output])
                        )
                        events.append(sse(usage))
                    events.append(SSE_DONE)
                if events:
                    yield "".join(events)
        except Exception as exc:
            error = exc if isinstance(exc, ServingError) else _engine_failure(exc)
            yield sse(error.to_dict()) + SSE_DONE
