"""Weight sync, the driver side: ask the ranks for their layouts, plan the FSDP → tensor-parallel
resharding once (:mod:`raylane.weight_transfer.plan`), set the ranks up, then run it per version.

    sync = WeightSync.colocated(group, source_role="actor", target_role="rollout")
    # or: WeightSync.disaggregated(trainer_group, rollout_group)
    report = sync.sync(version=step)       # every rollout rank now holds its TP shards of `step`
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.util import metrics

from raylane.actors import WorkerGroup, wait_all
from raylane.weight_transfer import PlanSummary, TransferPlan, TransferStats, WeightSyncConfig, plan_between

__all__ = ["SyncReport", "WeightSync"]

logger = logging.getLogger(__name__)

_MiB = 2**20


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
def _sync_gauges() -> tuple[metrics.Gauge, metrics.Gauge]:
    """The seconds and bytes of the last sync. Created on first use: Ray metrics need a connected Ray runtime."""
    return (
        metrics.Gauge("raylane_weight_sync_seconds", "Seconds of the last weight sync", tag_keys=("mode",)),
        metrics.Gauge(
            "raylane_weight_sync_bytes",
            "Bytes the last weight sync moved, over the network and local copies together",
            tag_keys=("mode",),
        ),
    )


class WeightSync:
    """The driver side of weight sync between a trainer role and one or more rollout groups.

    Build it with :meth:`colocated` or :meth:`disaggregated`; it plans once and sets the ranks up,
    then each :meth:`sync` moves one weight version. The trainer role subclasses
    :class:`~raylane.weight_transfer.WeightSyncSource`, the rollout role
    :class:`~raylane.weight_transfer.WeightSyncTarget`. Sources and targets are worker
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
        infos = [target.weight_target_info() for target in targets]
        return plan_between(source.weight_source_info(), infos, colocated, config)

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
        seconds_gauge, bytes_gauge = _sync_gauges()
        seconds_gauge.set(seconds, tags={"mode": self.mode})
        bytes_gauge.set(self.summary.total_bytes, tags={"mode": self.mode})
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
