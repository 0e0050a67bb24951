"""The disaggregated rollout engines as a pool of independent replicas: a failed replica is replaced
while training goes on, and the pool grows or shrinks at run time.

    pool = RolloutPool(role, replicas=2, bundle=..., config=RolloutPoolConfig(), rejoin=reconnect)
    samples = pool.generate(prompts)      # every prompt answered once, even if a replica dies meanwhile
    pool.scale(3)                         # between steps

Each replica is a worker group of ``rollout_tp`` ranks on its own resource pool, so one replica's
death leaves the others generating. The pool records which prompt rows each replica was given;
when a replica's actor dies, its rows go to the healthy replicas, and the dead replica is replaced
on the same bundles once the step's generation is done (at once if no replica is left). ``rejoin``
is called after every change of membership, before the pool takes more work: it reconnects the
weight sync to the new set of replicas and pushes the current policy version, so a replacement never
generates with stale weights.

A job reaches a running pool through :class:`RolloutControl`, a named Ray actor it drains between
steps (``raylane rollout scale N --job NAME``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray

from raylane.actors import DeadRankError, GroupFuture, GroupTimeoutError, ResourcePool, Role, WorkerGroup
from raylane.batch import Batch
from raylane.controllers.config import RolloutPoolConfig
from raylane.rlhf import concat_samples

__all__ = [
    "CONTROL_NAMESPACE",
    "RolloutControl",
    "RolloutPool",
    "RolloutPoolError",
    "control_actor_name",
    "request_scale",
    "rollout_status",
    "start_control",
]

logger = logging.getLogger(__name__)

# Named actors are looked up per namespace; a CLI process joins the cluster in a fresh anonymous one.
CONTROL_NAMESPACE = "raylane"
# How long one look at a share's result blocks before the next share is looked at.
_POLL_S = 0.02
# How often the replicas with work in flight are pinged while a generate call waits, and how long a
# ping may take before the replica counts as silent for that round.
_PING_EVERY_S = 1.0
_PING_TIMEOUT_S = 0.5


class RolloutPoolError(RuntimeError):
    """The rollout pool cannot go on (replacements exhausted) or cannot do what was asked."""


@dataclass(eq=False)
class _Replica:
    slot: int
    pool: ResourcePool
    group: WorkerGroup

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def handle(self):
        return self.group.rollout

    def shutdown(self) -> None:
        self.group.shutdown()
        self.pool.release()


@dataclass
class _Share:
    """Prompt rows given to one replica: ``start`` is their offset in the step's batch."""

    start: int
    rows: Batch
    replica: _Replica
    future: GroupFuture


def _split(start: int, rows: Batch, parts: int) -> list[tuple[int, Batch]]:
    """Consecutive slices of ``rows``, as even as can be, at most ``parts`` and none empty."""
    bounds = np.linspace(0, len(rows), min(parts, len(rows)) + 1).round().astype(int)
    return [(start + int(a), rows.index(slice(int(a), int(b)))) for a, b in itertools.pairwise(bounds)]


