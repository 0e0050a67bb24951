"""Online serving latency and throughput: the raylane Serve app against the bare engine, same load.

A seeded load generator sends streaming completion requests with Poisson arrivals and random
prompt/output lengths (``ignore_eos``, so every request produces exactly its output length),
first over HTTP to a raylane Ray Serve application on a local Ray cluster, once per ingress layout
(``--ingress``: the ingress in a deployment of its own, two Ray hops per streamed chunk; in the
model's replica, one hop, the proxy's; ``direct``, the same replica called on its own port, no
hop), then in-process to an `AsyncLLMEngine` with the same engine configuration; several request
rates give one load each, on the same application and engine. With ``--rounds N`` every load runs
N times per layout and on the engine, the layouts of one deployment taking turns in alternating
order, and each figure pools the N runs' requests: a busy machine's drift falls on all alike. It
reports time to first token (TTFT), time per output token after the first (TPOT), inter-token
latency between streamed chunks (ITL), at p50 and p99, and request and token throughput; the
Serve/engine ratios give the cost of the HTTP + Serve path. Prints a table and writes JSON under
``benchmarks/results/``:

    python benchmarks/bench_serving.py                          # tiny model, ~2-3 min on 2 cores
    python benchmarks/bench_serving.py --model DIR --num-requests 500 --request-rate 8 32 128 --device cuda
    python benchmarks/bench_serving.py --ingress with_model direct --rounds 3   # the proxy's cost alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from raylane.models import make_tiny_model
from raylane.runner import EngineConfig, SamplingParams
from raylane.runner.async_engine import AsyncLLMEngine
from raylane.serving import ModelDeploymentConfig


@dataclass
class Request:
    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class Trace:
    """What one client saw: when it sent, when each streamed chunk arrived, how many tokens it got."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    num_tokens: int = 0


def sample_length(rng: random.Random, mean: int, dist: str) -> int:
    if dist == "fixed":
        return mean
    if dist == "uniform":
        return rng.randint(max(1, mean // 2), max(1, mean * 3 // 2))
    # lognormal with the given mean and a 0.5 sigma: a long tail, as real prompts have.
    sigma = 0.5
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)))


def make_workload(args: argparse.Namespace, vocab_size: int, request_rate: float) -> list[Request]:
    rng = random.Random(args.seed)
    now, requests = 0.0, []
    for _ in range(args.num_requests):
        if math.isfinite(request_rate):
            now += rng.expovariate(request_rate)
        prompt_len = min(sample_length(rng, args.prompt_len, args.length_dist), args.max_model_len // 2)
        max_tokens = min(
            sample_length(rng, args.output_len, args.length_dist), args.max_model_len - prompt_len
        )
        # Byte tokens 32..126 (printable ASCII): valid text, and no special tokens.
        prompt = [rng.randint(32 + 3, 126 + 3) % vocab_size for _ in range(prompt_len)]
        requests.append(Request(now, prompt, max_tokens))
    return requests


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(traces: list[Trace], duration_s: float, prompt_tokens: int) -> dict:
    ttft = [t.chunks[0] - t.sent for t in traces if t.chunks]
    tpot = [(t.chunks[-1] - t.chunks[0]) / (t.num_tokens - 1) for t in traces if t.num_tokens > 1]
    itl = [b - a for t in traces for a, b in zip(t.chunks, t.chunks[1:])]
    output_tokens = sum(t.num_tokens for t in traces)
    ms = 1e3
    return {
        "requests": len(traces),
        "duration_s": duration_s,
        "ttft_ms": {
            "p50": percentile(ttft, 50) * ms,
            "p99": percentile(ttft, 99) * ms,
            "mean": statistics.fmean(ttft) * ms,
        },
        "tpot_ms": {
            "p50": percentile(tpot, 50) * ms,
            "p99": percentile(tpot, 99) * ms,
            "mean": statistics.fmean(tpot) * ms,
        },
        "itl_ms": {
            "p50": percentile(itl, 50) * ms,
            "p99": percentile(itl, 99) * ms,
            "mean": statistics.fmean(itl) * ms,
        },
        "request_throughput_per_s": len(traces) / duration_s,
        "output_token_throughput_per_s": output_tokens / duration_s,
        "total_token_throughput_per_s": (output_tokens + prompt_tokens) / duration_s,
        "output_tokens": output_tokens,
    }


# One load's traces and the wall time it took.
Run = tuple[list[Trace], float]


def pooled(runs: list[Run], workload: list[Request]) -> dict:
    """The figures of one load over all its runs' requests (`summarize`)."""
    traces = [trace for run, _ in runs for trace in run]
    prompt_tokens = sum(len(r.prompt_token_ids) for r in workload) * len(runs)
    return summarize(traces, sum(duration for _, duration in runs), prompt_tokens)


async def replay(workload: list[Request], send) -> Run:
    """Start each request at its arrival time; returns the traces and the wall time of the whole load."""
    start = time.perf_counter()

    async def one(request: Request) -> Trace:
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
        return await send(request)

    traces = await asyncio.gather(*(one(r) for r in workload))
    return list(traces), time.perf_counter() - start


async def run_engine(
    engine_config: EngineConfig, workloads: list[list[Request]], rounds: int
) -> list[list[Run]]:
    """Each round's traces of each load, on one in-process engine."""
    engine = AsyncLLMEngine.from_config(engine_config)
    counter = iter(range(10**9))

    async def send(request: Request) -> Trace:
        trace = Trace(sent=time.perf_counter())
        params = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True, temperature=1.0, seed=0)
        seen = 0
        async for output in engine.generate(
            f"bench-{next(counter)}", prompt_token_ids=request.prompt_token_ids, sampling_params=params
        ):
            num = len(output.outputs[0].token_ids)
            if num > seen:
                trace.chunks.append(time.perf_counter())
                seen = num
        trace.num_tokens = seen
        return trace

    try:
        await send(Request(0.0, workloads[0][0].prompt_token_ids, 4))  # warm-up
        return [[await replay(workload, send) for workload in workloads] for _ in range(rounds)]
    finally:
        engine.shutdown()


