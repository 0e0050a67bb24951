"""Errors of the actor layer: each names the worker group and, where one is to blame, the rank and node."""

from __future__ import annotations

__all__ = [
    "DeadRankError",
    "DispatchError",
    "GroupTimeoutError",
    "RankError",
    "ResourcePoolError",
    "WorkerGroupError",
]


class WorkerGroupError(RuntimeError):
    """Base class of every error a worker group raises on the driver."""

    def __reduce__(self) -> tuple:
        # Keyword-only constructors do not survive BaseException's default pickling, and these
        # errors may cross process boundaries (e.g. a controller that runs as a Ray task).
        return _rebuild_error, (type(self), self.args, self.__dict__.copy())


class ResourcePoolError(WorkerGroupError):
    """A resource pool could not be reserved, split, shared or released as asked."""


class DispatchError(WorkerGroupError, ValueError):
    """A group call's arguments do not fit its dispatch mode (caught on the driver, before any rank runs)."""


class RankError(WorkerGroupError):
    """A rank raised an exception while running a group call.

    ``cause`` is the original exception as raised on the rank (also chained as
    ``__cause__``), ``remote_traceback`` the traceback text from the rank's process.
    """

    def __init__(
        self,
        *,
        group: str,
        rank: int,
        method: str,
        node_ip: str,
        pid: int | None,
        cause: BaseException,
        remote_traceback: str,
    ) -> None:
        self.group = group
        self.rank = rank
        self.method = method
        self.node_ip = node_ip
        self.pid = pid
        self.cause = cause
        self.remote_traceback = remote_traceback
        super().__init__(
            f"rank {rank} of worker group {group!r} (node {node_ip}, pid {pid}) raised "
            f"{type(cause).__name__} in {method}: {cause}\n--- remote traceback ---\n{remote_traceback}"
        )


class DeadRankError(WorkerGroupError):
    """A rank's actor process died (or became unreachable) before or while running a group call.

    Ranks still waiting for the dead one inside a collective may stay blocked: recover
    with ``WorkerGroup.replace_rank`` (which also re-forms the process group).
    """

    def __init__(
        self, *, group: str, rank: int, method: str, node_ip: str, pid: int | None, reason: str
    ) -> None:
        self.group = group
        self.rank = rank
        self.method = method
        self.node_ip = node_ip
        self.pid = pid
        self.reason = reason
        super().__init__(
            f"rank {rank} of worker group {group!r} (node {node_ip}, pid {pid}) is dead; "
            f"it was running {method}. {reason}"
        )


class GroupTimeoutError(WorkerGroupError, TimeoutError):
    """A group call did not finish within its timeout; ``pending_ranks`` had not returned."""

    def __init__(self, *, group: str, method: str, timeout_s: float, pending_ranks: list[int]) -> None:
        self.group = group
        self.method = method
        self.timeout_s = timeout_s
        self.pending_ranks = pending_ranks
        super().__init__(
            f"{method} on worker group {group!r} did not finish within {timeout_s:g} s; "
            f"ranks {pending_ranks} have not returned (alive but busy or blocked in a collective)"
        )


def _rebuild_error(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error
