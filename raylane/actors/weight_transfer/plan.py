"""Weight resharding plans: what moves from which trainer shard to which runner shard.

The trainer keeps its weights as FSDP2 shards (``Shard(0)`` over ``dp`` ranks); the runner wants
them as tensor-parallel shards (``tp`` ranks per replica, ``replicas`` copies). The driver computes a
:class:`TransferPlan` once from the two layouts (:mod:`raylane.controllers.weight_sync`): for every
pair of source and destination ranks, which rows (and, for row-parallel weights, which column block)
of which tensor go where. Every destination receives exactly the bytes of its own shards.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

if TYPE_CHECKING:
    from raylane.models import CausalLM

Range = tuple[int, int]


class WeightSyncError(RuntimeError):
    """A weight sync cannot run as asked; the message says what does not match and what to do."""


# ---- layouts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One checkpoint tensor: full (unsharded) shape, the runner's dtype and its TP split dimension
    (0: column-parallel, 1: row-parallel, ``None``: replicated on every TP rank)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tp_shard_dim: int | None = None

    @property
    def row_numel(self) -> int:
        """Elements in one dim-0 row of the full tensor."""
        return math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FSDPLayout:
    """FSDP2 ``Shard(0)`` over ``dp`` ranks, with ``torch.chunk`` semantics: chunks of
    ``ceil(rows / dp)`` rows, so trailing ranks may hold fewer rows or none."""

    dp: int

    def __post_init__(self) -> None:
        if self.dp < 1:
            raise ValueError(f"dp must be >= 1, got {self.dp}")

    def rows(self, num_rows: int, rank: int) -> Range:
        """The global rows ``[start, stop)`` that ``rank`` holds of a tensor with ``num_rows`` rows."""
        chunk = -(-num_rows // self.dp)
        start = min(rank * chunk, num_rows)
        return start, min(start + chunk, num_rows)

    def local_shape(self, spec: ParamSpec, rank: int) -> tuple[int, ...]:
        start, stop = self.rows(spec.shape[0], rank)
        return (stop - start, *spec.shape[1:])


@dataclass(frozen=True)
class TPLayout:
    """``replicas`` tensor-parallel groups of ``tp`` ranks: rank = replica * tp + tp_rank
    (the runner's :class:`~raylane.actors.MeshLayout` with dp = replicas)."""

    tp: int
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.replicas < 1:
            raise ValueError(f"tp and replicas must be >= 1, got tp={self.tp}, replicas={self.replicas}")

    @property
    def world_size(self) -> int:
        return self.tp * self.replicas

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def region(self, spec: ParamSpec, rank: int) -> tuple[Range, Range | None]:
        """The global rows and (row-parallel only) columns of ``spec`` that ``rank`` holds."""
        t, rows = self.tp_rank(rank), spec.shape[0]
        if spec.tp_shard_dim == 0 and self.tp > 1:
            height = rows // self.tp
            return (t * height, (t + 1) * height), None
        if spec.tp_shard_dim == 1 and self.tp > 1:
            width = spec.shape[1] // self.tp
            return (0, rows), (t * width, (t + 1) * width)
        return (0, rows), None

    def local_shape(self, spec: ParamSpec, rank: int) -> tuple[int, ...]:
        (r0, r1), cols = self.region(spec, rank)
        shape = [r1 - r0, *spec.shape[1:]]
        if cols is not None:
            shape[1] = cols[1] - cols[0]
        return tuple(shape)


# ---- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceCopy:
    """Rows ``src_rows`` of the source rank's local shard (restricted to columns ``cols`` when set)
    become rows ``dst_rows`` of the destination rank's local tensor (all of its columns)."""

    name: str
    src_rank: int
    dst_rank: int
    src_rows: Range
    dst_rows: Range
    cols: Range | None
    numel: int
    nbytes: int


@dataclass(frozen=True)
class Message:
    """One point-to-point transfer: a single slice (received in place) or several small slices
    packed back to back into one flat buffer of ``dtype``."""

    src_rank: int
    dst_rank: int
    dtype: torch.dtype
    slices: tuple[SliceCopy, ...]

    @property
    def packed(self) -> bool:
        return len(self.slices) > 1

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slices)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slices)


@dataclass(frozen=True)
class Bucket:
    """The transfers of a run of parameters (at most the plan's ``bucket_bytes`` of the full model):
    network ``messages`` in a global order every rank follows, and same-rank ``local`` copies."""

    index: int
    names: tuple[str, ...]
    messages: tuple[Message, ...]
    local: tuple[SliceCopy, ...]


