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


def _split(chunk: str) -> list[str]:
    """The server-sent events of one streamed chunk, which must hold whole events only."""
    assert chunk.endswith("\n\n"), chunk
    events = [event + "\n\n" for event in chunk.removesuffix("\n\n").split("\n\n")]
    assert all(event.startswith("data: ") for event in events), chunk
    return events


def _events(chunks: list[str]) -> list[dict]:
    lines = [event for chunk in chunks for event in _split(chunk)]
    assert lines[-1] == SSE_DONE and SSE_DONE not in lines[:-1]
    return [json.loads(line[6:]) for line in lines[:-1]]


async def _serve(model_dir: str, calls, tokens_per_chunk: int = 1):
    engine = AsyncLLMEngine.from_config(EngineConfig(model=model_dir, max_model_len=128))
    try:
        admission = Admission(RequestLimits(), engine)
        return await calls(OpenAIServing(engine, "m", admission, tokens_per_chunk=tokens_per_chunk))
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


def test_a_lagging_reader_gets_the_tokens_coalesced_in_order_and_the_stream_closed_with_them(model_dir):
    body = {"model": "m", "prompt": ["one", "two"], "n": 2, "max_tokens": 24, "ignore_eos": True, "seed": 5}
    request = CompletionRequest.model_validate({**body, "logprobs": 0})
    stream_request = CompletionRequest.model_validate(
        {**body, "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    )

    async def calls(serving: OpenAIServing):
        whole = await serving.create_completion(request)
        chunks = []
        async for chunk in await serving.stream_completion(stream_request):
            chunks.append(chunk)
            await asyncio.sleep(0.05)  # the reader lags: the engine runs ahead meanwhile
        return whole, chunks

    whole, chunks = asyncio.run(_serve(model_dir, calls))
    # 4 completions of 24 tokens each, yet a handful of chunks: each carries all that was ready.
    assert len(chunks) < 24
    events = _events(chunks)
    text = {i: "" for i in range(4)}
    tokens: dict[int, list[str]] = {i: [] for i in range(4)}
    token_logprobs: dict[int, list[float]] = {i: [] for i in range(4)}
    for event in events[:-1]:
        (choice,) = event["choices"]
        i = choice["index"]
        # Offsets continue where the previous delta of the same completion ended.
        assert choice["logprobs"]["text_offset"][:1] in ([], [len(text[i])])
        text[i] += choice["text"]
        tokens[i] += choice["logprobs"]["tokens"]
        token_logprobs[i] += choice["logprobs"]["token_logprobs"]
    for choice in whole.choices:
        assert text[choice.index] == choice.text
        assert tokens[choice.index] == choice.logprobs.tokens
        assert token_logprobs[choice.index] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
    # The last tokens, the usage and [DONE] travel as one chunk, not three.
    last = [json.loads(e[6:]) for e in _split(chunks[-1])[:-1]]
    assert last[-1]["usage"]["completion_tokens"] == 96 and last[0]["choices"][0]["finish_reason"] == "length"


def test_a_reader_keeping_up_gets_the_first_tokens_before_the_request_ends(model_dir):
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": "go", "max_tokens": 120, "ignore_eos": True, "stream": True}
    )

    async def calls(serving: OpenAIServing):
        return [chunk async for chunk in await serving.stream_completion(request)]

    chunks = asyncio.run(_serve(model_dir, calls))
    # Nothing waits for more tokens: the stream starts with a chunk of its first token(s) alone.
    first = json.loads(_split(chunks[0])[0][6:])
    assert len(_split(chunks[0])) == 1 and "finish_reason" not in first["choices"][0]
    assert len(chunks) > 1 and "".join(chunks).count("data: ") == len(chunks) + 1  # only the end doubles up


def test_chunks_gather_tokens_after_the_first_which_goes_out_alone(model_dir):
    body = {
        "model": "m",
        "prompt": ["go", "stop"],
        "max_tokens": 40,
        "ignore_eos": True,
        "seed": 1,
        "logprobs": 0,
    }
    request = CompletionRequest.model_validate(body)
    stream_request = CompletionRequest.model_validate({**body, "stream": True})

    async def calls(serving: OpenAIServing):
        whole = await serving.create_completion(request)
        return whole, [chunk async for chunk in await serving.stream_completion(stream_request)]

    whole, chunks = asyncio.run(_serve(model_dir, calls, tokens_per_chunk=8))
    per_chunk: list[dict[int, int]] = []
    text = {0: "", 1: ""}
    for event in _events(chunks):
        (choice,) = event["choices"]
        text[choice["index"]] += choice["text"]
    for chunk in chunks:
        counts: dict[int, int] = {}
        for event in _split(chunk):
            if event != SSE_DONE:
                (choice,) = json.loads(event[6:])["choices"]
                counts[choice["index"]] = counts.get(choice["index"], 0) + len(choice["logprobs"]["tokens"])
        per_chunk.append(counts)
    assert text == {c.index: c.text for c in whole.choices}
    for i in (0, 1):
        sizes = [counts[i] for counts in per_chunk if counts.get(i)]
        assert sum(sizes) == 40
        # The first token is not held back for more; later ones leave 8 or more at a time, the last
        # chunk with whatever was left.
        assert sizes[0] < 8, sizes
        assert all(size >= 8 for size in sizes[1:-1]), sizes
