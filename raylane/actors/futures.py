"""``GroupFuture``: the pending result of one group call, and the wait that never hangs.

Waiting polls every rank's result with a short timeout instead of blocking on all of
them, so the first failure is raised as soon as it lands even while other ranks are
still busy (typically blocked in a collective waiting for the failed one). Ray reports
a killed actor process to its callers at once, so a dead rank surfaces within a poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from raylane.actors.errors import DeadRankError, GroupTimeoutError, RankError, WorkerGroupError
from raylane.actors.host import NodeInfo

__all__ = ["GroupFuture", "wait_all"]

# After a first failure, how long to let other ranks' results land: if one rank died,
# its peers fail too (their collectives lose a peer), and the dead rank is the one to report.
_FAILURE_GRACE_S = 0.5


class GroupFuture:
    """Results of one call on several ranks; :meth:`get` waits, gathers and collects them."""

    def __init__(
        self,
        *,
        group: str,
        method: str,
        ranks: Sequence[int],
        refs: Sequence[ray.ObjectRef],
        kept: Sequence[bool],
        collect: Callable[[list[Any]], Any],
        nodes: Mapping[int, NodeInfo],
        timeout_s: float | None,
        poll_interval_s: float,
    ) -> None:
        self.group = group
        self.method = method
        self.ranks = list(ranks)
        self.refs = list(refs)
        self._kept = list(kept)
        self._collect = collect
        self._nodes = dict(nodes)
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s

    def done(self) -> bool:
        """Whether every rank has finished (successfully or not)."""
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0, fetch_local=False)
        return len(ready) == len(self.refs)

    def get(self, timeout_s: float | None = None) -> Any:
        """The collected result; raises ``RankError``, ``DeadRankError`` or ``GroupTimeoutError``.

        ``timeout_s`` overrides the group's ``call_timeout_s`` (``None`` there means no limit,
        which is safe: a dead rank still ends the wait).
        """
        timeout = self._timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = [None] * len(self.refs)
        pending = list(range(len(self.refs)))
        while pending:
            wait_s = self._poll_interval_s
            if deadline is not None:
                wait_s = max(0.0, min(wait_s, deadline - time.monotonic()))
            ready = self._ready(pending, wait_s)
            if ready:
                failures = self._fetch(ready, values)
                pending = [i for i in pending if i not in ready]
                if failures:
                    raise self._worst(failures, pending)
            elif deadline is not None and time.monotonic() >= deadline:
                raise GroupTimeoutError(
                    group=self.group,
                    method=self.method,
                    timeout_s=timeout,
                    pending_ranks=[self.ranks[i] for i in pending],
                )
        return self._collect([v for v, keep in zip(values, self._kept) if keep])

    def _ready(self, indices: list[int], timeout_s: float) -> list[int]:
        refs = [self.refs[i] for i in indices]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        done_set = set(done)
        return [i for i in indices if self.refs[i] in done_set]

    def _fetch(self, indices: list[int], values: list[Any]) -> list[RankError | DeadRankError]:
        """Store the values of finished calls; return the mapped errors of failed ones."""
        try:
            for i, value in zip(indices, ray.get([self.refs[i] for i in indices])):
                values[i] = value
            return []
        except (RayTaskError, RayActorError):
            pass
        failures = []
        for i in indices:
            try:
                values[i] = ray.get(self.refs[i])
            except (RayTaskError, RayActorError) as exc:
                failures.append(self._map(self.ranks[i], exc))
        return failures

    def _worst(self, failures: list[RankError | DeadRankError], pending: list[int]) -> WorkerGroupError:
        """The failure to report: a dead rank first (its peers' errors are consequences), else the lowest rank."""
        if pending and not any(isinstance(f, DeadRankError) for f in failures):
            late = self._ready(pending, _FAILURE_GRACE_S)
            failures += self._fetch(late, [None] * len(self.refs))
        failures.sort(key=lambda f: (not isinstance(f, DeadRankError), f.rank))
        worst = failures[0]
        others = sorted({f.rank for f in failures[1:]})
        if others:
            worst.args = (f"{worst.args[0]}\n(ranks {others} of the same call failed too)",)
        return worst

    def _map(self, rank: int, exc: RayTaskError | RayActorError) -> RankError | DeadRankError:
        node = self._nodes.get(rank)
        node_ip = node.node_ip if node else "unknown"
        pid = node.pid if node else None
        if isinstance(exc, RayActorError):
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith("The actor")]
            return DeadRankError(
                group=self.group,
                rank=rank,
                method=self.method,
                node_ip=node_ip,
                pid=pid,
                reason=" ".join(lines) or str(exc),
            )
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        error = RankError(
            group=self.group,
            rank=rank,
            method=self.method,
            node_ip=node_ip,
            pid=pid,
            cause=cause,
            remote_traceback=str(exc),
        )
        error.__cause__ = cause
        return error

    def __repr__(self) -> str:
        return f"GroupFuture({self.group!r}.{self.method}, ranks={self.ranks}, done={self.done()})"


def wait_all(futures: Sequence[GroupFuture], timeout_s: float) -> list[Any]:
    """Results of futures (of one or several groups) that run together, in order.

    The first failure on any of them is raised at once, even while the others are still blocked
    (e.g. in a collective with the failed rank); ``GroupTimeoutError`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    results: list[Any] = [None] * len(futures)
    pending = set(range(len(futures)))
    while pending:
        for i in sorted(pending):
            try:
                results[i] = futures[i].get(timeout_s=0.05)
            except GroupTimeoutError:
                if time.monotonic() > deadline:
                    raise
                continue
            pending.discard(i)
    return results