async def run_http(base_url: str, model: str, workloads: list[list[Request]]) -> list[Run]:
    """The traces of each load, sent over HTTP to ``base_url``."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def send(request: Request) -> Trace:
            body = {
                "model": model,
                "prompt": request.prompt_token_ids,
                "max_tokens": request.max_tokens,
                "ignore_eos": True,
                "temperature": 1.0,
                "seed": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            trace = Trace(sent=time.perf_counter())
            async with session.post(f"{base_url}/v1/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        trace.num_tokens = event["usage"]["completion_tokens"]
                    elif event["choices"]:
                        trace.chunks.append(time.perf_counter())
            return trace

        await send(Request(0.0, workloads[0][0].prompt_token_ids, 4))  # warm-up
        return [await replay(workload, send) for workload in workloads]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Layouts and the deployment each is measured on: `direct` calls the with_model replica on its own port.
DEPLOYMENT_OF = {"separate": "separate", "with_model": "with_model", "direct": "with_model"}


def run_serve(
    engine_config: EngineConfig,
    workloads: list[list[Request]],
    threads: int,
    ingress: list[str],
    tokens_per_chunk: int,
    rounds: int,
) -> tuple[dict[str, list[list[Run]]], dict[str, float]]:
    """Each round's runs of the loads through a Serve application per ingress layout, on one local
    cluster; the layouts of one deployment take turns, in alternating order."""
    import ray

    from raylane.serving import ServingConfig, deploy, direct_ingress_urls, undeploy

    # A cluster of its own: a plain init would join another Ray instance running on this machine.
    ray.init(
        address="local",
        include_dashboard=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
    )
    # Serve's proxy keeps the port it first started with: every layout uses it.
    port = free_port()
    direct = "direct" in ingress
    results: dict[str, list[list[Run]]] = {layout: [] for layout in ingress}
    startups = {}
    try:
        for kind in dict.fromkeys(DEPLOYMENT_OF[layout] for layout in ingress):
            layouts = [layout for layout in ingress if DEPLOYMENT_OF[layout] == kind]
            config = ServingConfig(
                app_name="bench",
                models=[
                    ModelDeploymentConfig(
                        name="bench-model",
                        engine=engine_config,
                        max_waiting_seqs=None,
                        stream_tokens_per_chunk=tokens_per_chunk,
                    )
                ],
                port=port,
                grpc_port=None,
                ingress=kind,
                # Serve starts with direct ingress for the whole run when one layout needs it; the
                # proxy's path is the same with it (the proxy runs on the head node only: here, all).
                direct_ingress=direct,
            )
            print(f"deployment {kind}, layouts {layouts}...", flush=True)
            start = time.perf_counter()
            deploy(config)
            startups[kind] = time.perf_counter() - start
            try:
                urls = {layout: f"http://127.0.0.1:{config.port}" for layout in layouts}
                if "direct" in layouts:
                    urls["direct"] = direct_ingress_urls(config)[0]
                for i in range(rounds):
                    for layout in layouts if i % 2 == 0 else layouts[::-1]:
                        print(f"  round {i + 1}/{rounds}: {layout} ({urls[layout]})", flush=True)
                        results[layout].append(asyncio.run(run_http(urls[layout], "bench-model", workloads)))
            finally:
                undeploy(config)
    finally:
        ray.shutdown()
    return results, startups


TABLE_ROWS = [
    ("TTFT p50 (ms)", "ttft_ms", "p50"),
    ("TTFT p99 (ms)", "ttft_ms", "p99"),
    ("TPOT p50 (ms)", "tpot_ms", "p50"),
    ("TPOT p99 (ms)", "tpot_ms", "p99"),
    ("ITL p50 (ms)", "itl_ms", "p50"),
    ("ITL p99 (ms)", "itl_ms", "p99"),
    ("requests/s", "request_throughput_per_s", None),
    ("output tokens/s", "output_token_throughput_per_s", None),
    ("total tokens/s", "total_token_throughput_per_s", None),
]


def serve_over_engine(engine: dict, serve: dict) -> dict[str, float]:
    ratios = {}
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        for sub in ("p50", "p99", "mean"):
            ratios[f"{key}.{sub}"] = serve[key][sub] / engine[key][sub]
    for key in ("request_throughput_per_s", "output_token_throughput_per_s", "total_token_throughput_per_s"):
        ratios[key] = serve[key] / engine[key]
    return ratios


def print_table(rate: float, engine: dict, serves: dict[str, dict], ratios: dict[str, dict]) -> None:
    print(f"\n{rate:g} requests/s offered (ratio: serve/engine)")
    header = f"{'metric':<18}{'engine':>10}"
    for layout in serves:
        header += f"{'serve ' + layout:>22}{'ratio':>8}"
    print(header)
    for label, key, sub in TABLE_ROWS:
        line = f"{label:<18}{engine[key][sub] if sub else engine[key]:>10.2f}"
        for layout, serve in serves.items():
            value = serve[key][sub] if sub else serve[key]
            line += f"{value:>22.2f}{ratios[layout][f'{key}.{sub}' if sub else key]:>8.2f}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random model)")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[8.0],
        help="Poisson arrivals per second (inf: all at once); several give one load each, in order",
    )
    parser.add_argument("--prompt-len", type=int, default=64, help="mean prompt length in tokens")
    parser.add_argument("--output-len", type=int, default=32, help="mean output length in tokens")
    parser.add_argument("--length-dist", choices=["fixed", "uniform", "lognormal"], default="lognormal")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="share of the GPU each engine may take (the in-process one and the replica share one GPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the engine, in-process and in the replica"
    )
    parser.add_argument(
        "--ingress",
        nargs="+",
        choices=list(DEPLOYMENT_OF),
        default=["separate", "with_model"],
        help="ingress layouts of the Serve application to measure, each against the same engine runs "
        "(direct: the with_model replica on its own port, Serve's direct ingress; no proxy)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of every load per layout and on the engine, alternating; figures pool their requests",
    )
    parser.add_argument(
        "--tokens-per-chunk",
        type=int,
        default=ModelDeploymentConfig.model_fields["stream_tokens_per_chunk"].default,
        help="stream_tokens_per_chunk of the served model (1: a chunk per engine step)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results", "bench_serving.json")
    )
    args = parser.parse_args()

    model_dir = args.model or make_tiny_model(tempfile.mkdtemp(prefix="bench-serving-"))
    memory = (
        {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}
    )
    engine_config = EngineConfig(
        model=model_dir,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        **memory,
    )
    from raylane.models import ModelConfig

    vocab_size = ModelConfig.from_pretrained(model_dir).vocab_size
    workloads = [make_workload(args, vocab_size, rate) for rate in args.request_rate]
    torch.set_num_threads(args.threads)
    # Serve first: its replica's process, and so its GPU memory, is gone when Ray shuts down, while
    # an engine in this process could keep its share of the GPU and starve the replica.
    print(f"{args.num_requests} requests at each of {args.request_rate}/s; through Ray Serve...", flush=True)
    serve_runs, startups = run_serve(
        engine_config, workloads, args.threads, args.ingress, args.tokens_per_chunk, args.rounds
    )
    print("same loads on the engine in-process...", flush=True)
    engine_runs = asyncio.run(run_engine(engine_config, workloads, args.rounds))

    runs = []
    for i, (rate, workload) in enumerate(zip(args.request_rate, workloads, strict=True)):
        engine = pooled([rounds[i] for rounds in engine_runs], workload)
        serves = {
            layout: pooled([rounds[i] for rounds in serve_runs[layout]], workload) for layout in args.ingress
        }
        ratios = {layout: serve_over_engine(engine, serve) for layout, serve in serves.items()}
        print_table(rate, engine, serves, ratios)
        runs.append(
            {
                "request_rate_per_s": rate,
                "engine": engine,
                "serve": serves,
                "serve_over_engine": ratios,
                "ttft_p50_ms_per_round": {
                    name: [pooled([r[i]], workload)["ttft_ms"]["p50"] for r in rounds]
                    for name, rounds in {"engine": engine_runs, **serve_runs}.items()
                },
            }
        )

    result = {
        "model": args.model or "tiny (random)",
        "device": args.device,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "workload": {
            "num_requests": args.num_requests,
            "request_rates_per_s": args.request_rate,
            "prompt_len_mean": args.prompt_len,
            "output_len_mean": args.output_len,
            "length_dist": args.length_dist,
            "seed": args.seed,
            "rounds": args.rounds,
        },
        "ingress": args.ingress,
        "stream_tokens_per_chunk": args.tokens_per_chunk,
        "serve_startup_s": startups,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
