"""The durable rollout stream on Redis Streams: one stream entry per trajectory group.

Trainers read through one consumer group, so Redis keeps each consumer's pending entries list
(what it holds) across consumer and server restarts; XAUTOCLAIM hands a dead consumer's entries
to a live one. Commit is one MULTI/EXEC transaction: XACK, XDEL (committed groups leave the
stream) and SADD of their uids to the trained set ``<stream_key>:trained``. Durability across a
server crash is Redis's own: run it with ``--appendonly yes`` (``appendfsync everysec`` loses at
most a second of writes; ``always`` none).

A lost connection is retried for ``reconnect_s`` (a restarting server): every command is safe to
repeat, as a duplicate entry is skipped by uid, a commit is idempotent and an entry delivered in a
lost reply stays pending for this consumer until it is claimed again. After that,
:class:`StreamUnavailableError` says what to do.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from raylane.rlhf.trajectory import TrajectoryGroup
from raylane.streaming.base import RawEntry, Receipt, RolloutStream, StreamEntry

logger = logging.getLogger(__name__)

_FIELD = b"group"
_BACKOFF_CAP_S = 0.5


class StreamUnavailableError(ConnectionError):
    """Redis stayed unreachable longer than ``reconnect_s``."""


# XCLAIM alone would take an entry back from a consumer that claimed it in the meantime; the
# script renews only the entries still pending for this consumer, in one atomic step.
_RENEW_OWNED = """
local kept = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #pending == 1 and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    table.insert(kept, ARGV[i])
  end
end
return kept
"""


def _decode_entries(entries: list) -> list[RawEntry]:
    # An id whose message is gone has no fields; commits delete and acknowledge together, so
    # only a hand-edited stream has those, and there is nothing to train in them.
    return [(entry_id.decode(), fields[_FIELD]) for entry_id, fields in entries if fields]


class RedisRolloutStream(RolloutStream):
    """A rollout stream at ``url`` (``redis://host:port/db``) under the key ``stream_key``."""

    def __init__(
        self,
        url: str,
        consumer: str,
        *,
        stream_key: str = "raylane:rollouts",
        consumer_group: str = "trainers",
        claim_idle_s: float = 60.0,
        reconnect_s: float = 30.0,
    ) -> None:
        super().__init__(consumer, claim_idle_s)
        self.url = url
        self.stream_key = stream_key
        self.consumer_group = consumer_group
        self.reconnect_s = reconnect_s
        self._trained_key = f"{stream_key}:trained"
        # A server that is not there at all fails at once; one that goes away later is waited for.
        self._redis = redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0))
        self._renew_owned = self._redis.register_script(_RENEW_OWNED)
        try:
            self._redis.xgroup_create(stream_key, consumer_group, id="0", mkstream=True)
        except redis.ConnectionError as err:
            raise ConnectionError(
                f"cannot reach Redis at redis_url={url!r} ({err}): start redis-server there, or leave "
                "redis_url unset for the in-memory rollout stream"
            ) from err
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        backoff = ExponentialBackoff(cap=_BACKOFF_CAP_S)
        retries, waited = 0, 0.0
        while waited < reconnect_s:
            retries += 1
            waited += backoff.compute(retries)
        self._redis.set_retry(Retry(backoff, retries))

    def __reduce__(self):
        # Sent to another process (a rollout worker that puts), a handle reconnects and holds nothing.
        return (
            functools.partial(
                RedisRolloutStream,
                stream_key=self.stream_key,
                consumer_group=self.consumer_group,
                claim_idle_s=self.claim_idle_s,
                reconnect_s=self.reconnect_s,
            ),
            (self.url, self.consumer),
        )

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except redis.ConnectionError as err:
            raise StreamUnavailableError(
                f"lost the rollout stream's Redis at {self.url} for more than reconnect_s={self.reconnect_s} s "
                f"({err}): restart redis-server there (with --appendonly yes, so the stream survives), then "
                "resume the job from its last checkpoint (resume_from=...); nothing accepted is lost"
            ) from err

    def put(self, group: TrajectoryGroup) -> str:
        with self._reachable():
            return super().put(group)

    def get(self, max_groups: int, block_s: float = 0.0) -> list[StreamEntry]:
        with self._reachable():
            return super().get(max_groups, block_s)

    def commit(self, receipts: Iterable[Receipt]) -> None:
        with self._reachable():
            super().commit(receipts)

    def depth(self) -> int:
        with self._reachable():
            return int(self._redis.xlen(self.stream_key))

    def _append(self, payload: bytes) -> str:
        return self._redis.xadd(self.stream_key, {_FIELD: payload}).decode()

    def _read(self, start: str, count: int, block_ms: int | None) -> list[RawEntry]:
        reply = self._redis.xreadgroup(
            self.consumer_group, self.consumer, {self.stream_key: start}, count=count, block=block_ms
        )
        return _decode_entries(reply[0][1]) if reply else []

    def _read_own_pending(self, after_id: str, count: int) -> list[RawEntry]:
        return self._read(after_id, count, None)

    def _read_new(self, count: int, block_s: float) -> list[RawEntry]:
        # BLOCK 0 waits forever in Redis; no BLOCK at all returns at once.
        return self._read(">", count, int(block_s * 1000) or None)

    def _claim_idle(self, min_idle_s: float, count: int) -> list[RawEntry]:
        reply = self._redis.xautoclaim(
            self.stream_key,
            self.consumer_group,
            self.consumer,
            min_idle_time=int(min_idle_s * 1000),
            start_id="0-0",
            count=count,
        )
        return _decode_entries(reply[1])

    def _renew(self, entry_ids: Sequence[str]) -> list[str]:
        if not entry_ids:
            return []
        kept = self._renew_owned(
            keys=[self.stream_key], args=[self.consumer_group, self.consumer, *entry_ids]
        )
        return [entry_id.decode() for entry_id in kept]

    def _ack(self, entry_ids: Sequence[str], trained_uids: Sequence[str]) -> None:
        with self._redis.pipeline(transaction=True) as tx:
            tx.xack(self.stream_key, self.consumer_group, *entry_ids)
            tx.xdel(self.stream_key, *entry_ids)
            if trained_uids:
                tx.sadd(self._trained_key, *trained_uids)
            tx.execute()

    def _trained(self, uids: Sequence[str]) -> list[bool]:
        if not uids:
            return []
        return [bool(flag) for flag in self._redis.smismember(self._trained_key, list(uids))]
