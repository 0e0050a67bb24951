"""AsyncLLMEngine: the asyncio driver of the real engine on a tiny model, in-process (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from raylane.models import iter_checkpoint_tensors, make_tiny_model
from raylane.runner import LLM, EngineConfig, SamplingParams
from raylane.runner.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    RequestTooLargeError,
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async-engine")
    # A larger init scale than the default makes outputs depend on the prompt, so mix-ups show.
    return make_tiny_model(str(root / "a"), std=0.3), make_tiny_model(str(root / "b"), seed=1, std=0.3)


def _engine(model_dir: str, **kwargs) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_config(EngineConfig(model=model_dir, max_model_len=256), **kwargs)


async def _final(engine: AsyncLLMEngine, request_id: str, prompt: str, params: SamplingParams):
    last = None
    async for output in engine.generate(request_id, prompt=prompt, sampling_params=params):
        last = output
    return last


def test_concurrent_requests_match_offline_generation(model_dirs):
    prompts = [f"prompt number {i}" * (i % 3 + 1) for i in range(12)]
    params = [
        SamplingParams(max_tokens=6 + i % 5, temperature=0.9, top_p=0.95, seed=i, logprobs=True)
        for i in range(12)
    ]
    expected = LLM(model_dirs[0], max_model_len=256).generate(prompts, params, use_tqdm=False)

    async def main():
        engine = _engine(model_dirs[0])
        try:
            return await asyncio.gather(
                *(_final(engine, f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params)))
            )
        finally:
            engine.shutdown()

    outputs = asyncio.run(main())
    assert len({o.outputs[0].text for o in outputs}) > 6  # outputs really differ by prompt/seed
    for got, want in zip(outputs, expected, strict=True):
        assert got.finished and got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        assert got.outputs[0].logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-5)


def test_cancelled_consumer_aborts_and_frees_kv_blocks(model_dirs):
    async def main():
        engine = _engine(model_dirs[0])
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True, seed=0)

            async def consume():
                async for _ in engine.generate("long", prompt="a long story", sampling_params=params):
                    pass

            task = asyncio.create_task(consume())
            while (await engine.stats()).num_generated_tokens < 3:
                await asyncio.sleep(0.01)
            busy = await engine.stats()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                stats = await engine.stats()
                if stats.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            return busy, stats
        finally:
            engine.shutdown()

    busy, after = asyncio.run(main())
    assert busy.num_running == 1 and busy.num_free_blocks < busy.num_total_blocks
    assert after.num_running == 0 and after.num_free_blocks == after.num_total_blocks
    assert after.num_generated_tokens < 200  # aborted, not run to the end


def test_rejections_leave_the_engine_serving(model_dirs):
    async def main():
        engine = _engine(model_dirs[0], max_waiting_seqs=0)
        try:
            with pytest.raises(RequestTooLargeError, match="queues at most 0"):
                await engine.add_request("never", prompt="hi")
            engine.max_waiting_seqs = None
            with pytest.raises(ValueError, match="maximum context length"):
                await engine.add_request("long", prompt_token_ids=[1] * 300)
            return await _final(engine, "ok", "hi", SamplingParams(max_tokens=2))
        finally:
            engine.shutdown()

    assert asyncio.run(main()).finished


def test_the_waiting_cap_counts_sequences_not_requests(model_dirs):
    async def main():
        # One running sequence at a time, so the others wait in the queue the cap bounds.
        engine = AsyncLLMEngine.from_config(
            EngineConfig(model=model_dirs[0], max_model_len=256, max_num_seqs=1), max_waiting_seqs=2
        )
        long = SamplingParams(max_tokens=200, ignore_eos=True, seed=0)
        try:
            running = await engine.add_request("running", prompt="a long story", sampling_params=long)
            waiting = await engine.add_request("waiting", prompt="waits", sampling_params=long)
            with pytest.raises(EngineOverloadedError, match="adds 2"):
                await engine.add_request("fan-out", prompt="x", sampling_params=SamplingParams(n=2))
            with pytest.raises(RequestTooLargeError, match="asks for 3 sequences"):
                await engine.add_request("never", prompt="x", sampling_params=SamplingParams(n=3))
            queued = await engine.stats()
            running.abort()
            waiting.abort()
            return queued, await _final(engine, "after", "hi", SamplingParams(max_tokens=2))
        finally:
            engine.shutdown()

    queued, after = asyncio.run(main())
    assert queued.num_running == 1 and queued.num_waiting == 1 and after.finished


def test_a_request_that_breaks_a_step_fails_alone(model_dirs):
    good = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, seed=3)
    (expected,) = LLM(model_dirs[0], max_model_len=256).generate(["all fine"], good, use_tqdm=False)

    async def main():
        engine = _engine(model_dirs[0])
        try:
            bad = SamplingParams(max_tokens=24, ignore_eos=True, seed=4)
            good_stream = await engine.add_request("good", prompt="all fine", sampling_params=good)
            bad_stream = await engine.add_request("bad", prompt="broken", sampling_params=bad)
            # As a value that slipped past admission would: the engine's int64 tensors cannot hold it.
            bad.top_k = 2**64
            with pytest.raises(RequestFailedError, match="could not compute"):
                async for _ in bad_stream:
                    pass
            outputs = [output async for output in good_stream]
            after = await _final(engine, "after", "still serving", SamplingParams(max_tokens=3))
            return outputs[-1], after, await engine.stats(), engine.is_running
        finally:
            engine.shutdown()

    final, after, stats, running = asyncio.run(main())
    assert final.outputs[0].token_ids == expected.outputs[0].token_ids  # untouched by its neighbour
    assert after.finished and running
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_weight_update_between_steps_keeps_the_stream(model_dirs):
    new_weights = list(iter_checkpoint_tensors(model_dirs[1]))
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.7, seed=5)
    expected_b = LLM(model_dirs[1], max_model_len=256).generate(["after"], params, use_tqdm=False)[0]

    async def main():
        engine = _engine(model_dirs[0])
        try:
            stream = await engine.add_request("during", prompt="during", sampling_params=params)
            final = await stream.__anext__()
            await engine.update_weights(new_weights, version=7)
            async for output in stream:
                final = output
            after = await _final(engine, "after", "after", params)
            return final, after, engine.weight_version
        finally:
            engine.shutdown()

    final, after, version = asyncio.run(main())
    versions = final.outputs[0].weight_versions
    assert final.finished and len(final.outputs[0].token_ids) == 40
    assert versions[0] == 0 and versions[-1] == 7 and versions == sorted(versions)
    assert version == 7 and set(after.outputs[0].weight_versions) == {7}
    assert after.outputs[0].token_ids == expected_b.outputs[0].token_ids


def test_dead_engine_fails_fast(model_dirs):
    async def main():
        engine = _engine(model_dirs[0])
        engine.shutdown()
        assert not engine.is_running
        with pytest.raises(EngineDeadError, match="shut down"):
            await engine.add_request("r", prompt="hi")

    asyncio.run(main())
