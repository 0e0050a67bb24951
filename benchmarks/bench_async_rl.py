"""Streaming asynchronous RL against the synchronous loop, on the long-tail toy task ``repeat``.

Disaggregated placement: one trainer rank and one rollout rank, each an actor with one CPU thread.
The policy is first warm-started once (SFT, so answer lengths are heavy-tailed: most stop after a
few letters, a few run ~10x longer); every mode then starts from that same checkpoint and trains the
same number of samples (``--steps`` x ``--prompts`` x ``--samples``). Modes:

- ``sync``: generate a batch, train on it, sync the weights (the engine idles while training);
- ``one_step_off``: max_staleness 1 with ``keep``: the next batch generates while this one trains;
- ``async_eta{1,2,4}``: max_staleness η with ``abort_resume`` partial rollouts;
- ``april``: ``async_eta1`` plus APRIL's over-provisioning (oversample 1: one extra batch in
  flight, so the bound becomes 2); ``async_eta1`` is APRIL off.

Per mode, over the RL steps after ``--warmup-steps`` (the first steps pay one-time costs): trained
samples/s over those steps' wall time, the engine's busy fraction, rollout tokens per second of
engine time and of wall time, held-out exact match after the last step (greedy, ``--eval`` prompts,
with its binomial standard error) and the ratios to ``sync`` (APRIL to ``async_eta1``).
With several ``--seeds`` every mode runs once per seed (each seed its own warm-start) and the
summary gives each ratio and the held-out reward as mean and range over the seeds: one run's
reward varies far more from seed to seed than its binomial error says.
Prints a table per seed, writes JSON and a PNG of train reward against wall time (first seed)
under ``benchmarks/results/``.

    python benchmarks/bench_async_rl.py                    # all modes, ~7 minutes on 2 cores
    python benchmarks/bench_async_rl.py --max-num-seqs 4 --steps 120 --warmup-steps 4 \
        --micro-batch-size 16 --group-by-length --seeds 0 1 2 --tag cpu_grouped_seeds   # ~20 minutes
    python benchmarks/bench_async_rl.py --modes sync async_eta2 --steps 6 --sft-steps 20 --eval 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import ray

from raylane.controllers import AsyncRLJob, JobConfig, RLJob

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

MODES = {
    "sync": None,
    "one_step_off": {"max_staleness": 1, "partial_rollout": "keep"},
    "async_eta1": {"max_staleness": 1},
    "async_eta2": {"max_staleness": 2},
    "async_eta4": {"max_staleness": 4},
    "april": {"max_staleness": 1, "oversample": 1.0},
}


def job_config(
    args, seed: int, output_dir: str, model_path: str | None, steps: int, async_rl: dict | None
) -> JobConfig:
    """A mode's job: from ``model_path`` (already warm-started), or the warm-start itself (None)."""
    return JobConfig.model_validate(
        {
            "output_dir": output_dir,
            "seed": seed,
            "model": {"path": model_path} if model_path else {},
            "task": {"name": "repeat", "n_train": 1200, "n_eval": args.eval},
            "sft": {"steps": 0 if model_path else args.sft_steps, "batch_size": 64, "lr": 3e-3},
            "rollout": {"n": args.samples, "max_tokens": 42, "engine": {"max_num_seqs": args.max_num_seqs}},
            "actor": {
                "micro_batch_size": args.micro_batch_size,
                "group_by_length": args.group_by_length,
                "recompute_log_probs": args.recompute_log_probs,
                "optim": {"lr": args.lr},
                "loss": {"off_policy_correction": "none" if async_rl is None else "decoupled"},
            },
            "placement": {
                "mode": "disaggregated",
                "trainer_ranks": 1,
                "rollout_ranks": 1,
                "cpus_per_bundle": 1,
            },
            "steps": steps,
            "prompts_per_step": args.prompts,
            "eval_every": 0,
            "eval_prompts": args.eval,
            "freeze_gc_heap": args.freeze_gc_heap,
            "async_rl": None if async_rl is None else {**engine_calls(args), **async_rl},
        }
    )


