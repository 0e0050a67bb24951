"""Runner behaviour: batching invariance, prefix caching, preemption, seeds, stops, errors, weight updates."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest
import torch

from raylane.models import ModelConfigError, WeightLoadError, load_model, make_tiny_model
from raylane.runner import LLM, EngineConfig, LLMEngine, RequestOutput, SamplingParams, UnknownRequestError
from raylane.runner.engine import RequestsFailedError

MAX_TOKENS = 24


def _mixed_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randint(1, 150))] for _ in range(count)]


def _params_for(i: int) -> SamplingParams:
    """Alternate greedy and seeded sampling with truncation, so both paths are covered."""
    if i % 2 == 0:
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=True)
    return SamplingParams(
        temperature=0.8,
        top_p=0.9,
        top_k=40,
        seed=100 + i,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        logprobs=True,
    )


def _run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, sampling_params=_params_for(i))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
    return results


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Each of 31 mixed-length requests generated alone."""
    prompts = _mixed_prompts(31)
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, enable_prefix_caching=False))
    alone = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, sampling_params=_params_for(i))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    alone[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
    return prompts, alone


@pytest.mark.parametrize(
    "options",
    [
        {"enable_chunked_prefill": True, "enable_prefix_caching": True, "max_num_batched_tokens": 64},
        {"enable_chunked_prefill": False, "enable_prefix_caching": False, "max_num_batched_tokens": 512},
        {"enable_chunked_prefill": True, "enable_prefix_caching": False, "max_num_batched_tokens": 100},
        {"enable_chunked_prefill": False, "enable_prefix_caching": True, "max_num_batched_tokens": 512},
        # A pool of 24 blocks (384 tokens) for 31 requests of up to 174 tokens forces preemption.
        {"num_kv_blocks": 24, "max_num_batched_tokens": 64},
    ],
    ids=["chunked+prefix", "plain", "chunked", "prefix", "tiny-pool"],
)
def test_batching_does_not_change_outputs(tiny_model_dir, reference, options):
    prompts, alone = reference
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, max_model_len=256, **options))
    batched = _run(engine, prompts)
    for request_id, (tokens, logprobs) in alone.items():
        got_tokens, got_logprobs = batched[request_id]
        assert got_tokens == tokens, f"{request_id} changed when batched with {options}"
        assert torch.allclose(torch.tensor(got_logprobs), torch.tensor(logprobs), atol=1e-4)
    if "num_kv_blocks" in options:
        assert engine.stats.num_preemptions > 0, "the tiny pool was meant to force preemption"
    assert engine.stats.num_free_blocks == engine.stats.num_total_blocks


