"""Replacing a faulty rank: the action taken on a crash, a hang or a straggler a detector names.

A gloo collective blocked on a stopped peer cannot be aborted from inside (``ProcessGroup.abort``
does not wake it), so the culprit's process is killed: the peers waiting on it fail at once with
"connection closed"; a peer waiting on another peer would wait for the collective timeout, so it
is replaced as well, and so is a peer found dead too (a node lost with all its ranks). The group
starts fresh actors on the same bundles, once they are on a live node (reserved again elsewhere
when the culprit's node was isolated), and re-forms its process group. Probes start again on every
rank (sequence numbers restart with the new process group). Reloading the last
checkpoint is the caller's next step; the policy bounds how many replacements a job gets.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle

from raylane.actors import DeadRankError, GroupFuture, WorkerGroup
from raylane.fault_tolerance.config import ProbeConfig
from raylane.fault_tolerance.events import FaultEvent
from raylane.fault_tolerance.faults import signal_process

__all__ = ["RankReplacer", "Replacement", "RetriesExhaustedError"]

logger = logging.getLogger(__name__)


class RetriesExhaustedError(RuntimeError):
    """More faults than the policy allows replacements for; the message lists them all."""


def _died(ref: ray.ObjectRef) -> bool:
    """Whether a finished call failed because its actor is dead (not with an error of its own)."""
    try:
        ray.get(ref)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.RayError:
        pass
    return False


@dataclass(frozen=True)
class Replacement:
    """One replacement: the event behind it, the ranks replaced (the culprit first) and its seconds."""

    event: FaultEvent
    ranks: tuple[int, ...]
    seconds: float
    old_pid: int
    new_pid: int
    new_node_ip: str


@dataclass
class RankReplacer:
    """Replaces the culprit rank of each event on ``group`` (``max_replacements`` at most).

    ``detector`` gets the group forgotten and probes restarted on the new process group. Ranks of
    the stalled call still blocked ``survivor_grace_s`` after the culprit died are replaced too.
    ``role`` names the role that mixes in ``ProbedWorker`` in a group of colocated roles.
    """

    group: WorkerGroup
    detector: ActorHandle
    probe_config: ProbeConfig | None = None
    role: str = ""
    max_replacements: int = 3
    survivor_grace_s: float = 3.0
    history: list[Replacement] = field(default_factory=list)

    def replace(
        self, event: FaultEvent, pending: GroupFuture | None = None, move_off_node: bool = False
    ) -> Replacement:
        """Kill the culprit, let ``pending`` (the call it stalled) fail, replace it, restart the probes.

        Without ``pending``, every other rank whose call thread stays busy ``survivor_grace_s`` is
        taken for one still blocked in the stalled call. With ``move_off_node`` (the node was
        isolated), the pool's bundles on the culprit's node are reserved again elsewhere and every
        rank on them is replaced there.
        """
        if event.worker_group != self.group.name or not 0 <= event.rank < self.group.world_size:
            raise ValueError(f"event names no rank of group {self.group.name!r}: {event.summary()}")
        if len(self.history) >= self.max_replacements:
            past = "\n".join(f"  - {r.event.summary()}" for r in self.history)
            raise RetriesExhaustedError(
                f"group {self.group.name!r} had {len(self.history)} ranks replaced already (max_replacements="
                f"{self.max_replacements}); stopping on the next fault:\n  - {event.summary()}\nearlier:\n{past}\n"
                "Check the nodes named above (hardware, network), raise max_replacements, or resume from "
                "the last checkpoint once they are fixed."
            )
        start = time.monotonic()
        # Nothing the recovery kills is a new fault: the group is forgotten until its probes restart.
        ray.get(self.detector.forget_group.remote(self.group.name))
        old = self.group.nodes[event.rank]
        try:
            signal_process(old.node_id, old.pid, signal.SIGKILL)
        except (ray.exceptions.RayError, ProcessLookupError) as exc:  # gone already, or its node is
            logger.info("rank %d's process could not be signalled (%s); replacing it anyway", event.rank, exc)
        if pending is None:
            # An actor's ready call queues behind the call its thread is running.
            survivors = [r for r in range(self.group.world_size) if r != event.rank]
            refs = [self.group.actors[r].__ray_ready__.remote() for r in survivors]
        else:
            survivors, refs = list(pending.ranks), list(pending.refs)
        # Survivors waiting on the culprit fail now; one waiting on another survivor stays
        # blocked until the collective timeout, so it is replaced too, as is any that died with
        # the culprit (a lost node takes all its ranks).
        ready = ray.wait(refs, num_returns=len(refs), timeout=self.survivor_grace_s)[0] if refs else []
        ranks = [event.rank] + [
            r for r, ref in zip(survivors, refs) if r != event.rank and (ref not in ready or _died(ref))
        ]
        if move_off_node:
            ranks += [r for r in self.group.pool.move_off(old.node_id) if r not in ranks]
        # A node lost with the culprit: its bundles must be on a live node before ranks start there.
        self.group.pool.wait_placed()
        try:
            self.group.replace_ranks(ranks)
        except DeadRankError as exc:
            # A new rank went down with a node that Ray had not yet declared lost; the other ranks
            # wait for it in the rendezvous, so every rank is started again.
            logger.warning("a replacement died while the group re-formed (%s); replacing every rank", exc)
            self.group.pool.wait_placed()
            ranks = list(range(self.group.world_size))
            self.group.replace_ranks(ranks)
        probed = getattr(self.group, self.role) if self.role else self.group
        probed.start_probes(self.detector, self.probe_config)
        new = self.group.nodes[event.rank]
        replacement = Replacement(
            event, tuple(ranks), time.monotonic() - start, old.pid, new.pid, new.node_ip
        )
        self.history.append(replacement)
        logger.warning(
            "replaced ranks %s of %r (%s) in %.2f s: culprit pid %d -> %d on %s",
            ranks,
            self.group.name,
            event.kind,
            replacement.seconds,
            old.pid,
            new.pid,
            new.node_ip,
        )
        return replacement
