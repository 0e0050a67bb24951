"""Weight resharding, the worker side: transfer-plan types, the P2P executor and the two worker roles.

The trainer keeps its weights as FSDP2 shards (``Shard(0)`` over ``dp`` ranks); the runner wants
them as tensor-parallel shards (``tp`` ranks per replica, ``replicas`` copies). The driver computes a
:class:`TransferPlan` once from the two layouts (:mod:`raylane.controllers.weight_sync`): for every
pair of source and destination ranks, which rows (and, for row-parallel weights, which column block)
of which tensor go where. Every destination receives exactly the bytes of its own shards.

Executing a plan moves one bucket at a time with point-to-point sends and receives; a bucket's sends
are packed and posted while the previous bucket is still in flight. Large slices travel on their own
and land straight in the runner's parameters; small ones are packed into one message per peer.

- *Colocated* (trainer and rollout roles in the same process on every bundle): slices that live on
  the same rank are copied locally, the rest go over the worker group's own process group.
- *Disaggregated* (separate pools): both groups join a dedicated process group of ``dp + tp *
  replicas`` ranks formed from a TCPStore that the trainer's rank 0 opens on a free port; neither
  group's default process group is touched (gloo on CPU, NCCL on GPU).

Every sync carries a version: all ranks agree on it (and on the plan) in a handshake before any
weight moves, and the runner's engine records it once the last tensor landed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Shard

from raylane.actors.dispatch import Dispatch, register
from raylane.actors.rendezvous import Rendezvous, RendezvousMaster
from raylane.actors.worker import Worker

if TYPE_CHECKING:
    from raylane.models import CausalLM
    from raylane.runner import LLMEngine

__all__ = [
    "Bucket",
    "FSDPLayout",
    "Message",
    "ParamSpec",
    "PlanSummary",
    "SliceCopy",
    "SourceInfo",
    "TPLayout",
    "TargetInfo",
    "TransferPlan",
    "TransferStats",
    "WeightSyncChannel",
    "WeightSyncError",
    "WeightSyncSource",
    "WeightSyncTarget",
    "fsdp_local_shards",
    "join_weight_sync_group",
    "pack_message",
    "param_specs",
    "run_transfer",
    "unpack_message",
]

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
        text = repr((self.params, self.source, self.target, self.colocated, self.buckets))
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


# ---- moving bytes -------------------------------------------------------------------------------


def _src_view(source: Mapping[str, torch.Tensor], piece: SliceCopy) -> torch.Tensor:
    view = source[piece.name][piece.src_rows[0] : piece.src_rows[1]]
    return view if piece.cols is None else view[:, piece.cols[0] : piece.cols[1]]


def _dst_view(target: Mapping[str, torch.Tensor], piece: SliceCopy) -> torch.Tensor:
    return target[piece.name][piece.dst_rows[0] : piece.dst_rows[1]]


def pack_message(message: Message, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The contiguous buffer to send for ``message`` (the source slice itself when it can be)."""
    if not message.packed:
        view = _src_view(source, message.slices[0])
        if view.dtype == message.dtype and view.is_contiguous():
            return view
        # .to() alone would alias a non-contiguous view of the right dtype.
        return view.to(message.dtype).contiguous()
    device = source[message.slices[0].name].device
    flat = torch.empty(message.numel, dtype=message.dtype, device=device)
    offset = 0
    for piece in message.slices:
        view = _src_view(source, piece)
        flat[offset : offset + piece.numel].view(view.shape).copy_(view)
        offset += piece.numel
    return flat


