"""The driver side of ``raylane sft`` and ``raylane train-rm``: data and model preparation, then one
Ray Train ``TorchTrainer`` run of :func:`~raylane.supervised.loop.run_worker`.

Workers read the model and data files and rank 0 writes ``metrics.jsonl`` and the exported model
under ``output_dir``: on a multi-node cluster that folder (and ``ray.storage_path``) must be on
storage every node shares.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raylane.rlhf import ToyTaskFiles, make_toy_task
from raylane.supervised.config import RewardModelJobConfig, SFTJobConfig, SupervisedJobConfig
from raylane.supervised.data import write_toy_preferences
from raylane.supervised.loop import run_worker
from raylane.supervised.reward_model import RewardModelObjective
from raylane.supervised.sft import SFTObjective

logger = logging.getLogger(__name__)


def _toy_files(config: SupervisedJobConfig, data) -> tuple[str, ToyTaskFiles]:
    out_dir = os.path.join(config.output_dir, "data")
    return out_dir, make_toy_task(data.toy_task, out_dir, data.n_train, data.n_eval, seed=config.seed)


def _sft_files(config: SFTJobConfig) -> tuple[str, str | None]:
    if config.data.toy_task is None:
        return config.data.train_file, config.data.eval_file
    out_dir, files = _toy_files(config, config.data)
    eval_file = os.path.join(out_dir, "sft_eval.jsonl")
    with open(files.eval, encoding="utf-8") as src, open(eval_file, "w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({"prompt": row["prompt"], "completion": row["ground_truth"]}) + "\n")
    return files.sft, eval_file


def _preference_files(config: RewardModelJobConfig) -> tuple[str, str | None]:
    if config.data.toy_task is None:
        return config.data.train_file, config.data.eval_file
    out_dir, files = _toy_files(config, config.data)
    return (
        write_toy_preferences(files.train, os.path.join(out_dir, "pairs_train.jsonl"), seed=config.seed),
        write_toy_preferences(files.eval, os.path.join(out_dir, "pairs_eval.jsonl"), seed=config.seed + 1),
    )


def _sft_worker(loop_config: dict[str, Any]) -> None:
    config = SFTJobConfig.model_validate(loop_config["config"])
    objective = SFTObjective(
        config, loop_config["model_dir"], loop_config["train_file"], loop_config["eval_file"]
    )
    run_worker(config, objective, loop_config["model_dir"])


def _reward_model_worker(loop_config: dict[str, Any]) -> None:
    config = RewardModelJobConfig.model_validate(loop_config["config"])
    objective = RewardModelObjective(
        config, loop_config["model_dir"], loop_config["train_file"], loop_config["eval_file"]
    )
    run_worker(config, objective, loop_config["model_dir"])


def _fit(config: SupervisedJobConfig, worker_fn, files: tuple[str, str | None]) -> list[dict[str, float]]:
    """Run the job on Ray Train; returns the metrics history (``metrics.jsonl``)."""
    os.makedirs(config.output_dir, exist_ok=True)
    model_dir = os.path.abspath(config.model.materialize(config.output_dir))
    train_file, eval_file = (os.path.abspath(f) if f else None for f in files)
    config = config.model_copy(update={"output_dir": os.path.abspath(config.output_dir)})
    if not ray.is_initialized():
        ray.init(address=config.ray_address, log_to_driver=True)
    resources = {"CPU": config.ray.cpus_per_worker}
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "model_dir": model_dir,
            "train_file": train_file,
            "eval_file": eval_file,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.ray.worker_counts, use_gpu=config.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=os.path.basename(config.output_dir),
            storage_path=config.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.ray.keep_checkpoints),
        ),
        resume_from_checkpoint=(
            ray.train.Checkpoint.from_directory(os.path.abspath(config.resume_from))
            if config.resume_from
            else None
        ),
    )
    result = trainer.fit()
    logger.info("Ray Train run finished; last checkpoint %s", result.checkpoint)
    with open(os.path.join(config.output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_sft(config: SFTJobConfig) -> list[dict[str, float]]:
    """Supervised fine-tuning as a Ray Train job; the model is exported to ``output_dir/final_model``."""
    return _fit(config, _sft_worker, _sft_files(config))


def run_reward_model_training(config: RewardModelJobConfig) -> list[dict[str, float]]:
    """Reward-model training as a Ray Train job; ``output_dir/final_model`` is a ``task.reward_model``."""
    return _fit(config, _reward_model_worker, _preference_files(config))
