"""The detector as a Ray actor: probes ship to it, a thread checks the rules, events go out three ways.

A rank is also known dead when the caller says so (:meth:`DetectorActor.rank_died`, after Ray
failed a call on its actor). Each event is appended to ``metrics.jsonl`` (when an output directory
is given), counted in the Ray metric ``raylane_detector_events`` (tags: kind, role) and logged as a
warning. Liveness of a
silent rank is asked of Ray: a call on a dead actor fails at once, while a stopped or busy one
just does not answer, which is not a crash by itself. A silent rank that does not answer is also
gone when its node's raylet accepts no connection: Ray itself learns of a lost node only when its
health checks fail, seconds later.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util import metrics as ray_metrics
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raylane.fault_tolerance.config import DetectorConfig
from raylane.fault_tolerance.detector import Detector, RankKey
from raylane.fault_tolerance.events import FaultEvent
from raylane.fault_tolerance.probes import ProbeBatch, RankIdentity

__all__ = ["DetectorActor", "start_detector"]

logger = logging.getLogger(__name__)

_PING_WAIT_S = 0.05
# A live raylet accepts a connection within milliseconds, even on another host of the cluster.
_RAYLET_CONNECT_TIMEOUT_S = 0.2


class DetectorActor:
    """Collects probe batches and reports faults; create it with :func:`start_detector`."""

    def __init__(self, config: DetectorConfig, output_dir: str | None = None) -> None:
        self.config = config
        self._detector = Detector(config)
        self._lock = threading.Lock()
        self._events: list[FaultEvent] = []
        self._handles: dict[RankKey, ActorHandle] = {}
        self._pings: dict[RankKey, ray.ObjectRef] = {}
        self._dead: dict[RankKey, str] = {}
        self._metrics_path = os.path.join(output_dir, "metrics.jsonl") if output_dir else None
        self._counter = ray_metrics.Counter(
            "raylane_detector_events",
            description="raylane fault-detector events, by C4 class",
            tag_keys=("kind", "role"),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._check_loop, name="raylane-detector", daemon=True)
        self._thread.start()

    def register(self, identity: RankIdentity, handle: ActorHandle | None) -> None:
        """A probe's rank, with its actor (asked whether it is alive once the rank goes quiet)."""
        with self._lock:
            self._detector.register(identity, time.time())
            if handle is not None:
                self._handles[identity.key] = handle
            self._pings.pop(identity.key, None)
            self._dead.pop(identity.key, None)

    @ray.method(concurrency_group="reports")  # after the probe's last report
    def unregister(self, identity: RankIdentity) -> None:
        """A probe closed: its rank is no longer expected to ship."""
        with self._lock:
            self._detector.unregister(identity)
            self._handles.pop(identity.key, None)
            self._pings.pop(identity.key, None)

    # One thread for reports: a rank's batches are then ingested in the order it shipped them.
    @ray.method(concurrency_group="reports")
    def report(self, batch: ProbeBatch) -> None:
        with self._lock:
            self._detector.ingest(batch)

    def events(self) -> list[FaultEvent]:
        """Every event so far, in order."""
        with self._lock:
            return list(self._events)

    def stats(self) -> dict[str, int]:
        """Collective entries shipped so far, and exits that came without their entry (a broken probe)."""
        with self._lock:
            return {
                "collectives": self._detector.collectives_seen,
                "orphan_exits": self._detector.orphan_exits,
            }

    def forget_group(self, worker_group: str) -> None:
        """Drop what is known of ``worker_group`` (its process group is being re-formed): its batches
        are ignored until its ranks' probes register again, then everything starts afresh (and the
        same rank may be blamed again)."""
        with self._lock:
            self._detector.forget_group(worker_group)
            for key in [k for k in self._handles if k[0] == worker_group]:
                self._handles.pop(key, None)
                self._pings.pop(key, None)
                self._dead.pop(key, None)

    def rank_died(self, worker_group: str, rank: int) -> list[FaultEvent]:
        """Ray reported ``rank`` of ``worker_group`` dead (a group call failed on its actor): a crash
        now, without waiting for its heartbeat to go quiet. Returns the new events."""
        with self._lock:
            if (worker_group, rank) in self._detector.ranks:
                self._dead[(worker_group, rank)] = "actor died (a group call on it failed)"
        return self.check_now()

    def check_now(self) -> list[FaultEvent]:
        """Run the rules once (the background thread also does, every ``check_interval_s``)."""
        with self._lock:
            now = time.time()
            self._ask_liveness(self._detector.silent(now))
            events = self._detector.check(now, self._dead)
            self._events += events
        for event in events:
            self._emit(event)
        return events

    def shutdown(self) -> None:
        self._stop.set()

    def _check_loop(self) -> None:
        while not self._stop.wait(self.config.check_interval_s):
            try:
                self.check_now()
            except Exception:
                logger.exception("detector check failed")

    def _ask_liveness(self, silent: list[RankKey]) -> None:
        for key in silent:
            if key not in self._dead and key in self._handles and key not in self._pings:
                self._pings[key] = self._handles[key].__ray_ready__.remote()
        if not self._pings:
            return
        # A dead actor's call fails within milliseconds: learn it before the hang rules run.
        ready, _ = ray.wait(list(self._pings.values()), num_returns=len(self._pings), timeout=_PING_WAIT_S)
        for key, ref in list(self._pings.items()):
            if ref not in ready:
                continue
            del self._pings[key]  # alive: asked again if it stays silent
            try:
                ray.get(ref)
            except RayActorError:
                self._dead[key] = "actor died"
        self._check_nodes([key for key in self._pings if key not in self._dead])

    def _check_nodes(self, unanswered: list[RankKey]) -> None:
        """Silent ranks that did not answer are dead if their node's raylet accepts no connection."""
        by_raylet: dict[str, list[RankKey]] = {}
        for key in unanswered:
            state = self._detector.ranks.get(key)
            if state is not None and state.identity.raylet_address:
                by_raylet.setdefault(state.identity.raylet_address, []).append(key)
        for address, keys in by_raylet.items():
            problem = _unreachable(address)
            if problem:
                for key in keys:
                    self._dead[key] = f"node unreachable: {problem}"

    def _emit(self, event: FaultEvent) -> None:
        logger.warning("fault detected: %s", event.summary())
        self._counter.inc(1, tags={"kind": event.kind, "role": event.role or "-"})
        if self._metrics_path:
            with open(self._metrics_path, "a") as out:
                out.write(json.dumps(event.to_dict()) + "\n")


def _unreachable(raylet_address: str) -> str | None:
    """Why the raylet at ``host:port`` accepts no TCP connection, or None when it does."""
    host, _, port = raylet_address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=_RAYLET_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"its raylet at {raylet_address} accepts no connection ({error.strerror or 'timed out'})"
    return None


def start_detector(
    config: DetectorConfig | None = None, output_dir: str | None = None, name: str | None = None
) -> ActorHandle:
    """Start the detector actor (threaded: reports, checks and queries run side by side) on the
    caller's node, so that a worker node that fails does not take the detector with it. The
    affinity is hard: with a soft one Ray placed it on a worker node when the head had no CPUs."""
    actor = ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"reports": 1})(DetectorActor)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"name": name} if name else {}
    return actor.options(scheduling_strategy=here, **options).remote(config or DetectorConfig(), output_dir)
