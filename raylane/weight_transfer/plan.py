"""Weight resharding plans: what moves from which trainer shard to which runner shard.

The trainer keeps its weights as FSDP2 shards (``Shard(0)`` over ``dp`` ranks); the runner wants
them as tensor-parallel shards (``tp`` ranks per replica, ``replicas`` copies). The driver computes a
:class:`TransferPlan` once from the two layouts (:func:`plan_weight_transfer`, pure and deterministic):
for every pair of source and destination ranks, which rows (and, for row-parallel weights, which
column block) of which tensor go where, grouped in buckets. Every destination receives exactly the
bytes of its own shards.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

if TYPE_CHECKING:
    from raylane.models import CausalLM

logger = logging.getLogger(__name__)

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


# ---- planning -----------------------------------------------------------------------------------

_MiB = 2**20


@dataclass(frozen=True)
class WeightSyncConfig:
    """How weights move.

    ``bucket_bytes``: each bucket covers at most this many bytes of the full model (one replica, in
    the runner's dtype; a tensor larger than that is split by rows), which bounds staging memory;
    two buckets are in flight at a time. ``pack_below_bytes``: slices smaller than this travel
    packed into one message per pair of ranks and bucket (fewer, larger messages); larger slices
    travel alone and land in place. ``timeout_s`` bounds forming the weight-sync group and every
    transfer in it. ``coalesce_p2p``: post a bucket's sends and receives as one NCCL group call
    (off: one call per message, to rule grouped point-to-point out when a sync stalls); gloo posts
    them one by one either way.
    """

    bucket_bytes: int = 128 * _MiB
    pack_below_bytes: int = 1 * _MiB
    timeout_s: float = 300.0
    coalesce_p2p: bool = True

    def __post_init__(self) -> None:
        if self.bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {self.bucket_bytes}")
        if self.pack_below_bytes < 0:
            raise ValueError(f"pack_below_bytes must be >= 0, got {self.pack_below_bytes}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


def _check_layouts(
    params: Sequence[ParamSpec], source: FSDPLayout, target: TPLayout, colocated: bool
) -> None:
    if colocated and source.dp != target.world_size:
        raise ValueError(
            f"colocated weight sync puts trainer and rollout ranks in the same processes, so the trainer's "
            f"dp ({source.dp}) must equal tp * replicas ({target.tp} * {target.replicas}); choose a tp that "
            f"divides dp={source.dp} or use a disaggregated placement"
        )
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(
            f"duplicate parameter names in the plan: {sorted({n for n in names if names.count(n) > 1})}"
        )
    for spec in params:
        if not spec.shape:
            raise ValueError(
                f"{spec.name} is a 0-d tensor; FSDP2 shards dim 0, so weight sync needs >= 1-d tensors"
            )
        if spec.tp_shard_dim not in (None, 0, 1) or (spec.tp_shard_dim == 1 and len(spec.shape) < 2):
            raise ValueError(
                f"{spec.name}: tp_shard_dim {spec.tp_shard_dim} is not 0, 1 or None for shape {spec.shape}"
            )
        dim = spec.tp_shard_dim
        if dim is not None and spec.shape[dim] % target.tp:
            raise ValueError(
                f"{spec.name}: dim {dim} of size {spec.shape[dim]} does not split over tp={target.tp} ranks; "
                "pick a tp that divides the attention heads, KV heads and intermediate size"
            )


def _pieces(params: Sequence[ParamSpec], bucket_bytes: int) -> list[list[tuple[ParamSpec, int, int]]]:
    """Row ranges of the parameters, grouped greedily into buckets of at most ``bucket_bytes``."""
    buckets: list[list[tuple[ParamSpec, int, int]]] = [[]]
    filled = 0
    for spec in params:
        row_bytes = spec.row_numel * spec.dtype.itemsize
        rows_per_piece = max(1, bucket_bytes // max(1, row_bytes))
        for start in range(0, spec.shape[0], rows_per_piece):
            stop = min(start + rows_per_piece, spec.shape[0])
            size = (stop - start) * row_bytes
            if buckets[-1] and filled + size > bucket_bytes:
                buckets.append([])
                filled = 0
            buckets[-1].append((spec, start, stop))
            filled += size
    return [b for b in buckets if b]


def _slices(piece: tuple[ParamSpec, int, int], source: FSDPLayout, target: TPLayout) -> list[SliceCopy]:
    """What every (source, destination) pair moves of global rows ``[start, stop)`` of one tensor."""
    spec, start, stop = piece
    out = []
    for dst in range(target.world_size):
        (d0, d1), cols = target.region(spec, dst)
        dst_row_numel = (
            spec.row_numel if cols is None else spec.row_numel // spec.shape[1] * (cols[1] - cols[0])
        )
        for src in range(source.dp):
            s0, s1 = source.rows(spec.shape[0], src)
            lo, hi = max(start, s0, d0), min(stop, s1, d1)
            if lo >= hi:
                continue
            numel = (hi - lo) * dst_row_numel
            out.append(
                SliceCopy(
                    name=spec.name,
                    src_rank=src,
                    dst_rank=dst,
                    src_rows=(lo - s0, hi - s0),
                    dst_rows=(lo - d0, hi - d0),
                    cols=cols,
                    numel=numel,
                    nbytes=numel * spec.dtype.itemsize,
                )
            )
    return out


def plan_weight_transfer(
    params: Sequence[ParamSpec],
    source: FSDPLayout,
    target: TPLayout,
    *,
    colocated: bool,
    bucket_bytes: int = WeightSyncConfig.bucket_bytes,
    pack_below_bytes: int = WeightSyncConfig.pack_below_bytes,
    coalesce_p2p: bool = WeightSyncConfig.coalesce_p2p,
) -> TransferPlan:
    """The transfer plan from FSDP2 ``Shard(0)`` over ``source.dp`` ranks to ``target``'s TP shards.

    Each destination rank gets exactly its shards: a column-parallel rank only its rows, a
    row-parallel rank only its column block, replicated tensors whole. When ``colocated``, slices
    whose source and destination are the same rank become local copies.
    """
    _check_layouts(params, source, target, colocated)
    dtypes = {p.name: p.dtype for p in params}
    buckets = []
    for index, pieces in enumerate(_pieces(params, bucket_bytes)):
        by_pair: dict[tuple[int, int], list[SliceCopy]] = defaultdict(list)
        local: list[SliceCopy] = []
        for piece in pieces:
            for copy in _slices(piece, source, target):
                if colocated and copy.src_rank == copy.dst_rank:
                    local.append(copy)
                else:
                    by_pair[copy.src_rank, copy.dst_rank].append(copy)
        messages = []
        for (src, dst), copies in sorted(by_pair.items()):
            small: dict[Any, list[SliceCopy]] = defaultdict(list)
            for copy in copies:
                if copy.nbytes >= pack_below_bytes:
                    messages.append(Message(src, dst, dtypes[copy.name], (copy,)))
                else:
                    small[dtypes[copy.name]].append(copy)
            messages += [Message(src, dst, dtype, tuple(group)) for dtype, group in small.items()]
        names = tuple(dict.fromkeys(spec.name for spec, _, _ in pieces))
        buckets.append(Bucket(index, names, tuple(messages), tuple(local)))
    return TransferPlan(
        params=tuple(params),
        source=source,
        target=target,
        colocated=colocated,
        bucket_bytes=bucket_bytes,
        buckets=tuple(buckets),
        coalesce_p2p=coalesce_p2p,
    )


def _match(source: SourceInfo, target: TargetInfo) -> None:
    missing = [p.name for p in target.params if p.name not in source.shapes]
    wrong = [
        f"{p.name}: trainer {source.shapes[p.name]}, runner {p.shape}"
        for p in target.params
        if p.name in source.shapes and tuple(source.shapes[p.name]) != p.shape
    ]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"the trainer has no {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if wrong:
            problems.append("shapes differ: " + "; ".join(wrong[:8]))
        raise ValueError(
            "the trainer's model and the runner's model do not match (build both from the same config): "
            + " | ".join(problems)
        )
    extra = sorted(set(source.shapes) - {p.name for p in target.params})
    if extra:
        logger.info("weight sync skips trainer-only parameters %s", extra[:8])


def plan_between(
    source: SourceInfo, targets: Sequence[TargetInfo], colocated: bool, config: WeightSyncConfig
) -> TransferPlan:
    """The plan from a trainer to one or more rollout groups, from what their ranks reported.

    The rollout groups must run the same model at the same TP size; their replicas together form
    the destination layout.
    """
    first = targets[0]
    for info in targets[1:]:
        if info.layout.tp != first.layout.tp or info.params != first.params:
            raise ValueError(
                "the rollout groups of one weight sync must run the same model with the same tp size; got "
                f"tp sizes {[i.layout.tp for i in targets]}"
            )
    _match(source, first)
    return plan_weight_transfer(
        first.params,
        FSDPLayout(source.dp),
        TPLayout(first.layout.tp, sum(info.layout.replicas for info in targets)),
        colocated=colocated,
        bucket_bytes=config.bucket_bytes,
        pack_below_bytes=config.pack_below_bytes,
        coalesce_p2p=config.coalesce_p2p,
    )
