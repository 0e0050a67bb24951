"""Cost of checkpointing every step: the RL job's step time with no checkpoint, a synchronous one, an
asynchronous one (snapshot to host memory, persist in the background) and a lazy one (the snapshot
overlaps the next step, committed to a memory tier on tmpfs, copied to disk as fast as the disk
allows, newest first), in one run.

One colocated GRPO job is built once: by default on CPU (two gloo trainer ranks, FSDP2), or the job of
``--config`` (a job YAML with ``key=value`` overrides, e.g. ``examples/grpo_gpu.yaml`` on a GPU). Blocks of steps rotate
between the four modes, so drift of a shared machine hits all alike. A step's time is the loop's:
``rl_step``, the commit of the previous checkpoint (a wait if its persist is still running) and the
checkpoint call (async: the snapshot to host memory; lazy: starting it; sync: the whole write), as in
``RLJob.run``. Before the rounds each mode checkpoints ``--warmup-checkpoints`` steps, timed apart
(``warmup_step_s``): its first saves set up what later ones reuse (lazy mode's first writes its host
buffers with a full ``dcp.save``).
Reported: median step seconds per mode, the overhead in percent of the no-checkpoint step (also
paired: each block against the no-checkpoint block of the same round), and the step's parts: the
``rl_step`` (longer when a background persist shares the cores), the commit wait and the save call,
whose sum is the time the loop is blocked per checkpoint. At the end of an async or lazy block the
loop waits for the last persist (lazy: until the disk has caught up); that wait is reported apart
(``drain_s``) and not counted in the step times. For lazy mode also: how many of the block's
checkpoints reached the disk (the others were skipped for a newer one).

    python benchmarks/bench_checkpoint.py [--rounds 4] [--steps 4] [--hidden 384] [--layers 6]
    python benchmarks/bench_checkpoint.py --config examples/grpo_gpu.yaml --output results/x.json
    python benchmarks/bench_checkpoint.py --modes lazy     # against none only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch

from raylane.config import load_config
from raylane.controllers import JobConfig, RLJob

RESULT = Path(__file__).parent / "results" / "bench_checkpoint.json"
MODES = ("none", "sync", "async", "lazy")


def job_config(args: argparse.Namespace, output_dir: str) -> JobConfig:
    if args.config is not None:
        # The job as configured, but no warm-start, no end and no eval: only steps and checkpoints.
        forced = [f"output_dir={output_dir}", "steps=1000000", "checkpoint_keep_last=2", "sft.steps=0"]
        return load_config(JobConfig, args.config, [*args.set, *forced])
    return JobConfig.model_validate(
        {
            "output_dir": output_dir,
            "steps": 10**6,
            "checkpoint_keep_last": 2,
            "prompts_per_step": args.prompts,
            # Prompts of one length: the two rollout ranks' shards then concatenate (add2's do not always).
            "task": {"name": "reverse", "n_train": 512, "n_eval": 8},
            "rollout": {"n": 2, "max_tokens": 8},
            "actor": {"micro_batch_size": 8, "optim": {"lr": 1e-4}},
            "placement": {"trainer_ranks": 2, "cpus_per_bundle": 0.5},
            "sft": {"steps": 0},
            "model": {
                "tiny_shape": {
                    "hidden_size": args.hidden,
                    "intermediate_size": 4 * args.hidden,
                    "num_hidden_layers": args.layers,
                    "num_attention_heads": 8,
                    "num_key_value_heads": 4,
                    "max_position_embeddings": 128,
                }
            },
        }
    )


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


PARTS = ("step_s", "rl_step_s", "commit_wait_s", "save_call_s")


def run_block(job: RLJob, mode: str, first_step: int, steps: int) -> tuple[dict[str, list[float]], float]:
    """``steps`` loop iterations in ``mode``: per iteration its seconds, their parts (``PARTS``) and the
    RL step's own phases (``timing/<phase>_s``, to see which one a checkpoint slows); then the seconds
    the last persist (lazy: the disk tier) takes to drain."""
    if mode != "none":
        job.config = job.config.model_copy(update={"checkpoint_mode": mode})
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    for step in range(first_step, first_step + steps):
        start = time.perf_counter()
        phases = job.rl_step(step)
        trained = time.perf_counter()
        job.wait_for_checkpoint()
        committed = time.perf_counter()
        if mode != "none":
            job.checkpoint(step + 1)
        end = time.perf_counter()
        for part, seconds in zip(PARTS, (end - start, trained - start, committed - trained, end - committed)):
            times[part].append(seconds)
        for name, seconds in phases.items():
            if name.startswith("timing/") and name != "timing/step_s":
                times.setdefault(name, []).append(seconds)
    drain_start = time.perf_counter()
    job.drain_checkpoints()
    return times, time.perf_counter() - drain_start


def mean_overhead_ci(
    base: list[float], steps: list[float], resamples: int = 4000
) -> tuple[float, float, float]:
    """Overhead of the mean step over the base's, in percent, with a 95 % bootstrap interval
    (steps resampled within each mode): a step's time varies with its rollouts' lengths far more
    than a checkpoint adds, so one number without its interval says little."""
    rng = random.Random(0)
    ratios = sorted(
        statistics.fmean(rng.choices(steps, k=len(steps))) / statistics.fmean(rng.choices(base, k=len(base)))
        for _ in range(resamples)
    )
    point = statistics.fmean(steps) / statistics.fmean(base)
    return (
        100 * (point - 1),
        100 * (ratios[int(0.025 * resamples)] - 1),
        100 * (ratios[int(0.975 * resamples)] - 1),
    )


def pool(paths: list[Path]) -> None:
    """Pool the step times of several result files of one configuration and print each mode's mean
    overhead with its 95 % interval."""
    results = [json.loads(path.read_text()) for path in paths]
    keys = {(r["config"], tuple(r["overrides"]), json.dumps(r["model"])) for r in results}
    if len(keys) > 1:
        raise SystemExit(f"these results measured different jobs ({sorted(keys)}); pool one job's runs only")
    modes = [mode for mode in results[0]["modes"] if all(mode in r["modes"] for r in results)]
    steps = {mode: [t for r in results for t in r["modes"][mode]["times"]["step_s"]] for mode in modes}
    print(f"{len(results)} runs pooled; per mode: steps, mean step s, overhead of the mean % [95 % interval]")
    for mode in modes:
        overhead, low, high = mean_overhead_ci(steps["none"], steps[mode])
        print(
            f"{mode:<7}{len(steps[mode]):>5}{statistics.fmean(steps[mode]):>8.3f}"
            f"{overhead:>+8.1f} [{low:+.1f}, {high:+.1f}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of one block per mode, rotated")
    parser.add_argument("--steps", type=int, default=4, help="steps per block")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--config", help="a job YAML to measure instead of the tiny CPU job")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    parser.add_argument(
        "--warmup-checkpoints", type=int, default=3, help="untimed checkpoints per mode before the rounds"
    )
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to measure ('none' always is)"
    )
    parser.add_argument(
        "--pool", nargs="+", type=Path, metavar="RESULT", help="only pool these result files' step times"
    )
    args = parser.parse_args()
    if args.pool:
        pool(args.pool)
        return
    modes = tuple(mode for mode in MODES if mode in args.modes or mode == "none")

    output_dir = tempfile.mkdtemp(prefix="bench_checkpoint_")
    config = job_config(args, output_dir)
    # The tiny CPU job asks for logical CPUs beyond a small machine's; a configured job gets what is there.
    ray.init(num_cpus=3 if args.config is None else None, include_dashboard=False, log_to_driver=False)
    job = RLJob(config)
    job.build_groups()
    try:
        job.rl_step(0)  # warm-up
        if config.freeze_gc_heap:
            job.freeze_heaps()  # as RLJob.run does after its first step
        # Each checkpointing mode's first saves set up what later ones reuse (async: pinned host copies;
        # lazy: its host buffers, the first written by a full dcp.save); timed apart, not in the rounds.
        step, warmup = 1, {}
        for mode in modes[1:] if args.warmup_checkpoints else ():
            warmup[mode] = run_block(job, mode, step, args.warmup_checkpoints)[0]["step_s"]
            step += args.warmup_checkpoints
        times: dict[str, dict[str, list[float]]] = {mode: {part: [] for part in PARTS} for mode in modes}
        drains: dict[str, list[float]] = {"async": [], "lazy": []}
        on_disk: list[int] = []  # per lazy block: its checkpoints that reached the disk
        block_medians: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_index in range(args.rounds):
            # Rotate the order so that no mode always follows another.
            order = modes[round_index % len(modes) :] + modes[: round_index % len(modes)]
            for mode in order:
                skipped = job.persister.skipped if job.persister is not None else 0
                block, drain = run_block(job, mode, step, args.steps)
                if mode == "lazy":
                    on_disk.append(args.steps - (job.persister.skipped - skipped))
                step += args.steps
                for part, seconds in block.items():
                    times[mode].setdefault(part, []).extend(seconds)
                block_medians[mode].append(statistics.median(block["step_s"]))
                if mode in drains:
                    drains[mode].append(drain)
            medians = ", ".join(f"{mode} {block_medians[mode][-1]:.3f} s" for mode in modes)
            print(f"round {round_index + 1}/{args.rounds}: {medians}", flush=True)
        size = checkpoint_bytes(job.checkpoints.latest())
    finally:
        job.metrics.close()
        job.shutdown()
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(job.memory_checkpoints.root, ignore_errors=True)

    base = statistics.median(times["none"]["step_s"])
    result = {
        "benchmark": "bench_checkpoint",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "config": args.config,
        "overrides": args.set,
        "trainer_ranks": config.placement.trainer_ranks,
        "model": config.model.tiny_shape if args.config else {"hidden": args.hidden, "layers": args.layers},
        "checkpoint_mb": size / 2**20,
        "rounds": args.rounds,
        "steps_per_block": args.steps,
        "warmup_step_s": warmup,
        "modes": {},
    }
    print(f"\ncheckpoint of {size / 2**20:.1f} MB (model, AdamW moments, RNG, driver state) every step")
    for mode, seconds in warmup.items():
        print(f"{mode} warm-up checkpoints: " + ", ".join(f"{t:.2f}" for t in seconds) + " s a step")
    print(
        f"{'mode':<7}{'step s':>8}{'overhead %':>12}{'paired % (min..max)':>26}{'mean % [95 %]':>22}"
        f"{'rl_step s':>11}{'commit wait s':>15}{'save call s':>13}"
    )
    for mode in modes:
        steps = times[mode]["step_s"]
        median = statistics.median(steps)
        paired = [100 * (m / b - 1) for m, b in zip(block_medians[mode], block_medians["none"])]
        mean_overhead, low, high = mean_overhead_ci(times["none"]["step_s"], steps)
        entry = {
            "step_s_median": median,
            "step_s_p10": statistics.quantiles(steps, n=10)[0],
            "step_s_p90": statistics.quantiles(steps, n=10)[-1],
            "overhead_pct": 100 * (median / base - 1),
            "paired_overhead_pct_per_round": paired,
            "mean_overhead_pct": mean_overhead,
            "mean_overhead_ci95_pct": [low, high],
            **{f"{part}_median": statistics.median(times[mode][part]) for part in PARTS[1:]},
            "rl_step_phases_s_median": {
                part.removeprefix("timing/"): statistics.median(seconds)
                for part, seconds in times[mode].items()
                if part.startswith("timing/")
            },
            "blocked_s_median": statistics.median(
                wait + call for wait, call in zip(times[mode]["commit_wait_s"], times[mode]["save_call_s"])
            ),
            "times": times[mode],
        }
        if mode in drains:
            entry["drain_s_median"] = statistics.median(drains[mode])
        if mode == "lazy":
            entry["checkpoints_on_disk_per_block"] = on_disk
        result["modes"][mode] = entry
        print(
            f"{mode:<7}{median:>8.3f}{entry['overhead_pct']:>+12.1f}"
            f"{statistics.median(paired):>+12.1f} ({min(paired):+.1f}..{max(paired):+.1f})"
            f"{f'{mean_overhead:+.1f} [{low:+.1f}, {high:+.1f}]':>22}"
            f"{entry['rl_step_s_median']:>11.3f}{entry['commit_wait_s_median']:>15.3f}"
            f"{entry['save_call_s_median']:>13.3f}"
        )
    for mode in modes:
        phases = result["modes"][mode]["rl_step_phases_s_median"]
        print(f"{mode} rl_step phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    synchronous = result["modes"].get("sync")
    for mode in ("async", "lazy"):
        entry = result["modes"].get(mode)
        if entry is None or synchronous is None:
            continue
        print(
            f"{mode} blocks the loop {entry['blocked_s_median']:.3f} s per checkpoint against "
            f"{synchronous['blocked_s_median']:.3f} s synchronous "
            f"({synchronous['blocked_s_median'] / max(entry['blocked_s_median'], 1e-9):.1f}x less); "
            f"its last persist of a block drains in {entry['drain_s_median']:.3f} s"
        )
    if "lazy" in modes:
        print(
            f"lazy: {sum(on_disk)} of {len(on_disk) * args.steps} checkpoints reached the disk during their "
            "block (the others were skipped for a newer one); every one reached the memory tier"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
