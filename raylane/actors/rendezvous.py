"""Rank rendezvous: how the ranks of a group form a ``torch.distributed`` process group.

The group drives it in two steps: rank 0 opens a TCPStore on a port the OS picks (no
fixed ports, no race between picking a port and binding it) and reports its address;
then every rank joins that store and calls ``init_process_group``. Re-forming after a
rank was replaced is the same two steps with a fresh store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import ray
import torch
import torch.distributed as dist

__all__ = ["DistConfig", "Rendezvous", "RendezvousMaster", "init_process_group", "pick_device"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "gloo", "nccl"]


@dataclass(frozen=True)
class DistConfig:
    """How a group's ranks talk to each other.

    ``backend``: ``"auto"`` is NCCL for CUDA tensors (with gloo kept for CPU tensors)
    when the ranks have GPUs, gloo otherwise; ``None`` skips ``torch.distributed``.
    ``timeout_s`` bounds every collective and the rendezvous itself.
    """

    backend: Backend | None = "auto"
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "gloo", "nccl", None):
            raise ValueError(f"backend must be 'auto', 'gloo', 'nccl' or None, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0's store listens."""

    host: str
    port: int


def pick_device() -> torch.device:
    """This process's device: its first Ray-assigned GPU if it has one, else the CPU."""
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPUs, so its first GPU is always cuda:0.
    if ray.get_gpu_ids() and torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """The ``init_process_group`` backend string for ``backend`` on ``device``."""
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError(
            "backend 'nccl' needs a GPU, but this rank has none: give the pool num_gpus_per_bundle > 0 "
            "or use backend 'gloo'/'auto'"
        )
    if device.type == "cuda" and backend in ("auto", "nccl"):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


class RendezvousMaster:
    """Rank 0's side: the TCPStore every rank joins, kept open while the process group lives."""

    def __init__(self, host: str, world_size: int, timeout_s: float) -> None:
        self.store = dist.TCPStore(
            host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self.address = Rendezvous(host, self.store.port)


def init_process_group(
    *,
    rank: int,
    world_size: int,
    rendezvous: Rendezvous,
    config: DistConfig,
    device: torch.device,
    master: RendezvousMaster | None = None,
) -> None:
    """Join the store at ``rendezvous`` and form the default process group (collective)."""
    assert config.backend is not None
    timeout = timedelta(seconds=config.timeout_s)
    if dist.is_initialized():
        dist.destroy_process_group()
    store = (
        master.store
        if master is not None
        else dist.TCPStore(rendezvous.host, rendezvous.port, world_size, is_master=False, timeout=timeout)
    )
    backend = resolve_backend(config.backend, device)
    # No device_id (eager NCCL init): DeviceMesh then splits communicators with ncclCommSplit,
    # which segfaults once the process group has been re-formed (seen on torch 2.11, 2 x H200);
    # every rank must take the same path, and a replaced rank is always a fresh process.
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    logger.info("rank %d/%d joined %s process group at %s", rank, world_size, backend, rendezvous)
