"""How the ingress reaches a model: through a Serve handle, or in its own process.

A `ModelRoute` calls a `ModelServer` method by name (`call`) or opens one of its streams
(`stream`). `HandleRoute` goes through a Serve handle to the model's own deployment: one Ray
hop for each streamed chunk on top of the proxy's. `InProcessRoute` calls a `ModelServer`
living in the ingress's replica, so a chunk crosses only the proxy's hop.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ray.serve.handle import DeploymentHandle

if TYPE_CHECKING:
    from raylane.serving.deployment import ModelServer


class ModelStream:
    """The items of a streaming `ModelServer` method; `close` stops it, which aborts its engine request."""

    def __init__(self, items: AsyncIterator[Any], stop: Callable[[], Awaitable[None] | None]) -> None:
        self._items = items
        self._stop = stop

    def __aiter__(self) -> ModelStream:
        return self

    async def __anext__(self) -> Any:
        return await self._items.__anext__()

    async def close(self) -> None:
        stopped = self._stop()
        if stopped is not None:
            await stopped


class ModelRoute(Protocol):
    """Calls and streams of one model's `ModelServer`, wherever it runs."""

    async def call(self, method: str, *args: Any) -> Any: ...

    def stream(self, method: str, request: Any) -> ModelStream: ...


class HandleRoute:
    """A model served by its own deployment (`LLMServer`), reached through a Serve handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    def stream(self, method: str, request: Any) -> ModelStream:
        items = getattr(self.handle.options(stream=True), method).remote(request)
        # Serve propagates the cancel to the replica, where it aborts the engine request.
        return ModelStream(items, items.cancel)


class InProcessRoute:
    """A model whose `ModelServer` runs in the caller's process."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.server, method)(*args)
        return await result if inspect.isawaitable(result) else result

    def stream(self, method: str, request: Any) -> ModelStream:
        items = getattr(self.server, method)(request)
        # Closing the generator runs its cleanup, which aborts the engine request.
        return ModelStream(items, items.aclose)
