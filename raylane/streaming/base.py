"""The rollout stream's interface: producers put finished trajectory groups, trainers get, train and commit.

Delivery is at-least-once and training exactly-once. An entry a trainer got stays *held* (pending)
until :meth:`RolloutStream.commit`, which the trainer calls only once the step that used the entry
is in a checkpoint; a crash before that leaves the entry in the stream for the restarted trainer
(same consumer name: it gets its held entries back first) or for another one (after the entry has
been idle ``claim_idle_s``). Commit acknowledges the entries and records their uids as trained in
one atomic write, and ``get`` drops any entry whose uids are recorded, so a group put twice or
redelivered after a commit is never trained twice. The one gap left, a crash between the checkpoint
and the commit, is closed by saving the step's :class:`Receipt` s with the checkpoint and committing
them again on resume (commit is idempotent).

Backends implement the storage primitives; the delivery rules above live here once.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from raylane.rlhf.trajectory import TrajectoryGroup

logger = logging.getLogger(__name__)

RawEntry = tuple[str, bytes]  # (entry id, encoded TrajectoryGroup)


@dataclass(frozen=True)
class Receipt:
    """What committing an entry needs; small and JSON-friendly, to be saved with a checkpoint."""

    entry_id: str
    uids: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"entry_id": self.entry_id, "uids": list(self.uids)}

    @classmethod
    def from_dict(cls, raw: dict) -> Receipt:
        return cls(entry_id=str(raw["entry_id"]), uids=tuple(raw["uids"]))


@dataclass(frozen=True)
class StreamEntry:
    """A trajectory group as delivered to one consumer."""

    entry_id: str
    group: TrajectoryGroup

    @property
    def receipt(self) -> Receipt:
        return Receipt(self.entry_id, self.group.uids)


class RolloutStream(ABC):
    """One process's handle on a rollout stream, consuming as ``consumer`` (unique per live trainer)."""

    def __init__(self, consumer: str, claim_idle_s: float) -> None:
        if claim_idle_s <= 0:
            raise ValueError(f"claim_idle_s must be > 0, got {claim_idle_s}")
        self.consumer = consumer
        self.claim_idle_s = claim_idle_s
        self._held: dict[str, StreamEntry] = {}
        # Group ids of entries get skipped as already trained or held, until the caller takes them.
        self.skipped_group_ids: list[str] = []
        # A restarted consumer first walks the entries it held before the restart.
        self._pending_cursor: str | None = "0"
        # Renewing the held entries and looking for abandoned ones cost a round trip and a scan of
        # every held entry each; a fraction of claim_idle_s apart is often enough for both.
        self._housekeeping_every_s = claim_idle_s / 4
        self._renewed_at = self._claimed_at = -math.inf

    def put(self, group: TrajectoryGroup) -> str:
        """Append a finished group; returns its entry id."""
        return self._append(group.encode())

    def put_nowait(self, group: TrajectoryGroup) -> None:
        """Start appending a finished group without waiting for the stream to answer; :meth:`flush`
        waits for them. Here the same as :meth:`put`; a backend whose append is a round trip to
        another process overrides both (appends started together may then land in any order)."""
        self.put(group)

    def flush(self) -> None:  # noqa: B027 - nothing to wait for where put_nowait is put
        """Wait until every append :meth:`put_nowait` started is in the stream (raises its error)."""

    def get(self, max_groups: int, block_s: float = 0.0) -> list[StreamEntry]:
        """Up to ``max_groups`` groups not yet trained, waiting up to ``block_s`` when none is ready.

        Order: this consumer's entries held before a restart, then entries a dead consumer has held
        for ``claim_idle_s``, then new ones. Every returned entry is held until :meth:`commit`.
        """
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        now = time.monotonic()
        # A live consumer keeps its entries from looking abandoned however long its steps take.
        if now - self._renewed_at >= self._housekeeping_every_s:
            self._renewed_at = now
            self._drop_lost(set(self._renew(list(self._held))))
        raw: list[RawEntry] = []
        if self._pending_cursor is not None:
            raw = self._read_own_pending(self._pending_cursor, max_groups)
            self._pending_cursor = raw[-1][0] if raw else None
        if len(raw) < max_groups and now - self._claimed_at >= self._housekeeping_every_s:
            self._claimed_at = now
            # Entries just renewed or read back are idle again only after a stall longer than
            # claim_idle_s; they are still this handle's then, not new work to take (or to
            # acknowledge as duplicates).
            seen = set(self._held) | {entry_id for entry_id, _ in raw}
            claimed = self._claim_idle(self.claim_idle_s, max_groups - len(raw))
            raw += [entry for entry in claimed if entry[0] not in seen]
        if len(raw) < max_groups:
            raw += self._read_new(max_groups - len(raw), 0.0 if raw else block_s)
        return self._hold_untrained(raw)

    def _drop_lost(self, kept: set[str]) -> None:
        """Forget the held entries a renewal did not keep: another consumer claimed them."""
        lost = [entry_id for entry_id in self._held if entry_id not in kept]
        if lost:
            logger.warning(
                "rollout stream: %s went %.0f s (claim_idle_s) without calling get, and another consumer "
                "took %d of its entries; they may be trained twice: raise claim_idle_s",
                self.consumer,
                self.claim_idle_s,
                len(lost),
            )
            for entry_id in lost:
                del self._held[entry_id]

    def _hold_untrained(self, raw: list[RawEntry]) -> list[StreamEntry]:
        entries = [StreamEntry(entry_id, TrajectoryGroup.decode(payload)) for entry_id, payload in raw]
        uids = [uid for entry in entries for uid in entry.group.uids]
        trained = dict(zip(uids, self._trained(uids)))
        held_uids = {uid for entry in self._held.values() for uid in entry.group.uids}
        fresh, duplicates = [], []
        for entry in entries:
            if any(trained[uid] or uid in held_uids for uid in entry.group.uids):
                duplicates.append(entry.entry_id)
                self.skipped_group_ids.append(entry.group.group_id)
                continue
            held_uids.update(entry.group.uids)
            self._held[entry.entry_id] = entry
            fresh.append(entry)
        if duplicates:
            # Already trained (or held under another entry id): acknowledge without marking anything.
            logger.info("rollout stream: skipped %d already-trained entries", len(duplicates))
            self._ack(duplicates, [])
        return fresh

    def commit(self, receipts: Iterable[Receipt]) -> None:
        """Acknowledge entries and record their uids as trained, atomically; call it once the
        step that used them is in a checkpoint. Committing an entry again is harmless."""
        receipts = list(receipts)
        if not receipts:
            return
        self._ack([r.entry_id for r in receipts], [uid for r in receipts for uid in r.uids])
        for r in receipts:
            self._held.pop(r.entry_id, None)

    def redeliver(self) -> None:
        """Deliver every entry this handle holds again, oldest first, from the next :meth:`get` on, as
        a restarted consumer gets its pending entries back: for a trainer that rolls back to its
        last checkpoint in place, the entries it took since are untrained again."""
        self._held.clear()
        self._pending_cursor = "0"

    @property
    def held(self) -> list[Receipt]:
        """Receipts of the entries this handle got and has not committed."""
        return [entry.receipt for entry in self._held.values()]

    @abstractmethod
    def depth(self) -> int:
        """Entries in the stream not yet committed: waiting plus held by some consumer."""

    @abstractmethod
    def _append(self, payload: bytes) -> str: ...

    @abstractmethod
    def _read_own_pending(self, after_id: str, count: int) -> list[RawEntry]:
        """Entries held by this consumer with ids after ``after_id`` ("0": from the start)."""

    @abstractmethod
    def _claim_idle(self, min_idle_s: float, count: int) -> list[RawEntry]:
        """Take over held entries idle for ``min_idle_s`` (any consumer's, this one's included)."""

    @abstractmethod
    def _read_new(self, count: int, block_s: float) -> list[RawEntry]:
        """Entries never delivered to any consumer, now held by this one."""

    @abstractmethod
    def _renew(self, entry_ids: Sequence[str]) -> list[str]:
        """Reset the idle time of those entries this consumer still holds; returns their ids."""

    @abstractmethod
    def _ack(self, entry_ids: Sequence[str], trained_uids: Sequence[str]) -> None:
        """Remove the entries and add the uids to the trained set, in one atomic step."""

    @abstractmethod
    def _trained(self, uids: Sequence[str]) -> list[bool]:
        """Whether each uid was recorded by a commit."""
