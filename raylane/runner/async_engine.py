"""An asyncio front for `LLMEngine`: a background thread steps the engine, coroutines stream outputs.

The engine is not thread-safe and `step()` is a blocking compute call, so one dedicated thread
owns it: everything that touches the engine (adding, aborting, weight updates, reading stats)
is queued as a command and run by that thread between two steps. Outputs flow back to the
asyncio side through per-request queues. Any number of event loops may use one instance (each
request remembers the loop it was created on), which suits Ray Serve replicas and rollout workers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from raylane.runner.config import EngineConfig
from raylane.runner.engine import LLMEngine, RequestsFailedError, UnknownRequestError
from raylane.runner.outputs import EngineStats, RequestOutput
from raylane.runner.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from raylane.models import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting for the engine; the caller should retry later (HTTP 503/429)."""


class RequestTooLargeError(ValueError):
    """The request asks for more sequences than the engine will ever queue at once; it can never run."""


class RequestFailedError(RuntimeError):
    """The engine could not compute this request; it was aborted and every other request carried on."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down or crashed); the engine can serve no more requests."""


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative `RequestOutput`s.

    Outputs are cumulative, so a consumer slower than the engine loses nothing by skipping to
    the newest one: each `__anext__` returns the latest output available, which keeps a slow
    client from building an unbounded backlog. Iteration ends after the finished output.
    """

    def __init__(self, request_id: str, engine: AsyncLLMEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Abort the request in the engine unless it has finished; frees its KV blocks. Non-blocking."""
        if not self.finished:
            self.finished = True
            self._engine._abort_nowait(self.request_id)


