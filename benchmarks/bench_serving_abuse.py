"""Normal traffic under abuse: does a stream of bad requests hurt the good ones?

A raylane Serve application (API key, HTTP and gRPC) receives the same steady stream of normal
completion requests, alternating HTTP and gRPC, in interleaved rounds: alone (the reference) and
while a bounded stream of bad requests hits both protocols at the same time: oversized prompts (5 MB),
out-of-range values (seed and top_k past int64, NaN temperature, n of 20,000, 10,000 stop strings),
fan-out (128 prompts x n=128), a missing API key and non-JSON bodies. It reports the normal
requests' success rate and p50/p99 latency, pooled over the rounds, and their ratio (goal: 100 % success and
p99 within 1.5x), the status codes the bad requests got (all must be 4xx), and the resident memory
of the ingress and model replicas before and after the abuse. Prints a table and writes JSON
under ``benchmarks/results/``:

    python benchmarks/bench_serving_abuse.py                    # tiny model, ~2 min on 2 cores
    python benchmarks/bench_serving_abuse.py --duration-s 60 --normal-rate 8 --bad-rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import grpc

from raylane.models import make_tiny_model
from raylane.runner import EngineConfig
from raylane.serving.client import LLMClient
from raylane.serving.proto import llm_pb2_grpc

API_KEY_ENV = "RAYLANE_BENCH_ABUSE_KEY"
API_KEY = "bench-abuse-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_METADATA = (("authorization", f"Bearer {API_KEY}"),)
HUGE_PROMPT = "word " * (2**20)  # 5 MiB


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    status: str


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Target:
    """The application's HTTP and gRPC addresses, with one client session for each."""

    def __init__(self, http_url: str, grpc_target: str, app: str) -> None:
        self.http_url = http_url
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = llm_pb2_grpc.LLMServiceStub(self.channel)
        self.grpc_metadata = (("application", app),)

    async def http(self, body: bytes, headers: dict) -> str:
        async with self.session.post(
            f"{self.http_url}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as response:
            payload = await response.read()
            if response.status == 200 and not json.loads(payload)["choices"]:
                return "200-empty"
            return str(response.status)

    async def grpc(self, request, metadata: tuple = GRPC_METADATA) -> str:
        try:
            response = await self.stub.Generate(request, metadata=self.grpc_metadata + metadata, timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK" if response.completions else "OK-empty"

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()


async def normal_request(target: Target, index: int, max_tokens: int) -> Outcome:
    prompt = f"steady request {index}: tell me something"
    start = time.perf_counter()
    if index % 2 == 0:
        body = {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "seed": index,
        }
        status = await target.http(json.dumps(body).encode(), AUTH)
        ok = status == "200"
    else:
        request = LLMClient.request(prompt, model="bench", max_tokens=max_tokens, ignore_eos=True, seed=index)
        status = await target.grpc(request)
        ok = status == "OK"
    return Outcome(ok, time.perf_counter() - start, status)


def bad_requests(target: Target) -> list[tuple[str, object]]:
    """(kind, coroutine factory) of every bad request the abuse run cycles through."""

    def http(fields: dict | bytes, headers: dict = AUTH):
        if isinstance(fields, bytes):
            return lambda: target.http(fields, headers)
        body = json.dumps({"model": "bench", "prompt": "hi", **fields}).encode()
        return lambda: target.http(body, headers)

    def rpc(prompt: str = "hi", metadata: tuple = GRPC_METADATA, **sampling):
        return lambda: target.grpc(LLMClient.request(prompt, model="bench", **sampling), metadata)

    return [
        ("http oversized prompt", http({"prompt": HUGE_PROMPT})),
        ("grpc oversized prompt", rpc(HUGE_PROMPT)),
        ("http seed 2^63", http({"seed": 2**63})),
        ("http top_k 2^63", http({"top_k": 2**63})),
        ("http NaN temperature", http(b'{"model": "bench", "prompt": "hi", "temperature": NaN}')),
        ("grpc n=20000", rpc(n=20_000)),
        ("grpc 10,000 stop strings", rpc(stop=["s"] * 10_000)),
        ("http fan-out 128x128", http({"prompt": ["hi"] * 128, "n": 128})),
        ("grpc max_tokens 2^32-1", rpc(max_tokens=2**32 - 1)),
        ("http no API key", http({}, headers={})),
        ("grpc no API key", rpc(metadata=())),
        ("http not JSON", http(b"\xff\xfe{{")),
    ]


async def run_load(target: Target, args: argparse.Namespace, abuse: bool) -> tuple[list[Outcome], Counter]:
    """Normal requests at a steady rate for the duration; with ``abuse``, bad ones at their own rate."""
    start = time.perf_counter()
    num_normal = int(args.duration_s * args.normal_rate)
    bad_codes: Counter = Counter()

    async def normal(i: int) -> Outcome:
        await asyncio.sleep(max(0.0, start + i / args.normal_rate - time.perf_counter()))
        return await normal_request(target, i, args.max_tokens)

    async def bad(i: int, kind: str, make) -> None:
        await asyncio.sleep(max(0.0, start + i / args.bad_rate - time.perf_counter()))
        bad_codes[f"{kind}: {await make()}"] += 1

    tasks = [asyncio.create_task(normal(i)) for i in range(num_normal)]
    if abuse:
        kinds = itertools.cycle(bad_requests(target))
        bad_tasks = [
            asyncio.create_task(bad(i, *next(kinds))) for i in range(int(args.duration_s * args.bad_rate))
        ]
        await asyncio.gather(*bad_tasks)
    return list(await asyncio.gather(*tasks)), bad_codes


def summarize(outcomes: list[Outcome]) -> dict:
    latencies = [o.latency_s * 1e3 for o in outcomes if o.ok]
    return {
        "requests": len(outcomes),
        "success_rate": sum(o.ok for o in outcomes) / len(outcomes),
        "failures": dict(Counter(o.status for o in outcomes if not o.ok)),
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
    }


def replica_rss_mib(app: str) -> dict[str, float]:
    """Resident memory of the application's Serve replicas on this machine, found by process title."""
    title = f"ray::ServeReplica:{app}:"
    rss = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            if not cmdline.startswith(title):
                continue
            with open(f"/proc/{pid}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue  # the process ended meanwhile
        # The title is "ray::ServeReplica:APP:DEPLOYMENT", plus ".method" while a call runs.
        rss[cmdline.removeprefix(title).split("\0")[0].split(".")[0].strip()] = kib / 1024
    return rss


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def measure(http_url: str, grpc_target: str, app: str, args: argparse.Namespace) -> dict:
    target = Target(http_url, grpc_target, app)
    try:
        await normal_request(target, 0, 2)  # warm-up, both protocols
        await normal_request(target, 1, 2)
        rss_before = replica_rss_mib(app)
        # Interleaved rounds, pooled: a shared machine's slow spells hit both conditions alike.
        reference: list[Outcome] = []
        abused: list[Outcome] = []
        bad_codes: Counter = Counter()
        rounds = []
        for _ in range(args.rounds):
            alone, _ = await run_load(target, args, abuse=False)
            under_abuse, codes = await run_load(target, args, abuse=True)
            reference += alone
            abused += under_abuse
            bad_codes += codes
            rounds.append({"reference": summarize(alone), "abused": summarize(under_abuse)})
        await asyncio.sleep(2.0)  # let the allocator return what the bursts took
        rss_after = replica_rss_mib(app)
    finally:
        await target.close()
    return {
        "reference": summarize(reference),
        "abused": summarize(abused),
        "rounds": rounds,
        "bad_requests": dict(sorted(bad_codes.items())),
        "replica_rss_mib": {"before_abuse": rss_before, "after_abuse": rss_after},
    }


def print_table(result: dict) -> None:
    ref, abused = result["reference"], result["abused"]
    print(f"{'normal requests':<22}{'reference':>12}{'under abuse':>14}{'ratio':>8}")
    print(f"{'success rate (%)':<22}{ref['success_rate'] * 100:>12.1f}{abused['success_rate'] * 100:>14.1f}")
    for q in ("p50", "p99"):
        r, a = ref["latency_ms"][q], abused["latency_ms"][q]
        print(f"{f'latency {q} (ms)':<22}{r:>12.1f}{a:>14.1f}{a / r:>8.2f}")
    for name in ("reference", "abused"):
        per_round = ", ".join(f"{r[name]['latency_ms']['p99']:.0f}" for r in result["rounds"])
        print(f"{f'p99 per round, {name}':<34}{per_round}")
    print("\nbad requests (kind: status -> count)")
    for kind, count in result["bad_requests"].items():
        print(f"  {kind:<40}{count:>5}")
    print("\nreplica resident memory (MiB): before -> after the abuse")
    before, after = result["replica_rss_mib"]["before_abuse"], result["replica_rss_mib"]["after_abuse"]
    for name in sorted(before):
        print(f"  {name:<40}{before[name]:>8.0f} -> {after.get(name, float('nan')):.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random model)")
    parser.add_argument("--duration-s", type=float, default=15.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="reference/abused run pairs, interleaved")
    parser.add_argument("--normal-rate", type=float, default=4.0, help="normal requests per second")
    parser.add_argument(
        "--bad-rate", type=float, default=10.0, help="bad requests per second in the abused run"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens each normal request generates")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results", "bench_serving_abuse.json")
    )
    args = parser.parse_args()

    import ray

    from raylane.serving import ModelDeploymentConfig, ServingConfig, deploy, undeploy

    model_dir = args.model or make_tiny_model(tempfile.mkdtemp(prefix="bench-abuse-"))
    engine = EngineConfig(model=model_dir, device=args.device, max_model_len=args.max_model_len)
    os.environ[API_KEY_ENV] = API_KEY
    config = ServingConfig(
        app_name="bench-abuse",
        models=[ModelDeploymentConfig(name="bench", engine=engine)],
        port=free_port(),
        grpc_port=free_port(),
        api_key_env=API_KEY_ENV,
    )
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        deploy(config)
        print(
            f"{args.rounds} rounds of {args.duration_s:.0f} s of {args.normal_rate}/s normal requests, "
            f"alone then with {args.bad_rate}/s bad ones",
            flush=True,
        )
        result = asyncio.run(
            measure(f"http://127.0.0.1:{config.port}", f"127.0.0.1:{config.grpc_port}", config.app_name, args)
        )
    finally:
        undeploy(config)
        ray.shutdown()
    result["p99_ratio"] = result["abused"]["latency_ms"]["p99"] / result["reference"]["latency_ms"]["p99"]
    result["bad_requests_all_4xx"] = all(
        kind.rsplit(": ", 1)[1] in {"400", "401", "413", "INVALID_ARGUMENT", "UNAUTHENTICATED"}
        for kind in result["bad_requests"]
    )
    print_table(result)
    result.update(
        model=args.model or "tiny (random)",
        device=args.device,
        cpus=os.cpu_count(),
        platform=platform.platform(),
        workload={
            k: getattr(args, k)
            for k in ("duration_s", "rounds", "normal_rate", "bad_rate", "max_tokens", "max_model_len")
        },
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"\np99 under abuse / reference: {result['p99_ratio']:.2f}; every bad request got a 4xx: "
        f"{result['bad_requests_all_4xx']}\nwrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
