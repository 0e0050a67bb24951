"""Where a decode step's time goes on a GPU: engine step wall time against the captured graph's GPU time.

Builds a model of one of bench_runner's shapes (default Llama-3.2-1B) with random weights directly
on the GPU (no checkpoint), puts ``batch`` sequences of 128-token prompts into steady decoding, then
times 60 engine steps and 20 bare replays of that batch's CUDA graph. The difference is host work
not hidden behind the device.

    python benchmarks/probe_decode_step.py [--no-compile] [--eager] [--profile [BATCH ...]] [--batch-sizes 1 16 64 256]
                                           [--max-num-seqs 256] [--inductor coordinate_descent_tuning=True]
                                           [--shape qwen-0.5b]
"""

from __future__ import annotations

import argparse
import ast
import time

import torch
from bench_runner import PRESETS  # this script's folder is on sys.path

from raylane.models import CausalLM, tiny_config
from raylane.runner import EngineConfig, LLMEngine, SamplingParams


def random_model(shape: str) -> CausalLM:
    fields = dict(PRESETS[shape])
    with torch.device("meta"):
        model = CausalLM(tiny_config(fields.pop("arch", "llama"), **fields))
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    model.model.rotary_emb.build_tables("cuda")
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0, 0.02)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument(
        "--profile",
        type=int,
        nargs="*",
        default=None,
        metavar="BATCH",
        help="print the prefill step's top ops and the top kernels of 3 decode steps at these batch "
        "sizes (none given: 1 and 256)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=256, help="largest captured batch")
    parser.add_argument(
        "--inductor",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="torch._inductor.config settings for the compiled decode step",
    )
    parser.add_argument("--shape", choices=["llama-1b", "qwen-0.5b"], default="llama-1b")
    parser.add_argument(
        "--no-programmatic-launch",
        action="store_true",
        help="EngineOptions.programmatic_launch=False (PDL off)",
    )
    args = parser.parse_args()
    profiled = set(args.profile or [1, 256]) if args.profile is not None else set()
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        setattr(torch._inductor.config, key, ast.literal_eval(value))
    start = time.perf_counter()
    config = EngineConfig(model="<in memory>", device="cuda", max_model_len=776, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=4096, num_kv_blocks=16000, enforce_eager=args.eager,
                          compile_decode=not args.no_compile,
                          programmatic_launch=False if args.no_programmatic_launch else None)  # fmt: skip
    engine = LLMEngine(config, model=random_model(args.shape))
    print(f"start-up {time.perf_counter() - start:.1f} s, CUDA graphs {engine.runner.graphs is not None}")
    for batch in args.batch_sizes:
        first_prefill = time.perf_counter()
        gen = torch.Generator().manual_seed(batch)
        for i in range(batch):
            prompt = torch.randint(0, 128000, (128,), generator=gen).tolist()
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=200, ignore_eos=True)
            engine.add_request(f"{batch}-{i}", prompt_token_ids=prompt, sampling_params=params)
        if batch in profiled:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step(return_unfinished=False)
                torch.cuda.synchronize()
        else:
            engine.step(return_unfinished=False)
        print(f"batch {batch:4d}: first (prefill) step {(time.perf_counter() - first_prefill) * 1e3:.1f} ms")
        if batch in profiled:
            print(
                prof.key_averages().table(
                    sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60
                )
            )
        while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
            engine.step(return_unfinished=False)
        for _ in range(10):
            engine.step(return_unfinished=False)
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(60):
            engine.step(return_unfinished=False)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - begin) / 60
        gpu = float("nan")
        graphs = engine.runner.graphs
        if graphs is not None:
            graph = graphs._graphs[graphs._bucket_of[batch]][0]
            first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()
            first.record()
            for _ in range(20):
                graph.replay()
            last.record()
            torch.cuda.synchronize()
            gpu = first.elapsed_time(last) / 20 / 1e3
        print(f"batch {batch:4d}: step {wall * 1e3:7.3f} ms, graph on GPU {gpu * 1e3:7.3f} ms, "
              f"host not hidden {(wall - gpu) * 1e3:7.3f} ms -> {batch / wall:9.1f} tok/s")  # fmt: skip
        if graphs is not None and batch in profiled:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    engine.step(return_unfinished=False)
                torch.cuda.synchronize()
            launches = sum(event.count for event in prof.key_averages()) / 3
            print(f"batch {batch:4d}: {launches:.0f} kernels and copies per step")
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
            )
        while engine.has_unfinished_requests():
            engine.step(return_unfinished=False)


if __name__ == "__main__":
    main()
