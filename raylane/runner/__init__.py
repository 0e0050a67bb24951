"""raylane's own inference engine: continuous batching over a paged KV cache, in PyTorch."""

from raylane.runner.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    RequestStream,
    RequestTooLargeError,
)
from raylane.runner.attention import AttentionBackend, get_attention_backend, register_attention_backend
from raylane.runner.config import EngineConfig, EngineOptions
from raylane.runner.engine import LLMEngine, RequestsFailedError, UnknownRequestError
from raylane.runner.llm import LLM
from raylane.runner.outputs import CompletionOutput, EngineStats, RequestOutput
from raylane.runner.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "AttentionBackend",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineOptions",
    "EngineOverloadedError",
    "EngineStats",
    "LLMEngine",
    "RequestFailedError",
    "RequestOutput",
    "RequestStream",
    "RequestTooLargeError",
    "RequestsFailedError",
    "SamplingParams",
    "UnknownRequestError",
    "get_attention_backend",
    "register_attention_backend",
]
