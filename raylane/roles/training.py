"""Pieces shared by the roles that train or score sequences: FSDP2 sharding, optimiser, micro-batched forwards.

Sequences use verl's layout: ``prompts`` [B, P] left-padded, ``responses`` [B, T] right-padded,
``attention_mask`` [B, P + T], ``response_mask`` [B, T]. Per-token values (log-probs, values,
advantages) are ``[B, T]``, aligned with ``responses``.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raylane.actors.dispatch import Dispatch, register
from raylane.actors.worker import Worker
from raylane.batch import Batch
from raylane.fault_tolerance.checkpoint import BackgroundSaver, load_train_state, save_train_state
from raylane.roles.config import OptimConfig


def resolve_train_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a trained model: ``auto`` is bf16 on CUDA and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def shard_model(
    model: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype, activation_checkpointing: bool = False
) -> nn.Module:
    """FSDP2: shard each decoder layer, then the rest, over the data-parallel mesh.

    ``model`` holds fp32 parameters: they are the master weights the optimiser updates. With a lower
    ``compute_dtype`` FSDP2 all-gathers them in that dtype for forward and backward and reduces the
    gradients in fp32 (its ``MixedPrecisionPolicy``), so no second copy of the weights is kept by hand
    and bf16 rounding never accumulates in the weights or the Adam moments.
    """
    if compute_dtype == torch.float32:
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    model.model.activation_checkpointing = activation_checkpointing
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def build_optimizer(model: nn.Module, config: OptimConfig) -> tuple[torch.optim.Optimizer, object]:
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sequence_inputs(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, attention_mask, prompt_len)`` of prompts + responses."""
    prompts, responses = batch["prompts"], batch["responses"]
    input_ids = torch.cat([prompts, responses], dim=1).to(device)
    return input_ids, batch["attention_mask"].to(device), prompts.shape[1]


def response_slice(per_position: torch.Tensor, prompt_len: int, response_len: int) -> torch.Tensor:
    """Rows of a [B, P + T, ...] output that predict the response tokens: positions P-1 .. P+T-2."""
    return per_position[:, prompt_len - 1 : prompt_len - 1 + response_len]


def forward_micro_batches(
    batch: Batch, micro_batch_size: int, fn: Callable[[Batch], torch.Tensor]
) -> torch.Tensor:
    """Run ``fn`` without gradients over micro-batches and concatenate the ``[b, T]`` outputs."""
    with torch.no_grad():
        return torch.cat([fn(micro) for micro in batch.split(micro_batch_size)], dim=0)


def policy_log_probs(model: nn.Module, batch: Batch, temperature: float, device: torch.device) -> tuple:
    """Per-token log-probs ``[b, T]`` of the responses (and the logits rows that produced them)."""
    from raylane.rlhf.logprobs import log_probs_from_logits

    input_ids, attention_mask, prompt_len = sequence_inputs(batch, device)
    responses = batch["responses"].to(device)
    logits = response_slice(model(input_ids, attention_mask=attention_mask), prompt_len, responses.shape[1])
    return log_probs_from_logits(logits, responses, temperature), logits


def rows_metrics(metrics: dict[str, float]) -> Batch:
    """One row of metrics, so that DP_SHARD's row concatenation gathers one row per DP group."""
    return Batch.from_dict({name: torch.tensor([float(value)]) for name, value in metrics.items()})


