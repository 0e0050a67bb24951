"""`OpenAIIngress`: the application's entry point for HTTP (OpenAI API) and gRPC (`LLMService`).

It parses and validates requests, answers errors in OpenAI's shape, and routes each request
by its ``model`` to that model's `ModelServer` (`raylane.serving.routes`): either through a
Serve handle to the model's own `LLMServer` deployment, so one address serves several models
and each model scales on its own, or, in an application of one model, to a `ModelServer` in
this replica, which saves a Ray hop per streamed chunk; the replicas of this deployment then
are the model's replicas. Client disconnects stop the model's stream, which aborts the engine
request.

Before anything is parsed, a request must bring the API key (when one is set) and stay under
``max_request_bytes``; health and model listing stay open. Every error, expected or not, is
answered in OpenAI's JSON shape (HTTP) or as a gRPC status, never as a plain-text page; only
a request that Serve refuses before it reaches this deployment (its queue is full, see
`ModelDeploymentConfig.max_queued_requests`; the proxy's queue, or with direct ingress the
replica's) gets Serve's own 503.
"""

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from raylane.serving.auth import ApiKeyCheck
from raylane.serving.errors import (
    BadRequestError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServingError,
)
from raylane.serving.metrics import CountHttpRequests, count_grpc_request
from raylane.serving.proto import llm_pb2
from raylane.serving.protocol import ChatCompletionRequest, CompletionRequest, ModelList, parse_request
from raylane.serving.routes import HandleRoute, InProcessRoute, ModelRoute, ModelStream

if TYPE_CHECKING:
    from raylane.serving.config import ModelDeploymentConfig
    from raylane.serving.deployment import ModelServer

logger = logging.getLogger(__name__)

api = FastAPI(title="raylane", description="OpenAI-compatible API of a raylane serving application")
api.add_middleware(CountHttpRequests)


@api.exception_handler(ServingError)
async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
    headers = {"Retry-After": "1"} if isinstance(exc, OverloadedError) else None
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.error("request failed unexpectedly: %r", exc)
    error = ServingError(f"the server failed to answer this request: {type(exc).__name__}: {exc}")
    return JSONResponse(error.to_dict(), status_code=error.status_code)


def client_error(exc: BaseException) -> ServingError | None:
    """The client-facing error behind an exception raised through a Serve handle, if it is one."""
    if isinstance(exc, RayTaskError):
        exc = exc.cause
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, BackPressureError):
        return OverloadedError(
            f"every replica of the model is busy and its queue is full; retry later ({exc})"
        )
    return None


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The decoded JSON body, read no further than ``max_bytes``."""
    too_large = PayloadTooLargeError(
        f"the request body is over {max_bytes} bytes (max_request_bytes): shorten the prompt or split the request"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise too_large
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the request body is not valid JSON: {exc}") from None


async def _events(stream: ModelStream) -> AsyncIterator[str]:
    try:
        async for event in stream:
            yield event
    finally:
        # Reached on client disconnect too: stop the model's stream (aborts the engine request).
        await stream.close()


async def _route_to(
    app_name: str, target: "DeploymentHandle | ModelDeploymentConfig"
) -> "tuple[ModelRoute, ModelServer | None]":
    """The route to a model given by its deployment's handle, or by its config to serve it in this process."""
    if isinstance(target, DeploymentHandle):
        return HandleRoute(target), None
    # Imported here: a routing-only ingress replica must not load torch and the engine.
    from raylane.serving.deployment import ModelServer, load_engine

    server = ModelServer(target, *await load_engine(target, app_name))
    return InProcessRoute(server), server


