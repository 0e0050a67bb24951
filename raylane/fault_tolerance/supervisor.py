"""``FaultSupervisor``: a job's steps run under the detector's watch, and each event gets its policy.

A step runs in a thread of the driver while the supervisor polls the detector. A rank that crashes
fails the step's group call within a poll, and Ray's report of its death is passed to the detector,
which names the crash at once; one that hangs blocks it for good (gloo and NCCL wait
out their collective timeout), so the step is not waited on alone: the detector's event names the
rank, and the policy of its class decides. To replace it, the culprit is killed first (the step's
calls then fail at once and the step thread ends), then :class:`RankReplacer` replaces it and any
rank still blocked, and :class:`RanksReplaced` tells the job to reload its last checkpoint.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import ray
from ray.actor import ActorHandle

from raylane.actors import DeadRankError, WorkerGroup, WorkerGroupError
from raylane.fault_tolerance.config import FaultAction, FaultToleranceConfig
from raylane.fault_tolerance.detector_actor import start_detector
from raylane.fault_tolerance.events import FaultEvent
from raylane.fault_tolerance.faults import signal_process
from raylane.fault_tolerance.isolation import NodeIsolator
from raylane.fault_tolerance.recovery import RankReplacer, Replacement, RetriesExhaustedError

__all__ = ["FaultRecord", "FaultStopError", "FaultSupervisor", "RanksReplaced", "node_isolation"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_POLL_S = 0.2
# A step thread ends within a poll of the group call it is in once the culprit is dead; one busy
# on the driver ends at its next group call.
_STEP_END_WAIT_S = 120.0


@dataclass(frozen=True)
class FaultRecord:
    """One event and what was done about it, at which step of the job."""

    event: FaultEvent
    step: int
    action: FaultAction
    outcome: str

    def line(self) -> str:
        at = datetime.fromtimestamp(self.event.detected_at, UTC).strftime("%H:%M:%S")
        return f"{at} UTC, step {self.step}: {self.event.summary()} -> {self.action}: {self.outcome}"


class FaultStopError(RuntimeError):
    """The job stops on a fault (its policy says so, replacements ran out, or no rank can be
    replaced); the message reports every fault of the job, when, and what was tried."""


class RanksReplaced(Exception):
    """The step was abandoned and ranks of the group replaced: reload the last checkpoint."""

    def __init__(self, replacement: Replacement) -> None:
        super().__init__(f"ranks {list(replacement.ranks)} replaced")
        self.replacement = replacement


def node_isolation(config: FaultToleranceConfig) -> Callable[[FaultEvent], object] | None:
    """The node isolation ``config``'s policies need: a :class:`NodeIsolator`'s ``isolate`` when any
    class is ``isolate_and_replace``, else None (nothing is built, so no Kubernetes credentials are
    needed)."""
    policies = config.policies
    if any(policies.action(kind) == "isolate_and_replace" for kind in type(policies).model_fields):
        return NodeIsolator(config.isolation).isolate
    return None


@dataclass
class FaultSupervisor:
    """Watches ``group`` (its role ``role`` mixes in ``ProbedWorker``) and applies ``config``'s policies.

    ``isolate`` keeps new work off an event's node (for ``isolate_and_replace``); by default a
    :class:`NodeIsolator` of ``config.isolation`` when a policy needs one.
    """

    config: FaultToleranceConfig
    group: WorkerGroup
    role: str = ""
    output_dir: str | None = None
    isolate: Callable[[FaultEvent], object] | None = None
    records: list[FaultRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.isolate is None:
            self.isolate = node_isolation(self.config)
        self.detector: ActorHandle = start_detector(self.config.detector, self.output_dir)
        self._probed().start_probes(self.detector, self.config.probes)
        self.replacer = RankReplacer(
            self.group,
            self.detector,
            self.config.probes,
            role=self.role,
            max_replacements=self.config.max_replacements,
            survivor_grace_s=self.config.survivor_grace_s,
        )
        self._seen = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raylane-step")

    def _action(self, kind: str) -> FaultAction:
        return self.config.policies.action(kind)

    def _probed(self):
        return getattr(self.group, self.role) if self.role else self.group

    def run(self, work: Callable[[], T], step: int) -> T:
        """``work()`` with the detector watching; raises :class:`RanksReplaced` after a replacement
        and :class:`FaultStopError` when the job must stop."""
        future = self._pool.submit(work)
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except FutureTimeout:
                pass
            except WorkerGroupError as failure:
                self._named(failure, step)
            for event in self._unhandled():
                self._apply(event, step, future)

    def _named(self, failure: WorkerGroupError, step: int) -> None:
        """A step failed on a rank: act on the event that names it, or raise ``failure`` as it is."""
        if isinstance(failure, DeadRankError) and failure.group == self.group.name:
            # Ray's word that the actor died is as good as the detector's, and a heartbeat
            # takes silence_s longer to say it.
            ray.get(self.detector.rank_died.remote(failure.group, failure.rank))
        deadline = time.monotonic() + self.config.event_wait_s
        while time.monotonic() < deadline:
            for event in self._unhandled():
                self._apply(event, step, None)
            time.sleep(_POLL_S)
        raise failure

    def _unhandled(self) -> list[FaultEvent]:
        return ray.get(self.detector.events.remote())[self._seen :]

    def _apply(self, event: FaultEvent, step: int, running: Future | None) -> None:
        self._seen += 1
        action = self._action(event.kind)
        if action == "log_only":
            self.records.append(FaultRecord(event, step, action, "logged; the job goes on"))
            return
        if action == "stop":
            self._stop(FaultRecord(event, step, action, "stopped the job"), "its policy is stop")
        if event.worker_group != self.group.name or event.rank < 0:
            self._stop(
                FaultRecord(event, step, action, "nothing replaced"),
                f"no single rank of {self.group.name!r} is named: check the nodes of the event",
            )
        if self.isolate is not None and action == "isolate_and_replace":
            self.isolate(event)
        culprit = self.group.nodes[event.rank]
        if running is not None:
            # Killed before it is replaced, so that the step's calls fail and its thread ends.
            try:
                signal_process(culprit.node_id, culprit.pid, signal.SIGKILL)
            except (ray.exceptions.RayError, ProcessLookupError) as exc:
                logger.info("rank %d could not be signalled (%s); it is replaced anyway", event.rank, exc)
            try:
                running.exception(timeout=_STEP_END_WAIT_S)
            except FutureTimeout:
                self._stop(
                    FaultRecord(event, step, action, "the step did not end after its rank was killed"),
                    f"the step is still running {_STEP_END_WAIT_S:.0f} s after the culprit died",
                )
        try:
            replacement = self.replacer.replace(event, move_off_node=action == "isolate_and_replace")
        except RetriesExhaustedError as exc:
            self._stop(FaultRecord(event, step, action, "not replaced: retries exhausted"), str(exc))
        self.records.append(
            FaultRecord(
                event,
                step,
                action,
                f"ranks {list(replacement.ranks)} replaced in {replacement.seconds:.2f} s "
                f"(pid {replacement.old_pid} -> {replacement.new_pid} on {replacement.new_node_ip})",
            )
        )
        # Events raised before the group was forgotten describe this same fault.
        for covered in self._unhandled():
            self._seen += 1
            self.records.append(FaultRecord(covered, step, "log_only", "covered by the replacement above"))
        raise RanksReplaced(replacement)

    def _stop(self, record: FaultRecord, reason: str) -> None:
        self.records.append(record)
        raise FaultStopError(f"the job stops: {reason}.\nFaults of this job:\n{self.report()}")

    def report(self) -> str:
        """Every fault of the job so far, one line each: when, at which step, what, and what was done."""
        return "\n".join(f"  - {record.line()}" for record in self.records) or "  (none)"

    def close(self) -> None:
        """Stop the probes and the detector (the group may already be gone)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._probed().stop_probes()
        except WorkerGroupError:
            logger.info("probes not stopped: the group is gone")
        ray.get(self.detector.shutdown.remote())
        ray.kill(self.detector)
