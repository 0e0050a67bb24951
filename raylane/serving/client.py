"""A small synchronous client of the `raylane.serving.v1.LLMService` gRPC API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from raylane.serving.proto import llm_pb2, llm_pb2_grpc


class LLMClient:
    """Call `Generate`, `GenerateStream` and `Health` on a serving application's gRPC address.

    ``application`` is the Serve application name; Ray Serve's gRPC proxy needs it when the
    cluster runs more than one application. ``api_key`` is sent as ``authorization: Bearer KEY``
    metadata, for servers started with an API key. Sampling keywords are `SamplingOptions` fields
    (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``n``, ``logprobs``...).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        application: str | None = None,
        timeout_s: float = 120.0,
        api_key: str | None = None,
    ) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = llm_pb2_grpc.LLMServiceStub(self._channel)
        metadata = [("application", application)] if application else []
        if api_key is not None:
            metadata.append(("authorization", f"Bearer {api_key}"))
        self._metadata = tuple(metadata)
        self.timeout_s = timeout_s

    @staticmethod
    def request(prompt: str | list[int], model: str = "", **sampling: Any) -> llm_pb2.GenerateRequest:
        """A `GenerateRequest` for a text or token-id prompt."""
        options = llm_pb2.SamplingOptions(**sampling)
        if isinstance(prompt, str):
            return llm_pb2.GenerateRequest(model=model, prompt=prompt, sampling=options)
        return llm_pb2.GenerateRequest(
            model=model, prompt_token_ids=llm_pb2.TokenIds(ids=prompt), sampling=options
        )

    def generate(self, prompt: str | list[int], model: str = "", **sampling: Any) -> llm_pb2.GenerateResponse:
        """Complete ``prompt``; raises `grpc.RpcError` (e.g. INVALID_ARGUMENT) on failure."""
        return self._stub.Generate(
            self.request(prompt, model, **sampling), metadata=self._metadata, timeout=self.timeout_s
        )

    def generate_stream(
        self, prompt: str | list[int], model: str = "", **sampling: Any
    ) -> Iterator[llm_pb2.GenerateStreamResponse]:
        """Stream the new tokens of each completion as they are sampled; the last message carries usage.

        Stop iterating early (or call ``.cancel()`` on the returned iterator) to abort the request.
        """
        return self._stub.GenerateStream(
            self.request(prompt, model, **sampling), metadata=self._metadata, timeout=self.timeout_s
        )

    def health(self) -> llm_pb2.HealthResponse:
        return self._stub.Health(llm_pb2.HealthRequest(), metadata=self._metadata, timeout=self.timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