@serve.deployment(max_ongoing_requests=4096, max_queued_requests=-1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    """Routes requests to the `ModelServer` of the model they name.

    ``models`` maps each model name to its `LLMServer` deployment (bound, a handle in the replica)
    or to its `ModelDeploymentConfig`, to serve that model in this replica.
    """

    async def __init__(
        self,
        models: "Mapping[str, DeploymentHandle | ModelDeploymentConfig]",
        app_name: str,
        api_key_digest: str | None,
        max_request_bytes: int,
    ) -> None:
        self.models: dict[str, ModelRoute] = {}
        self._servers: list[ModelServer] = []
        for name, target in models.items():
            self.models[name], server = await _route_to(app_name, target)
            if server is not None:
                self._servers.append(server)
        self.api_key = ApiKeyCheck(api_key_digest)
        self.max_request_bytes = max_request_bytes

    async def _http_request(self, http_request: Request, model: type[Any]) -> Any:
        """The authorized, size-checked and validated request of a generation route."""
        self.api_key.check(http_request.headers.get("authorization"))
        return parse_request(model, await _json_body(http_request, self.max_request_bytes))

    def _check_grpc(self, request: llm_pb2.GenerateRequest, grpc_context: Any) -> str:
        """Authorize and size-check a gRPC generation request; returns the model it names."""
        self.api_key.check_metadata(grpc_context.invocation_metadata())
        if request.ByteSize() > self.max_request_bytes:
            raise PayloadTooLargeError(
                f"the request message is over {self.max_request_bytes} bytes (max_request_bytes): "
                "shorten the prompt"
            )
        return self._grpc_model(request)

    def _route(self, model: str) -> ModelRoute:
        route = self.models.get(model)
        if route is None:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; this server serves {sorted(self.models)}"
            )
        return route

    async def _call(self, model: str, method: str, *args: Any) -> Any:
        """Call a model's method; client errors (returned or raised) are raised as `ServingError`."""
        try:
            result = await self._route(model).call(method, *args)
        except Exception as exc:
            error = client_error(exc)
            if error is None:
                raise
            raise error from None
        if isinstance(result, ServingError):
            raise result
        return result

    async def _stream(self, model: str, method: str, request: Any) -> ModelStream:
        """Start a streaming call and wait until the model admitted the request (or said why not)."""
        stream = self._route(model).stream(method, request)
        try:
            first = await stream.__anext__()
        except Exception as exc:
            await stream.close()
            error = client_error(exc)
            if error is None:
                raise
            raise error from None
        if isinstance(first, ServingError):
            await stream.close()
            raise first
        return stream

    # ------------------------------------------------------------------ HTTP

    @api.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        cards = [await self._call(name, "model_card") for name in sorted(self.models)]
        return JSONResponse(ModelList(data=cards).model_dump())

    @api.post("/v1/completions")
    async def completions(self, http_request: Request) -> Response:
        request = await self._http_request(http_request, CompletionRequest)
        if request.stream:
            stream = await self._stream(request.model, "stream_completion", request)
            return StreamingResponse(_events(stream), media_type="text/event-stream")
        response = await self._call(request.model, "create_completion", request)
        return JSONResponse(response.model_dump())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, http_request: Request) -> Response:
        request = await self._http_request(http_request, ChatCompletionRequest)
        if request.stream:
            stream = await self._stream(request.model, "stream_chat_completion", request)
            return StreamingResponse(_events(stream), media_type="text/event-stream")
        response = await self._call(request.model, "create_chat_completion", request)
        return JSONResponse(response.model_dump())

    @api.get("/health")
    async def health_http(self) -> Response:
        return Response(status_code=200)

    # ------------------------------------------------------------------ gRPC (raylane.serving.v1.LLMService)

    def _grpc_model(self, request: llm_pb2.GenerateRequest) -> str:
        if request.model:
            return request.model
        if len(self.models) == 1:
            return next(iter(self.models))
        raise BadRequestError(f"set model: this application serves {sorted(self.models)}", param="model")

    async def Generate(self, request: llm_pb2.GenerateRequest, grpc_context: Any) -> llm_pb2.GenerateResponse:
        with count_grpc_request("Generate", grpc_context):
            try:
                return await self._call(self._check_grpc(request, grpc_context), "generate", request)
            except ServingError as exc:
                grpc_context.set_code(exc.grpc_code)
                grpc_context.set_details(exc.message)
                return llm_pb2.GenerateResponse()

    async def GenerateStream(
        self, request: llm_pb2.GenerateRequest, grpc_context: Any
    ) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
        with count_grpc_request("GenerateStream", grpc_context):
            try:
                stream = await self._stream(
                    self._check_grpc(request, grpc_context), "generate_stream", request
                )
            except ServingError as exc:
                grpc_context.set_code(exc.grpc_code)
                grpc_context.set_details(exc.message)
                # A stream that ends without a message never carries the context back to the proxy;
                # raising does, with the status set above.
                raise
            try:
                async for response in stream:
                    yield response
            finally:
                await stream.close()

    async def Health(self, request: llm_pb2.HealthRequest) -> llm_pb2.HealthResponse:
        try:
            models = [await self._call(name, "health") for name in sorted(self.models)]
        except Exception:
            logger.exception("health check of the model replicas failed")
            return llm_pb2.HealthResponse(status=llm_pb2.HealthResponse.NOT_SERVING)
        return llm_pb2.HealthResponse(status=llm_pb2.HealthResponse.SERVING, models=models)

    # ------------------------------------------------------------------ the models served in this replica

    async def engine_stats(self) -> dict[str, Any]:
        """The engine counters of the model served in this replica (see `ModelServer.engine_stats`)."""
        if len(self._servers) != 1:
            raise ValueError(
                f"this replica runs {len(self._servers)} engines; ask the model's LLMServer deployment"
            )
        return await self._servers[0].engine_stats()

    def check_health(self) -> None:
        """Serve's health probe: a dead engine loop in this replica fails it, and Serve replaces the replica."""
        for server in self._servers:
            server.check_health()
