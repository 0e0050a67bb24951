"""The GPU RL job measured phase by phase: ``examples/grpo_gpu.yaml`` on one GPU, colocated.

Runs the job with per-phase memory probes, then, from its checkpoint, a few more steps with the
runner in fp32 (and, with ``--fp32-trainer``, the trainer too) to measure the train/inference
log-prob gap each way; then the standalone runner on the trained model with the job's rollout batch.
Reports, in a table and ``benchmarks/results/bench_rl_gpu.json``:

- seconds per phase (generate, log-probs, update, sleep / wake / weight sync) and the colocated
  transitions (sleep + wake + sync) as a share of the step;
- rollout tokens/s inside the job (its last five steps) against the standalone runner on the final
  model and the same batch;
- trainer tokens/s and model FLOPs utilisation (6 N per trained token, 2 N per log-prob token,
  against the GPU's dense bf16 peak);
- peak GPU memory per phase;
- the log-prob gap: mean |runner - trainer| and the share of tokens whose ratio leaves [0.9, 1.1];
- the reward curve (metrics and PNG copied next to the JSON).

    python benchmarks/bench_rl_gpu.py [--steps 60] [--gap-steps 4] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import ray
import torch

from raylane.config import load_config
from raylane.controllers import JobConfig
from raylane.controllers.rl import run_job
from raylane.models import ModelConfig
from raylane.rlhf import PromptDataset
from raylane.runner import EngineConfig, LLMEngine, SamplingParams

# Dense bf16 peak by the vendor's datasheet (H100/H200 SXM); the denominator of MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12}


def _job(config: str, overrides: list[str]) -> tuple[JobConfig, list[dict]]:
    job = load_config(JobConfig, config, overrides)
    start = time.perf_counter()
    history = run_job(job)
    print(f"job {job.output_dir}: {time.perf_counter() - start:.0f} s", flush=True)
    ray.shutdown()
    return job, history


def _median(history: list[dict], key: str) -> float | None:
    values = [row[key] for row in history if key in row and row["step"] > 1]  # step 1 warms up
    return statistics.median(values) if values else None


def _param_count(model_dir: str) -> int:
    from raylane.models import CausalLM

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def _standalone_rollout(job: JobConfig, model_dir: str) -> dict:
    """The runner alone on the job's trained model: the job's prompts per step x n, same sampling."""
    engine = LLMEngine(EngineConfig(model=model_dir, **job.rollout.engine.model_dump()))
    prompts = list(PromptDataset.from_jsonl(os.path.join(job.output_dir, "data", "train.jsonl")))
    rates = []
    for repeat in range(3):
        batch = prompts[repeat * job.prompts_per_step : (repeat + 1) * job.prompts_per_step]
        start = time.perf_counter()
        for i, example in enumerate(batch):
            params = SamplingParams(
                n=job.rollout.n,
                temperature=job.rollout.temperature,
                max_tokens=job.rollout.max_tokens,
                seed=i,
                logprobs=True,
            )
            engine.add_request(str(i), prompt=example.prompt, sampling_params=params)
        tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens += sum(len(c.token_ids) for c in out.outputs)
        rates.append(tokens / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates[1:]), "runs": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="examples/grpo_gpu.yaml")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: the config's)")
    parser.add_argument("--gap-steps", type=int, default=4, help="steps of each log-prob gap run")
    parser.add_argument("--fp32-trainer", action="store_true", help="also a gap run with an fp32 trainer")
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--run-dir", default="outputs/bench-rl-gpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    main_dir = os.path.join(args.run_dir, "grpo")
    overrides = [f"output_dir={main_dir}", "profile_memory=true", *args.set]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    job, history = _job(args.config, overrides)
    steps = job.steps
    checkpoint = os.path.join(main_dir, "checkpoints", f"step_{steps}")
    model_dir = os.path.join(main_dir, "initial_model")

    gap_runs = {"runner bf16, trainer bf16 (the job)": history}
    variants = {"runner fp32, trainer bf16": ["rollout.engine.dtype=float32"]}
    if args.fp32_trainer:
        variants["runner fp32, trainer fp32"] = ["rollout.engine.dtype=float32", "actor.dtype=float32"]
    for i, (name, extra) in enumerate(variants.items()):
        _, gap_history = _job(
            args.config,
            [
                f"output_dir={os.path.join(args.run_dir, f'gap{i}')}",
                f"model.path={model_dir}",
                f"resume_from={checkpoint}",
                f"steps={steps + args.gap_steps}",
                "eval_every=0",
                *args.set,
                *extra,
            ],
        )
        gap_runs[name] = [row for row in gap_history if row["step"] > steps]

    standalone = _standalone_rollout(job, os.path.join(main_dir, "final_model"))
    params = _param_count(model_dir)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device), None)

    phases = [
        "generate",
        "sleep",
        "reward",
        "log_probs",
        "advantages",
        "update_actor",
        "wake_up",
        "sync_weights",
    ]
    seconds = {phase: _median(history, f"timing/{phase}_s") for phase in phases}
    step_s = _median(history, "timing/step_s")
    transitions = sum(seconds[p] or 0.0 for p in ("sleep", "wake_up", "sync_weights"))
    train_tokens = _median(history, "throughput/train_tokens")
    update_tokens_per_s = _median(history, "throughput/train_tokens_per_s")
    # The standalone runner runs the final model, whose answers (and so tokens per sequence, which
    # set the rate at 8 tokens at most) differ from the early steps': compare the last steps'.
    final_steps = [row for row in history if row["step"] > steps - 5]
    in_job = _median(final_steps, "throughput/tokens_per_s")
    result = {
        "device": device,
        "command": " ".join(sys.argv),
        "config": args.config,
        "parameters": params,
        "steps": steps,
        "rollout_batch": {"prompts": job.prompts_per_step, "n": job.rollout.n, "max_tokens": job.rollout.max_tokens},
        "phase_seconds_median": seconds,
        "step_seconds_median": step_s,
        "transition_share_of_step": transitions / step_s,
        "rollout_tokens_per_s": {"in_job_last_5_steps": in_job, "in_job_all_steps": _median(history, "throughput/tokens_per_s"),
                                 "engine_busy_fraction": _median(history, "rollout/engine_busy_fraction"),
                                 "standalone": standalone["tokens_per_s"], "ratio": in_job / standalone["tokens_per_s"],
                                 "standalone_runs": standalone["runs"]},
        "trainer": {
            "tokens_per_s_update": update_tokens_per_s,
            # No log_probs phase where the update computes the old log-probs (actor.recompute_log_probs).
            "tokens_per_s_log_probs": train_tokens / seconds["log_probs"] if seconds["log_probs"] else None,
            "mfu_update": 6 * params * update_tokens_per_s / peak if peak else None,
            "mfu_log_probs": 2 * params * train_tokens / seconds["log_probs"] / peak
            if peak and seconds["log_probs"]
            else None,
            "peak_flops": peak,
        },
        "peak_memory_gib": {phase: _median(history, f"memory/{phase}_peak_gib") for phase in phases},
        "log_prob_gap": {
            name: {
                "mean_abs": statistics.mean(r["rollout/log_prob_gap"] for r in rows if "rollout/log_prob_gap" in r),
                "ratio_outside_10pct": statistics.mean(
                    r["rollout/ratio_outside_10pct"] for r in rows if "rollout/ratio_outside_10pct" in r
                ),
            }
            for name, rows in gap_runs.items()
        },
        "eval_reward": [(r["step"], r["eval_reward_mean"]) for r in history if "eval_reward_mean" in r],
    }  # fmt: skip
    curve_dir = os.path.join(args.output, "grpo_gpu")
    os.makedirs(curve_dir, exist_ok=True)
    for name in ("metrics.jsonl", "reward_curve.png"):
        shutil.copy(os.path.join(main_dir, name), os.path.join(curve_dir, name))
    with open(os.path.join(args.output, "bench_rl_gpu.json"), "w") as f:
        json.dump(result, f, indent=2)

    print(f"\n{device}, {params / 1e6:.0f} M parameters, {steps} steps, median step {step_s:.2f} s")
    print(f"{'phase':<14}{'seconds':>9}{'share':>8}{'peak GiB':>10}")
    for phase in phases:
        if seconds[phase] is not None:
            mem = result["peak_memory_gib"][phase]
            print(f"{phase:<14}{seconds[phase]:>9.3f}{seconds[phase] / step_s:>8.1%}{mem or 0:>10.1f}")
    print(f"transitions (sleep + wake + sync): {result['transition_share_of_step']:.1%} of the step")
    rollout = result["rollout_tokens_per_s"]
    print(
        f"rollout tok/s in job (last 5 steps) {in_job:,.0f} vs standalone {rollout['standalone']:,.0f} on the final "
        f"model: {rollout['ratio']:.2f}x; {rollout['engine_busy_fraction']:.0%} of the job's generate phase in engine steps"
    )
    trainer = result["trainer"]
    print(f"trainer tok/s: update {trainer['tokens_per_s_update']:,.0f} (MFU {trainer['mfu_update'] or 0:.1%}), "
          f"log-probs {trainer['tokens_per_s_log_probs'] or 0:,.0f} (MFU {trainer['mfu_log_probs'] or 0:.1%})")  # fmt: skip
    for name, gap in result["log_prob_gap"].items():
        print(f"log-prob gap, {name}: mean |d| {gap['mean_abs']:.4f}, ratio outside [0.9,1.1] "
              f"{gap['ratio_outside_10pct']:.2%}")  # fmt: skip
    print("held-out reward:", ", ".join(f"{s}:{r:.3f}" for s, r in result["eval_reward"]))


if __name__ == "__main__":
    main()
