"""GRPO written out as a driver script: the single-controller dataflow in plain Python.

    python examples/grpo.py                # the reverse toy task on a tiny model, CPU, about 2 minutes

``raylane train`` runs the same dataflow (raylane.controllers.RLJob) from a YAML config; this
script shows the loop itself so a new algorithm is a new function, not a copied trainer.
"""

from __future__ import annotations

import ray

from raylane.controllers import JobConfig, RLJob, compute_batch_advantages, mean_rows


def grpo_step(job: RLJob, step: int) -> dict[str, float]:
    prompts = job.prompt_batch(job.loader.next_batch(), seed=step)
    batch = job.rollout.generate(prompts)  # n samples per prompt, tagged with the weight version
    batch = batch.union(job.reward.compute_rewards(batch))  # exact-match verifier
    batch = batch.union(job.actor.compute_log_probs(batch))  # behaviour-policy log-probs
    metrics = compute_batch_advantages(batch, job.config)  # group-normalised advantages
    metrics.update(mean_rows(job.actor.update_actor(batch)))  # clipped policy-gradient step
    job.sync_weights()  # new policy version to the rollout engines
    metrics["reward_mean"] = float(batch["scores"].mean())
    return metrics


def main() -> None:
    ray.init()
    config = JobConfig(output_dir="outputs/grpo-example", steps=100)
    job = RLJob(config)
    job.build_groups()
    try:
        job.warm_start()
        print(f"held-out exact match after warm-start: {job.evaluate():.2f}")
        for step in range(config.steps):
            metrics = grpo_step(job, step)
            if (step + 1) % 10 == 0:
                print(f"step {step + 1}: sampled reward {metrics['reward_mean']:.3f}")
        print(f"held-out exact match after GRPO: {job.evaluate():.2f}")
    finally:
        job.shutdown()


if __name__ == "__main__":
    main()
