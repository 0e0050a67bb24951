"""Executing a transfer plan: point-to-point sends and receives, one bucket at a time.

A bucket's sends are packed and posted while the previous bucket is still in flight. Large slices
travel on their own and land straight in the runner's parameters; small ones are packed into one
message per peer. Every sync carries a version: all ranks agree on it (and on the plan) in a
handshake before any weight moves.

- *Colocated* (trainer and rollout roles in the same process on every bundle): slices that live on
  the same rank are copied locally, the rest go over the worker group's own process group.
- *Disaggregated* (separate pools): both groups join a dedicated process group of ``dp + tp *
  replicas`` ranks formed from a TCPStore that the trainer's rank 0 opens on a free port; neither
  group's default process group is touched (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from raylane.actors.rendezvous import Rendezvous, RendezvousMaster
from raylane.weight_transfer.plan import (
    Message,
    SliceCopy,
    TransferPlan,
    TransferStats,
    WeightSyncError,
)

logger = logging.getLogger(__name__)


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
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[torch.Tensor, int]],
        coalesce: bool = True,
    ) -> list[dist.Work]:
        """Post ``(tensor, peer)`` sends and receives; wait on the returned works.

        Between one pair of ranks and one direction, messages match in posting order, so both
        sides post in the plan's order. ``coalesce`` groups them into one call where the backend
        supports it.
        """
        if not sends and not recvs:
            return []
        grouped = coalesce and self._coalesce
        if grouped:
            self.group._start_coalescing(self.device)
        works = [self.group.send([tensor], peer, 0) for tensor, peer in sends]
        works += [self.group.recv([tensor], peer, 0) for tensor, peer in recvs]
        if grouped:
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
        works = channel.start(
            send_ops, [(buf, plan.src_peer(m.src_rank)) for m, buf in receives], plan.coalesce_p2p
        )
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