class RolloutPool:
    """``replicas`` independent engine replicas of ``role`` (its ``tp_size`` ranks each).

    ``bundle`` holds the resource-pool options of one rank (``num_cpus_per_bundle``,
    ``num_gpus_per_bundle``). ``rejoin`` is called after replicas were added, removed or replaced.
    """

    def __init__(
        self,
        role: Role,
        replicas: int,
        *,
        bundle: dict[str, float],
        config: RolloutPoolConfig,
        rejoin: Callable[[], None],
    ) -> None:
        self.role = role
        self.bundle = bundle
        self.config = config
        self.rejoin = rejoin
        self.replacements = 0
        self._replicas: list[_Replica] = []
        self._dead: list[_Replica] = []
        try:
            for _ in range(replicas):
                self._replicas.append(self._start(self._free_slot()))
        except BaseException:
            self.shutdown()
            raise

    # ---- membership -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Replicas in the pool (live or waiting to be replaced)."""
        return len(self._replicas)

    @property
    def handles(self) -> list:
        """The rollout role handle of every replica, in pool order (weight-sync targets)."""
        return [replica.handle for replica in self._replicas]

    @property
    def names(self) -> list[str]:
        """The replicas' worker-group names (``raylane fault kill --group NAME`` reaches their ranks)."""
        return [replica.name for replica in self._replicas]

    def _free_slot(self) -> int:
        used = {replica.slot for replica in self._replicas}
        return min(set(range(len(used) + 1)) - used)

    def _start(self, slot: int, pool: ResourcePool | None = None) -> _Replica:
        name = f"rollout{slot}"
        pool = pool or ResourcePool([self.role.tp_size], name=name, **self.bundle)
        try:
            group = WorkerGroup(pool, {"rollout": self.role}, name=name)
        except BaseException:
            pool.release()
            raise
        return _Replica(slot, pool, group)

    def _replace_dead(self) -> None:
        """Start a fresh replica on the bundles of each dead one, then let them all rejoin."""
        for dead in self._dead:
            dead.group.shutdown()
            fresh = self._start(dead.slot, dead.pool)
            self._replicas[self._replicas.index(dead)] = fresh
            logger.warning(
                "rollout replica %s replaced (%d replacements so far)", dead.name, self.replacements
            )
        self._dead = []
        self.rejoin()

    def _mark_dead(self, replica: _Replica, reason: str) -> None:
        # Shares re-queued onto a replica not yet known dead fail after it was counted (or replaced).
        if replica in self._dead or replica not in self._replicas:
            return
        if self.replacements >= self.config.max_replacements:
            raise RolloutPoolError(
                f"rollout replica {replica.name!r} died ({reason}); {self.replacements} replica(s) were "
                f"already replaced this run, rollout_pool.max_replacements={self.config.max_replacements}: "
                "stopping the job. Look for the cause on its node, or raise rollout_pool.max_replacements"
            )
        self.replacements += 1
        self._dead.append(replica)
        logger.warning(
            "rollout replica %s died: %s; its prompts go to the healthy replicas", replica.name, reason
        )

    def replace_failed(self, timeout_s: float = 5.0) -> int:
        """Replace the replicas with a rank that died (or does not answer a ping within ``timeout_s``)
        while the pool was idle, e.g. while the trainers trained; returns how many were replaced. Call
        it before a weight sync, which cannot reach a dead replica."""
        for replica in self._replicas:
            silent = replica.group.check_alive(timeout_s)
            if silent:
                self._mark_dead(replica, f"ranks {silent} dead or silent between generate calls")
        failed = len(self._dead)
        if failed:
            self._replace_dead()
        return failed

    def scale(self, replicas: int) -> None:
        """Grow or shrink the pool to ``replicas`` (between steps: nothing is in flight then, so a
        shrink drops no work); the new set rejoins the weight sync with the current policy version."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"a rollout pool needs at least 1 replica, got {replicas!r}")
        if replicas > self.config.max_replicas:
            raise ValueError(
                f"cannot scale the rollout pool to {replicas} replicas: rollout_pool.max_replicas is "
                f"{self.config.max_replicas}; raise it in the job's config"
            )
        if replicas == self.size:
            return
        self._check_resources(replicas - self.size)
        while self.size < replicas:
            self._replicas.append(self._start(self._free_slot()))
        removed, self._replicas = self._replicas[replicas:], self._replicas[:replicas]
        for replica in removed:
            replica.handle.close_weight_sync()
            replica.shutdown()
        self.rejoin()
        logger.warning("rollout pool scaled to %d replicas: %s", self.size, self.names)

    def _check_resources(self, added: int) -> None:
        """Refuse a grow the cluster cannot hold now, rather than wait for bundles that never come."""
        if added <= 0:
            return
        ranks = added * self.role.tp_size
        needed = {
            "CPU": ranks * self.bundle.get("num_cpus_per_bundle", 0.0),
            "GPU": ranks * self.bundle.get("num_gpus_per_bundle", 0.0),
        }
        available = ray.available_resources()
        short = {k: v for k, v in needed.items() if v > 0 and v > available.get(k, 0.0) + 1e-9}
        if short:
            have = {k: round(available.get(k, 0.0), 3) for k in short}
            raise ValueError(
                f"cannot add {added} rollout replica(s): they need {short} ({ranks} bundles of "
                f"{self.bundle}) and the cluster has {have} free; free resources, add nodes or ask "
                "for fewer replicas"
            )

    # ---- work -------------------------------------------------------------------------------------

    def _submit(self, start: int, rows: Batch, replica: _Replica) -> _Share:
        return _Share(start, rows, replica, replica.handle.generate.remote(rows))

    def _dispatch(self, start: int, rows: Batch, replicas: list[_Replica]) -> list[_Share]:
        return [
            self._submit(first, part, replica)
            for (first, part), replica in zip(_split(start, rows, len(replicas)), replicas)
        ]

    def generate(self, prompts: Batch) -> Batch:
        """Every prompt row of ``prompts`` answered once (``Rollout.generate``'s layout, rows in input
        order), over the healthy replicas; the rows of a replica that dies, or hangs (silent for
        ``hang_timeout_s``), are generated again elsewhere."""
        pending = self._dispatch(0, prompts, self._replicas)
        done: dict[int, Batch] = {}
        silent_since: dict[_Replica, float] = {}
        next_ping = time.monotonic() + _PING_EVERY_S
        while pending:
            still = []
            for share in pending:
                try:
                    done[share.start] = share.future.get(timeout_s=_POLL_S)
                except GroupTimeoutError:
                    still.append(share)
                except DeadRankError as error:
                    still += self._requeue(share, str(error))
            if time.monotonic() >= next_ping:
                for replica in self._hung({share.replica for share in still}, silent_since):
                    failed = [share for share in still if share.replica is replica]
                    still = [share for share in still if share.replica is not replica]
                    reason = f"no answer to pings for {self.config.hang_timeout_s:g} s (rollout_pool.hang_timeout_s)"
                    for share in failed:
                        still += self._requeue(share, reason)
                next_ping = time.monotonic() + _PING_EVERY_S
            pending = still
        if self._dead:
            self._replace_dead()
        return concat_samples([done[start] for start in sorted(done)])

    def _requeue(self, share: _Share, reason: str) -> list[_Share]:
        """``share``'s replica failed: count it, and give its rows to the healthy replicas (to fresh
        ones if none is left)."""
        self._mark_dead(share.replica, reason)
        healthy = [r for r in self._replicas if r not in self._dead]
        if not healthy:
            self._replace_dead()
            healthy = list(self._replicas)
        return self._dispatch(share.start, share.rows, healthy)

    def _hung(self, busy: set[_Replica], silent_since: dict[_Replica, float]) -> list[_Replica]:
        """Of the replicas with work in flight, those whose ranks have not answered a ping for
        ``hang_timeout_s`` (replaced, and so killed, like dead ones)."""
        now, hung = time.monotonic(), []
        for replica in busy - set(self._dead):
            if not replica.group.check_alive(_PING_TIMEOUT_S):
                silent_since.pop(replica, None)
            elif now - silent_since.setdefault(replica, now) >= self.config.hang_timeout_s:
                hung.append(replica)
        return hung

    # ---- what the job's phase timer and reports ask ------------------------------------------------

    def reset_peak_memory(self) -> None:
        for replica in self._replicas:
            replica.handle.reset_peak_memory()

    def device_info(self) -> list:
        return [info for replica in self._replicas for info in replica.handle.device_info()]

    def weight_versions(self) -> dict[str, int]:
        """Each replica's weight version (its first rank's), by replica name."""
        return {replica.name: replica.handle.weight_version()[0] for replica in self._replicas}

    def shutdown(self) -> None:
        for replica in self._replicas:
            replica.shutdown()
        self._replicas, self._dead = [], []


class RolloutControl:
    """A running job's mailbox for rollout-pool requests: clients post, the job drains between steps
    and reports each request's outcome and the pool's status."""

    def __init__(self) -> None:
        self._requests: list[tuple[int, int]] = []
        self._outcomes: dict[int, tuple[bool, str]] = {}
        self._status: dict = {}
        self._next_id = 0

    def request_scale(self, replicas: int) -> int:
        """Queue a scale to ``replicas``; returns the request's id."""
        self._next_id += 1
        self._requests.append((self._next_id, replicas))
        return self._next_id

    def drain(self) -> list[tuple[int, int]]:
        requests, self._requests = self._requests, []
        return requests

    def report(self, request_id: int, ok: bool, message: str) -> None:
        self._outcomes[request_id] = (ok, message)

    def outcome(self, request_id: int) -> tuple[bool, str] | None:
        return self._outcomes.get(request_id)

    def set_status(self, status: dict) -> None:
        self._status = dict(status)

    def status(self) -> dict:
        return dict(self._status)


