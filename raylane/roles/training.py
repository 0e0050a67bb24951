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


def _cut_responses(micro: Batch, width: int) -> Batch:
    """``micro`` with its response columns (and the attention mask's) cut to the first ``width``."""
    response_len, prompt_len = micro["responses"].shape[1], micro["prompts"].shape[1]
    cut = {}
    for name, value in micro.tensors.items():
        if name == "attention_mask":
            value = value[:, : prompt_len + width]
        elif name != "prompts" and value.dim() >= 2 and value.shape[1] == response_len:
            value = value[:, :width]
        cut[name] = value
    return Batch(cut, micro.non_tensors, micro.meta)


def micro_batches(
    batch: Batch, size: int, group_by_length: bool = False
) -> tuple[list[Batch], torch.Tensor | None]:
    """``batch`` in micro-batches of ``size`` rows, and the row order they follow (None: as given).

    ``group_by_length``: rows sorted by response length, each micro-batch cut to its longest
    response, so long-tailed lengths no longer pad every row to the longest of the batch."""
    if not group_by_length:
        return batch.split(size), None
    order = torch.argsort(batch["response_mask"].sum(dim=1), stable=True)
    micros = [
        _cut_responses(micro, max(1, int(micro["response_mask"].sum(dim=1).max())))
        for micro in batch.index(order).split(size)
    ]
    return micros, order


def forward_micro_batches(
    batch: Batch, micro_batch_size: int, fn: Callable[[Batch], torch.Tensor], group_by_length: bool = False
) -> torch.Tensor:
    """Run ``fn`` without gradients over micro-batches and concatenate the ``[b, T]`` outputs, in
    ``batch``'s row order (see :func:`micro_batches`; cut columns come back as zeros)."""
    micros, order = micro_batches(batch, micro_batch_size, group_by_length)
    with torch.no_grad():
        outputs = [fn(micro) for micro in micros]
    if order is None:
        return torch.cat(outputs, dim=0)
    width = batch["responses"].shape[1]
    stacked = torch.cat([nn.functional.pad(out, (0, width - out.shape[1])) for out in outputs], dim=0)
    return torch.empty_like(stacked).index_copy_(0, order.to(stacked.device), stacked)


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
    group_by_length: bool = False,
) -> dict[str, float]:
    """Epochs x mini-batches of gradient-accumulated micro-batches; returns the mean metrics.

    ``batch`` is this rank's shard; ``mini_batch_size`` counts rows over all ranks (None: the
    whole batch in one optimizer step), so each rank steps on ``mini_batch_size / dp_size`` of
    its rows. From the second optimizer step on the policy differs from the one that sampled
    the batch, which is what gives PPO's ratio and clipping something to act on.

    ``worker`` has ``model`` (FSDP2-sharded), ``optimizer``, ``scheduler``, ``config`` (a TrainConfig)
    and ``global_step``; ``optimizer``/``scheduler`` override the worker's (``scheduler=None`` with
    an override: constant LR). ``loss_fn(micro)`` returns ``(loss, metrics)``; ``group_by_length``
    as in :func:`micro_batches`, each micro-batch's loss weighted by its share of the tokens.
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
            micros, _ = micro_batches(mini_batch, cfg.micro_batch_size, group_by_length)
            if group_by_length:
                tokens = max(1.0, float(mini_batch["response_mask"].sum()))
            for i, micro in enumerate(micros):
                # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
                worker.model.set_requires_gradient_sync(i == len(micros) - 1)
                loss, metrics = loss_fn(micro)
                # Grouped by length, a micro-batch's token mean weighs as its share of the tokens:
                # the sum is the mini-batch's token mean, however the rows were grouped.
                if group_by_length:
                    share = float(micro["response_mask"].sum()) / tokens
                else:
                    share = len(micro) / len(mini_batch)
                (loss * share).backward()
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
            worker,
            batch,
            loss_fn,
            prefix,
            epochs=cfg.ppo_epochs,
            mini_batch_size=cfg.mini_batch_size,
            group_by_length=cfg.group_by_length,
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
        self,
        path: str,
        extra: dict | None = None,
        mode: str = "sync",
        writer_threads: int = 1,
        host_dir: str | None = None,
    ) -> None:
        """Distributed checkpoint of model, optimizer, LR schedule, RNG and ``extra`` (e.g. data position),
        its shards written by ``writer_threads`` threads per rank. ``mode`` is the job's
        ``checkpoint_mode``: ``sync`` returns once written; ``async`` once the state is snapshotted to
        host memory, persisting it while the caller goes on; ``lazy`` at once, the snapshot taken
        before this role's next optimizer step, into host buffers that are files in ``host_dir`` (a folder
        beside the memory tier's checkpoints). :meth:`wait_checkpoint` waits for the write."""
        state = (self.model, self.optimizer, self.scheduler, self.global_step, self.rank, extra or {})
        self.wait_checkpoint()
        if mode == "lazy":
            self._lazy_saver.save(path, *state, writer_threads=writer_threads, host_dir=host_dir)
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
