"""The runner's CUDA path against the CPU reference: Triton attention, fused sampling, CUDA graphs.

The engine-level GPU tests are marked ``gpu`` and skipped without CUDA. The kernel-level parity
tests run everywhere Triton is installed: on the GPU, or on CPU in Triton's interpreter (which
``conftest.py`` turns on when there is no CUDA), so CI runs the GPU kernels' own code, in fp32.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

from raylane.models import load_model
from raylane.runner import EngineConfig, LLMEngine, SamplingParams
from raylane.runner.attention import (
    ATTENTION_BACKENDS,
    PagedAttentionMetadata,
    get_attention_backend,
    resolve_attention_backend,
)
from raylane.runner.sampler import SamplingBatch, gumbel_noise

ON_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")

# Where the Triton kernels run: the GPU, else Triton's interpreter on CPU. The interpreter computes
# in numpy, whose bf16 is not faithful, so off the GPU the kernels are checked in fp32 only.
KERNEL_DEVICE = "cuda" if ON_CUDA else "cpu"
KERNEL_DTYPES = [torch.float32, torch.bfloat16] if ON_CUDA else [torch.float32]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton, and a CUDA device or TRITON_INTERPRET=1",
)
kernel_dtypes = pytest.mark.parametrize(
    "dtype", KERNEL_DTYPES, ids=[str(d).removeprefix("torch.") for d in KERNEL_DTYPES]
)


# ---- CPU: what CI checks -----------------------------------------------------------------------


def test_auto_backend_resolves_per_device():
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    fast = "triton" if "triton" in ATTENTION_BACKENDS else "torch"
    assert resolve_attention_backend("auto", torch.device("cuda")) == fast
    assert resolve_attention_backend("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="unknown attention_backend"):
        get_attention_backend("no-such-backend")


def test_cpu_engine_runs_the_eager_reference(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, device="cpu", max_num_seqs=4))
    assert engine.runner.graphs is None
    assert engine.runner.backend.name == "torch"
    # No scratch block either: the KV cache is exactly what the block manager hands out.
    assert engine.runner.kv_caches[0].shape[1] == engine.block_manager.num_blocks


def test_decode_buckets_cover_every_batch_size():
    from raylane.runner.cuda_graphs import decode_buckets

    for max_num_seqs in (1, 3, 16, 100, 256):
        buckets = decode_buckets(max_num_seqs)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_num_seqs
        assert all(any(b >= n for b in buckets) for n in range(1, max_num_seqs + 1))


# ---- GPU ---------------------------------------------------------------------------------------


def _random_paged(query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """Random q/k/v and a randomly laid out paged cache holding ``context_lens`` earlier tokens."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(needed) + 5
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in needed]
    width, max_q = max(needed), max(query_lens)
    cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen)
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen)
    k = torch.randn((sum(query_lens), num_kv_heads, head_dim), generator=gen)
    v = torch.randn((sum(query_lens), num_kv_heads, head_dim), generator=gen)
    slots, pad, query_positions, starts = [], [], [], [0]
    for b, (context, n) in enumerate(zip(context_lens, query_lens, strict=True)):
        span = range(context, context + n)
        slots += [tables[b][p // block_size] * block_size + p % block_size for p in span]
        pad += range(b * max_q, b * max_q + n)
        query_positions.append([*span, *([0] * (max_q - n))])
        starts.append(starts[-1] + n)

    def index(x):
        return torch.tensor(x, dtype=torch.long, device=KERNEL_DEVICE)

    meta = PagedAttentionMetadata(
        slot_mapping=index(slots),
        block_tables=index([t + [0] * (width - len(t)) for t in tables]),
        query_positions=index(query_positions),
        query_pad_index=index(pad),
        max_query_len=max_q,
        seq_lens=index(seq_lens),
        query_start_loc=index(starts),
    )
    return [t.to(KERNEL_DEVICE, dtype) for t in (q, k, v, cache)], meta


PAGED_CASES = {
    "decode-batch1": ([1], [700], 32, 8, 64, 16),
    "decode-batch": ([1] * 9, [5, 40, 130, 1, 17, 256, 63, 64, 65], 32, 8, 64, 16),
    "decode-mha-bs32": ([1] * 3, [200, 17, 63], 8, 8, 128, 32),
    "mixed": ([7, 1, 200, 1, 33], [0, 33, 16, 0, 300], 32, 8, 64, 16),
    "prefill-gqa3-bs128": ([70, 5], [0, 190], 12, 4, 64, 128),
}


@needs_triton
@kernel_dtypes
@pytest.mark.parametrize("case", list(PAGED_CASES), ids=list(PAGED_CASES))
def test_triton_attention_matches_reference(case, dtype):
    (q, k, v, cache), meta = _random_paged(*PAGED_CASES[case], dtype=dtype, seed=hash(case) % 1000)
    scale = q.shape[-1] ** -0.5
    ref_cache = cache.double()
    reference = get_attention_backend("torch").forward(
        q.double(), k.double(), v.double(), ref_cache, meta, scale
    )
    out = get_attention_backend("triton").forward(q, k, v, cache, meta, scale)
    error = ((out.double() - reference).norm() / reference.norm()).item()
    assert error < (1e-4 if dtype == torch.float32 else 1e-2), error
    assert torch.equal(cache.double(), ref_cache), "the new K/V must land in the same slots"


@needs_triton
def test_fused_sampler_matches_torch_sampler():
    from raylane.runner.sampling_kernel import fused_sample

    gen = torch.Generator().manual_seed(0)
    # A Llama-3 vocabulary on the GPU; a smaller odd one keeps the interpreter quick.
    rows, vocab = (64, 128256) if ON_CUDA else (16, 5003)
    logits = (torch.randn((rows, vocab), generator=gen) * 3).to(KERNEL_DEVICE)
    temperatures = (torch.rand(rows, generator=gen) + 0.3).to(KERNEL_DEVICE)
    temperatures[::4] = 0.0  # greedy rows mixed in
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=gen).to(KERNEL_DEVICE)
    steps = torch.randint(0, 1000, (rows,), generator=gen).to(KERNEL_DEVICE)
    tokens, logprobs = fused_sample(logits, temperatures, seeds, steps)
    greedy = temperatures == 0
    scaled = logits / torch.where(greedy, 1.0, temperatures)[:, None]
    noisy = (scaled + gumbel_noise(seeds, steps, vocab)).argmax(-1)
    expected = torch.where(greedy, logits.argmax(-1), noisy)
    assert torch.equal(tokens, expected)
    expected_logprobs = scaled.log_softmax(-1).gather(1, expected[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-4, rtol=1e-5)
    if ON_CUDA:
        bf16_tokens, _ = fused_sample(logits.bfloat16(), temperatures, seeds, steps)
        assert bf16_tokens.shape == tokens.shape


@pytest.mark.gpu
@needs_cuda
def test_sampler_uses_the_fused_kernel_on_cuda(monkeypatch):
    from raylane.runner import sampling_kernel
    from raylane.runner.sampler import Sampler

    calls = []
    fused_sample = sampling_kernel.fused_sample

    def counting_fused_sample(*args):
        calls.append(args)
        return fused_sample(*args)

    monkeypatch.setattr(sampling_kernel, "fused_sample", counting_fused_sample)
    logits = torch.randn(4, 1000, device="cuda")
    greedy = torch.zeros(4, device="cuda")
    steps = torch.zeros(4, dtype=torch.long, device="cuda")
    batch = SamplingBatch(greedy, torch.full_like(steps, 1000), greedy + 1, steps, steps, True, False, False)
    tokens, _ = Sampler()(logits, batch)
    assert len(calls) == 1 and torch.equal(tokens, logits.argmax(-1))


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randint(1, 120))] for _ in range(count)]


