"""Collective probes: every rank records entry and exit of each collective, step phases and a heartbeat.

The probe wraps the methods of ``torch.distributed``'s ``ProcessGroup`` class in the rank's process.
Every collective goes through one of them, whether it was called as ``dist.all_reduce`` (FSDP's
all-gathers and reduce-scatters, tensor-parallel all-reduces) or on a process group object directly
(the weight-sync transport's sends and receives), and whatever the backend (gloo or NCCL), so no
call site changes. Each call appends an entry record (group, op, sequence number, bytes, peer) in
the calling thread; its exit is recorded when the op's future completes, which also covers
``async_op=True``; a send's or receive's exit is when its ``wait`` returns. A background thread ships the records in batches to the detector actor every
``flush_interval_s``; an empty shipment is still a heartbeat.

Group labels are what makes records of different ranks comparable: c10d numbers its groups per
process-group world, so a numeric name is prefixed with the worker group (``policy/0`` is the
default group of the ``policy`` ranks); a group with a name of its own (``weight-sync``) keeps it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import ray
import torch
from torch._C._distributed_c10d import ProcessGroup

from raylane.fault_tolerance.config import ProbeConfig
from raylane.fault_tolerance.faults import InRankFault

__all__ = [
    "COLLECTIVE_OPS",
    "P2P_OPS",
    "CollectiveProbe",
    "ProbeBatch",
    "RankIdentity",
    "active_probe",
    "phase",
]

logger = logging.getLogger(__name__)

P2P_OPS = ("send", "recv")
COLLECTIVE_OPS = (
    "allreduce",
    "allreduce_coalesced",
    "allgather",
    "_allgather_base",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_tensor_coalesced",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "alltoall",
    "alltoall_base",
    "barrier",
    # The names torch >= 2.10 dispatches all_gather_into_tensor, reduce_scatter_tensor and
    # all_to_all_single to.
    "all_gather_single",
    "all_gather_single_coalesced",
    "reduce_scatter_single",
    "reduce_scatter_single_coalesced",
    "all_to_all_single",
)


@dataclass(frozen=True)
class RankIdentity:
    """Who a probe reports for: the worker group, rank, role and where it runs."""

    group: str
    rank: int
    role: str
    node_id: str
    node_ip: str
    pid: int
    # "host:port" of the node's raylet, which the detector tries when this rank goes silent.
    raylet_address: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.group, self.rank)


@dataclass(frozen=True)
class ProbeBatch:
    """One shipment from a rank.

    ``enters``: ``(op_id, group_label, op, seq, nbytes, peer, group_rank, group_size, t_enter)``
    (``peer`` is the other rank, in the group's numbering, of a send or receive, else -1);
    ``exits``: ``(op_id, t_exit, ok, t_wait)`` (``t_wait``: when a send's or receive's ``wait`` was
    called, so ``t_exit - t_wait`` is how long the rank was blocked on it; ``t_exit`` for others); ``phases``: ``(name, step, t_start, t_end)``. Times are
    ``time.time()`` of the rank's host.
    """

    identity: RankIdentity
    enters: list[tuple]
    exits: list[tuple]
    phases: list[tuple]
    sent_at: float


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


_REGISTER_TIMEOUT_S = 60.0

_originals: dict[str, object] = {}
_active: CollectiveProbe | None = None


def active_probe() -> CollectiveProbe | None:
    """The probe installed in this process, if any."""
    return _active


def phase(name: str, step: int = -1) -> contextlib.AbstractContextManager:
    """Mark a step phase on this process's probe (nothing when no probe is installed)."""
    return _active.phase(name, step) if _active is not None else contextlib.nullcontext()


def _record_exit(exits: deque, op_id: int, future: torch.futures.Future) -> None:
    try:
        future.value()
        ok = True
    except Exception:
        ok = False
    now = time.time()
    exits.append((op_id, now, ok, now))


class _WaitRecorded:
    """A send's or receive's work whose exit is recorded when ``wait`` returns.

    Its future is no use there: gloo completes a point-to-point op's future when the op is posted,
    before any data moved.
    """

    __slots__ = ("_exits", "_op_id", "_work")

    def __init__(self, work, exits: deque, op_id: int) -> None:
        self._work = work
        self._exits = exits
        self._op_id = op_id

    def wait(self, *args, **kwargs):
        called = time.time()
        result = self._work.wait(*args, **kwargs)
        if self._op_id >= 0:
            self._exits.append((self._op_id, time.time(), True, called))
            self._op_id = -1
        return result

    def __getattr__(self, name: str):
        return getattr(self._work, name)


def _wrap(op: str, original):
    @functools.wraps(original)
    def probed(pg, *args, **kwargs):
        probe = _active
        if probe is None:
            return original(pg, *args, **kwargs)
        return probe.run(op, original, pg, args, kwargs)

    return probed


class CollectiveProbe:
    """This process's recorder; ``install`` it once the rank knows its identity.

    ``sink`` is the detector actor (anything with ``report.remote(batch)``).
    """

    def __init__(self, identity: RankIdentity, sink, config: ProbeConfig | None = None) -> None:
        self.identity = identity
        self.config = config or ProbeConfig()
        self._sink = sink
        self._enters: deque[tuple] = deque()
        self._exits: deque[tuple] = deque()
        self._phases: deque[tuple] = deque()
        self._next_op_id = 0
        self._seq: dict[tuple, int] = {}
        self._labels: dict[str, str] = {}
        self._fault: InRankFault | None = None
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifetime -------------------------------------------------------------------------

    def install(self) -> CollectiveProbe:
        """Wrap the ProcessGroup methods (once per process), register with the detector and start
        shipping; replaces an older probe."""
        global _active
        if not _originals:
            for op in (*COLLECTIVE_OPS, *P2P_OPS):
                if op not in ProcessGroup.__dict__:  # an older torch
                    continue
                # The class attribute itself (pybind's instancemethod) is what uninstall puts back.
                _originals[op] = ProcessGroup.__dict__[op]
                setattr(ProcessGroup, op, _wrap(op, getattr(ProcessGroup, op)))
        if _active is not None and _active is not self:
            _active.close(unregister=False)  # this process stays registered, under the new probe
        _active = self
        handle = None
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            handle = ray.get_runtime_context().current_actor
        # Elsewhere (a driver script, a plain process) liveness comes from heartbeats alone.
        # Waited for: from here on the detector expects this rank (and the route to it is open).
        ray.get(self._sink.register.remote(self.identity, handle), timeout=_REGISTER_TIMEOUT_S)
        self._start_shipping()
        logger.info("collective probe on rank %d of %r", self.identity.rank, self.identity.group)
        return self

    def close(self, unregister: bool = True) -> None:
        """Ship what is left and stop (and tell the detector, unless ``unregister`` is false); the
        wrappers pass calls straight through afterwards."""
        global _active
        self._stop_shipping()
        self.flush()
        if unregister:  # a probe closed on purpose is no silent rank
            self._sink.unregister.remote(self.identity)
        if _active is self:
            _active = None

    @staticmethod
    def uninstall() -> None:
        """Put the original ProcessGroup methods back (after ``close``)."""
        for op, original in _originals.items():
            setattr(ProcessGroup, op, original)
        _originals.clear()

    # -- recording ------------------------------------------------------------------------

    def label(self, pg: ProcessGroup) -> str:
        name = pg.group_name
        label = self._labels.get(name)
        if label is None:
            label = f"{self.identity.group}/{name}" if name.isdigit() or not name else name
            self._labels[name] = label
        return label

    def run(self, op: str, original, pg: ProcessGroup, args: tuple, kwargs: dict):
        """Record one op around ``original(pg, *args, **kwargs)``."""
        label = self.label(pg)
        peer = args[1] if op in P2P_OPS and len(args) > 1 else -1
        seq_key = (label, op, peer) if peer >= 0 else label
        seq = self._seq.get(seq_key, 0)
        self._seq[seq_key] = seq + 1
        fault = self._fault if self._fault is not None and self._fault.applies(op, seq) else None
        if fault is not None and not fault.inside:
            self._inject(fault)
        op_id = self._next_op_id
        self._next_op_id += 1
        self._enters.append(
            (op_id, label, op, seq, _nbytes(args[0]) if args else 0, peer, pg.rank(), pg.size(), time.time())
        )
        if fault is not None and fault.inside:
            self._inject(fault)
        try:
            work = original(pg, *args, **kwargs)
        except BaseException:
            now = time.time()
            self._exits.append((op_id, now, False, now))
            raise
        if op in P2P_OPS and work is not None:
            return _WaitRecorded(work, self._exits, op_id)
        future = None
        if work is not None:
            with contextlib.suppress(RuntimeError):
                future = work.get_future()
        if future is None:
            now = time.time()
            self._exits.append((op_id, now, True, now))
        else:
            # The future completes (or fails) in the backend's thread once the op is done.
            future.add_done_callback(functools.partial(_record_exit, self._exits, op_id))
        return work

    def _inject(self, fault: InRankFault) -> None:
        if fault.action == "delay":
            time.sleep(fault.delay_s)
            return
        # Quiet from here on, as a frozen process is; but the detector must have every record so far.
        self._stop_shipping()
        self.flush(wait_s=_REGISTER_TIMEOUT_S)
        os.kill(os.getpid(), signal.SIGSTOP if fault.action == "stop" else signal.SIGKILL)
        self._start_shipping()  # continued (SIGCONT)

    @contextlib.contextmanager
    def phase(self, name: str, step: int = -1) -> Iterator[None]:
        """Record the start and end of a step phase (``generate``, ``update_actor``, ...)."""
        start = time.time()
        try:
            yield
        finally:
            self._phases.append((name, step, start, time.time()))

    def arm(self, fault: InRankFault | None) -> None:
        """Inject ``fault`` from its collective on (``None`` disarms)."""
        self._fault = fault

    # -- shipping -------------------------------------------------------------------------

    def _start_shipping(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._ship_loop, args=(self._stop,), name="raylane-probe", daemon=True
        )
        self._thread.start()

    def _stop_shipping(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _ship_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.config.flush_interval_s):
            try:
                self.flush()
            except Exception:  # a detector gone for good must not take the rank down
                logger.exception("probe could not ship its records")

    @staticmethod
    def _drain(queue: deque, limit: int) -> list:
        out = []
        while queue and len(out) < limit:
            out.append(queue.popleft())
        return out

    def flush(self, wait_s: float = 0.0) -> None:
        """Ship the records gathered so far (also a heartbeat when there are none).

        ``wait_s`` > 0 waits until the detector has them (and every earlier shipment: the detector
        runs reports one at a time, in the order each caller sent them).
        """
        with self._flush_lock:
            limit = self.config.max_batch
            # Exits first: an op that ends while the batch is drained then ships its exit no earlier
            # than its entry.
            exits = self._drain(self._exits, limit)
            enters = self._drain(self._enters, limit)
            batch = ProbeBatch(self.identity, enters, exits, self._drain(self._phases, limit), time.time())
            shipped = self._sink.report.remote(batch)
        if wait_s > 0:
            ray.wait([shipped], timeout=wait_s)
