"""Overhead of WorkerGroup dispatch against raw Ray calls on the same actors.

Cases (8 ranks, one CPU bundle each):
  one_to_all_noop   a no-op ONE_TO_ALL call, vs ray.get([a.execute.remote(...) for a in actors])
  dp_shard_64mb     DP_SHARD of a 64 MiB Batch, vs manual chunk + one ray.put per shard + call
  dp_shard_64mb_raw_tensor
                    the same 64 MiB as plain torch tensor shards through Ray's default
                    serializer, to show what Batch's raw-buffer pickling saves

The raw baselines call the rank actors' own entry point (``WorkerHost.execute``) directly,
so the ratio isolates what raylane adds on the driver: planning, the failure-aware wait
and collecting.

    python benchmarks/bench_dispatch.py [--iters-noop 300] [--iters-64mb 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch

from raylane.actors import Dispatch, ResourcePool, Worker, WorkerGroup, register
from raylane.batch import Batch

RANKS = 8
BATCH_BYTES = 64 * 1024 * 1024
RESULT = Path(__file__).parent / "results" / "bench_dispatch.json"


class Sink(Worker):
    @register(Dispatch.ONE_TO_ALL)
    def noop(self) -> None:
        return None

    @register(Dispatch.DP_SHARD)
    def consume(self, batch: Batch) -> int:
        return len(batch)

    @register(Dispatch.ONE_TO_ALL)
    def consume_tensor(self, shard: torch.Tensor) -> int:
        return shard.shape[0]


def _stats(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "median_ms": statistics.median(samples) * 1e3,
        "p90_ms": samples[int(0.9 * (len(samples) - 1))] * 1e3,
        "iters": len(samples),
    }


def timed_pair(
    ours: Callable[[], object], raw: Callable[[], object], iters: int, warmup: int = 3
) -> tuple[dict, dict]:
    """Time both callables, alternating them so both see the same machine load and object-store state."""
    for _ in range(warmup):
        ours()
        raw()
    samples: dict[str, list[float]] = {"ours": [], "raw": []}
    for i in range(iters):
        order = [("ours", ours), ("raw", raw)] if i % 2 == 0 else [("raw", raw), ("ours", ours)]
        for name, fn in order:
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return _stats(samples["ours"]), _stats(samples["raw"])


def run(iters_noop: int, iters_64mb: int) -> dict:
    rows = BATCH_BYTES // (4 * 2048)
    batch = Batch({"x": torch.randn(rows, 2048)})
    assert batch.nbytes == BATCH_BYTES
    with (
        ResourcePool([RANKS], num_cpus_per_bundle=0.25, name="bench-pool") as pool,
        WorkerGroup(pool, Sink, name="bench") as group,
    ):
        actors = group.actors

        def raw_noop() -> None:
            ray.get([a.execute.remote("", "noop", True) for a in actors])

        def raw_shard() -> None:
            refs = [ray.put(chunk) for chunk in batch.chunk(RANKS)]
            ray.get([a.execute.remote("", "consume", True, ref) for a, ref in zip(actors, refs)])

        def raw_tensor_shard() -> None:
            refs = [ray.put(chunk) for chunk in batch["x"].chunk(RANKS)]
            ray.get([a.execute.remote("", "consume_tensor", True, ref) for a, ref in zip(actors, refs)])

        assert group.consume(batch) == [rows // RANKS] * RANKS
        cases = {
            "one_to_all_noop": timed_pair(group.noop, raw_noop, iters_noop),
            "dp_shard_64mb": timed_pair(lambda: group.consume(batch), raw_shard, iters_64mb),
            "dp_shard_64mb_raw_tensor": timed_pair(
                lambda: group.consume(batch), raw_tensor_shard, iters_64mb // 3
            ),
        }
    return {
        name: {"raylane": ours, "raw_ray": raw, "ratio": ours["median_ms"] / raw["median_ms"]}
        for name, (ours, raw) in cases.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters-noop", type=int, default=300)
    parser.add_argument("--iters-64mb", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    ray.init(num_cpus=RANKS, include_dashboard=False, log_to_driver=False)
    try:
        cases = run(args.iters_noop, args.iters_64mb)
    finally:
        ray.shutdown()

    print(f"{'case':<26} {'raylane ms':>11} {'raw ray ms':>11} {'ratio':>7}")
    for name, case in cases.items():
        print(
            f"{name:<26} {case['raylane']['median_ms']:>11.2f} {case['raw_ray']['median_ms']:>11.2f} {case['ratio']:>7.2f}"
        )
    report = {
        "benchmark": "bench_dispatch",
        "ranks": RANKS,
        "batch_bytes": BATCH_BYTES,
        "statistic": "median wall time per call, the two sides timed alternately; ratio = raylane / raw ray",
        "cases": cases,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "load_average_1m": os.getloadavg()[0],
        },
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