def _params(i: int) -> SamplingParams:
    # Varying lengths shrink the batch through every graph bucket; every third request samples;
    # every fourth may stop at a stop token, leaving rows of steps launched ahead unused.
    max_tokens = 8 + (i * 5) % 28
    stops = list(range(0, 256, 11)) if i % 4 == 1 else []
    if i % 3 == 2:
        return SamplingParams(
            temperature=0.8,
            seed=i,
            max_tokens=max_tokens,
            ignore_eos=True,
            logprobs=True,
            stop_token_ids=stops,
        )
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=True, stop_token_ids=stops
    )


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, sampling_params=_params(i))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
    return done


def _assert_same_generations(got: dict, reference: dict) -> None:
    """Every request's tokens equal the reference's, and its log-probs agree within 1e-4."""
    for request_id, (tokens, logprobs) in reference.items():
        assert got[request_id][0] == tokens, request_id
        torch.testing.assert_close(
            torch.tensor(got[request_id][1]), torch.tensor(logprobs), atol=1e-4, rtol=0
        )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "cuda_options",
    [{}, {"graph_capture": "lazy"}, {"programmatic_launch": False}],
    ids=["eager-capture", "lazy-capture", "no-programmatic-launch"],
)
def test_cuda_path_matches_cpu_reference_fp32(tiny_model_dir, cuda_options):
    # The requests' lengths differ, so the last one decodes alone: the batch-1 graph runs too.
    prompts = _prompts(20)
    options = dict(
        model=tiny_model_dir, dtype="float32", max_num_seqs=16, max_num_batched_tokens=256, num_kv_blocks=512
    )
    reference = _generate(LLMEngine(EngineConfig(device="cpu", **options)), prompts)
    engine = LLMEngine(EngineConfig(device="cuda", **options, **cuda_options))
    assert engine.runner.backend.name == "triton" and engine.runner.graphs is not None
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert engine.runner.graphs.programmatic_launch == (hopper and "programmatic_launch" not in cuda_options)
    got = _generate(engine, prompts)
    assert engine.runner.graphs.num_replays > 0, "decode steps should replay CUDA graphs"
    assert 1 in engine.runner.graphs._graphs, "the batch-1 graph should have run"
    # The CPU reference steps synchronously; on CUDA steps are launched ahead (async scheduling).
    assert engine.stats.num_steps_launched_ahead > 0
    _assert_same_generations(got, reference)


