"""Throughput of raylane's runner against Hugging Face ``generate`` on the same model and workload.

Prints a table and writes JSON under ``benchmarks/results/``. Runs on CPU (default: the tiny model)
and on a GPU (``--preset llama-1b --device cuda``):

    python benchmarks/bench_runner.py                                   # CPU, tiny model
    python benchmarks/bench_runner.py --preset llama-1b --device cuda --batch-sizes 1 16 64 256
    # both shapes in one run, engine start-up cold and warm in new processes
    python benchmarks/bench_runner.py --preset llama-1b qwen-0.5b --device cuda --batch-sizes 1 64 256 \
        --no-hf --grpo-prompts 0 --startup --graph-capture lazy

Share of roofline: bytes one decode step must read (all weights + the KV cache of the batch) over
the step time, divided by the device copy bandwidth (read + write) measured at the start of the run.

``--startup`` starts the engine in two fresh processes that share an empty compile cache folder:
the first is a cold start, the second a start on a machine that has run the engine once; the
in-process engine then starts from that warm cache too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from raylane.models import make_tiny_model
from raylane.runner import LLM, SamplingParams

PRESETS = {
    # ~0.2 M parameters: the model CI and `make run` use.
    "tiny": {"max_position_embeddings": 1024},
    # ~10 M parameters: still quick on a laptop CPU, big enough that matmuls matter.
    "small": {"max_position_embeddings": 1024, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 4},
    # Llama-3.2-1B shape (1.24 B parameters), random weights.
    "llama-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096,
                 "tie_word_embeddings": True, "rope_theta": 500000.0},
    # Qwen2.5-0.5B shape (0.49 B parameters: 24 layers, head dim 64, q/k/v biases), random weights.
    "qwen-0.5b": {"arch": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                  "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                  "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0},
}  # fmt: skip


def copy_bandwidth(device: torch.device) -> float:
    """Measured bytes/s of a large device-to-device copy, counting read + write."""
    numel = (256 if device.type == "cuda" else 64) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).tolist()


def bench_raylane(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    # Warm-up on the same batch (a few tokens), as in a rollout loop that calls the engine again and
    # again: the shape-specific one-time costs (cuBLAS heuristics, kernel loading) are paid here.
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.engine.block_manager.reset_prefix_cache([])  # the timed run must compute its prompts again
    sync(llm.engine.device)
    before = llm.engine.stats
    # Time every engine step too (each ends by reading its sampled tokens, so host time is device time).
    engine_step, step_seconds = llm.engine.step, []

    def timed_step(*args, **kwargs):
        begin = time.perf_counter()
        outputs = engine_step(*args, **kwargs)
        step_seconds.append(time.perf_counter() - begin)
        return outputs

    llm.engine.step = timed_step
    start = time.perf_counter()
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        sync(llm.engine.device)
    finally:
        del llm.engine.step
    elapsed = time.perf_counter() - start
    after = llm.engine.stats
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    step_seconds.sort()
    return {
        "seconds": elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "steps": after.num_steps - before.num_steps,
        "median_step_ms": 1e3 * step_seconds[len(step_seconds) // 2],
        "slowest_steps_ms": [round(1e3 * t, 2) for t in step_seconds[-8:]],
        "prompt_tokens_computed": after.num_prompt_tokens_computed - before.num_prompt_tokens_computed,
    }


def bench_hf(model_dir: str, prompts: list[list[int]], new_tokens: int, device, dtype) -> dict | None:
    try:
        import transformers
    except ImportError:
        return None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    model = model.to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        model.generate(ids[:1, :8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        sync(device)
    elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del model
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed}


def print_row(row: dict) -> None:
    """One line of the table, printed as soon as the workload is measured."""
    hf = row.get("hf", {}).get("tokens_per_s")
    ratio = row.get("ratio_vs_hf")
    print(f"{row['workload']:<12} {row['raylane']['tokens_per_s']:>14.1f} "
          f"{(f'{hf:.1f}' if hf else '-'):>10} {(f'{ratio:.2f}x' if ratio else '-'):>7} {row['roofline_share']:>8.1%} {row['raylane']['median_step_ms']:>9.2f} ms")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=["tiny"],
                        help="one or more model shapes, measured one after the other in this run")  # fmt: skip
    parser.add_argument("--model", help="a checkpoint folder instead of a random preset")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--grpo-prompt-len", type=int, default=512)
    parser.add_argument(
        "--grpo-prompts", type=int, default=8, help="distinct prompts, each sampled n=8 times (0: skip)"
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face reference")
    parser.add_argument("--attention-backend", default="auto", help="auto, torch or triton")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="CUDA graphs of the eager model")
    parser.add_argument(
        "--no-async-scheduling", action="store_true", help="read each step's tokens before launching the next"
    )
    parser.add_argument("--graph-capture", choices=["eager", "lazy"], default="eager")
    parser.add_argument(
        "--no-programmatic-launch",
        action="store_true",
        help="EngineOptions.programmatic_launch=False (PDL off)",
    )
    parser.add_argument("--compile-cache-dir", help="EngineOptions.compile_cache_dir (default: the engine's)")
    parser.add_argument(
        "--startup", action="store_true", help="cold and warm-cache start-up in new processes"
    )
    parser.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)  # a --startup child
    parser.add_argument(
        "--output", help="JSON path (default benchmarks/results/bench_runner_<device>_<preset>.json)"
    )
    return parser.parse_args()


def engine_kwargs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """The LLM's options for this workload (the same in a --startup child and in the measuring process)."""
    max_len = max(args.prompt_len, args.grpo_prompt_len) + args.new_tokens + 8
    max_batch = max(max(args.batch_sizes, default=1), 8 * args.grpo_prompts, 1)
    # A KV cache sized for the workload (with room to spare) rather than for most of the GPU, so
    # that Hugging Face, run later in this process, has memory left.
    num_kv_blocks = int(1.25 * max_batch * -(-max_len // 16)) + 16
    kwargs = dict(device=str(device), dtype=str(dtype).removeprefix("torch."), max_model_len=max_len,
                  max_num_seqs=max_batch, max_num_batched_tokens=max(4096, max_batch), num_kv_blocks=num_kv_blocks,
                  attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                  compile_decode=not args.no_compile, graph_capture=args.graph_capture,
                  async_scheduling=False if args.no_async_scheduling else None,
                  programmatic_launch=False if args.no_programmatic_launch else None)  # fmt: skip
    if args.compile_cache_dir:
        kwargs["compile_cache_dir"] = args.compile_cache_dir
    return kwargs


def startup_in_new_processes(args: argparse.Namespace, model_dir: str, cache_dir: str) -> dict:
    """Engine start-up in fresh processes sharing ``cache_dir``: cold (empty compile cache), then warm
    (the cache the cold one left).

    Each child gets this run's arguments, so it builds the engine the measuring process builds.
    """
    argv = [a for a in sys.argv[1:] if a != "--startup"]
    result = {}
    for name in ("cold", "warm"):
        command = [sys.executable, os.path.abspath(__file__), *argv, "--startup-only", "--model", model_dir,
                   "--compile-cache-dir", cache_dir]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"start-up child failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["engine_startup_s"]
        result[f"engine_startup_{name}_s"] = seconds
        print(f"engine start-up in a new process, {name} compile cache: {seconds:.1f} s")
    return result


def bench_preset(args, preset: str, device, dtype, bandwidth: float) -> dict:
    """Every workload of one model shape; returns its JSON section."""
    model_dir = args.model or make_tiny_model(tempfile.mkdtemp(prefix="bench-"), std=0.02, **PRESETS[preset])
    startup = {}
    if args.startup:
        cache_dir = tempfile.mkdtemp(prefix="bench-compile-cache-")
        startup = startup_in_new_processes(args, model_dir, cache_dir)
        args.compile_cache_dir = cache_dir
    start = time.perf_counter()
    llm = LLM(model_dir, **engine_kwargs(args, device, dtype))
    startup_s = time.perf_counter() - start
    if args.startup_only:
        print(json.dumps({"engine_startup_s": startup_s}))
        return {}
    config = llm.engine.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    attn = llm.engine.model.model.layers[0].self_attn
    kv_bytes_per_token = 2 * attn.num_kv_heads * attn.head_dim * config.num_hidden_layers * dtype.itemsize
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=args.new_tokens, ignore_eos=True)
    runner = llm.engine.runner
    print(f"raylane runner vs HF generate — preset {preset}, {sum(p.numel() for p in llm.engine.model.parameters()) / 1e6:.1f} M params, "
          f"{device.type} {dtype}, copy bandwidth {bandwidth / 1e9:.1f} GB/s, prompt {args.prompt_len}, new {args.new_tokens}")  # fmt: skip
    print(f"attention backend {runner.backend.name}, CUDA graphs {runner.graphs is not None}, async scheduling "
          f"{llm.engine.async_scheduling}, graph capture "
          f"{args.graph_capture}, engine start-up {startup_s:.1f} s (compile + capture)")  # fmt: skip
    print(
        f"{'workload':<12} {'raylane tok/s':>14} {'HF tok/s':>10} {'ratio':>7} {'roofline':>9} {'median step':>12}"
    )
    rows = []
    for batch in args.batch_sizes:
        prompts = random_prompts(batch, args.prompt_len, config.vocab_size, seed=batch)
        ours = bench_raylane(llm, prompts, params)
        step_s = ours["seconds"] / args.new_tokens
        avg_context = args.prompt_len + args.new_tokens / 2
        step_bytes = weight_bytes + batch * avg_context * kv_bytes_per_token
        row = {"workload": f"batch {batch}", "batch": batch, "raylane": ours,
               "roofline_share": step_bytes / step_s / bandwidth}  # fmt: skip
        hf = None if args.no_hf else bench_hf(model_dir, prompts, args.new_tokens, device, dtype)
        if hf:
            row["hf"] = hf
            row["ratio_vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
        rows.append(row)
        print_row(row)

    grpo = {}
    if args.grpo_prompts:
        grpo_prompts = random_prompts(args.grpo_prompts, args.grpo_prompt_len, config.vocab_size, seed=99)
        grpo_params = SamplingParams(
            n=8, temperature=1.0, seed=1, max_tokens=args.new_tokens // 4, ignore_eos=True
        )
        for caching in (True, False):
            llm.engine.block_manager.enable_prefix_caching = caching
            llm.engine.block_manager.reset_prefix_cache([])
            grpo["on" if caching else "off"] = bench_raylane(llm, grpo_prompts, grpo_params)
        llm.engine.block_manager.enable_prefix_caching = llm.engine.config.enable_prefix_caching
        grpo["speedup"] = grpo["on"]["tokens_per_s"] / grpo["off"]["tokens_per_s"]
        print(f"GRPO n=8 x {args.grpo_prompts} prompts of {args.grpo_prompt_len}: prefix cache on "
              f"{grpo['on']['tokens_per_s']:.1f} tok/s, off {grpo['off']['tokens_per_s']:.1f} tok/s "
              f"({grpo['speedup']:.2f}x); prompt tokens computed {grpo['on']['prompt_tokens_computed']} vs "
              f"{grpo['off']['prompt_tokens_computed']}")  # fmt: skip

    result = {
        "preset": preset if not args.model else args.model,
        "params": sum(p.numel() for p in llm.engine.model.parameters()),
        "weight_bytes": weight_bytes,
        "attention_backend": runner.backend.name,
        "cuda_graphs": runner.graphs is not None,
        "compile_decode": runner.graphs is not None and not args.no_compile,
        "async_scheduling": llm.engine.async_scheduling,
        "graph_capture": args.graph_capture,
        "programmatic_launch": runner.graphs is not None and runner.graphs.programmatic_launch,
        "engine_startup_s": startup_s,
        **startup,
        "rows": rows,
        "grpo_prefix_caching": grpo,
    }
    del llm, runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    dtype = (
        (torch.float32 if device.type == "cpu" else torch.bfloat16)
        if args.dtype == "auto"
        else getattr(torch, args.dtype)
    )
    if args.startup_only:
        bench_preset(args, args.preset[0], device, dtype, 0.0)
        return 0
    bandwidth = copy_bandwidth(device)
    common = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    path = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"bench_runner_{device.type}_{'_'.join(args.preset)}.json")  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sections = {}
    for preset in args.preset:
        sections[preset] = bench_preset(args, preset, device, dtype, bandwidth)
        # One preset keeps the flat layout of earlier results; several are keyed by preset. Written
        # after each preset, so that a run stopped by its time limit keeps the presets it finished.
        result = {**common, **sections[preset]} if len(args.preset) == 1 else {**common, "presets": sections}
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
