"""The in-memory rollout stream: one Ray actor holds the entries, the embedded default.

It follows the Redis backend's rules (held entries, idle claims, trained set) so that a job
behaves the same on both; what it cannot do is outlive the driver that owns the actor.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence

import ray

from raylane.rlhf.trajectory import TrajectoryGroup
from raylane.streaming.base import RawEntry, RolloutStream


class _StreamState:
    """The stream inside the actor. Async methods share one event loop, so no locks are needed."""

    def __init__(self) -> None:
        self._entries: dict[int, bytes] = {}
        # Ids start at 1: "0" is the cursor before every entry, as in Redis.
        self._next_id = 1
        self._delivered_up_to = 0  # every id <= this has been delivered once
        self._held: dict[int, tuple[str, float]] = {}  # id -> (consumer, last delivery or renewal)
        self._trained: set[str] = set()
        self._appended = asyncio.Condition()

    def _deliver(self, consumer: str, ids: list[int]) -> list[RawEntry]:
        now = time.monotonic()
        for i in ids:
            self._held[i] = (consumer, now)
        return [(str(i), self._entries[i]) for i in ids]

    async def append(self, payload: bytes) -> str:
        entry_id = self._next_id
        self._entries[entry_id] = payload
        self._next_id += 1
        async with self._appended:
            self._appended.notify_all()
        return str(entry_id)

    async def read_new(self, consumer: str, count: int, block_s: float) -> list[RawEntry]:
        if block_s > 0 and self._delivered_up_to + 1 >= self._next_id:
            async with self._appended:
                try:
                    await asyncio.wait_for(
                        self._appended.wait_for(lambda: self._delivered_up_to + 1 < self._next_id), block_s
                    )
                except TimeoutError:
                    return []
        ids = list(range(self._delivered_up_to + 1, min(self._next_id, self._delivered_up_to + 1 + count)))
        if ids:
            self._delivered_up_to = ids[-1]
        return self._deliver(consumer, ids)

    async def read_own_pending(self, consumer: str, after_id: str, count: int) -> list[RawEntry]:
        ids = sorted(i for i, (owner, _) in self._held.items() if owner == consumer and i > int(after_id))
        return self._deliver(consumer, ids[:count])

    async def claim_idle(self, consumer: str, min_idle_s: float, count: int) -> list[RawEntry]:
        cutoff = time.monotonic() - min_idle_s
        ids = sorted(i for i, (_, since) in self._held.items() if since <= cutoff)
        return self._deliver(consumer, ids[:count])

    async def renew(self, consumer: str, entry_ids: list[str]) -> list[str]:
        owned = [int(i) for i in entry_ids if self._held.get(int(i), ("",))[0] == consumer]
        return [entry_id for entry_id, _ in self._deliver(consumer, owned)]

    async def ack(self, entry_ids: list[str], trained_uids: list[str]) -> None:
        for entry_id in entry_ids:
            self._held.pop(int(entry_id), None)
            self._entries.pop(int(entry_id), None)
        self._trained.update(trained_uids)

    async def trained(self, uids: list[str]) -> list[bool]:
        return [uid in self._trained for uid in uids]

    async def depth(self) -> int:
        return len(self._entries)


_StreamActor = ray.remote(num_cpus=0)(_StreamState)


class InMemoryRolloutStream(RolloutStream):
    """A rollout stream in the actor named ``raylane-stream:<stream_key>``, created by the first
    handle that opens it; every process of the job that opens the same key shares it."""

    def __init__(self, consumer: str, *, stream_key: str = "raylane:rollouts", claim_idle_s: float = 60.0):
        super().__init__(consumer, claim_idle_s)
        self.stream_key = stream_key
        self.actor = _StreamActor.options(name=f"raylane-stream:{stream_key}", get_if_exists=True).remote()
        self._appending: list[ray.ObjectRef] = []

    def __reduce__(self):
        # Sent to another process, a handle finds the same actor by name and holds nothing.
        return (
            functools.partial(
                InMemoryRolloutStream, stream_key=self.stream_key, claim_idle_s=self.claim_idle_s
            ),
            (self.consumer,),
        )

    def depth(self) -> int:
        return ray.get(self.actor.depth.remote())

    def _append(self, payload: bytes) -> str:
        return ray.get(self.actor.append.remote(payload))

    def put_nowait(self, group: TrajectoryGroup) -> None:
        # The actor is async: appends in flight together may run in any order (ids follow that order).
        self._appending.append(self.actor.append.remote(group.encode()))

    def flush(self) -> None:
        appending, self._appending = self._appending, []
        ray.get(appending)

    def _read_own_pending(self, after_id: str, count: int) -> list[RawEntry]:
        return ray.get(self.actor.read_own_pending.remote(self.consumer, after_id, count))

    def _claim_idle(self, min_idle_s: float, count: int) -> list[RawEntry]:
        return ray.get(self.actor.claim_idle.remote(self.consumer, min_idle_s, count))

    def _read_new(self, count: int, block_s: float) -> list[RawEntry]:
        return ray.get(self.actor.read_new.remote(self.consumer, count, block_s))

    def _renew(self, entry_ids: Sequence[str]) -> list[str]:
        return ray.get(self.actor.renew.remote(self.consumer, list(entry_ids))) if entry_ids else []

    def _ack(self, entry_ids: Sequence[str], trained_uids: Sequence[str]) -> None:
        ray.get(self.actor.ack.remote(list(entry_ids), list(trained_uids)))

    def _trained(self, uids: Sequence[str]) -> list[bool]:
        return ray.get(self.actor.trained.remote(list(uids))) if uids else []