def engine_calls(args) -> dict:
    return {} if args.engine_steps_per_call is None else {"engine_steps_per_call": args.engine_steps_per_call}


def warm_start(args, seed: int, out: str) -> str:
    """SFT once (a job of 0 RL steps exports the warm-started policy), shared by every mode."""
    config = job_config(args, seed, os.path.join(out, "warm_start"), None, 0, None)
    RLJob(config).run()
    return os.path.join(config.output_dir, "final_model")


def summarise(history: list[dict], config: JobConfig, warmup_steps: int) -> dict:
    every_step = [r for r in history[1:] if "timing/step_s" in r]
    steps = every_step[warmup_steps:]
    rows = config.prompts_per_step * config.rollout.n
    wall = sum(r["timing/step_s"] for r in steps)
    tokens = sum(r["response_length"] * rows for r in steps)
    if config.async_rl is None:
        engine_s = sum(r["timing/generate_s"] for r in steps)
    else:
        engine_s = sum(r["rollout/engine_busy_fraction"] * r["timing/step_s"] for r in steps)
    held_out = history[-1]["eval_reward_mean"]
    curve, elapsed = [], 0.0
    for r in every_step:
        elapsed += r["timing/step_s"]
        curve.append((elapsed, r["reward_mean"]))
    return {
        "trained_samples": rows * len(steps),
        "wall_s": wall,
        "samples_per_s": rows * len(steps) / wall,
        "engine_busy_fraction": engine_s / wall,
        "rollout_tokens_per_engine_s": tokens / max(engine_s, 1e-9),
        "rollout_tokens_per_s": tokens / wall,
        "held_out_reward": held_out,
        "held_out_stderr": math.sqrt(held_out * (1 - held_out) / config.eval_prompts),
        "max_staleness_seen": max((r.get("rollout/staleness_max", 0.0) for r in steps), default=0.0),
        "reward_vs_wall": curve,
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, summary in results.items():
        wall, reward = zip(*summary["reward_vs_wall"])
        line = ax.plot(wall, reward, label=f"{mode} (held-out {summary['held_out_reward']:.2f})", alpha=0.8)
        ax.plot([wall[-1]], [summary["held_out_reward"]], "o", color=line[0].get_color())
    ax.set_xlabel("wall time of the RL steps (s)")
    ax.set_ylabel("train reward (dots: held-out after the last step)")
    ax.set_title("GRPO on the long-tail task repeat: sync vs streaming async")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the rates")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (groups) per batch")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=16,
        help="the engine's batch of sequences; fewer make generation a larger share of a step (here "
        "16: ~25%%, 4: ~40%% of a synchronous step; 70-90%% on GPUs)",
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=64, help="the trainer's rows per forward/backward"
    )
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="the trainer's micro-batches grouped by response length, each cut to its longest (actor.group_by_length)",
    )
    parser.add_argument(
        "--engine-steps-per-call",
        type=int,
        help="async modes: engine steps per rollout call (default: async_rl.engine_steps_per_call's)",
    )
    parser.add_argument(
        "--recompute-log-probs",
        choices=["auto", "always"],
        default="auto",
        help="actor.recompute_log_probs: 'always' adds the trainer's separate old-log-prob pass",
    )
    parser.add_argument(
        "--no-freeze-gc-heap",
        dest="freeze_gc_heap",
        action="store_false",
        help="leave the processes' heaps unfrozen after the first step (freeze_gc_heap: false)",
    )
    parser.add_argument("--lr", type=float, default=6e-4, help="the RL learning rate, every mode")
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--eval", type=int, default=200, help="held-out prompts")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one warm-start and run of every mode per seed"
    )
    parser.add_argument("--out", default="/tmp/raylane-bench-async-rl")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)

    # One thread per actor: the trainer and the rollout engine each get one core.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    started = time.perf_counter()
    by_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    summary = summarise_seeds(by_seed) if len(by_seed) > 1 else None
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"bench_async_rl_{args.tag}")
    plot(by_seed[args.seeds[0]], stem + ".png")
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "config": vars(args),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "total_s": time.perf_counter() - started,
                "seeds": by_seed,
                "summary": summary,
            },
            f,
            indent=1,
        )
    print(f"wrote {stem}.json and {stem}.png")
    return 0