def optimizer_steps(
    worker,
    batch: Batch,
    loss_fn,
    prefix: str,
    *,
    epochs: int = 1,
    mini_batch_size: int | None = None,
    optimizer=None,
    scheduler=None,
) -> dict[str, float]:
    """Epochs x mini-batches of gradient-accumulated micro-batches; returns the mean metrics.

    ``batch`` is this rank's shard; ``mini_batch_size`` counts rows over all ranks (None: the
    whole batch in one optimizer step), so each rank steps on ``mini_batch_size / dp_size`` of
    its rows. From the second optimizer step on the policy differs from the one that sampled
    the batch, which is what gives PPO's ratio and clipping something to act on.

    ``worker`` has ``model`` (FSDP2-sharded), ``optimizer``, ``scheduler``, ``config`` (a TrainConfig)
    and ``global_step``; ``optimizer``/``scheduler`` override the worker's (``scheduler=None`` with
    an override: constant LR). ``loss_fn(micro)`` returns ``(loss, metrics)``.
    """
    if optimizer is None:
        optimizer, scheduler = worker.optimizer, worker.scheduler
    worker.model.train()
    cfg = worker.config
    mini = len(batch) if mini_batch_size is None else max(1, mini_batch_size // worker.dp_size)
    totals: dict[str, list[float]] = defaultdict(list)
    for _ in range(epochs):
        for mini_batch in batch.split(mini):
            optimizer.zero_grad(set_to_none=True)
            micros = mini_batch.split(cfg.micro_batch_size)
            for i, micro in enumerate(micros):
                # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
                worker.model.set_requires_gradient_sync(i == len(micros) - 1)
                loss, metrics = loss_fn(micro)
                (loss * len(micro) / len(mini_batch)).backward()
                for name, value in metrics.items():
                    totals[name].append(float(value))
            if cfg.optim.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(worker.model.parameters(), cfg.optim.grad_clip)
                totals[f"{prefix}/grad_norm"].append(
                    float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                )
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
                worker.global_step += 1
    totals[f"{prefix}/lr"].append(optimizer.param_groups[0]["lr"])
    return {name: sum(values) / len(values) for name, values in totals.items()}


def ppo_update(worker, batch: Batch, loss_fn, prefix: str) -> Batch:
    """:func:`optimizer_steps` with the worker's ``ppo_epochs`` and ``mini_batch_size``, as one metrics row."""
    cfg = worker.config
    return rows_metrics(
        optimizer_steps(
            worker, batch, loss_fn, prefix, epochs=cfg.ppo_epochs, mini_batch_size=cfg.mini_batch_size
        )
    )


class CheckpointedTrainer(Worker):
    """A trained role's checkpoint verbs; it holds ``model``, ``optimizer``, ``scheduler``, ``global_step``."""

    @functools.cached_property
    def _background_saver(self) -> BackgroundSaver:
        return BackgroundSaver()

    @functools.cached_property
    def _lazy_saver(self) -> BackgroundSaver:
        return BackgroundSaver(lazy=True)

    @register(Dispatch.ONE_TO_ALL)
    def save_checkpoint(
        self, path: str, extra: dict | None = None, mode: str = "sync", writer_threads: int = 1
    ) -> None:
        """Distributed checkpoint of model, optimizer, LR schedule, RNG and ``extra`` (e.g. data position),
        its shards written by ``writer_threads`` threads per rank. ``mode`` is the job's
        ``checkpoint_mode``: ``sync`` returns once written; ``async`` once the state is snapshotted to
        host memory, persisting it while the caller goes on; ``lazy`` at once, the snapshot taken
        before this role's next optimizer step. :meth:`wait_checkpoint` waits for the write."""
        state = (self.model, self.optimizer, self.scheduler, self.global_step, self.rank, extra or {})
        self.wait_checkpoint()
        if mode == "lazy":
            self._lazy_saver.save(path, *state, writer_threads=writer_threads)
        elif mode == "async":
            self._background_saver.save(path, *state, writer_threads=writer_threads)
        else:
            save_train_state(path, *state, writer_threads=writer_threads)

    @register(Dispatch.ONE_TO_ALL)
    def wait_checkpoint(self) -> None:
        """Block until this rank's checkpoint in flight is written; raises if it failed."""
        self._lazy_saver.wait()
        self._background_saver.wait()

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> dict:
        """Restore a checkpoint (any DP size); returns the ``extra`` state saved with it."""
        # A lazy snapshot still reading the parameters must not see them overwritten.
        self.wait_checkpoint()
        self.global_step, extra = load_train_state(
            path, self.model, self.optimizer, self.scheduler, self.rank
        )
        return extra
