"""Where the in-job rollout loses to the standalone runner: the same job run with a few CPU shares per
bundle, against the standalone runner in the driver's process with all its threads and with one.

Ray starts each actor with ``OMP_NUM_THREADS`` set to its CPU share (1 for a fractional share), so
the engine's host-side torch work (batch assembly, sampling bookkeeping, the trajectory tensors)
runs on one intra-op thread in the job, while the standalone runner of ``bench_rl_gpu.py`` has the
whole machine. Each job run is short (``--steps``, a brief warm-start); its rollout tokens/s is the
median over the steps after the first. The standalone runs use the last job's final model and the
job's rollout batch. The job's ``rollout/engine_busy_fraction`` splits its generate phase into time
in engine steps and the rest (dispatch, tokenizing, building the batch). Prints a table, writes
``benchmarks/results/bench_rollout_in_job.json``.

    python benchmarks/bench_rollout_in_job.py --cpus 1 8          # on the GPU machine
    python benchmarks/bench_rollout_in_job.py --config examples/grpo_reverse.yaml --cpus 1 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from bench_rl_gpu import _job, _median, _standalone_rollout  # this script's folder is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="examples/grpo_gpu.yaml")
    parser.add_argument(
        "--cpus", type=float, nargs="+", default=[1.0, 8.0], help="placement.cpus_per_bundle values"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--run-dir", default="outputs/bench-rollout-in-job")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)

    in_job, job = {}, None
    for cpus in args.cpus:
        overrides = [
            f"output_dir={os.path.join(args.run_dir, f'cpus{cpus:g}')}",
            f"placement.cpus_per_bundle={cpus}",
            f"steps={args.steps}",
            f"sft.steps={args.sft_steps}",
            "eval_every=0",
            "checkpoint_every=0",
            *args.set,
        ]
        job, history = _job(args.config, overrides)
        busy = _median(history, "rollout/engine_busy_fraction")
        in_job[f"{cpus:g}"] = {
            "tokens_per_s": _median(history, "throughput/tokens_per_s"),
            "generate_s": _median(history, "timing/generate_s"),
            "engine_busy_fraction": busy,
            "engine_tokens_per_s": _median(history, "throughput/tokens_per_s") / max(busy, 1e-9),
        }
    model_dir = os.path.join(job.output_dir, "final_model")
    threads = torch.get_num_threads()
    standalone = {str(threads): _standalone_rollout(job, model_dir)}
    torch.set_num_threads(1)
    standalone["1"] = _standalone_rollout(job, model_dir)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    reference = standalone[str(threads)]["tokens_per_s"]
    result = {
        "device": device,
        "command": " ".join(sys.argv),
        "config": args.config,
        "rollout_batch": {
            "prompts": job.prompts_per_step,
            "n": job.rollout.n,
            "max_tokens": job.rollout.max_tokens,
        },
        "in_job_by_cpus_per_bundle": in_job,
        "standalone_by_threads": standalone,
        "reference": f"standalone, {threads} threads",
    }
    with open(os.path.join(args.output, "bench_rollout_in_job.json"), "w") as f:
        json.dump(result, f, indent=2)

    print(
        f"\n{device}: {job.prompts_per_step} prompts x {job.rollout.n}, at most {job.rollout.max_tokens} tokens"
    )
    print(f"{'run':<36}{'tok/s':>10}{'vs standalone':>15}{'in engine steps':>17}")
    for cpus, row in in_job.items():
        ratio = row["tokens_per_s"] / reference
        busy = row["engine_busy_fraction"]
        print(
            f"{f'in job, cpus_per_bundle={cpus}':<36}{row['tokens_per_s']:>10,.0f}{ratio:>14.2f}x{busy:>16.0%}"
        )
        engine_rate = row["engine_tokens_per_s"]
        print(
            f"{'  the same, within engine steps':<36}{engine_rate:>10,.0f}{engine_rate / reference:>14.2f}x"
        )
    for n, row in standalone.items():
        ratio = row["tokens_per_s"] / reference
        print(f"{f'standalone, {n} thread(s)':<36}{row['tokens_per_s']:>10,.0f}{ratio:>14.2f}x")


if __name__ == "__main__":
    main()
