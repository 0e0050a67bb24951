"""`ModelServer`: one model's engine and its request mappings; `LLMServer`: its Ray Serve deployment.

The ingress (`raylane.serving.ingress`) parses requests and routes them by model name to a
`ModelServer`: through a Serve handle to an `LLMServer` replica (one replica = one engine), or,
when the application serves one model, to a `ModelServer` inside the ingress's own replica.
Streaming methods first yield `STREAM_ACCEPTED` once the engine admitted the request (or the
`ServingError` that refused it), so the ingress can still answer a rejected request with an
error status before it starts a 200 event stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from ray import serve

from raylane.runner.async_engine import AsyncLLMEngine
from raylane.runner.engine import LLMEngine
from raylane.serving.admission import Admission
from raylane.serving.errors import ServingError
from raylane.serving.grpc_service import GrpcServing
from raylane.serving.openai_api import OpenAIServing
from raylane.serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
)
from raylane.serving.weights import WeightFollower

if TYPE_CHECKING:
    import torch

    from raylane.serving.config import ModelDeploymentConfig
    from raylane.serving.proto import llm_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

# First item of every streaming method: the request was admitted, the real stream follows.
STREAM_ACCEPTED = None


async def _value_or_error(call: Awaitable[T]) -> T | ServingError:
    try:
        return await call
    except ServingError as exc:
        return exc


async def _admitted_stream(start: Awaitable[AsyncIterator[T]]) -> AsyncIterator[T | ServingError | None]:
    """The items of a stream, preceded by `STREAM_ACCEPTED`, or only the error that refused it."""
    try:
        items = await start
    except ServingError as exc:
        yield exc
        return
    yield STREAM_ACCEPTED
    async for item in items:
        yield item


async def load_engine(config: ModelDeploymentConfig, app_name: str) -> tuple[AsyncLLMEngine, WeightFollower]:
    """Load the model's checkpoint, then the latest weights published for it (if any)."""
    engine = LLMEngine(config.engine)
    replica_id = serve.get_replica_context().replica_id.unique_id
    weights = WeightFollower(app_name, config.name, replica_id)
    latest = await weights.latest()
    if latest is not None:
        # A replica started after a publication must not serve the stale checkpoint.
        version, tensors = latest
        engine.update_weights(tensors, version)
        await weights.report(version)
    return AsyncLLMEngine(engine, max_waiting_seqs=config.max_waiting_seqs), weights


class ModelServer:
    """One served model: an `AsyncLLMEngine` plus the OpenAI and gRPC request mappings.

    It follows the weight versions published for the model (see `raylane.serving.weights`).
    Build one in a Serve replica with ``ModelServer(config, *await load_engine(config, app_name))``.
    """

    def __init__(
        self, config: ModelDeploymentConfig, engine: AsyncLLMEngine, weights: WeightFollower
    ) -> None:
        self.config = config
        self.engine = engine
        admission = Admission(config.limits, engine)
        self.openai = OpenAIServing(engine, config.name, admission, config.stream_tokens_per_chunk)
        self.grpc = GrpcServing(engine, config.name, admission, config.stream_tokens_per_chunk)
        self._follower = asyncio.create_task(
            weights.follow(lambda: self.engine.weight_version, self.update_weights)
        )
        logger.info(
            "replica %s serves %s (weight version %d)", weights.replica_id, config.name, engine.weight_version
        )

    # Client errors come back as values, not exceptions: raising would make Serve log a traceback
    # for every bad request and wrap the error; the ingress re-raises them.

    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | ServingError:
        return await _value_or_error(self.openai.create_completion(request))

    async def stream_completion(self, request: CompletionRequest) -> AsyncIterator[str | ServingError | None]:
        async for item in _admitted_stream(self.openai.stream_completion(request)):
            yield item

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | ServingError:
        return await _value_or_error(self.openai.create_chat_completion(request))

    async def stream_chat_completion(
        self, request: ChatCompletionRequest
    ) -> AsyncIterator[str | ServingError | None]:
        async for item in _admitted_stream(self.openai.stream_chat_completion(request)):
            yield item

    def model_card(self) -> ModelCard:
        return ModelCard(
            id=self.config.name,
            root=self.config.engine.model,
            weight_version=self.engine.weight_version,
            max_model_len=self.engine.max_model_len,
        )

    async def generate(self, request: llm_pb2.GenerateRequest) -> llm_pb2.GenerateResponse | ServingError:
        return await _value_or_error(self.grpc.generate(request))

    async def generate_stream(
        self, request: llm_pb2.GenerateRequest
    ) -> AsyncIterator[llm_pb2.GenerateStreamResponse | ServingError | None]:
        async for item in _admitted_stream(self.grpc.generate_stream(request)):
            yield item

    def health(self) -> llm_pb2.ModelHealth:
        return self.grpc.health()

    # ------------------------------------------------------------------ operations

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> int:
        """Apply weights to *this replica* between two engine steps; returns the version now served.

        A handle reaches one replica only: use `raylane.serving.publish_weights` to update all.
        """
        await self.engine.update_weights(named_tensors, version)
        return self.engine.weight_version

    async def engine_stats(self) -> dict[str, Any]:
        """This replica's engine counters (KV blocks, running/waiting sequences...) and weight version."""
        stats = await self.engine.stats()
        return {**dataclasses.asdict(stats), "weight_version": self.engine.weight_version}

    def check_health(self) -> None:
        """Serve's health probe: a dead engine loop fails it, and Serve replaces the replica."""
        if not self.engine.is_running:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment
class LLMServer(ModelServer):
    """A replica of one served model, which an `OpenAIIngress` in its own deployment routes to."""

    async def __init__(self, config: ModelDeploymentConfig, app_name: str) -> None:
        super().__init__(config, *await load_engine(config, app_name))