class AsyncLLMEngine:
    """Drive an `LLMEngine` from asyncio: continuous batching across concurrent `generate` calls.

    ``max_waiting_seqs`` bounds the engine's waiting queue in sequences (a request sampling n
    completions has n): a request that would take the queue past it raises `EngineOverloadedError`
    instead of queueing, and one with more than ``max_waiting_seqs`` sequences, which could never be
    queued, raises `RequestTooLargeError` (None: unbounded).

    A request that breaks an engine step fails alone with `RequestFailedError` (see
    `RequestsFailedError`); the loop and the other requests carry on. Prompt text is tokenized on a
    worker thread, never on the engine's thread or the caller's event loop.
    """

    def __init__(self, engine: LLMEngine, max_waiting_seqs: int | None = None) -> None:
        self.engine = engine
        self.max_waiting_seqs = max_waiting_seqs
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # Written by asyncio threads (register) and the engine thread (pop on finish); single dict
        # operations are atomic under the GIL, which is all either side needs.
        self._streams: dict[str, RequestStream] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raylane-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting_seqs: int | None = None) -> AsyncLLMEngine:
        """Load the model named in ``config`` and start the engine loop."""
        return cls(LLMEngine(config), max_waiting_seqs=max_waiting_seqs)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def weight_version(self) -> int:
        """The version of the weights the next step will use."""
        return self.engine.weight_version

    @property
    def is_running(self) -> bool:
        return self._error is None and self._thread.is_alive()

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._step_until_stopped()
            reason = EngineDeadError("the engine was shut down")
        except Exception as exc:
            logger.exception("engine loop crashed; failing all in-flight requests")
            reason = EngineDeadError(f"the engine loop crashed: {exc!r}")
            reason.__cause__ = exc
        self._error = reason
        self._fail_all(reason)
        self._drain_commands()

    def _step_until_stopped(self) -> None:
        while True:
            # Block while idle; otherwise take only what is already queued and keep stepping.
            command = (
                self._commands.get() if not self.engine.has_unfinished_requests() else self._get_nowait()
            )
            while command is not None:
                if command is _STOP:
                    return
                command()
                command = self._get_nowait()
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except RequestsFailedError as exc:
                    outputs = exc.outputs
                    self._fail_requests(exc.failures)
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        if output.finished:
                            self._streams.pop(output.request_id, None)
                        stream._deliver(output)

    def _fail_requests(self, failures: dict[str, Exception]) -> None:
        for request_id, cause in failures.items():
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                error = RequestFailedError(f"the engine could not compute this request: {cause!r}")
                error.__cause__ = cause
                stream._deliver(error)

    def _get_nowait(self) -> Callable[[], None] | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._streams):
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._deliver(exc)

    def _drain_commands(self) -> None:
        """Run queued commands after the loop stopped so their futures fail instead of hanging."""
        while (command := self._get_nowait()) is not None:
            if command is not _STOP:
                command()

    # ----------------------------------------------------------------- asyncio side

    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            if self._error is not None:
                future.set_exception(self._error)
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        if self._error is not None:
            raise self._error
        self._commands.put(command)
        if self._error is not None:
            # The loop died between the check and the put: fail the command here, not never.
            self._drain_commands()
        return future

    async def run_between_steps(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps and return its result."""
        return await asyncio.wrap_future(self._submit(lambda: fn(self.engine)))

    async def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> RequestStream:
        """Admit a request and return its output stream.

        Raises the engine's `ValueError` for invalid parameters or a prompt that is too long,
        `RequestTooLargeError` for more sequences than ``max_waiting_seqs``, and
        `EngineOverloadedError` when its sequences would take the waiting queue past
        ``max_waiting_seqs``. The caller must iterate the stream to its end or call `RequestStream.abort`.
        """
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight; request ids must be unique")
        num_seqs = (sampling_params or SamplingParams()).n
        if self.max_waiting_seqs is not None and num_seqs > self.max_waiting_seqs:
            raise RequestTooLargeError(
                f"the request asks for {num_seqs} sequences but this engine queues at most "
                f"{self.max_waiting_seqs} (max_waiting_seqs): lower n"
            )
        if prompt is not None and prompt_token_ids is None and self.tokenizer is not None:
            prompt_token_ids = await asyncio.get_running_loop().run_in_executor(
                None, self.tokenizer.encode, prompt
            )
        stream = RequestStream(request_id, self)

        def admit() -> None:
            if self.max_waiting_seqs is not None:
                waiting = self.engine.stats.num_waiting
                if waiting + num_seqs > self.max_waiting_seqs:
                    raise EngineOverloadedError(
                        f"{waiting} sequences are already waiting for the engine and this request adds "
                        f"{num_seqs} (max_waiting_seqs={self.max_waiting_seqs}); retry later"
                    )
            self.engine.add_request(
                request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, sampling_params=sampling_params
            )

        # Registered before the engine sees the request, so its first output finds the stream.
        self._streams[request_id] = stream
        try:
            await asyncio.wrap_future(self._submit(admit))
        except BaseException as exc:
            self._streams.pop(request_id, None)
            if isinstance(exc, asyncio.CancelledError):
                # The admit command may have started before the cancellation reached it.
                self._abort_nowait(request_id)
            raise
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs; closing or cancelling the iterator aborts it."""
        stream = await self.add_request(request_id, prompt, prompt_token_ids, sampling_params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def _abort_nowait(self, request_id: str) -> None:
        def abort() -> None:
            self._streams.pop(request_id, None)
            # Unknown: it finished (or was never admitted) before the abort reached the engine.
            with contextlib.suppress(UnknownRequestError):
                self.engine.abort(request_id)

        if self._error is None:
            self._commands.put(abort)

    async def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request by id and return its final output (finish reason "abort").

        Its stream, if someone iterates it, ends with that output. Returns None when the request
        had already finished.
        """

        def abort(engine: LLMEngine) -> RequestOutput | None:
            stream = self._streams.pop(request_id, None)
            try:
                output = engine.abort(request_id)
            except UnknownRequestError:
                return None
            if stream is not None:
                stream._deliver(output)
            return output

        return await self.run_between_steps(abort)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights in place between two steps; in-flight requests continue with them."""
        await self.run_between_steps(lambda engine: engine.update_weights(named_tensors, version))
        logger.info("engine now serves weight version %d", version)

    async def stats(self) -> EngineStats:
        """The engine's counters (`EngineStats`), read between two steps."""
        return await self.run_between_steps(lambda engine: engine.stats)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop thread; in-flight requests fail with `EngineDeadError`."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout_s)


def _stop() -> None:
    """Sentinel command that ends the engine loop."""


_STOP = _stop
