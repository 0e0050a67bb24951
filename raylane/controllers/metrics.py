"""Step metrics: a progress line, ``metrics.jsonl``, Ray metrics for the dashboard, the optional
TensorBoard and Weights & Biases loggers, a reward-curve PNG."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

from ray.util import metrics as ray_metrics

from raylane.controllers.loggers import StepLogger

logger = logging.getLogger(__name__)

# Metrics exported to the Ray dashboard (Prometheus names cannot hold '/'). Weight-sync time and
# bytes are not among them: WeightSync exports every sync itself.
_DASHBOARD = {
    "reward_mean": "raylane_reward_mean",
    "eval_reward_mean": "raylane_eval_reward_mean",
    "timing/step_s": "raylane_step_seconds",
    "throughput/tokens_per_s": "raylane_rollout_tokens_per_second",
    "throughput/train_tokens_per_s": "raylane_trainer_tokens_per_second",
    "rollout/staleness": "raylane_rollout_staleness",
    "actor/pg_loss": "raylane_actor_loss",
    "actor/grad_norm": "raylane_actor_grad_norm",
    "sft/loss": "raylane_sft_loss",
    "eval_exact_match": "raylane_sft_eval_exact_match",
    "rm/loss": "raylane_rm_loss",
    "eval_pair_accuracy": "raylane_rm_eval_pair_accuracy",
    "actor/pg_clipfrac": "raylane_actor_clip_fraction",
    "actor/importance_weight_mean": "raylane_actor_importance_weight_mean",
    "rollout/staleness_max": "raylane_rollout_staleness_max",
    "rollout/staleness_mean": "raylane_rollout_staleness_mean",
    "rollout/samples_in_flight": "raylane_rollout_samples_in_flight",
    "rollout/engine_busy_fraction": "raylane_rollout_engine_busy_fraction",
    "stream/depth": "raylane_stream_depth",
    "rollout/replicas": "raylane_rollout_replicas",
    "rollout/replacements": "raylane_rollout_replacements",
    "trainer/idle_fraction": "raylane_trainer_idle_fraction",
}
# Each step phase's seconds ("timing/<phase>_s") go to one gauge tagged with the phase.
_PHASE_PREFIX, _PHASE_SUFFIX = "timing/", "_s"
# The staleness histogram of a step's groups ("rollout/staleness_groups_<versions>"): one gauge
# tagged with the number of versions.
_STALENESS_PREFIX = "rollout/staleness_groups_"


class MetricsTracker:
    """Writes one JSON object per step, mirrors key values to Ray gauges and hands every value to
    ``loggers`` under the same name."""

    def __init__(self, output_dir: str, job_name: str, loggers: Sequence[StepLogger] = ()) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.history: list[dict[str, float]] = []
        self._gauges = {
            key: ray_metrics.Gauge(name, description=f"raylane {key}", tag_keys=("job",))
            for key, name in _DASHBOARD.items()
        }
        self._phase_seconds = ray_metrics.Gauge(
            "raylane_step_phase_seconds",
            description="Seconds of one phase of the last step",
            tag_keys=("job", "phase"),
        )
        self._staleness_groups = ray_metrics.Gauge(
            "raylane_rollout_staleness_groups",
            description="Groups of the last batch by staleness (policy versions since they started)",
            tag_keys=("job", "staleness"),
        )
        self._tags = {"job": job_name}
        self.loggers = list(loggers)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, gauge in self._gauges.items():
            if key in record:
                gauge.set(record[key], tags=self._tags)
        for key, value in record.items():
            if key.startswith(_PHASE_PREFIX) and key.endswith(_PHASE_SUFFIX) and key not in _DASHBOARD:
                phase = key[len(_PHASE_PREFIX) : -len(_PHASE_SUFFIX)]
                self._phase_seconds.set(value, tags={**self._tags, "phase": phase})
            elif key.startswith(_STALENESS_PREFIX):
                staleness = key[len(_STALENESS_PREFIX) :]
                self._staleness_groups.set(value, tags={**self._tags, "staleness": staleness})
        for step_logger in self.loggers:
            step_logger.log(step, {k: v for k, v in record.items() if k != "step"})

    def close(self) -> None:
        """Close the loggers (a W&B run finishes); the tracker logs to metrics.jsonl and Ray only after."""
        for step_logger in self.loggers:
            step_logger.close()
        self.loggers = []

    def restore(self, history: list[dict[str, float]]) -> None:
        """Continue a resumed run: rewrite metrics.jsonl with the history saved in the checkpoint,
        keeping the fault detector's event lines already there."""
        self.history = list(history)
        events = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                events = [line for line in f if line.strip() and "step" not in json.loads(line)]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in history)
            f.writelines(events)

    def plot(self, path: str, title: str) -> str:
        """The reward curve (train and held-out) as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["reward_mean"]) for r in self.history if "reward_mean" in r]
        held_out = [(r["step"], r["eval_reward_mean"]) for r in self.history if "eval_reward_mean" in r]
        if train:
            ax.plot(*zip(*train), label="train reward (sampled)", alpha=0.7)
        if held_out:
            ax.plot(*zip(*held_out), marker="o", label="held-out exact match (greedy)")
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def progress_line(step: int, total: int, values: Mapping[str, float]) -> str:
    """One human-readable line per step."""
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (
        ("reward_mean", "reward", ".3f"),
        ("eval_reward_mean", "eval", ".3f"),
        ("kl", "kl", ".4f"),
        ("actor/pg_loss", "pg_loss", ".4f"),
        ("critic/value_loss", "v_loss", ".4f"),
        ("sft/loss", "loss", ".4f"),
        ("eval_exact_match", "eval exact", ".3f"),
        ("rm/loss", "loss", ".4f"),
        ("rm/pair_accuracy", "pair acc", ".3f"),
        ("eval_pair_accuracy", "eval pair acc", ".3f"),
        ("throughput/train_tokens_per_s", "train tok/s", ".0f"),
        ("throughput/tokens_per_s", "tok/s", ".0f"),
        ("timing/step_s", "step", ".2f"),
    ):
        if key in values:
            parts.append(f"{label} {values[key]:{fmt}}")
    phases = [
        f"{k.split('/')[1][:-2]} {v:.2f}"
        for k, v in values.items()
        if k.startswith("timing/") and k != "timing/step_s"
    ]
    if phases:
        parts.append("(" + ", ".join(phases) + " s)")
    return " | ".join(parts)