def run_seed(args, seed: int) -> dict:
    """Every mode from one warm-start of ``seed``; prints the table and returns each mode's summary."""
    out = os.path.join(args.out, f"seed{seed}")
    model = warm_start(args, seed, out)
    results = {}
    for mode in args.modes:
        config = job_config(args, seed, os.path.join(out, mode), model, args.steps, MODES[mode])
        history = (RLJob if config.async_rl is None else AsyncRLJob)(config).run()
        results[mode] = summarise(history, config, args.warmup_steps)
        print(f"seed {seed}, {mode}: {results[mode]['samples_per_s']:.1f} samples/s", file=sys.stderr)

    base = results.get("sync")
    print(
        f"\nseed {seed}\n{'mode':<14}{'samples/s':>10}{'x sync':>8}{'engine busy':>13}{'tok/engine-s':>14}"
        f"{'tok/s':>8}{'held-out':>10}{'+-':>6}{'max stale':>10}"
    )
    for mode, s in results.items():
        if base:
            s["speedup_vs_sync"] = s["samples_per_s"] / base["samples_per_s"]
        ratio = f"{s['speedup_vs_sync']:.2f}" if base else "-"
        print(
            f"{mode:<14}{s['samples_per_s']:>10.1f}{ratio:>8}{s['engine_busy_fraction']:>13.2f}"
            f"{s['rollout_tokens_per_engine_s']:>14.0f}{s['rollout_tokens_per_s']:>8.0f}"
            f"{s['held_out_reward']:>10.3f}{s['held_out_stderr']:>6.3f}{s['max_staleness_seen']:>10.0f}"
        )
    if "april" in results and "async_eta1" in results:
        april, off = results["april"], results["async_eta1"]
        april["rollout_throughput_vs_april_off"] = (
            april["rollout_tokens_per_engine_s"] / off["rollout_tokens_per_engine_s"]
        )
        april["rollout_tokens_per_s_vs_april_off"] = (
            april["rollout_tokens_per_s"] / off["rollout_tokens_per_s"]
        )
        print(
            f"APRIL rollout throughput vs async_eta1: {april['rollout_throughput_vs_april_off']:.2f}x per "
            f"engine second, {april['rollout_tokens_per_s_vs_april_off']:.2f}x per wall second"
        )
    return results


def summarise_seeds(by_seed: dict) -> dict:
    """Per mode over the seeds: mean, min and max of the speed-up over sync, of the rollout tokens per
    second and of the held-out reward (whose spread over seeds is the noise a mode is judged by)."""
    keys = ("speedup_vs_sync", "rollout_tokens_per_s", "held_out_reward", "rollout_tokens_per_s_vs_april_off")
    summary = {}
    print(f"\nover seeds {list(by_seed)}: mean (min..max)")
    for mode in next(iter(by_seed.values())):
        rows = [results[mode] for results in by_seed.values()]
        summary[mode] = {
            key: {
                "mean": statistics.fmean(r[key] for r in rows),
                "min": min(r[key] for r in rows),
                "max": max(r[key] for r in rows),
            }
            for key in keys
            if all(key in r for r in rows)
        }
        print(
            f"{mode:<14}"
            + "  ".join(
                f"{key} {v['mean']:.3f} ({v['min']:.3f}..{v['max']:.3f})" for key, v in summary[mode].items()
            )
        )
    return summary


if __name__ == "__main__":
    sys.exit(main())
