"""Weight sync, the driver side: plan the FSDP → tensor-parallel resharding once, then run it per version.

    sync = WeightSync.colocated(group, source_role="actor", target_role="rollout")
    # or: WeightSync.disaggregated(trainer_group, rollout_group)
    report = sync.sync(version=step)       # every rollout rank now holds its TP shards of `step`

The plan (:func:`plan_weight_transfer`) is pure and deterministic: from the parameters' full shapes
and TP split dimensions, the trainer's DP size and the runner's TP size and replica count, it lists
for every pair of ranks the exact slices to move, grouped in buckets. The workers execute it
(:mod:`raylane.actors.weight_transfer`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.util import metrics

from raylane.actors import WorkerGroup, wait_all
from raylane.actors.weight_transfer import (
    Bucket,
    FSDPLayout,
    Message,
    ParamSpec,
    PlanSummary,
    SliceCopy,
    SourceInfo,
    TargetInfo,
    TPLayout,
    TransferPlan,
    TransferStats,
)

__all__ = ["SyncReport", "WeightSync", "WeightSyncConfig", "plan_weight_transfer"]

logger = logging.getLogger(__name__)

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


# ---- planning -----------------------------------------------------------------------------------


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


# ---- orchestration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncReport:
    """One finished sync: the driver-side wall time and every rank's stats."""

    version: int
    seconds: float
    summary: PlanSummary
    ranks: tuple[TransferStats, ...]

    @property
    def gbps(self) -> float:
        """Model bytes (one replica) per second, in GB/s."""
        return self.summary.model_bytes / self.seconds / 1e9


@functools.cache
def _sync_seconds_gauge() -> metrics.Gauge:
    # Created on first use: Ray metrics need a connected Ray runtime.
    return metrics.Gauge("raylane_weight_sync_seconds", "Seconds of the last weight sync", tag_keys=("mode",))


class WeightSync:
    """The driver side of weight sync between a trainer role and one or more rollout groups.

    Build it with :meth:`colocated` or :meth:`disaggregated`; it plans once and sets the ranks up,
    then each :meth:`sync` moves one weight version. The trainer role subclasses
    :class:`~raylane.actors.weight_transfer.WeightSyncSource`, the rollout role
    :class:`~raylane.actors.weight_transfer.WeightSyncTarget`. Sources and targets are worker
    groups (single role) or role handles (``group.actor``).
    """

    def __init__(
        self, source: Any, targets: Sequence[Any], plan: TransferPlan, config: WeightSyncConfig
    ) -> None:
        self.source = source
        self.targets = list(targets)
        self.plan = plan
        self.config = config
        self.summary = plan.summary()
        self._closed = False

    @staticmethod
    def _plan(source: Any, targets: Sequence[Any], colocated: bool, config: WeightSyncConfig) -> TransferPlan:
        source_info: SourceInfo = source.weight_source_info()
        infos: list[TargetInfo] = [target.weight_target_info() for target in targets]
        first = infos[0]
        for info in infos[1:]:
            if info.layout.tp != first.layout.tp or info.params != first.params:
                raise ValueError(
                    "the rollout groups of one weight sync must run the same model with the same tp size; got "
                    f"tp sizes {[i.layout.tp for i in infos]}"
                )
        _match(source_info, first)
        return plan_weight_transfer(
            first.params,
            FSDPLayout(source_info.dp),
            TPLayout(first.layout.tp, sum(info.layout.replicas for info in infos)),
            colocated=colocated,
            bucket_bytes=config.bucket_bytes,
            pack_below_bytes=config.pack_below_bytes,
            coalesce_p2p=config.coalesce_p2p,
        )

    @classmethod
    def colocated(
        cls,
        group: WorkerGroup,
        *,
        source_role: str = "actor",
        target_role: str = "rollout",
        config: WeightSyncConfig | None = None,
    ) -> WeightSync:
        """Sync between two roles of one colocated group (same processes, the group's process group)."""
        config = config or WeightSyncConfig()
        source, target = getattr(group, source_role), getattr(group, target_role)
        plan = cls._plan(source, [target], colocated=True, config=config)
        target.attach_colocated_source(plan, source_role)
        sync = cls(source, [target], plan, config)
        sync._log()
        return sync

    @classmethod
    def disaggregated(
        cls, source: Any, target: Any | Sequence[Any], *, config: WeightSyncConfig | None = None
    ) -> WeightSync:
        """Sync from a trainer group to separate rollout group(s) over a dedicated process group.

        ``target`` is one rollout group or a list of them (e.g. one engine group per replica, all
        with the same TP size); their replicas together form the destination layout.
        """
        config = config or WeightSyncConfig()
        targets = list(target) if isinstance(target, list | tuple) else [target]
        plan = cls._plan(source, targets, colocated=False, config=config)
        rendezvous = source.open_weight_sync(plan.world_size, config.timeout_s)
        joins = [source.join_weight_sync.remote(rendezvous, plan, config.timeout_s)]
        first_dst_rank = 0
        for handle in targets:
            joins.append(handle.join_weight_sync.remote(rendezvous, plan, config.timeout_s, first_dst_rank))
            first_dst_rank += len(handle.ranks)
        wait_all(joins, config.timeout_s)
        sync = cls(source, targets, plan, config)
        sync._log()
        return sync

    def _log(self) -> None:
        s = self.summary
        logger.info(
            "%s weight sync planned: dp=%d -> tp=%d x %d replicas, %d buckets, %d messages, "
            "%.1f MiB over the network + %.1f MiB local per sync",
            self.mode,
            self.plan.source.dp,
            self.plan.target.tp,
            self.plan.target.replicas,
            s.num_buckets,
            s.num_messages,
            s.network_bytes / _MiB,
            s.local_bytes / _MiB,
        )

    @property
    def mode(self) -> str:
        return "colocated" if self.plan.colocated else "disaggregated"

    def sync(self, version: int) -> SyncReport:
        """Move weight ``version`` from every trainer rank to every rollout rank; the engines record it.

        The report lists the trainer ranks' stats first (disaggregated), then the rollout ranks'.
        """
        if self._closed:
            raise RuntimeError("this WeightSync is closed; build a new one")
        if not isinstance(version, int):
            raise ValueError(f"weight version must be an int, got {version!r}")
        started = time.perf_counter()
        if self.plan.colocated:
            stats = self.targets[0].reshard_colocated(version)
        else:
            futures = [self.source.send_weights.remote(version)]
            futures += [target.receive_weights.remote(version) for target in self.targets]
            stats = [s for group_stats in wait_all(futures, self.config.timeout_s) for s in group_stats]
        seconds = time.perf_counter() - started
        _sync_seconds_gauge().set(seconds, tags={"mode": self.mode})
        report = SyncReport(version, seconds, self.summary, tuple(stats))
        logger.info(
            "weight version %d synced (%s) in %.3f s, %.2f GB/s", version, self.mode, seconds, report.gbps
        )
        return report

    def close(self) -> None:
        """Release the weight-sync group on every rank (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for target in self.targets:
            target.close_weight_sync()
        if not self.plan.colocated:
            self.source.close_weight_sync()

    def __enter__(self) -> WeightSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
