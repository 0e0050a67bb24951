"""The detector's rules: C4's fault classes read from the ranks' collective records.

Collectives are periodic and homogeneous: every rank of a group runs the same sequence of them,
so the k-th collective of a group is comparable across its ranks, and a fault shows up as an
asymmetry between them.

- **crash**: a rank's actor is dead (asked once its heartbeat went quiet for ``silence_s``; the
  actor also reports a rank as dead with its node when that node's raylet accepts no connection),
  or its heartbeat stayed silent for ``2 * hang_s`` with no hang explaining it. Heartbeats and records
  are stamped with the rank host's clock: hosts are assumed synchronised (NTP) to well within
  ``silence_s``.
- **hangs**: a rank has been inside collective k for ``hang_s``. If some rank of the group never
  arrived at k it is a **non-communication hang**, else (all entered, some never left) a
  **communication hang**, which names the group and its nodes. The culprit is a rank of the group
  whose heartbeat went silent (a stopped process, wherever it stopped), else the ranks that never
  arrived.
- **non-communication slow**: in the last w complete collectives of one op of a group (every w up to
  ``straggler_window``) the same rank arrived last more often than chance explains (a binomial
  test), by a margin several times the spread of the others. Arrival order comes from durations
  (everyone leaves a collective together, so the last to arrive waits least), which needs no clock
  shared between hosts.
- **communication slow**: a matrix of point-to-point transfers (the weight sync's sends and
  receives), one cell per (sender, receiver): the seconds per byte a receiver stayed blocked in
  ``wait`` for that sender's data (a receive waited on after its data landed counts ~0, so waiting
  on several receives in turn blames none of them wrongly). A cell several times the fastest half
  of the cells is hot; a hot row names the sender, a hot column the receiver, a lone cell the link.

:class:`Detector` is plain Python (``ingest`` batches, ``check`` at a time); the detector actor
runs it.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from raylane.fault_tolerance.config import DetectorConfig
from raylane.fault_tolerance.events import FaultEvent
from raylane.fault_tolerance.probes import ProbeBatch, RankIdentity

__all__ = ["Detector"]

RankKey = tuple[str, int]

# Complete collectives kept per group beyond the straggler window (older ones are dropped).
_KEPT_SEQS = 64


@functools.cache
def _needed_last(window: int, size: int, alpha: float) -> int:
    """The fewest times out of ``window`` a rank must be last for chance (1/size each time) to
    explain it with probability below ``alpha`` (one-sided binomial test)."""
    p = 1.0 / size
    tail = 0.0
    for count in range(window, -1, -1):
        tail += math.comb(window, count) * p**count * (1 - p) ** (window - count)
        if tail >= alpha:
            return count + 1
    return 0


@dataclass
class _Arrival:
    rank: RankKey
    t_enter: float
    t_exit: float | None = None
    ok: bool = True


@dataclass
class _Group:
    size: int
    members: dict[int, RankKey] = field(default_factory=dict)
    seqs: dict[int, dict[int, _Arrival]] = field(default_factory=dict)
    ops: dict[int, str] = field(default_factory=dict)
    # Complete collectives by op: like is compared with like (a rank late to the all-reduce after
    # its compute is on time for the all-gather right after it).
    complete: dict[str, deque] = field(default_factory=dict)


@dataclass
class _RankState:
    identity: RankIdentity
    last_seen: float
    last_phase: str = ""


class Detector:
    """Turns probe batches into :class:`FaultEvent` s; each fault is reported once."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.ranks: dict[RankKey, _RankState] = {}
        self._groups: dict[str, _Group] = {}
        self._collective_ops: dict[tuple[RankKey, int], tuple[str, int, int]] = {}
        self._p2p_ops: dict[tuple[RankKey, int], tuple] = {}
        self._links: dict[tuple[str, int, RankKey], deque] = {}
        self._blamed: dict[RankKey, str] = {}
        self._reported: set[tuple] = set()
        self.collectives_seen = 0
        self._early_exits: dict[tuple[RankKey, int], list] = {}

    # -- ingest ---------------------------------------------------------------------------

    def register(self, identity: RankIdentity, now: float) -> None:
        """A probe started on ``identity``'s rank (its first heartbeat)."""
        self.ranks[identity.key] = _RankState(identity, now)

    def unregister(self, identity: RankIdentity) -> None:
        """``identity``'s probe closed (a newer process of the same rank stays registered)."""
        state = self.ranks.get(identity.key)
        if state is not None and state.identity == identity:
            del self.ranks[identity.key]

    def _member(self, label: str, group: _Group, group_rank: int) -> RankKey | None:
        """Who is ``group_rank`` of ``label``: known from its records, or, for the default group of a
        worker group (every registered rank of it in the group), the worker-group rank itself."""
        if group_rank in group.members:
            return group.members[group_rank]
        worker_group = label.rsplit("/", 1)[0]
        ranks = [key for key in self.ranks if key[0] == worker_group]
        key = (worker_group, group_rank)
        return key if len(ranks) == group.size and key in self.ranks else None

    def ingest(self, batch: ProbeBatch) -> None:
        """Take one probe batch (ignored unless its rank's process is the one registered)."""
        key = batch.identity.key
        state = self.ranks.get(key)
        if state is None or state.identity != batch.identity:
            return  # not registered, or from a process the rank's registered one replaced
        # Stamped by the rank: a batch that took long on the way is no sign of life now.
        state.last_seen = max(state.last_seen, batch.sent_at)
        for enter in batch.enters:
            self._enter(key, *enter)
        for op_id, *exit_ in batch.exits:
            if (key, op_id) in self._collective_ops or (key, op_id) in self._p2p_ops:
                self._exit(key, op_id, *exit_)
            else:  # its entry is in a batch still on its way (Ray may deliver batches out of order)
                self._early_exits[(key, op_id)] = exit_
        if batch.phases:
            state.last_phase = batch.phases[-1][0]

    @property
    def orphan_exits(self) -> int:
        """Exits whose entry has not come (yet)."""
        return len(self._early_exits)

    def _enter(
        self,
        key: RankKey,
        op_id: int,
        label: str,
        op: str,
        seq: int,
        nbytes: int,
        peer: int,
        group_rank: int,
        group_size: int,
        t_enter: float,
    ) -> None:
        group = self._groups.get(label)
        if group is None or group.size != group_size:
            group = self._groups[label] = _Group(group_size)
        group.members[group_rank] = key
        if peer >= 0:
            self._p2p_ops[(key, op_id)] = (label, op, peer, nbytes)
        else:
            group.seqs.setdefault(seq, {})[group_rank] = _Arrival(key, t_enter)
            group.ops[seq] = op
            self.collectives_seen += 1
            self._collective_ops[(key, op_id)] = (label, seq, group_rank)
        early = self._early_exits.pop((key, op_id), None)
        if early is not None:
            self._exit(key, op_id, *early)

    def _exit(self, key: RankKey, op_id: int, t_exit: float, ok: bool, t_wait: float) -> None:
        if (key, op_id) in self._collective_ops:
            label, seq, group_rank = self._collective_ops.pop((key, op_id))
            self._exit_collective(label, seq, group_rank, t_exit, ok)
        else:
            label, op, peer, nbytes = self._p2p_ops.pop((key, op_id))
            if op == "recv":
                self._received(label, peer, key, nbytes, t_exit - t_wait)

    def _exit_collective(self, label: str, seq: int, group_rank: int, t_exit: float, ok: bool) -> None:
        group = self._groups.get(label)
        arrivals = group.seqs.get(seq) if group else None
        if arrivals is None or group_rank not in arrivals:
            return
        arrival = arrivals[group_rank]
        arrival.t_exit, arrival.ok = t_exit, ok
        if len(arrivals) == group.size and all(a.t_exit is not None for a in arrivals.values()):
            del group.seqs[seq]
            op = group.ops.pop(seq)
            if all(a.ok for a in arrivals.values()):
                group.complete.setdefault(op, deque(maxlen=_KEPT_SEQS)).append(arrivals)

    def _received(self, label: str, sender: int, receiver: RankKey, nbytes: int, blocked_s: float) -> None:
        """A receive's wait: how long the receiver was blocked on this sender's data."""
        # The sender is kept as its group rank: its own records may not have come yet.
        link = (label, sender, receiver)
        if link not in self._links:
            self._links[link] = deque(maxlen=self.config.link_window)
        self._links[link].append((max(blocked_s, 0.0), nbytes))

    def forget_group(self, worker_group: str) -> None:
        """Forget the ranks of ``worker_group`` and the collective groups they ran (numbered afresh
        once their process group is re-formed)."""
        gone = {key for key in self.ranks if key[0] == worker_group}
        for key in gone:
            del self.ranks[key]
            self._blamed.pop(key, None)
        for label in [label for label, group in self._groups.items() if set(group.members.values()) & gone]:
            del self._groups[label]
            self._reported = {r for r in self._reported if len(r) < 2 or r[1] != label}
        for table in (self._collective_ops, self._p2p_ops, self._early_exits):
            for op_key in [op_key for op_key in table if op_key[0] in gone]:
                del table[op_key]
        for link in [link for link in self._links if link[2] in gone]:
            del self._links[link]

    # -- rules ----------------------------------------------------------------------------

    def check(self, now: float, dead: Mapping[RankKey, str] | None = None) -> list[FaultEvent]:
        """New events at time ``now``; ``dead`` maps ranks whose actor is known dead to how that was learnt."""
        events = [
            self._crash(key, now, how) for key, how in sorted((dead or {}).items()) if key not in self._blamed
        ]
        for label, group in self._groups.items():
            events += self._hangs(label, group, now)
            events += self._stragglers(label, group, now)
        events += self._slow_links(now)
        for key in self.silent(now, 2 * self.config.hang_s):
            if key not in self._blamed:
                age = now - self.ranks[key].last_seen
                events.append(self._crash(key, now, f"heartbeat silent for {age:.1f} s"))
        return events

    def silent(self, now: float, after_s: float | None = None) -> list[RankKey]:
        """Ranks whose last shipment is older than ``after_s`` (default ``silence_s``)."""
        limit = self.config.silence_s if after_s is None else after_s
        return [key for key, state in self.ranks.items() if now - state.last_seen > limit]

    def _event(self, kind: str, key: RankKey | None, label: str, nodes, evidence: dict, now: float):
        identity = self.ranks[key].identity if key is not None else None
        event = FaultEvent(
            kind=kind,
            worker_group=identity.group if identity else label.split("/")[0],
            rank=identity.rank if identity else -1,
            role=identity.role if identity else "",
            node_ip=identity.node_ip if identity else "",
            node_id=identity.node_id if identity else "",
            collective_group=label,
            nodes=tuple(sorted(set(nodes))),
            evidence=evidence,
            detected_at=now,
        )
        if key is not None:
            self._blamed[key] = kind
        return event

    def _crash(self, key: RankKey, now: float, reason: str) -> FaultEvent:
        state = self.ranks[key]
        evidence = {"reason": reason, "last_seen_s_ago": round(now - state.last_seen, 3)}
        if state.last_phase:
            evidence["last_phase"] = state.last_phase
        return self._event("crash", key, "", [state.identity.node_ip], evidence, now)

    def _node(self, key: RankKey) -> str:
        return self.ranks[key].identity.node_ip if key in self.ranks else ""

    def _hangs(self, label: str, group: _Group, now: float) -> list[FaultEvent]:
        # A collective is open while a rank is still in it: gloo lets some ranks leave collective k
        # and go on to k+1 while others still wait in k for a stopped peer.
        seqs = sorted(group.seqs)
        for seq in seqs[:-_KEPT_SEQS]:  # partial records of long ago (e.g. lost with a process)
            del group.seqs[seq]
            group.ops.pop(seq, None)
        seq = next(
            (
                s
                for s in seqs[-_KEPT_SEQS:]
                if any(
                    a.t_exit is None and now - a.t_enter >= self.config.hang_s for a in group.seqs[s].values()
                )
            ),
            None,
        )
        if seq is None or ("hang", label, seq) in self._reported:
            return []
        arrivals = group.seqs[seq]
        members = {r: self._member(label, group, r) for r in range(group.size)}
        quiet = set(self.silent(now))
        # A rank gone silent is the culprit wherever it stopped; else the ones that never arrived.
        silent = [k for k in members.values() if k in quiet]
        missing = [r for r in range(group.size) if r not in arrivals]
        culprits = silent or [members[r] for r in missing if members[r] is not None]
        if culprits and all(c in self._blamed for c in culprits):
            return []
        self._reported.add(("hang", label, seq))
        kind = "noncomm_hang" if missing else "comm_hang"
        inside = [a for a in arrivals.values() if a.t_exit is None]
        evidence = {
            "seq": seq,
            "waited_s": round(now - min(a.t_enter for a in inside), 3),
            "arrived": sorted(arrivals),
            "missing_group_ranks": missing,
            "not_left": sorted(r for r, a in arrivals.items() if a.t_exit is None),
            "silent_ranks": sorted(k[1] for k in silent),
        }
        nodes = [self._node(k) for k in group.members.values()]
        if not culprits:
            return [self._event(kind, None, label, nodes, evidence, now)]
        return [self._event(kind, c, label, nodes, {**evidence, **self._phase_of(c)}, now) for c in culprits]

    def _phase_of(self, key: RankKey) -> dict:
        phase = self.ranks[key].last_phase if key in self.ranks else ""
        return {"last_phase": phase} if phase else {}

    def _stragglers(self, label: str, group: _Group, now: float) -> list[FaultEvent]:
        if group.size < 2:
            return []
        events = []
        for op, complete in group.complete.items():
            event = self._straggler(label, group, op, complete, now)
            if event is not None:
                events.append(event)
        return events

    def _straggler(self, label: str, group: _Group, op: str, complete: deque, now: float):
        # Every suffix of the window is tested, newest collective first, so that a rank last in
        # each one is named after the fewest collectives chance cannot explain, not after a full
        # window. Only the rank last in the collective just added can newly pass: the count it
        # needs never falls as the suffix grows.
        alpha = self.config.straggler_alpha
        last_counts: dict[RankKey, int] = defaultdict(int)
        margins: dict[RankKey, list[float]] = defaultdict(list)
        spreads = []
        recent = list(complete)[-self.config.straggler_window :]
        for seen, arrivals in enumerate(reversed(recent), start=1):
            waits = sorted((a.t_exit - a.t_enter, a.rank) for a in arrivals.values())
            rank = waits[0][1]
            last_counts[rank] += 1
            margins[rank].append(waits[1][0] - waits[0][0])
            spreads.append(waits[-1][0] - waits[1][0])
            count = last_counts[rank]
            if count < _needed_last(seen, group.size, alpha) or ("slow", label, rank) in self._reported:
                continue
            margin = statistics.median(margins[rank])
            spread = statistics.median(spreads)
            if margin < max(self.config.straggler_min_margin_s, self.config.straggler_margin_ratio * spread):
                continue
            self._reported.add(("slow", label, rank))
            evidence = {
                "op": op,
                "last_in": f"{count}/{seen}",
                "median_margin_s": round(margin, 4),
                "median_spread_of_others_s": round(spread, 4),
            }
            nodes = [self._node(k) for k in group.members.values()]
            return self._event("noncomm_slow", rank, label, nodes, evidence, now)
        return None

    def _slow_links(self, now: float) -> list[FaultEvent]:
        every = {
            (label, self._groups[label].members[sender], receiver): samples
            for (label, sender, receiver), samples in self._links.items()
            if sender in self._groups[label].members
        }
        # Cells still short of samples: a verdict on their row or column waits for them.
        young = {link for link, samples in every.items() if len(samples) < self.config.link_min_transfers}
        cells = {link: samples for link, samples in every.items() if link not in young}
        seconds = {link: statistics.median(s for s, _ in samples) for link, samples in cells.items()}
        cells = {
            link: statistics.median(s / max(n, 1) for s, n in samples) for link, samples in cells.items()
        }
        if len(cells) < 2:
            return []
        # The baseline is the fastest half of the cells: a hot row or column can be half of them.
        ordered = sorted(cells.values())
        baseline = statistics.median(ordered[: max(1, len(ordered) // 2)])
        threshold = self.config.link_slow_ratio * baseline
        hot = {
            link
            for link, value in cells.items()
            if value > threshold and seconds[link] >= self.config.link_min_seconds
        }
        events = []
        for label, sender, receiver in sorted(hot):
            row = [link for link in every if link[0] == label and link[1] == sender]
            column = [link for link in every if link[0] == label and link[2] == receiver]
            if young & {*row, *column}:
                continue
            if len(row) > 1 and all(link in hot for link in row):
                culprit, side = sender, "sender"
            elif len(column) > 1 and all(link in hot for link in column):
                culprit, side = receiver, "receiver"
            else:
                culprit, side = None, "link"
            report_key = ("link", label, culprit if culprit else (sender, receiver))
            if report_key in self._reported:
                continue
            self._reported.add(report_key)
            evidence = {
                "culprit": side,
                "sender": list(sender),
                "receiver": list(receiver),
                "seconds_per_mb": round(cells[(label, sender, receiver)] * 1e6, 4),
                "median_blocked_s": round(seconds[(label, sender, receiver)], 4),
                "baseline_seconds_per_mb": round(baseline * 1e6, 4),
            }
            nodes = [self._node(sender), self._node(receiver)]
            events.append(self._event("comm_slow", culprit, label, nodes, evidence, now))
        return events
