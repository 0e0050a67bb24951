"""How the ingress reaches a model: through a Serve handle, or in its own process.

A `ModelRoute` calls a `ModelServer` method by name (`call`) or opens one of its streams
(`stream`). `HandleRoute` goes through a Serve handle to the model's own deployment: one Ray
hop for each streamed chunk on top of the proxy's. `InProcessRoute` calls a `ModelServer`
living in the ingress's replica, so a chunk crosses only the proxy's hop.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

if TYPE_CHECKING:
    from raylane.serving.deployment import ModelServer


class ModelStream(Protocol):
    """The items of a streaming `ModelServer` method; `close` stops it (aborting its engine request)."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def __anext__(self) -> Any: ...

    async def close(self) -> None: ...


class ModelRoute(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...

    def stream(self, method: str, request: Any) -> ModelStream: ...


class _HandleStream:
    def __init__(self, stream: DeploymentResponseGenerator) -> None:
        self._stream = stream

    def __aiter__(self) -> _HandleStream:
        return self

    async def __anext__(self) -> Any:
        return await self._stream.__anext__()

    async def close(self) -> None:
        # Serve propagates the cancel to the replica, where it aborts the engine request.
        self._stream.cancel()


class HandleRoute:
    """A model served by its own deployment (`LLMServer`), reached through a Serve handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    def stream(self, method: str, request: Any) -> ModelStream:
        return _HandleStream(getattr(self.handle.options(stream=True), method).remote(request))


class _GeneratorStream:
    def __init__(self, items: AsyncIterator[Any]) -> None:
        self._items = items

    def __aiter__(self) -> _GeneratorStream:
        return self

    async def __anext__(self) -> Any:
        return await self._items.__anext__()

    async def close(self) -> None:
        # Runs the generator's cleanup, which aborts the engine request.
        await self._items.aclose()  # type: ignore[attr-defined]


class InProcessRoute:
    """A model whose `ModelServer` runs in the caller's process."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.server, method)(*args)
        return await result if inspect.isawaitable(result) else result

    def stream(self, method: str, request: Any) -> ModelStream:
        return _GeneratorStream(getattr(self.server, method)(request))
