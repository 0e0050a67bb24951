"""One post-training pipeline on a laptop CPU: SFT -> reward model -> GRPO scored by it -> serving.

    python examples/pipeline.py                       # the reverse toy task, a few minutes on 2 cores
    python examples/pipeline.py --output-dir outputs/pipeline --rl-steps 60

1. ``raylane sft``: supervised fine-tuning of a tiny model on the task's completions (Ray Train).
2. ``raylane train-rm``: a reward model, started from the SFT model, on preference pairs: a prompt's
   right answer against another prompt's answer (Ray Train).
3. ``raylane train``: GRPO from the SFT model, its reward the reward model's score
   (``task.reward_model``); no verifier is involved in training. A KL term to the SFT model and a
   small learning rate keep the policy where the reward model was trained: a tiny reward model is
   easy to exploit (unchecked, GRPO drives its score up and exact match to zero).
4. ``raylane serve`` of the GRPO model, queried over OpenAI HTTP for held-out exact match.

Each stage's held-out numbers land in ``OUTPUT_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import ray

from raylane.config import load_config
from raylane.controllers import JobConfig, run_job
from raylane.supervised import RewardModelJobConfig, SFTJobConfig, run_reward_model_training, run_sft

SHAPE = (
    "model.tiny_shape={hidden_size: 96, intermediate_size: 256, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}"
)


def last(history: list[dict[str, float]], key: str) -> float:
    return [record[key] for record in history if key in record][-1]


def serve_and_score(model_dir: str, eval_file: str, port: int, prompts: int) -> float:
    """Start ``raylane serve`` on this Ray cluster, score greedy answers to held-out prompts, stop it."""
    command = [sys.executable, "-m", "raylane.cli", "serve", "--model", f"pipeline={model_dir}"]
    command += ["--port", str(port), "--address", ray.get_runtime_context().gcs_address]
    server = subprocess.Popen(command)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as response:
                    if json.load(response)["data"]:
                        break
            except OSError:  # not listening yet, or a read timing out while it starts
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("raylane serve did not come up")
            time.sleep(1)
        with open(eval_file) as f:
            rows = [json.loads(line) for line in f][:prompts]
        body = {"model": "pipeline", "prompt": [r["prompt"] for r in rows], "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            f"{base}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            choices = sorted(json.load(response)["choices"], key=lambda c: c["index"])
        return sum(c["text"].strip() == r["ground_truth"] for c, r in zip(choices, rows)) / len(rows)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/pipeline")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--rm-steps", type=int, default=80)
    parser.add_argument("--rl-steps", type=int, default=30)
    parser.add_argument(
        "--workers", type=int, default=2, help="Ray Train workers of SFT and the reward model"
    )
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_dir)
    # Logical CPUs: Ray Train workers, RL workers and Serve replicas each ask for one, even on 2 cores.
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)
    try:
        common = [SHAPE, f"ray.num_workers={args.workers}", "data.toy_task=reverse"]
        sft = load_config(
            SFTJobConfig, None, [*common, f"output_dir={out}/sft", f"steps={args.sft_steps}", "eval_every=0"]
        )
        sft_history = run_sft(sft)
        reward_model = load_config(
            RewardModelJobConfig,
            None,
            [
                *common,
                f"output_dir={out}/reward_model",
                f"steps={args.rm_steps}",
                "eval_every=0",
                f"model.path={sft.final_model_dir}",
                "optim.lr=1e-3",
            ],
        )
        rm_history = run_reward_model_training(reward_model)
        grpo = load_config(
            JobConfig,
            None,
            [
                f"output_dir={out}/grpo",
                f"model.path={sft.final_model_dir}",
                f"task.reward_model={reward_model.final_model_dir}",
                "task.name=reverse",
                "sft.steps=0",
                f"steps={args.rl_steps}",
                "eval_every=0",
                "prompts_per_step=32",
                "actor.optim.lr=1e-4",
                "use_reference=true",
                "actor.loss.kl_loss_coef=0.1",
            ],
        )
        rl_history = run_job(grpo)
        summary = {
            "sft_eval_exact_match": last(sft_history, "eval_exact_match"),
            "rm_eval_pair_accuracy": last(rm_history, "eval_pair_accuracy"),
            "rl_reward_model_score_start": rl_history[1]["reward_mean"],
            "rl_reward_model_score_end": last(rl_history, "reward_mean"),
            "served_eval_exact_match": serve_and_score(
                os.path.join(out, "grpo", "final_model"),
                os.path.join(out, "grpo", "data", "eval.jsonl"),
                args.port,
                prompts=100,
            ),
        }
    finally:
        ray.shutdown()
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
