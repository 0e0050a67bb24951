"""The `raylane.serving.v1.LLMService` gRPC API on top of one `AsyncLLMEngine`.

`GrpcServing` maps protobuf requests to engine requests and engine outputs to protobuf
responses; Ray Serve's gRPC proxy carries the messages (see `raylane.serving.ingress`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from raylane.serving.admission import Admission
from raylane.serving.errors import BadRequestError, ServingError
from raylane.serving.proto import llm_pb2
from raylane.serving.streaming import Delta, DeltaTracker, admit, collect, merge

if TYPE_CHECKING:
    from raylane.runner import RequestOutput
    from raylane.runner.async_engine import AsyncLLMEngine
    from raylane.serving.metrics import TimedStream

# Import path of the servicer registration function, for Ray Serve's `gRPCOptions`.
GRPC_SERVICER_FUNCTION = "raylane.serving.proto.llm_pb2_grpc.add_LLMServiceServicer_to_server"


def sampling_fields(options: llm_pb2.SamplingOptions) -> dict[str, Any]:
    """`SamplingParams` keyword arguments of a request's `SamplingOptions`; unset fields take defaults."""
    fields = {
        name: getattr(options, name)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed")
        if options.HasField(name)
    }
    return {
        "n": options.n or 1,
        "stop": list(options.stop),
        "stop_token_ids": list(options.stop_token_ids),
        "logprobs": options.logprobs,
        "ignore_eos": options.ignore_eos,
        **fields,
    }


def _prompt(request: llm_pb2.GenerateRequest) -> str | list[int]:
    kind = request.WhichOneof("prompt_input")
    if kind is None:
        raise BadRequestError("set either prompt or prompt_token_ids", param="prompt")
    return request.prompt if kind == "prompt" else list(request.prompt_token_ids.ids)


def _usage(output: RequestOutput) -> llm_pb2.Usage:
    return llm_pb2.Usage(
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=sum(len(c.token_ids) for c in output.outputs),
    )


def _completion(delta: Delta, fallback_version: int) -> llm_pb2.Completion:
    return llm_pb2.Completion(
        index=delta.index,
        text=delta.text,
        token_ids=delta.token_ids,
        logprobs=delta.logprobs or [],
        finish_reason=delta.finish_reason or "",
        weight_version=delta.weight_version if delta.weight_version is not None else fallback_version,
    )


class GrpcServing:
    """Serve `LLMService` requests for one model with one engine.

    ``tokens_per_chunk``: tokens gathered into one streamed message after the first (see `merge`)."""

    def __init__(
        self, engine: AsyncLLMEngine, model_name: str, admission: Admission, tokens_per_chunk: int = 1
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.admission = admission
        self.tokens_per_chunk = tokens_per_chunk

    async def _admit(self, request: llm_pb2.GenerateRequest) -> tuple[str, list[str], list[TimedStream]]:
        params = self.admission.sampling_params(**sampling_fields(request.sampling))
        prompt = _prompt(request)
        self.admission.check_prompt(prompt)
        request_id = f"grpc-{uuid.uuid4().hex}"
        streams = await admit(self.engine, [prompt], params, request_id)
        return request_id, params.stop, streams

    async def generate(self, request: llm_pb2.GenerateRequest) -> llm_pb2.GenerateResponse:
        """Run the request to completion."""
        request_id, _, streams = await self._admit(request)
        try:
            (final,) = await collect(streams)
        except Exception as exc:
            raise ServingError(f"generation failed: {exc}") from exc
        version = self.engine.weight_version
        completions = [
            _completion(
                Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.weight_version), version
            )
            for c in final.outputs
        ]
        return llm_pb2.GenerateResponse(
            request_id=request_id, model=self.model_name, completions=completions, usage=_usage(final)
        )

    async def generate_stream(
        self, request: llm_pb2.GenerateRequest
    ) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
        """Admit the request (raising client errors now) and return its stream of deltas."""
        request_id, stop, streams = await self._admit(request)
        return self._deltas(request_id, stop, streams)

    async def _deltas(
        self, request_id: str, stop: list[str], streams: list[TimedStream]
    ) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
        tracker = DeltaTracker(stop)
        try:
            async for _, output in merge(streams, self.tokens_per_chunk):
                deltas = tracker.deltas(output.outputs)
                if deltas or output.finished:
                    version = self.engine.weight_version
                    yield llm_pb2.GenerateStreamResponse(
                        request_id=request_id,
                        model=self.model_name,
                        deltas=[_completion(d, version) for d in deltas],
                        usage=_usage(output) if output.finished else None,
                    )
        except ServingError:
            raise
        except Exception as exc:
            raise ServingError(f"generation failed: {exc}") from exc

    def health(self) -> llm_pb2.ModelHealth:
        return llm_pb2.ModelHealth(name=self.model_name, weight_version=self.engine.weight_version)