@pytest.mark.gpu
@needs_cuda
def test_sleep_and_wake_keep_the_graphs_unless_memory_moved(tiny_model_dir):
    prompts = _prompts(12)
    engine = LLMEngine(
        EngineConfig(model=tiny_model_dir, device="cuda", dtype="float32", max_num_seqs=16, num_kv_blocks=512)
    )
    graphs = engine.runner.graphs
    before = _generate(engine, prompts)
    assert graphs.num_captures == 1
    # A colocated trainer uses the freed memory meanwhile, and gives its transient tensors back.
    engine.sleep()
    scratch = torch.empty(engine.runner.kv_caches[0].numel(), dtype=torch.float32, device="cuda")
    del scratch
    engine.wake_up()
    assert graphs.num_captures == 1, "the cache came back where it was: the graphs stay valid"
    _assert_same_generations(_generate(engine, prompts), before)
    # Offloaded weights come back elsewhere: the graphs are captured again, and still right.
    engine.sleep(offload_weights=True)
    held = torch.empty(engine.runner.kv_caches[0].numel() * 2, dtype=torch.float32, device="cuda")
    engine.wake_up()
    del held
    assert graphs.num_captures == 2
    _assert_same_generations(_generate(engine, prompts), before)


@needs_triton
@pytest.mark.skipif(
    ON_CUDA, reason="on a GPU test_cuda_path_matches_cpu_reference_fp32 runs the whole CUDA path"
)
def test_triton_backend_in_the_engine_matches_reference_on_cpu(tiny_model_dir):
    # The engine's Triton attention path (metadata, decode splits, chunked prefill, mixed steps) in
    # the interpreter: the same tokens as the reference, greedy and seeded.
    prompts = _prompts(6)
    options = dict(
        model=tiny_model_dir, device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=64
    )
    reference = _generate(LLMEngine(EngineConfig(attention_backend="torch", **options)), prompts)
    engine = LLMEngine(EngineConfig(attention_backend="triton", **options))
    assert engine.runner.backend.name == "triton"
    got = _generate(engine, prompts)
    _assert_same_generations(got, reference)


