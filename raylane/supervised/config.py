"""Typed configuration of the supervised jobs (``raylane sft``, ``raylane train-rm``); laptop defaults.

Both jobs share :class:`SupervisedJobConfig`: the starting model, the optimiser, batch sizes, the
step/eval/checkpoint cadence and how Ray Train runs the workers (:class:`RayTrainConfig`). Each
adds its data section.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from raylane.config import StrictConfig
from raylane.controllers import ModelSpec
from raylane.rlhf import TOY_TASKS
from raylane.roles import OptimConfig

ToyTaskName = TOY_TASKS.name_field()


class RayTrainConfig(StrictConfig):
    """How Ray Train runs the job: its workers, their resources, restarts and checkpoint storage."""

    num_workers: int = Field(1, ge=1, description="training workers (data-parallel FSDP2 ranks)")
    min_workers: int | None = Field(
        None,
        ge=1,
        description="elastic: go on with as few as this many workers when not all num_workers fit "
        "(Ray Train's ScalingConfig(num_workers=(min, max))); None: always num_workers",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); False: CPU workers over gloo")
    max_failures: int = Field(
        0, ge=-1, description="restarts from the last checkpoint when a worker dies (-1: no limit)"
    )
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints kept in storage (None: all)")
    storage_path: str | None = Field(
        None,
        description="where Ray Train persists checkpoints (shared storage on a multi-node cluster); "
        "None: <output_dir>/ray_train",
    )

    @model_validator(mode="after")
    def _min_at_most_max(self) -> RayTrainConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"ray.min_workers ({self.min_workers}) must be at most ray.num_workers ({self.num_workers})"
            )
        return self

    @property
    def worker_counts(self) -> int | tuple[int, int]:
        """Ray Train's ``num_workers``: a count, or ``(min, max)`` for an elastic run."""
        return self.num_workers if self.min_workers is None else (self.min_workers, self.num_workers)


class SupervisedJobConfig(StrictConfig):
    """What SFT and reward-model training share."""

    model: ModelSpec = ModelSpec()
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype ('auto': bf16 on CUDA, fp32 on CPU); master weights stay fp32"
    )
    activation_checkpointing: bool = False
    optim: OptimConfig = OptimConfig(lr=3e-3, warmup_steps=5)
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="examples per optimizer step, over all workers")
    micro_batch_size: int = Field(32, ge=1, description="rows per forward/backward on one worker")
    max_length: int = Field(64, ge=2, description="longest tokenized example (longer ones are an error)")
    eval_every: int = Field(20, ge=0, description="evaluate held-out data every N steps (0: only at the end)")
    eval_examples: int = Field(100, ge=1, description="held-out examples per evaluation")
    checkpoint_every: int = Field(25, ge=0, description="checkpoint every N steps (0: only at the end)")
    report_every: int = Field(
        10,
        ge=1,
        description="hand metrics to Ray Train every N steps (and with every checkpoint); metrics.jsonl "
        "and the progress line get every step. Each report waits for the Ray Train controller's next "
        "poll of the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default)",
    )
    resume_from: str | None = Field(
        None, description="a checkpoint folder (a Ray Train checkpoint_* or step_* folder) to start from"
    )
    output_dir: str = "outputs/supervised"
    seed: int = 0
    ray: RayTrainConfig = RayTrainConfig()
    ray_address: str | None = Field(None, description="join this Ray cluster; None starts a local one")

    @property
    def storage_path(self) -> str:
        return os.path.abspath(self.ray.storage_path or os.path.join(self.output_dir, "ray_train"))

    @property
    def final_model_dir(self) -> str:
        return os.path.join(self.output_dir, "final_model")


class _DataConfig(StrictConfig):
    """Training and held-out rows: JSONL files, or a built-in toy task written out as such files."""

    toy_task: ToyTaskName | None = Field("reverse", description="toy task; None to use train_file")
    train_file: str | None = None
    eval_file: str | None = Field(None, description="held-out rows")
    n_train: int = Field(2000, ge=1, description="toy task: training rows")
    n_eval: int = Field(200, ge=1, description="toy task: held-out rows")

    @model_validator(mode="after")
    def _one_source(self) -> _DataConfig:
        if (self.toy_task is None) == (self.train_file is None):
            raise ValueError("data: set exactly one of data.toy_task or data.train_file")
        return self


class SFTDataConfig(_DataConfig):
    """SFT examples: JSONL with ``prompt`` + ``completion`` or chat ``messages`` ending in the assistant's
    reply, or a built-in toy task written out as such a file."""

    packing: bool = Field(
        False, description="pack several examples into each max_length row (no padding, fewer rows)"
    )
    eval_max_new_tokens: int = Field(8, ge=1, description="greedy tokens generated per held-out prompt")


class SFTJobConfig(SupervisedJobConfig):
    """``raylane sft CONFIG.yaml key=value ...``: supervised fine-tuning of a causal LM."""

    data: SFTDataConfig = SFTDataConfig()
    output_dir: str = "outputs/sft"


class PreferenceDataConfig(_DataConfig):
    """Preference pairs: JSONL with ``prompt`` (or ``messages``), ``chosen`` and ``rejected``, or a toy
    task's pairs (each prompt's right answer against another prompt's answer)."""


class RewardModelJobConfig(SupervisedJobConfig):
    """``raylane train-rm CONFIG.yaml key=value ...``: a value-head reward model on preference pairs."""

    data: PreferenceDataConfig = PreferenceDataConfig()
    output_dir: str = "outputs/reward_model"