def control_actor_name(job: str) -> str:
    """The Ray name of job ``job``'s control mailbox (in namespace :data:`CONTROL_NAMESPACE`)."""
    return f"rollout-control:{job}"


def start_control(job: str):
    """Register job ``job``'s control mailbox; refuses if a running job already holds the name."""
    name = control_actor_name(job)
    try:
        ray.get_actor(name, namespace=CONTROL_NAMESPACE)
    except ValueError:
        return ray.remote(RolloutControl).options(name=name, namespace=CONTROL_NAMESPACE, num_cpus=0).remote()
    raise RolloutPoolError(
        f"a running job named {job!r} already has a rollout control mailbox on this cluster; give this "
        "job another output_dir (its last folder is the job's name) or set rollout_pool.control=false"
    )


def _find_control(job: str):
    try:
        return ray.get_actor(control_actor_name(job), namespace=CONTROL_NAMESPACE)
    except ValueError:
        raise RolloutPoolError(
            f"no running job named {job!r} with a rollout pool on this Ray cluster (its name is the last "
            "folder of its output_dir; the pool needs placement.mode=disaggregated without async_rl)"
        ) from None


def rollout_status(job: str) -> dict:
    """Running job ``job``'s rollout pool as of its last step: replicas and replacements so far."""
    return ray.get(_find_control(job).status.remote())


def request_scale(job: str, replicas: int, timeout_s: float) -> tuple[bool, str]:
    """Ask running job ``job`` to scale its rollout pool to ``replicas``; waits up to ``timeout_s``
    for the job to apply (or refuse) it between steps and returns (applied, message)."""
    control = _find_control(job)
    request_id = ray.get(control.request_scale.remote(replicas))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = ray.get(control.outcome.remote(request_id))
        if outcome is not None:
            return outcome
        time.sleep(0.2)
    raise TimeoutError(
        f"job {job!r} did not apply the scale to {replicas} within {timeout_s:g} s (requests are applied "
        "between steps: a long step delays them); it is still queued"
    )
