"""OpenAIServing in-process on the real engine: batched prompts, n samples, streamed vs whole responses."""

from __future__ import annotations

import asyncio
import json

import pytest

from raylane.models import make_tiny_model
from raylane.runner import LLM, EngineConfig, SamplingParams
from raylane.runner.async_engine import AsyncLLMEngine
from raylane.serving.admission import Admission
from raylane.serving.config import RequestLimits
from raylane.serving.errors import BadRequestError
from raylane.serving.openai_api import SSE_DONE, OpenAIServing
from raylane.serving.protocol import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("openai") / "m"), std=0.3)


def _events(lines: list[str]) -> list[dict]:
    assert lines[-1] == SSE_DONE and all(
        line.startswith("data: ") and line.endswith("\n\n") for line in lines
    )
    return [json.loads(line[6:]) for line in lines[:-1]]


async def _serve(model_dir: str, calls):
    engine = AsyncLLMEngine.from_config(EngineConfig(model=model_dir, max_model_len=128))
    try:
        return await calls(OpenAIServing(engine, "m", Admission(RequestLimits(), engine)))
    finally:
        engine.shutdown()


def test_batched_prompts_with_n_samples_stream_the_same_text_as_whole_responses(model_dir):
    body = {
        "model": "m",
        "prompt": ["first prompt", "second"],
        "n": 2,
        "max_tokens": 9,
        "seed": 3,
        "stop": ["ab"],
    }
    request = CompletionRequest.model_validate(body)
    stream_request = CompletionRequest.model_validate(
        {**body, "stream": True, "stream_options": {"include_usage": True}}
    )

    async def calls(serving: OpenAIServing):
        whole = await serving.create_completion(request)
        lines = [line async for line in await serving.stream_completion(stream_request)]
        return whole, lines

    whole, lines = asyncio.run(_serve(model_dir, calls))
    offline = LLM(model_dir, max_model_len=128).generate(
        ["first prompt", "second"], SamplingParams(n=2, max_tokens=9, seed=3, stop=["ab"]), use_tqdm=False
    )
    expected = [c.text for out in offline for c in out.outputs]
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert [c.text for c in whole.choices] == expected
    assert whole.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in offline)

    events = _events(lines)
    streamed = {i: "" for i in range(4)}
    finished = set()
    for event in events[:-1]:
        (choice,) = event["choices"]
        streamed[choice["index"]] += choice["text"]
        if choice.get("finish_reason"):
            finished.add(choice["index"])
    assert [streamed[i] for i in range(4)] == expected and finished == {0, 1, 2, 3}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole.usage.model_dump()


def test_chat_stream_sends_the_role_first_then_content_per_choice(model_dir):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 6, "seed": 1}

    async def calls(serving: OpenAIServing):
        whole = await serving.create_chat_completion(ChatCompletionRequest.model_validate(body))
        stream = await serving.stream_chat_completion(
            ChatCompletionRequest.model_validate({**body, "stream": True})
        )
        return whole, [line async for line in stream]

    whole, lines = asyncio.run(_serve(model_dir, calls))
    events = _events(lines)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    content = {0: "", 1: ""}
    for event in events[2:]:
        (choice,) = event["choices"]
        content[choice["index"]] += choice["delta"].get("content", "")
    assert [content[0], content[1]] == [c.message.content for c in whole.choices]
    assert whole.usage.completion_tokens == 12


def test_engine_rejections_become_bad_requests(model_dir):
    async def calls(serving: OpenAIServing):
        with pytest.raises(BadRequestError, match="maximum context length"):
            await serving.create_completion(CompletionRequest(model="m", prompt=[5] * 200))
        long_chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x" * 200}])
        with pytest.raises(BadRequestError, match="shorten the messages") as info:
            await serving.stream_chat_completion(long_chat)
        assert info.value.code == "context_length_exceeded"

    asyncio.run(_serve(model_dir, calls))
