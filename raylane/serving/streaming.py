"""Engine requests as the API layers need them: all-or-none admission, merged streams, deltas.

The engine reports each completion's full text so far; `DeltaTracker` turns that into the
deltas a streaming client receives. Two parts of that text may still change, so they are held back until they settle: a tail that could be the start of a stop
string (the engine cuts the text at a stop string once it completes), and trailing U+FFFD
characters, which a byte-level tokenizer produces for an incomplete UTF-8 sequence that the
next token may complete. That way the concatenated deltas always equal the final text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raylane.runner.async_engine import EngineDeadError, EngineOverloadedError
from raylane.serving.errors import BadRequestError, OverloadedError
from raylane.serving.metrics import TimedStream

if TYPE_CHECKING:
    from raylane.runner import RequestOutput, SamplingParams
    from raylane.runner.async_engine import AsyncLLMEngine

_REPLACEMENT_CHAR = "\ufffd"


@dataclass
class Delta:
    """What one completion gained since the previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None
    weight_version: int | None


@dataclass
class _Sent:
    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False


@dataclass
class DeltaTracker:
    """Remembers what was sent for each completion of one request and computes the next deltas."""

    stop: list[str] = field(default_factory=list)
    _sent: dict[int, _Sent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    def deltas(self, completions: list) -> list[Delta]:
        """Deltas of the completions (`CompletionOutput`s) that gained text/tokens or just finished."""
        result = []
        for completion in completions:
            sent = self._sent.setdefault(completion.index, _Sent())
            if sent.finished:
                continue
            finished = completion.finish_reason is not None
            text_end = len(completion.text) if finished else self._settled_length(completion.text)
            text_end = max(text_end, sent.text_len)
            new_tokens = completion.token_ids[sent.num_tokens :]
            if text_end == sent.text_len and not new_tokens and not finished:
                continue
            logprobs = completion.logprobs[sent.num_tokens :] if completion.logprobs is not None else None
            result.append(
                Delta(
                    index=completion.index,
                    text=completion.text[sent.text_len : text_end],
                    token_ids=list(new_tokens),
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,
                    weight_version=completion.weight_version,
                )
            )
            sent.text_len, sent.num_tokens, sent.finished = text_end, len(completion.token_ids), finished
        return result

    def _settled_length(self, text: str) -> int:
        end = len(text) - self._holdback
        while end > 0 and text[end - 1] == _REPLACEMENT_CHAR:
            end -= 1
        return max(end, 0)


async def admit(
    engine: AsyncLLMEngine, prompts: list[str | list[int]], params: SamplingParams, id_prefix: str
) -> list[TimedStream]:
    """Add one engine request per prompt, all or none, mapping engine rejections to client errors.

    The streams record their latencies to the serving metrics (`TimedStream`)."""
    start = time.monotonic()
    streams: list[TimedStream] = []
    try:
        for i, prompt in enumerate(prompts):
            text, token_ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
            stream = await engine.add_request(f"{id_prefix}-{i}", text, token_ids, params)
            streams.append(TimedStream(stream, start))
    except BaseException as exc:
        for stream in streams:
            stream.abort()
        if isinstance(exc, EngineOverloadedError):
            raise OverloadedError(str(exc)) from None
        if isinstance(exc, EngineDeadError):
            # Serve's health check replaces this replica; a retry will reach a live one.
            raise OverloadedError(str(exc), code="engine_unavailable") from None
        if isinstance(exc, ValueError):
            raise BadRequestError(str(exc)) from None
        raise
    return streams


async def merge(
    streams: list[TimedStream], tokens_per_chunk: int = 1
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as ``(stream index, output)``; aborts unfinished ones on exit.

    Outputs are cumulative, so a reader slower than the engine gets only the newest output of
    each stream that advanced since it last read, as a single stream does (`RequestStream`).

    With ``tokens_per_chunk`` above 1, after a stream's first output its next one is yielded only
    once the stream gained that many tokens since, or ended (its last output, or its error), so a
    streamed chunk carries several tokens. Each chunk costs a Serve replica and its proxy the same
    whatever its size, and in the replica that work competes with the engine's thread for the CPU
    and the GIL: under load, one chunk per token slows the engine's steps.
    """
    if len(streams) == 1 and tokens_per_chunk <= 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            streams[0].abort()
        return
    unread: dict[int, RequestOutput] = {}
    # Per stream, the tokens at which its next output is due to go out; the first goes out at once.
    due = [0] * len(streams)
    failures: list[Exception] = []
    ready = asyncio.Event()

    async def pump(i: int, stream: TimedStream) -> None:
        try:
            async for output in stream:
                unread[i] = output  # supersedes an older output the reader has not taken
                if _num_tokens(output) >= due[i]:
                    ready.set()
        except Exception as exc:
            failures.append(exc)
        finally:
            ready.set()  # the stream ended: its last output or its error goes out now

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        while True:
            await ready.wait()
            ready.clear()
            if failures:
                raise failures[0]
            for i in list(unread):
                # Read now, not before the yields above: a pump may have superseded it meanwhile.
                output = unread[i]
                if tasks[i].done() or _num_tokens(output) >= due[i]:
                    del unread[i]
                    due[i] = _num_tokens(output) + tokens_per_chunk
                    yield i, output
            if not unread and all(task.done() for task in tasks):
                return
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


def _num_tokens(output: RequestOutput) -> int:
    """Tokens of the longest completion: the completions of one request decode in the same steps."""
    return max((len(c.token_ids) for c in output.outputs), default=0)


async def collect(streams: list[TimedStream]) -> list[RequestOutput]:
    """The final output of every stream, in order."""
    finals: list[Any] = [None] * len(streams)
    async for i, output in merge(streams):
        finals[i] = output
    return finals
