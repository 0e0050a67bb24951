"""What Ray Train costs: SFT tokens/s through ``raylane sft`` (a TorchTrainer job) against the RL
actor's own SFT step (``PolicyTrainer.sft_step`` on a raylane WorkerGroup), same model, same batches.

Both train the same tiny decoder with FSDP2 on the same number of CPU ranks, on batches of the
reverse toy task's SFT rows, ``--batch-size`` rows per optimizer step in micro-batches of
``--micro-batch-size``. Two figures per path:

  step     tokens / seconds of the training steps only (the first ``--warmup`` steps left out):
           Ray Train's is timed inside the worker, the actor's on the driver around each call
  wall     all tokens / wall seconds from the start of the job (or of the worker group) to its
           end: start-up, Ray Train's reports and checkpoints, the actor's dispatch of each batch

    python benchmarks/bench_sft.py [--workers 1] [--steps 40]

Prints a table and writes ``benchmarks/results/bench_sft.json``; ratios are Ray Train / actor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch

from raylane.actors import ResourcePool, Role, WorkerGroup
from raylane.config import load_config
from raylane.controllers import JobConfig, RLJob
from raylane.rlhf import PromptLoader
from raylane.roles import PolicyTrainer
from raylane.supervised import SFTJobConfig, run_sft

RESULT = Path(__file__).parent / "results" / "bench_sft.json"
SHAPE = (
    "model.tiny_shape={hidden_size: 128, intermediate_size: 512, num_hidden_layers: 4, "
    "num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 64}"
)


def ray_train(args, out: str) -> dict[str, float]:
    config = load_config(
        SFTJobConfig,
        None,
        [
            SHAPE,
            f"output_dir={out}/ray_train",
            f"steps={args.steps}",
            f"batch_size={args.batch_size}",
            f"micro_batch_size={args.micro_batch_size}",
            f"ray.num_workers={args.workers}",
            "eval_every=0",
            "checkpoint_every=0",
            "eval_examples=1",
        ],
    )
    start = time.perf_counter()
    history = run_sft(config)
    wall = time.perf_counter() - start
    steps = [r for r in history if "throughput/train_tokens" in r]
    timed = steps[args.warmup :]
    return {
        "step_tokens_per_s": sum(r["throughput/train_tokens"] for r in timed)
        / sum(r["timing/step_s"] for r in timed),
        "wall_tokens_per_s": sum(r["throughput/train_tokens"] for r in steps) / wall,
        "wall_s": wall,
    }


def rl_actor(args, out: str) -> dict[str, float]:
    job_config = load_config(
        JobConfig,
        None,
        [SHAPE, f"output_dir={out}/rl_actor", f"actor.micro_batch_size={args.micro_batch_size}"],
    )
    job = RLJob(job_config)  # the RL job's model, SFT rows and batch layout, without its other roles
    loader = PromptLoader(job.sft_data, args.batch_size, seed=0)
    start = time.perf_counter()
    pool = ResourcePool([args.workers], name="bench_sft")
    actor_config = job_config.actor.model_copy(update={"model": job.model_dir})
    group = WorkerGroup(pool, {"actor": Role(PolicyTrainer, (actor_config,))}, name="bench_sft")
    try:
        tokens, seconds = [], []
        for _ in range(args.steps):
            batch = job._sft_batch(loader.next_batch())
            batch.meta["lr"] = 3e-3
            step_start = time.perf_counter()
            group.actor.sft_step(batch)
            seconds.append(time.perf_counter() - step_start)
            tokens.append(float(batch["attention_mask"].sum()))
        wall = time.perf_counter() - start
    finally:
        group.shutdown()
        pool.release()
    return {
        "step_tokens_per_s": sum(tokens[args.warmup :]) / sum(seconds[args.warmup :]),
        "wall_tokens_per_s": sum(tokens) / wall,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as out:
        results = {"ray_train": ray_train(args, out), "rl_actor": rl_actor(args, out)}
    ray.shutdown()
    ratios = {
        f"{key}_ratio": results["ray_train"][key] / results["rl_actor"][key]
        for key in ("step_tokens_per_s", "wall_tokens_per_s")
    }
    print(f"SFT, {args.workers} CPU worker(s), {args.steps} steps of {args.batch_size} rows")
    print(f"{'path':<12}{'step tok/s':>12}{'wall tok/s':>12}{'wall s':>9}")
    for name, row in results.items():
        print(
            f"{name:<12}{row['step_tokens_per_s']:>12.0f}{row['wall_tokens_per_s']:>12.0f}{row['wall_s']:>9.1f}"
        )
    print(
        f"{'ratio':<12}{ratios['step_tokens_per_s_ratio']:>12.2f}{ratios['wall_tokens_per_s_ratio']:>12.2f}"
    )
    report = {
        "benchmark": "bench_sft",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "ratios_ray_train_over_rl_actor": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