def _receive_buffer(message: Message, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Where ``message`` lands: the destination rows themselves for a single slice, else a flat buffer."""
    if not message.packed:
        view = _dst_view(target, message.slices[0])
        if view.is_contiguous() and view.dtype == message.dtype:
            return view
    device = target[message.slices[0].name].device
    return torch.empty(message.numel, dtype=message.dtype, device=device)


def unpack_message(message: Message, buffer: torch.Tensor, target: Mapping[str, torch.Tensor]) -> None:
    """Copy a received buffer into the destination tensors (nothing to do if it landed in place)."""
    offset = 0
    for piece in message.slices:
        view = _dst_view(target, piece)
        if buffer.data_ptr() != view.data_ptr():
            view.copy_(buffer[offset : offset + piece.numel].view(view.shape))
        offset += piece.numel


class WeightSyncChannel:
    """Point-to-point transport of a weight sync over one process group.

    ``group`` is either the worker group's own process group (colocated) or the dedicated
    weight-sync group (:func:`join_weight_sync_group`). The group object is used directly, with
    group ranks, so it needs no entry in ``torch.distributed``'s global registry.
    """

    def __init__(
        self, group: ProcessGroup, device: torch.device, *, owned: bool = False, store: object = None
    ) -> None:
        self.group = group
        self.device = device
        self.rank = group.rank()
        self.size = group.size()
        self._owned = owned
        self._store = store  # keeps rank 0's TCPStore alive as long as the group lives
        # NCCL fuses a batch of sends/receives into one group call; gloo runs each op on its own.
        self._coalesce = group._get_backend(device).supports_coalescing

    def start(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
    ) -> list[dist.Work]:
        """Post ``(tensor, peer)`` sends and receives; wait on the returned works.

        Between one pair of ranks and one direction, messages match in posting order, so both
        sides post in the plan's order.
        """
        if not sends and not recvs:
            return []
        if self._coalesce:
            self.group._start_coalescing(self.device)
        works = [self.group.send([tensor], peer, 0) for tensor, peer in sends]
        works += [self.group.recv([tensor], peer, 0) for tensor, peer in recvs]
        if self._coalesce:
            return [self.group._end_coalescing(self.device)]
        return works

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MAX
        self.group.allreduce([tensor], options).wait()
        return tensor

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = root
        self.group.broadcast([tensor], options).wait()

    def barrier(self) -> None:
        """Every rank of the group reached this point (a one-element all-reduce, any backend)."""
        self.all_reduce_max(torch.zeros(1, device=self.device))

    def close(self) -> None:
        """Shut the dedicated group down (a worker group's own process group is left alone)."""
        if self._owned:
            self.group.shutdown()
            self._store = None


def join_weight_sync_group(
    rendezvous: Rendezvous,
    rank: int,
    world_size: int,
    device: torch.device,
    timeout_s: float,
    master: RendezvousMaster | None = None,
) -> WeightSyncChannel:
    """Form the dedicated weight-sync process group (collective over its ``world_size`` ranks).

    Built like vLLM's stateless process group: a ``ProcessGroup`` over a prefixed TCPStore with a
    gloo (CPU) or NCCL (CUDA) backend, never registered as or replacing the default group.
    """
    timeout = timedelta(seconds=timeout_s)
    store = (
        master.store
        if master is not None
        else dist.TCPStore(rendezvous.host, rendezvous.port, world_size, is_master=False, timeout=timeout)
    )
    prefixed = dist.PrefixStore("raylane-weight-sync", store)
    group = ProcessGroup(prefixed, rank, world_size)
    if device.type == "cuda":
        from torch.distributed.distributed_c10d import ProcessGroupNCCL  # only in CUDA builds

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        backend = ProcessGroupNCCL(prefixed, rank, world_size, options)
        kind = ProcessGroup.BackendType.NCCL
    else:
        from torch.distributed.distributed_c10d import ProcessGroupGloo

        backend = ProcessGroupGloo(prefixed, rank, world_size, timeout)
        kind = ProcessGroup.BackendType.GLOO
    backend._set_sequence_number_for_group()
    group._set_default_backend(kind)
    group._register_backend(torch.device(device.type), kind, backend)
    channel = WeightSyncChannel(group, device, owned=True, store=store)
    # A first collective over every rank: NCCL creates its communicator here, not inside a bucket.
    channel.barrier()
    logger.info("rank %d/%d joined the weight-sync group at %s", rank, world_size, rendezvous)
    return channel


def _handshake(channel: WeightSyncChannel, version: int, digest: int) -> None:
    """All ranks agree on the version and the plan before any weight moves (else all of them raise)."""
    mine = torch.tensor([version, digest, -version, -digest], dtype=torch.int64, device=channel.device)
    high_version, high_digest, neg_low_version, neg_low_digest = channel.all_reduce_max(mine).tolist()
    if high_version != -neg_low_version:
        raise WeightSyncError(
            f"the ranks of this weight sync were given different versions ({-neg_low_version} .. {high_version}); "
            "pass the same version to the trainer and the rollout side (WeightSync.sync does)"
        )
    if high_digest != -neg_low_digest:
        raise WeightSyncError(
            "the ranks of this weight sync hold different transfer plans; re-plan and hand the same plan "
            "to both sides (build one WeightSync per layout pair)"
        )


def _check_shapes(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], side: str, rank: int
) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightSyncError(f"{side} rank {rank} has no tensors {missing[:8]} that the transfer plan moves")
    wrong = [
        f"{name}: {tuple(tensors[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if tuple(tensors[name].shape) != shape
    ]
    if wrong:
        raise WeightSyncError(
            f"{side} rank {rank} holds tensors of the wrong local shape for the plan: {'; '.join(wrong[:8])}"
        )


@dataclass
class _InFlight:
    """A posted bucket: its works, where its messages land, and the packed send buffers, which
    must stay alive until the sends complete (the backend reads them asynchronously)."""

    works: list[dist.Work]
    receives: list[tuple[Message, torch.Tensor]]
    send_buffers: list[torch.Tensor] = field(default_factory=list)


def _bucket_ops(
    plan: TransferPlan,
    src_rank: int | None,
    dst_rank: int | None,
) -> Iterator[tuple[list[Message], list[Message], list[SliceCopy]]]:
    for bucket in plan.buckets:
        yield (
            [m for m in bucket.messages if m.src_rank == src_rank],
            [m for m in bucket.messages if m.dst_rank == dst_rank],
            [c for c in bucket.local if c.src_rank == src_rank] if dst_rank is not None else [],
        )


@torch.no_grad()
def run_transfer(
    plan: TransferPlan,
    channel: WeightSyncChannel,
    version: int,
    *,
    src_rank: int | None = None,
    source: Mapping[str, torch.Tensor] | None = None,
    dst_rank: int | None = None,
    target: Mapping[str, torch.Tensor] | None = None,
) -> TransferStats:
    """Execute this rank's part of ``plan`` (collective over the channel's group).

    A trainer rank passes ``src_rank`` and its FSDP shards as ``source``; a rollout rank passes
    ``dst_rank`` and its TP-local parameters as ``target`` (written in place); a colocated rank
    passes both. While bucket ``k`` is in flight, bucket ``k + 1`` is packed and its local copies run.
    """
    if channel.size != plan.world_size:
        raise WeightSyncError(
            f"the transfer plan spans {plan.world_size} ranks but the process group has {channel.size}"
        )
    if source is not None:
        expected = {p.name: plan.source.local_shape(p, src_rank) for p in plan.params}
        _check_shapes(source, expected, "trainer", src_rank)
    if target is not None:
        expected = {p.name: plan.target.local_shape(p, dst_rank) for p in plan.params}
        _check_shapes(target, expected, "rollout", dst_rank)
    started = time.perf_counter()
    _handshake(channel, version, plan.digest)
    sent = received = copied = count = 0
    pending: _InFlight | None = None
    for sends, recvs, local in _bucket_ops(plan, src_rank, dst_rank):
        send_ops = [(pack_message(m, source), plan.dst_peer(m.dst_rank)) for m in sends]
        receives = [(m, _receive_buffer(m, target)) for m in recvs]
        works = channel.start(send_ops, [(buf, plan.src_peer(m.src_rank)) for m, buf in receives])
        for piece in local:
            _dst_view(target, piece).copy_(_src_view(source, piece))
            copied += piece.nbytes
        if pending is not None:
            _finish(pending, target, channel.device)
        pending = _InFlight(works, receives, [t for t, _ in send_ops])
        sent += sum(m.nbytes for m in sends)
        received += sum(m.nbytes for m in recvs)
        count += len(sends) + len(recvs)
    if pending is not None:
        _finish(pending, target, channel.device)
    return TransferStats(
        rank=channel.rank,
        version=version,
        seconds=time.perf_counter() - started,
        bytes_sent=sent,
        bytes_received=received,
        bytes_copied=copied,
        messages=count,
    )


def _finish(pending: _InFlight, target: Mapping[str, torch.Tensor] | None, device: torch.device) -> None:
    for work in pending.works:
        work.wait()
    if device.type == "cuda":
        # NCCL's wait() only orders streams; holding the host here keeps at most two buckets of
        # staging buffers alive instead of letting the loop enqueue the whole model.
        torch.cuda.current_stream(device).synchronize()
    for message, buffer in pending.receives:
        unpack_message(message, buffer, target)


# ---- worker roles -------------------------------------------------------------------------------


@dataclass
class _SyncState:
    plan: TransferPlan
    channel: WeightSyncChannel
    rank: int  # this process's source or destination rank in the plan
    source_role: str | None = None


def _require(state: _SyncState | None, role: str, how: str) -> _SyncState:
    if state is None:
        raise WeightSyncError(
            f"this {role} rank has no weight sync set up; build a raylane.controllers.WeightSync ({how}) first"
        )
    return state


class WeightSyncSource(Worker):
    """The trainer side of a weight sync: a role whose model is FSDP2-sharded over all of its ranks.

    Subclasses implement :meth:`weight_sync_module`; the driver's ``WeightSync`` calls the rest.
    """

    _weight_sync: _SyncState | None = None
    _weight_sync_master: RendezvousMaster | None = None

    def weight_sync_module(self) -> nn.Module:
        """The FSDP2-wrapped model to publish (parameters under their Hugging Face names)."""
        raise NotImplementedError(f"{type(self).__name__} must implement weight_sync_module()")

    def weight_sync_shards(self) -> dict[str, torch.Tensor]:
        """This rank's FSDP2 shard of every parameter."""
        return fsdp_local_shards(self.weight_sync_module(), self.world_size)

    @property
    def weight_sync_channel(self) -> WeightSyncChannel:
        """The dedicated weight-sync group this rank joined (disaggregated syncs)."""
        return _require(self._weight_sync, "trainer", "disaggregated").channel

    @register(Dispatch.RANK_ZERO)
    def weight_source_info(self) -> SourceInfo:
        """The DP size and the full shape of every parameter, for the planner."""
        if self.tp_size != 1:
            raise WeightSyncError(
                f"weight sync reads FSDP2 shards over a 1-D data-parallel mesh, but this trainer role has "
                f"tp_size={self.tp_size}; give the trainer Role(tp_size=1)"
            )
        shapes = {name: tuple(p.shape) for name, p in self.weight_sync_module().named_parameters()}
        return SourceInfo(dp=self.world_size, shapes=shapes)

    @register(Dispatch.RANK_ZERO)
    def open_weight_sync(self, world_size: int, timeout_s: float) -> Rendezvous:
        """Open the weight-sync group's store on a free port of this node; returns its address."""
        self._weight_sync_master = RendezvousMaster(ray.util.get_node_ip_address(), world_size, timeout_s)
        return self._weight_sync_master.address

    @register(Dispatch.ONE_TO_ALL)
    def join_weight_sync(self, rendezvous: Rendezvous, plan: TransferPlan, timeout_s: float) -> None:
        """Join the weight-sync group as the plan's source rank ``self.rank`` (collective with the
        rollout group's ``join_weight_sync``)."""
        self.close_weight_sync()
        master = self._weight_sync_master if self.rank == 0 else None
        channel = join_weight_sync_group(
            rendezvous, plan.src_peer(self.rank), plan.world_size, self.device, timeout_s, master
        )
        self._weight_sync_master = None
        self._weight_sync = _SyncState(plan, channel, self.rank)

    @register(Dispatch.ONE_TO_ALL)
    def send_weights(self, version: int) -> TransferStats:
        """Send this rank's slices of weight ``version`` (collective with ``receive_weights``)."""
        state = _require(self._weight_sync, "trainer", "disaggregated")
        return run_transfer(
            state.plan, state.channel, version, src_rank=self.rank, source=self.weight_sync_shards()
        )

    @register(Dispatch.ONE_TO_ALL)
    def close_weight_sync(self) -> None:
        """Leave the weight-sync group (no-op if none)."""
        if self._weight_sync is not None:
            self._weight_sync.channel.close()
            self._weight_sync = None


class WeightSyncTarget(Worker):
    """The rollout side of a weight sync: a role whose engine runs the model tensor-parallel over
    the role's TP groups (``CausalLM`` built with this rank's ``TensorParallelGroup``).

    Subclasses implement :meth:`weight_sync_engine`. A sync writes this rank's shards into the
    engine's parameters in place and then calls ``engine.set_weight_version``; the engine must not
    be stepping meanwhile (sync between steps, or pause it).
    """

    _weight_sync: _SyncState | None = None

    def weight_sync_engine(self) -> LLMEngine:
        """The engine whose model receives the weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement weight_sync_engine()")

    def _weight_sync_targets(self, plan: TransferPlan, dst_rank: int) -> dict[str, torch.Tensor]:
        model = self.weight_sync_engine().model
        if model.tp.size != plan.target.tp or model.tp.rank != plan.target.tp_rank(dst_rank):
            raise WeightSyncError(
                f"rollout rank {self.rank} runs TP rank {model.tp.rank} of {model.tp.size}, but the plan expects "
                f"TP rank {plan.target.tp_rank(dst_rank)} of {plan.target.tp}: build the model with "
                "TensorParallelGroup(self.tp_size, self.tp_rank, self.tp_group)"
            )
        return {name: param.detach() for name, param in model.named_parameters()}

    @property
    def weight_sync_channel(self) -> WeightSyncChannel:
        """The process group this rank syncs over (dedicated, or the group's own when colocated)."""
        return _require(self._weight_sync, "rollout", "colocated or disaggregated").channel

    @register(Dispatch.RANK_ZERO)
    def weight_target_info(self) -> TargetInfo:
        """The TP layout and the parameters of the runner model, for the planner."""
        model = self.weight_sync_engine().model
        if model.tp.size != self.tp_size:
            raise WeightSyncError(
                f"the rollout role has tp_size={self.tp_size} but its model was built with TP size {model.tp.size}"
            )
        return TargetInfo(TPLayout(self.tp_size, self.dp_size), param_specs(model))

    @register(Dispatch.ONE_TO_ALL)
    def join_weight_sync(
        self, rendezvous: Rendezvous, plan: TransferPlan, timeout_s: float, first_dst_rank: int = 0
    ) -> None:
        """Join the weight-sync group as the plan's destination rank ``first_dst_rank + self.rank``
        (several rollout groups can share one sync, each holding whole replicas); collective with
        the trainer group's ``join_weight_sync``."""
        dst_rank = first_dst_rank + self.rank
        self._weight_sync_targets(plan, dst_rank)
        self.close_weight_sync()
        channel = join_weight_sync_group(
            rendezvous, plan.dst_peer(dst_rank), plan.world_size, self.device, timeout_s
        )
        self._weight_sync = _SyncState(plan, channel, dst_rank)

    @register(Dispatch.ONE_TO_ALL)
    def receive_weights(self, version: int) -> TransferStats:
        """Receive this rank's shards of weight ``version`` in place (collective with ``send_weights``)."""
        state = _require(self._weight_sync, "rollout", "disaggregated")
        stats = run_transfer(
            state.plan,
            state.channel,
            version,
            dst_rank=state.rank,
            target=self._weight_sync_targets(state.plan, state.rank),
        )
        self.weight_sync_engine().set_weight_version(version)
        return stats

    @register(Dispatch.ONE_TO_ALL)
    def attach_colocated_source(self, plan: TransferPlan, source_role: str) -> None:
        """Sync from the trainer role ``source_role`` hosted in this same process, over this group's
        process group."""
        if not plan.colocated:
            raise WeightSyncError("attach_colocated_source needs a plan made with colocated=True")
        source = self.colocated(source_role)
        if not isinstance(source, WeightSyncSource):
            raise WeightSyncError(
                f"role {source_role!r} is a {type(source).__name__}, not a WeightSyncSource: "
                "the trainer role must subclass raylane.actors.WeightSyncSource"
            )
        self._weight_sync_targets(plan, self.rank)
        if not dist.is_initialized():
            raise WeightSyncError(
                "colocated weight sync needs the worker group's process group (DistConfig backend)"
            )
        self.close_weight_sync()
        channel = WeightSyncChannel(dist.group.WORLD, self.device)
        self._weight_sync = _SyncState(plan, channel, self.rank, source_role)

    @register(Dispatch.ONE_TO_ALL)
    def reshard_colocated(self, version: int) -> TransferStats:
        """Reshard weight ``version`` from the colocated trainer role into this engine (collective)."""
        state = _require(self._weight_sync, "rollout", "colocated")
        if state.source_role is None:
            raise WeightSyncError(
                "this rank joined a disaggregated weight sync; call receive_weights instead"
            )
        source = self.colocated(state.source_role)
        stats = run_transfer(
            state.plan,
            state.channel,
            version,
            src_rank=self.rank,
            source=source.weight_sync_shards(),
            dst_rank=self.rank,
            target=self._weight_sync_targets(state.plan, self.rank),
        )
        self.weight_sync_engine().set_weight_version(version)
        return stats

    @register(Dispatch.ONE_TO_ALL)
    def close_weight_sync(self) -> None:
        """Forget the weight sync and leave a dedicated group (no-op if none)."""
        if self._weight_sync is not None:
            self._weight_sync.channel.close()
            self._weight_sync = None
