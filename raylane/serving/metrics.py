"""Serving metrics for the Ray dashboard: time to first token and time per output token as
histograms, and requests by protocol, method and status, each under one ``raylane_serving_`` name.

Latencies are measured in the model replica, from the moment a request reaches the engine to
the outputs the serving layer reads (`TimedStream`), so they hold for HTTP and gRPC alike. The
ingress counts every request it answers with its final status: an ASGI middleware for HTTP
(`CountHttpRequests`), `count_grpc_request` around each gRPC method. Inside a Serve replica,
Ray Serve adds the deployment, replica and application tags. Nothing is recorded unless Ray is
initialised: the serving layer also runs in tests and benchmarks without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray
from ray.serve import metrics

if TYPE_CHECKING:
    from raylane.runner import RequestOutput
    from raylane.runner.async_engine import RequestStream

__all__ = ["CountHttpRequests", "TimedStream", "count_grpc_request"]

# Seconds; a tiny model on a laptop CPU answers in milliseconds, a large one under load in seconds.
_FIRST_TOKEN_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_PER_TOKEN_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


@functools.cache
def _instruments() -> dict[str, metrics.Metric]:
    # One registration per process: Ray rejects a name registered twice with other tags.
    return {
        "first_token": metrics.Histogram(
            "raylane_serving_time_to_first_token_seconds",
            "Seconds from a request reaching the engine to its first generated token",
            boundaries=_FIRST_TOKEN_BOUNDARIES,
        ),
        "per_token": metrics.Histogram(
            "raylane_serving_time_per_output_token_seconds",
            "Seconds per generated token after the first, per request",
            boundaries=_PER_TOKEN_BOUNDARIES,
        ),
        "requests": metrics.Counter(
            "raylane_serving_requests",
            "Requests the ingress answered, by protocol, method and status (HTTP code or gRPC status name)",
            tag_keys=("protocol", "method", "status"),
        ),
    }


def _count(protocol: str, method: str, status: str) -> None:
    if ray.is_initialized():
        _instruments()["requests"].inc(tags={"protocol": protocol, "method": method, "status": status})


class TimedStream:
    """A `RequestStream` that records its request's time to first token and time per output token.

    Time per output token is the time from the first token to the finished output over the tokens
    after the first, of the longest completion (the completions of one request decode together).
    """

    def __init__(self, stream: RequestStream, start: float) -> None:
        """``start``: the `time.monotonic` at which the request was handed to the engine."""
        self._stream = stream
        self._start = start
        self._first_token_at: float | None = None

    def __aiter__(self) -> TimedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        output = await self._stream.__anext__()
        self._observe(output, time.monotonic())
        return output

    def abort(self) -> None:
        self._stream.abort()

    def _observe(self, output: RequestOutput, now: float) -> None:
        if not ray.is_initialized():
            return
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if self._first_token_at is None and num_tokens > 0:
            self._first_token_at = now
            _instruments()["first_token"].observe(now - self._start)
        if output.finished and self._first_token_at is not None and num_tokens > 1:
            _instruments()["per_token"].observe((now - self._first_token_at) / (num_tokens - 1))


@contextlib.contextmanager
def count_grpc_request(method: str, grpc_context: Any) -> Iterator[None]:
    """Count one gRPC request under the status it ends with: the code set on ``grpc_context``, else
    OK, CANCELLED when the client went away, INTERNAL when the method raised something else."""
    status = None
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        status = "CANCELLED"
        raise
    except Exception:
        status = "INTERNAL"
        raise
    finally:
        code = grpc_context.code()
        _count("grpc", method, code.name if code is not None else status or "OK")


class CountHttpRequests:
    """ASGI middleware counting each HTTP request under its route and response status (500 when the
    application raised instead of answering). Unmatched paths share the method ``unmatched``, so a
    scan of random URLs cannot create a series per path."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "500"

        async def send_and_note_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            # The router puts the matched route into the scope it was given, which is this one.
            route = scope.get("route")
            _count("http", getattr(route, "path", "unmatched"), status)