def test_prefix_cache_computes_shared_prompt_once(tiny_model_dir):
    prompt = _mixed_prompts(1, seed=5)[0] * 2
    prompt = (prompt * 3)[:200]
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, block_size=16, max_num_batched_tokens=256))
    params = SamplingParams(n=8, temperature=1.0, seed=9, max_tokens=8, ignore_eos=True)
    engine.add_request("grpo", prompt_token_ids=prompt, sampling_params=params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    full_blocks = (200 - 1) // 16  # 12 blocks = 192 tokens are shareable; the last token is recomputed
    stats = engine.stats
    assert stats.num_prompt_tokens_computed == 200 + 7 * (200 - full_blocks * 16)
    assert stats.num_cached_prompt_tokens == 7 * full_blocks * 16
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1, "8 seeded samples should differ"

    uncached = LLMEngine(EngineConfig(model=tiny_model_dir, enable_prefix_caching=False))
    uncached.add_request("grpo", prompt_token_ids=prompt, sampling_params=params)
    while uncached.has_unfinished_requests():
        for out in uncached.step():
            reference = out
    assert uncached.stats.num_prompt_tokens_computed == 8 * 200
    assert [c.token_ids for c in reference.outputs] == [c.token_ids for c in final.outputs]

    # New weights (here: the same, announced as a new version) make every cached block stale.
    manager = engine.block_manager
    assert any(block.block_hash is not None for block in manager.blocks)
    engine.set_weight_version(1)
    assert not manager.hash_to_block
    assert all(block.block_hash is None and block.token_ids == () for block in manager.blocks)
    computed = engine.stats.num_prompt_tokens_computed
    engine.add_request("again", prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats.num_prompt_tokens_computed - computed == 200, "nothing may come from the old cache"


def test_seeded_sampling_reproducible_across_runs_and_batches(tiny_model_dir):
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    first = LLM(tiny_model_dir).generate(["abc"], params, use_tqdm=False)[0].outputs[0].token_ids
    again = LLM(tiny_model_dir).generate(["abc"], params, use_tqdm=False)[0].outputs[0].token_ids
    others = ["x" * n for n in range(1, 12)]
    crowd = LLM(tiny_model_dir).generate([*others, "abc"], params, use_tqdm=False)[-1].outputs[0].token_ids
    assert first == again == crowd
    other_seed = SamplingParams(temperature=1.0, top_k=50, seed=4321, max_tokens=16, ignore_eos=True)
    assert LLM(tiny_model_dir).generate(["abc"], other_seed, use_tqdm=False)[0].outputs[0].token_ids != first


def test_stops_and_lengths(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    free = llm.generate(
        ["hello"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    tokens = free[0].outputs[0].token_ids
    assert free[0].outputs[0].finish_reason == "length" and len(tokens) == 12

    by_token = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[tokens[3]])
    out = llm.generate(["hello"], by_token, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == tokens[: tokens.index(tokens[3]) + 1]

    # Byte-level tokenizer: an ASCII token decodes to exactly one character.
    position = next(i for i, t in enumerate(tokens) if i > 0 and 32 < t < 127)
    stop = chr(tokens[position])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    out = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(tokens[: tokens.index(tokens[position])])
    assert stop not in out.text

    # EOS ends a request unless ignore_eos: make the first greedy token an EOS by listing it as one.
    llm.engine.eos_token_ids.add(tokens[0])
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == tokens[:1]


def test_n_samples_and_weight_versions(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    out = llm.generate(
        ["abc"], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    assert all(c.weight_versions == [0] * 6 for c in out[0].outputs)


def test_update_weights_switches_model_and_version(tiny_model_dir, tmp_path):
    other_dir = make_tiny_model(str(tmp_path / "other"), arch="llama", seed=42, std=0.3)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = LLM(other_dir).generate(["weights"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    llm = LLM(tiny_model_dir)
    before = llm.generate(["weights"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert before != expected
    new_weights = list(load_model(other_dir).named_parameters())
    # Two buckets, as a trainer would send them.
    llm.engine.update_weights(new_weights[:5], version=7)
    llm.engine.update_weights(new_weights[5:], version=7)
    out = llm.generate(["weights"], greedy, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected and out.weight_version == 7


def _update_weights_after_four_steps(engine: LLMEngine, other) -> RequestOutput:
    """Step four times, load ``other``'s weights as version 1, run to the end; the last output."""
    for _ in range(4):
        engine.step()
    engine.update_weights(other.named_parameters(), version=1)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return final


def test_update_weights_mid_request_continues(tiny_model_dir, tmp_path):
    other = load_model(make_tiny_model(str(tmp_path / "o"), seed=3, std=0.3))
    engine = LLMEngine(EngineConfig(model=tiny_model_dir))
    engine.add_request(
        "a", prompt="partial rollout", sampling_params=SamplingParams(max_tokens=10, ignore_eos=True)
    )
    final = _update_weights_after_four_steps(engine, other)
    versions = final.outputs[0].weight_versions
    assert len(versions) == 10 and versions[0] == 0 and versions[-1] == 1


def test_bad_inputs_get_clear_errors_and_engine_survives(tiny_model_dir, tmp_path):
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, max_model_len=64))
    with pytest.raises(ValueError, match="maximum context length is 64"):
        engine.add_request("long", prompt_token_ids=[1] * 64)
    with pytest.raises(ValueError, match=r"as text \(prompt\) or as token ids"):
        engine.add_request("none")
    with pytest.raises(ValueError, match=r"\[0, 259\)"):
        engine.add_request("oov", prompt_token_ids=[5, 100000])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", prompt_token_ids=[])
    for bad in [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": 0},
        {"max_tokens": 0},
        {"n": 0},
        {"seed": -3},
        {"seed": 2**63},  # the engine's int64 seeds and top-k would overflow inside a step
        {"top_k": 2**63},
        {"stop_token_ids": [2**63]},
        {"stop": [""]},
    ]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(UnknownRequestError, match="no such running or waiting request"):
        engine.abort("never-added")
    engine.add_request(
        "ok", prompt="still works", sampling_params=SamplingParams(max_tokens=30, ignore_eos=True)
    )
    engine.step()
    engine.step()
    assert engine.stats.num_free_blocks < engine.stats.num_total_blocks
    aborted = engine.abort("ok")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert engine.stats.num_free_blocks == engine.stats.num_total_blocks
    assert not engine.has_unfinished_requests()
    engine.add_request("after", prompt="more", sampling_params=SamplingParams(max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()


def _edit_config(model_dir: str, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _copy_checkpoint(src: str, dst: str) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f_in, open(os.path.join(dst, name), "wb") as f_out:
            f_out.write(f_in.read())
    return dst


def test_bad_checkpoints_get_clear_errors(tiny_model_dir, tmp_path):
    unknown = _copy_checkpoint(tiny_model_dir, str(tmp_path / "unknown"))
    _edit_config(unknown, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(unknown)

    missing = _copy_checkpoint(tiny_model_dir, str(tmp_path / "missing"))
    os.remove(os.path.join(missing, "model.safetensors"))
    with pytest.raises(WeightLoadError, match="no weights"):
        LLM(missing)

    misshaped = _copy_checkpoint(tiny_model_dir, str(tmp_path / "misshaped"))
    _edit_config(misshaped, intermediate_size=96)
    with pytest.raises(WeightLoadError, match=r"mis-shaped tensors: model\.layers\.0\.mlp"):
        LLM(misshaped)

    engine = LLMEngine(EngineConfig(model=tiny_model_dir))
    with pytest.raises(WeightLoadError, match="unexpected tensors"):
        engine.update_weights([("model.not_a_layer.weight", torch.zeros(3))], version=1)
    with pytest.raises(WeightLoadError, match="mis-shaped"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))], version=1)


def test_kv_pool_too_small_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="raise num_kv_blocks"):
        LLMEngine(EngineConfig(model=tiny_model_dir, num_kv_blocks=2, max_model_len=256))


def test_sleep_releases_the_kv_cache_and_wake_up_restores_generation(tiny_model_dir):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(tiny_model_dir)
    before = llm.generate(["sleep well"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.engine
    cache_bytes = sum(c.untyped_storage().nbytes() for c in engine.runner.kv_caches)
    engine.add_request("busy", prompt="x", sampling_params=greedy)
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.sleep()
    engine.abort("busy")
    engine.sleep(offload_weights=True)
    assert sum(c.untyped_storage().nbytes() for c in engine.runner.kv_caches) == 0
    with pytest.raises(RuntimeError, match="asleep"):
        engine.add_request("late", prompt="x")
    engine.wake_up()
    assert sum(c.untyped_storage().nbytes() for c in engine.runner.kv_caches) == cache_bytes
    assert llm.generate(["sleep well"], greedy, use_tqdm=False)[0].outputs[0].token_ids == before


@pytest.mark.parametrize("num_kv_blocks", [64, 2])
def test_start_up_warm_up_leaves_no_trace(tiny_model_dir, num_kv_blocks):
    """The CUDA engine's start-up warm-up (run here on CPU) frees what it used and resets the
    counters, also with a KV pool too small to run its requests side by side."""

    def greedy(engine):
        engine.add_request(
            "r",
            prompt_token_ids=[7, 8, 9, 10, 11],
            sampling_params=SamplingParams(temperature=0, max_tokens=6),
        )
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step(return_unfinished=False)
        return outputs[0].outputs[0].token_ids

    config = EngineConfig(model=tiny_model_dir, max_model_len=32, num_kv_blocks=num_kv_blocks)
    expected = greedy(LLMEngine(config))
    engine = LLMEngine(config)
    engine._warm_up()
    stats = engine.stats
    assert not engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert (stats.num_steps, stats.num_generated_tokens, stats.num_prompt_tokens_computed) == (0, 0, 0)
    assert not engine.block_manager.hash_to_block
    assert greedy(engine) == expected
    assert engine.stats.num_prompt_tokens_computed == 5  # nothing served from the warm-up's cache


def _async_script(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Requests that stop early (stop tokens), sample n=3, join mid-run and get aborted mid-run."""
    stops = list(range(0, 256, 9))
    prompts = _mixed_prompts(10, seed=11)

    def params(i: int) -> SamplingParams:
        p = _params_for(i)
        return dataclasses.replace(p, stop_token_ids=stops if i % 3 == 0 else [], n=3 if i == 4 else 1)

    def add(indices):
        for i in indices:
            engine.add_request(f"r{i}", prompt_token_ids=prompts[i], sampling_params=params(i))

    add(range(6))
    outputs, calls = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        calls += 1
        if calls == 3:
            add(range(6, 10))
        if calls == 5:
            outputs["r1"] = engine.abort("r1")
    return outputs


def test_async_scheduling_gives_the_same_outputs(tiny_model_dir):
    """Steps launched before the previous step's tokens are read: same tokens, log-probs and ends."""
    results, stats = {}, {}
    for async_scheduling in (False, True):
        engine = LLMEngine(EngineConfig(model=tiny_model_dir, async_scheduling=async_scheduling))
        results[async_scheduling] = _async_script(engine)
        stats[async_scheduling] = engine.stats
    sync, ahead = results[False], results[True]
    assert stats[False].num_steps_launched_ahead == 0
    assert stats[True].num_steps_launched_ahead > 20
    assert set(sync) == set(ahead) == {f"r{i}" for i in range(10)}
    stopped = 0
    for request_id, want in sync.items():
        got = ahead[request_id]
        assert len(got.outputs) == len(want.outputs)
        for g, w in zip(got.outputs, want.outputs):
            if request_id == "r1":  # aborted after the same number of calls, not the same number of tokens
                shorter, longer = sorted((g.token_ids, w.token_ids), key=len)
                assert longer[: len(shorter)] == shorter and g.finish_reason == w.finish_reason == "abort"
                continue
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason, request_id
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
            stopped += w.finish_reason == "stop"
    assert stopped >= 2, "the script should stop some requests early"
    for s in stats.values():
        assert s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0


def test_async_scheduling_labels_tokens_with_the_weights_that_computed_them(tiny_model_dir, tmp_path):
    """A weight update between steps: the token computed ahead, under the old weights, keeps their version."""
    other = load_model(make_tiny_model(str(tmp_path / "o"), seed=3, std=0.3))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
    old = LLM(tiny_model_dir).generate(["labels"], params, use_tqdm=False)[0].outputs[0]
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, async_scheduling=True))
    engine.add_request("a", prompt="labels", sampling_params=params)
    final = _update_weights_after_four_steps(engine, other)
    got = final.outputs[0]
    # Four steps read four tokens; the fifth was already being computed with version 0.
    assert got.weight_versions == [0] * 5 + [1] * 7
    assert got.token_ids[:5] == old.token_ids[:5]
    torch.testing.assert_close(
        torch.tensor(got.logprobs[:5]), torch.tensor(old.logprobs[:5]), atol=1e-6, rtol=0
    )
    assert abs(got.logprobs[5] - old.logprobs[5]) > 1e-3, "the sixth token should come from the new weights"


def test_a_request_whose_bookkeeping_raises_fails_alone(tiny_model_dir):
    # The stop-string check (detokenizing) of one request raises while its step completes: that
    # request is aborted and reported, its neighbour and the engine carry on.
    good = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = LLM(tiny_model_dir).generate(["hello"], good, use_tqdm=False)[0].outputs[0].token_ids
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, device="cpu", max_num_seqs=4))
    engine.add_request("good", prompt="hello", sampling_params=good)
    bad = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["never seen"])
    engine.add_request("bad", prompt="broken", sampling_params=bad)
    detokenizer = engine._requests["bad"].detokenizers[0]
    calls = []

    def broken_update(token_ids):
        calls.append(1)
        if len(calls) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted")
        return type(detokenizer).update(detokenizer, token_ids)

    detokenizer.update = broken_update
    finished, failures = {}, {}
    while engine.has_unfinished_requests():
        try:
            outputs = engine.step()
        except RequestsFailedError as exc:
            outputs = exc.outputs
            failures.update(exc.failures)
        finished.update({out.request_id: out for out in outputs if out.finished})
    assert set(failures) == {"bad"} and isinstance(failures["bad"], UnicodeDecodeError)
    assert finished["good"].outputs[0].token_ids == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.add_request("after", prompt="hello", sampling_params=good)
    while engine.has_unfinished_requests():
        done = [o for o in engine.step() if o.finished]
    assert done[0].outputs[0].token_ids == expected
