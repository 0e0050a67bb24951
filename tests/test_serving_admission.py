"""One rule set for HTTP and gRPC: the same bad requests get the same 400s, before tokenizing,
and the engine carries on (in-process, real engine on a tiny model, no Ray)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from raylane.models import make_tiny_model
from raylane.runner import EngineConfig
from raylane.runner.async_engine import AsyncLLMEngine
from raylane.serving.admission import Admission
from raylane.serving.client import LLMClient
from raylane.serving.config import RequestLimits
from raylane.serving.errors import BadRequestError
from raylane.serving.grpc_service import GrpcServing
from raylane.serving.openai_api import OpenAIServing
from raylane.serving.protocol import ChatCompletionRequest, CompletionRequest, parse_request

MAX_MODEL_LEN = 128
MAX_WAITING_SEQS = 64


@pytest.fixture(scope="module")
def servings(tmp_path_factory):
    model_dir = make_tiny_model(str(tmp_path_factory.mktemp("admission") / "m"))
    engine = AsyncLLMEngine.from_config(
        EngineConfig(model=model_dir, max_model_len=MAX_MODEL_LEN), max_waiting_seqs=MAX_WAITING_SEQS
    )
    admission = Admission(RequestLimits(), engine)
    yield OpenAIServing(engine, "m", admission), GrpcServing(engine, "m", admission)
    engine.shutdown()


# (what is wrong, the HTTP body's fields, the gRPC SamplingOptions, the param the 400 names)
CASES = [
    ("seed past int64", {"seed": 2**63}, None, "seed"),
    ("top_k past int64", {"top_k": 2**63}, None, "top_k"),
    ("n over the limit", {"n": 129}, {"n": 129}, "n"),
    ("huge fan-out", {"n": 20_000}, {"n": 20_000}, "n"),
    ("too many stop strings", {"stop": ["s"] * 5}, {"stop": ["s"] * 5}, "stop"),
    ("10,000 stop strings", {"stop": ["s"] * 10_000}, {"stop": ["s"] * 10_000}, "stop"),
    ("long stop string", {"stop": ["s" * 257]}, {"stop": ["s" * 257]}, "stop"),
    ("many stop token ids", {"stop_token_ids": [1] * 65}, {"stop_token_ids": [1] * 65}, "stop_token_ids"),
    (
        "max_tokens past the context",
        {"max_tokens": MAX_MODEL_LEN},
        {"max_tokens": MAX_MODEL_LEN},
        "max_tokens",
    ),
    ("hot temperature", {"temperature": 2.5}, {"temperature": 2.5}, "temperature"),
]


def _http(serving: OpenAIServing, fields: dict, prompt: str | list = "hello") -> BadRequestError:
    async def call() -> None:
        request = parse_request(CompletionRequest, {"model": "m", "prompt": prompt, **fields})
        await serving.create_completion(request)

    with pytest.raises(BadRequestError) as info:
        asyncio.run(call())
    return info.value


def _grpc(serving: GrpcServing, sampling: dict, prompt: str | list[int] = "hello") -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        asyncio.run(serving.generate(LLMClient.request(prompt, **sampling)))
    return info.value


@pytest.mark.parametrize(("case", "http_fields", "grpc_sampling", "param"), CASES, ids=[c[0] for c in CASES])
def test_http_and_grpc_refuse_the_same_requests(servings, case, http_fields, grpc_sampling, param):
    openai, grpc = servings
    error = _http(openai, http_fields)
    assert error.param == param or error.message.startswith(param), error.message
    if grpc_sampling is not None:  # the proto's int types cannot carry the value otherwise
        error = _grpc(grpc, grpc_sampling)
        assert error.param == param or error.message.startswith(param), error.message


def test_oversized_prompts_are_refused_before_tokenizing(servings):
    openai, grpc = servings
    huge = "word " * 1_000_000  # 5 MB
    for error in (_http(openai, {}, huge), _grpc(grpc, {}, huge)):
        # The message counts characters: it was refused on its length, never tokenized.
        assert "characters" in error.message and error.code == "context_length_exceeded"
    error = _http(openai, {}, ["hi"] * 129)  # 129 prompts, one completion each
    assert error.param == "n" and "129 completions" in error.message

    async def chat() -> None:
        await openai.create_chat_completion(
            ChatCompletionRequest(model="m", messages=[{"role": "user", "content": huge}])
        )

    with pytest.raises(BadRequestError, match="characters"):
        asyncio.run(chat())


def test_a_request_over_the_waiting_cap_is_refused_as_never_fitting(servings):
    openai, grpc = servings
    limits = openai.admission.limits
    openai.admission.limits = limits.model_copy(update={"max_sequences": 1000})
    try:
        # 65 completions would fit the per-request limit but never the engine's queue of 64.
        for error in (_http(openai, {"n": 65}), _grpc(grpc, {"n": 65})):
            assert error.param == "n" and "max_waiting_seqs" in error.message
    finally:
        openai.admission.limits = limits

    async def normal() -> tuple:
        response = await openai.create_completion(CompletionRequest(model="m", prompt="fine", max_tokens=4))
        return response, await openai.engine.stats()

    response, stats = asyncio.run(normal())
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert stats.num_free_blocks == stats.num_total_blocks and openai.engine.is_running


def test_prompts_are_tokenized_off_the_engine_loop_and_the_event_loop(servings):
    openai, _ = servings
    tokenizer = openai.engine.tokenizer
    threads = []
    encode = tokenizer.encode

    def recording_encode(text, *args, **kwargs):
        threads.append(threading.current_thread())
        return encode(text, *args, **kwargs)

    async def requests() -> None:
        await openai.create_completion(CompletionRequest(model="m", prompt="a text prompt", max_tokens=2))
        await openai.create_chat_completion(
            ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        )

    tokenizer.encode = recording_encode
    try:
        asyncio.run(requests())  # its event loop runs on this (the main) thread
    finally:
        del tokenizer.encode
    assert len(threads) == 2
    assert all(t is not threading.main_thread() and t.name != "raylane-engine-loop" for t in threads)