@dataclass(frozen=True)
class PlanSummary:
    """What a plan moves, in bytes of the destination dtype."""

    model_bytes: int
    bytes_per_dst: dict[int, int]
    bytes_per_src: dict[int, int]
    network_bytes: int
    local_bytes: int
    num_messages: int
    num_local_copies: int
    num_buckets: int

    @property
    def total_bytes(self) -> int:
        return self.network_bytes + self.local_bytes


@dataclass(frozen=True)
class TransferPlan:
    """Every slice that moves from the FSDP layout to the TP layout, bucket by bucket.

    Source rank ``s`` and destination rank ``d`` are ranks of the trainer and rollout roles. When
    ``colocated`` they share processes (rank ``s`` of the group is rank ``d == s``) and talk over the
    group's process group; otherwise the weight-sync group has ``dp + tp * replicas`` ranks, the
    trainer's first.
    """

    params: tuple[ParamSpec, ...]
    source: FSDPLayout
    target: TPLayout
    colocated: bool
    bucket_bytes: int
    buckets: tuple[Bucket, ...]
    # Post each bucket's messages as one grouped call where the backend can (NCCL).
    coalesce_p2p: bool = True

    @property
    def world_size(self) -> int:
        """Ranks of the process group the plan runs over."""
        return self.source.dp if self.colocated else self.source.dp + self.target.world_size

    def src_peer(self, src_rank: int) -> int:
        return src_rank

    def dst_peer(self, dst_rank: int) -> int:
        return dst_rank if self.colocated else self.source.dp + dst_rank

    @cached_property
    def digest(self) -> int:
        """A 62-bit fingerprint; ranks compare it before a sync so mismatched plans never move bytes."""
        text = repr((self.params, self.source, self.target, self.colocated, self.buckets, self.coalesce_p2p))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2

    def summary(self) -> PlanSummary:
        per_dst = dict.fromkeys(range(self.target.world_size), 0)
        per_src = dict.fromkeys(range(self.source.dp), 0)
        network = local = messages = copies = 0
        for bucket in self.buckets:
            for message in bucket.messages:
                per_dst[message.dst_rank] += message.nbytes
                per_src[message.src_rank] += message.nbytes
                network += message.nbytes
            messages += len(bucket.messages)
            for copy in bucket.local:
                per_dst[copy.dst_rank] += copy.nbytes
                per_src[copy.src_rank] += copy.nbytes
                local += copy.nbytes
            copies += len(bucket.local)
        return PlanSummary(
            model_bytes=sum(p.nbytes for p in self.params),
            bytes_per_dst=per_dst,
            bytes_per_src=per_src,
            network_bytes=network,
            local_bytes=local,
            num_messages=messages,
            num_local_copies=copies,
            num_buckets=len(self.buckets),
        )


@dataclass(frozen=True)
class SourceInfo:
    """What the trainer side reports to the planner: its DP size and every tensor's full shape."""

    dp: int
    shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class TargetInfo:
    """What the rollout side reports to the planner: its layout and its parameters."""

    layout: TPLayout
    params: tuple[ParamSpec, ...]


@dataclass(frozen=True)
class TransferStats:
    """One rank's share of one sync."""

    rank: int
    version: int
    seconds: float
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0
    messages: int = 0


# ---- describing the two sides -------------------------------------------------------------------


def param_specs(model: CausalLM) -> tuple[ParamSpec, ...]:
    """The runner model's checkpoint tensors as plan inputs (full shapes, its dtype, TP split dims)."""
    params = dict(model.named_parameters())
    shapes = model.full_shapes()
    return tuple(
        ParamSpec(name, tuple(shapes[name]), params[name].dtype, model.tp_shard_dim(name))
        for name in model.weight_names()
    )


def fsdp_local_shards(module: nn.Module, dp: int) -> dict[str, torch.Tensor]:
    """This rank's FSDP2 shard of every parameter (``DTensor.to_local()``), by name."""
    shards = {}
    for name, param in module.named_parameters():
        if isinstance(param, DTensor):
            placements = tuple(param.placements)
            if placements != (Shard(0),) or param.device_mesh.size() != dp:
                raise WeightSyncError(
                    f"parameter {name} is sharded as {placements} over {param.device_mesh.size()} ranks, but "
                    f"weight sync reads FSDP2 Shard(0) over the trainer's {dp} ranks: apply fully_shard over "
                    "a 1-D mesh of all trainer ranks (default shard placement)"
                )
            shards[name] = param.to_local().detach()
        elif dp == 1:
            shards[name] = param.detach()
        else:
            raise WeightSyncError(
                f"parameter {name} is not an FSDP2 DTensor on a trainer with dp={dp}: the module is unsharded "
                "(e.g. reshard_after_forward=False after a forward); call module.reshard() before syncing"
            )
    return shards
