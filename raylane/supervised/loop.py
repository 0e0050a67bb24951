"""The per-worker loop Ray Train runs for a supervised job: FSDP2 set-up, steps, evaluation,
checkpoints through ``ray.train``, resume, metrics and the Hugging Face export.

What differs between SFT and reward-model training (the model, the rows and loss of a step, the
held-out evaluation) is an :class:`Objective`; everything else is here. Checkpoints are the RL
trainer's DCP format (:func:`~raylane.fault_tolerance.save_train_state`): every worker writes its
own shards into a local folder it hands to ``ray.train.report``, and Ray Train merges the folders
into one ``step_N`` checkpoint in storage, from which any number of workers resume.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray.train
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from tqdm.auto import tqdm

from raylane.batch import Batch
from raylane.controllers import MetricsTracker, progress_line
from raylane.fault_tolerance import load_train_state, save_hf_checkpoint, save_train_state
from raylane.rlhf import PromptLoader
from raylane.roles import build_optimizer, optimizer_steps, resolve_train_dtype, shard_model
from raylane.supervised.config import SupervisedJobConfig

logger = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This worker's place in the job: its rank, the world size and its device."""

    rank: int
    world: int
    device: torch.device

    def shard(self, items: Sequence) -> tuple[list, int]:
        """This rank's share of ``items`` and how many of them are real: every rank gets the same
        count (the last items repeat), so the collectives of a sharded model stay in step."""
        per_rank = -(-len(items) // self.world)
        mine = list(items[self.rank :: self.world])
        real = len(mine)
        return mine + [items[i % len(items)] for i in range(per_rank - real)], real

    def total(self, *values: float) -> list[float]:
        """Sums over all ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


class Objective(Protocol):
    """What a supervised job trains, on which rows, and how it is evaluated."""

    prefix: str  # metric prefix of the training loss ("sft", "rm")

    def build_model(self, device: torch.device) -> nn.Module:
        """The model to train, full fp32 weights on ``device`` (sharded afterwards)."""

    def train_examples(self) -> Sequence:
        """The training examples the loader draws each step's batch from."""

    def rows(self, examples: Sequence) -> Batch:
        """The rows one rank trains on for its share of a step's examples."""

    def tokens(self, rows: Batch) -> int:
        """Real (non-padding) tokens of a rank's rows."""

    def loss(self, model: nn.Module, micro: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss of a micro-batch of rows and its metrics."""

    def evaluate(self, model: nn.Module, ranks: Ranks) -> dict[str, float]:
        """Held-out metrics, the same on every rank (collective)."""


@dataclass
class _TrainState:
    """What :func:`~raylane.roles.optimizer_steps` steps: the sharded model and its optimiser."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: SupervisedJobConfig
    dp_size: int
    global_step: int = 0


def _ranks(config: SupervisedJobConfig) -> Ranks:
    context = ray.train.get_context()
    if config.ray.use_gpu:
        device = torch.device("cuda", context.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Ranks(context.get_world_rank(), context.get_world_size(), device)


def _resume(state: _TrainState, ranks: Ranks) -> dict:
    """Restore the latest checkpoint Ray Train knows of (after a restart, or ``resume_from``)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as path:
        state.global_step, extra = load_train_state(
            path, state.model, state.optimizer, state.scheduler, ranks.rank
        )
    logger.info("rank %d resumed from %s at step %d", ranks.rank, checkpoint.path, state.global_step)
    return extra


def _evaluate(objective: Objective, state: _TrainState, ranks: Ranks) -> dict[str, float]:
    state.model.eval()
    return objective.evaluate(state.model, ranks)


def _publish(
    step: int,
    metrics: dict[str, float],
    tracker: MetricsTracker | None,
    config: SupervisedJobConfig,
    checkpoint_state: tuple[_TrainState, Ranks, dict] | None = None,
) -> None:
    """Log ``metrics`` (rank 0: ``metrics.jsonl``, the progress line) and, every ``report_every`` steps,
    ``ray.train.report`` them, with a DCP checkpoint written by every rank when ``checkpoint_state``
    is given. Every rank reports at the same steps: a report is a barrier of all workers."""
    if tracker is not None:
        tracker.log(step, metrics)
        tqdm.write(progress_line(step, config.steps, metrics))
    if checkpoint_state is None:
        if step % config.report_every == 0 or step == config.steps:
            ray.train.report(metrics)
        return
    state, ranks, extra = checkpoint_state
    history = tracker.history if tracker is not None else []
    with tempfile.TemporaryDirectory(prefix="raylane-ckpt-") as path:
        save_train_state(
            path,
            state.model,
            state.optimizer,
            state.scheduler,
            state.global_step,
            ranks.rank,
            {**extra, "history": history},
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(path),
            checkpoint_dir_name=f"step_{state.global_step}",
        )
    # A worker's reports wait in a queue of one until the controller's next poll takes them, and only
    # then is the checkpoint the one a restart resumes from. This second report returns once the
    # controller has taken the checkpoint, so a failure from here on loses less than one interval.
    ray.train.report(metrics)


def run_worker(config: SupervisedJobConfig, objective: Objective, model_dir: str) -> None:
    """The loop of one Ray Train worker; rank 0 also writes ``metrics.jsonl`` and the progress line."""
    ranks = _ranks(config)
    torch.manual_seed(config.seed)
    mesh = init_device_mesh(ranks.device.type, (ranks.world,), mesh_dim_names=("dp",))
    model = shard_model(
        objective.build_model(ranks.device),
        mesh["dp"],
        resolve_train_dtype(config.dtype, ranks.device),
        config.activation_checkpointing,
    )
    optimizer, scheduler = build_optimizer(model, config.optim)
    state = _TrainState(model, optimizer, scheduler, config, ranks.world)
    loader = PromptLoader(objective.train_examples(), config.batch_size, seed=config.seed)
    tracker = (
        MetricsTracker(config.output_dir, os.path.basename(os.path.abspath(config.output_dir)))
        if ranks.rank == 0
        else None
    )
    saved = _resume(state, ranks)
    resumed_from = state.global_step if saved else None
    if saved:
        loader.load_state_dict(saved["loader"])
        if tracker is not None:
            tracker.restore(saved["history"])
    else:
        if tracker is not None:
            tracker.restore([])  # a fresh start, also after a failure before the first checkpoint
        _publish(0, _evaluate(objective, state, ranks), tracker, config)
    while state.global_step < config.steps:
        start = time.perf_counter()
        rows = objective.rows(loader.next_batch()[ranks.rank :: ranks.world])
        metrics = optimizer_steps(
            state, rows, lambda micro: objective.loss(state.model, micro), objective.prefix
        )
        seconds = time.perf_counter() - start
        loss_sum, tokens = ranks.total(metrics[f"{objective.prefix}/loss"], float(objective.tokens(rows)))
        metrics[f"{objective.prefix}/loss"] = loss_sum / ranks.world
        metrics["throughput/train_tokens"] = tokens
        metrics["throughput/train_tokens_per_s"] = tokens / max(seconds, 1e-9)
        metrics["timing/step_s"] = seconds
        metrics["train/workers"] = float(ranks.world)  # fewer after an elastic restart on lost nodes
        if resumed_from is not None:
            metrics["resumed_from_step"] = float(resumed_from)
            resumed_from = None
        done = state.global_step
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            metrics.update(_evaluate(objective, state, ranks))
        checkpoint = (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps
        position = {"loader": loader.state_dict()}
        _publish(done, metrics, tracker, config, (state, ranks, position) if checkpoint else None)
    save_hf_checkpoint(config.final_model_dir, state.model, model_dir, ranks.rank)