def _teacher_forced_logits(model, sequences: list[list[int]], prompt_lens: list[int]) -> torch.Tensor:
    """The model's fp32 logits predicting every generated token, concatenated over sequences."""
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for sequence, prompt_len in zip(sequences, prompt_lens, strict=True):
            logits = model(torch.tensor([sequence], device=device))[0]
            rows.append(logits[prompt_len - 1 : -1].float().cpu())
    return torch.cat(rows)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_top1_agreement(tiny_model_dir):
    """bf16 on CUDA picks the fp32 reference's top-1 token wherever bf16 rounding cannot flip it.

    On a small random model many next-token margins are below bf16's resolution (the dense bf16
    forward itself disagrees with fp32 on a few percent of tokens), so agreement is required at
    least 99% on the positions where the fp32 margin exceeds twice the dense bf16 forward's logit
    error, and overall no worse than the dense bf16 forward's own agreement minus one point.
    """
    prompts = _prompts(32, seed=1)
    config = EngineConfig(
        model=tiny_model_dir, device="cuda", dtype="bfloat16", max_num_seqs=32, num_kv_blocks=512
    )
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, sampling_params=params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    generated = torch.tensor([t for i in range(len(prompts)) for t in outputs[f"r{i}"]])
    sequences = [p + outputs[f"r{i}"] for i, p in enumerate(prompts)]
    lens = [len(p) for p in prompts]
    fp32 = _teacher_forced_logits(
        load_model(tiny_model_dir, torch.float32, torch.device("cpu")), sequences, lens
    )
    bf16 = _teacher_forced_logits(
        load_model(tiny_model_dir, torch.bfloat16, torch.device("cpu")), sequences, lens
    )
    top2 = fp32.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * (bf16 - fp32).abs().amax(-1)
    agree = generated == fp32.argmax(-1)
    dense_agree = bf16.argmax(-1) == fp32.argmax(-1)
    print(  # shown with -rP: the numbers the GPU notes quote
        f"top-1 agreement with fp32: {agree.float().mean():.4f} overall, "
        f"{agree[decisive].float().mean():.4f} on {int(decisive.sum())}/{len(agree)} decisive positions; "
        f"dense bf16 forward {dense_agree.float().mean():.4f}"
    )
    assert decisive.float().mean() > 0.3, "too few positions left to judge"
    assert agree[decisive].float().mean() >= 0.99
    assert agree.float().mean() >= dense_agree.float().mean() - 0.01


@pytest.mark.gpu
@needs_cuda
def test_truncated_sampling_on_graphs_matches_eager(tiny_model_dir):
    # Top-k / top-p rows are re-sampled from the graph's logits; eager mode samples them directly.
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    tokens = {}
    for enforce_eager in (False, True):
        engine = LLMEngine(
            EngineConfig(
                model=tiny_model_dir,
                device="cuda",
                dtype="float32",
                enforce_eager=enforce_eager,
                num_kv_blocks=64,
            )
        )
        assert (engine.runner.graphs is None) == enforce_eager
        engine.add_request("r", prompt_token_ids=[1, 2, 3, 4, 5], sampling_params=params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[enforce_eager] = out.outputs[0].token_ids
    assert len(tokens[False]) == 24
    assert tokens[False] == tokens[True]


@needs_triton
@kernel_dtypes
def test_gemv_kernel_matches_linear(dtype):
    from raylane.runner.gemv_kernel import gemv_op

    torch.manual_seed(0)
    # Odd sizes exercise the row and column masks; one shape per tile the heuristic picks. The
    # interpreter runs every program in Python: off the GPU the matrices have fewer rows, and the
    # tiles picked for many rows are tried on short matrices of the same width.
    from raylane.runner.gemv_kernel import gemv, gemv_tile

    shapes = [(3072, 2048), (1000, 2047), (16384, 2048), (9728, 896), (2048, 8192), (896, 4864), (1, 33)]
    if not ON_CUDA:
        shapes = [(301, 2048), (99, 2047), (37, 8195), (1, 33)]
        for n, k, rows_picked_for in [(37, 2048, 16384), (41, 896, 16384), (41, 4864, 4096)]:
            weight = torch.randn(n, k, device=KERNEL_DEVICE, dtype=dtype) * 0.05
            x = torch.randn(1, k, device=KERNEL_DEVICE, dtype=dtype)
            tile = gemv(x, weight, None, gemv_tile(rows_picked_for, k))
            torch.testing.assert_close(tile, torch.nn.functional.linear(x, weight), rtol=2e-2, atol=2e-2)
    for n, k in shapes:
        weight = torch.randn(n, k, device=KERNEL_DEVICE, dtype=dtype) * 0.05
        bias = torch.randn(n, device=KERNEL_DEVICE, dtype=dtype)
        x = torch.randn(1, k, device=KERNEL_DEVICE, dtype=dtype)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(
            gemv_op(x, weight, bias), torch.nn.functional.linear(x, weight, bias), **tol
        )
        torch.testing.assert_close(gemv_op(x, weight, None), torch.nn.functional.linear(x, weight), **tol)
