"""``Worker``: the base class of every role a worker group runs (trainer, rollout, reference, ...).

A worker group constructs one object of each of its roles in every rank's process. By
then the process knows its place in the group and ``torch.distributed`` is up, so
``__init__`` can already use ``self.rank``, ``self.device`` and ``self.mesh``.

Worker methods marked with :func:`raylane.actors.register` are the ones the driver can
call on the group; everything else stays private to the process.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Self

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from raylane.actors.dispatch import Dispatch, register
from raylane.actors.mesh import MeshLayout, build_device_mesh

__all__ = ["DeviceInfo", "Worker", "WorkerContext"]


@dataclass(frozen=True)
class WorkerContext:
    """Where one rank sits: in its group, on its node."""

    group: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_id: str
    node_ip: str


@dataclass(frozen=True)
class DeviceInfo:
    """A rank's device and its memory, in bytes (``used``/``peak``: allocated by torch on a GPU,
    the process's resident memory on the CPU)."""

    rank: int
    device: str
    name: str
    total_bytes: int
    used_bytes: int
    peak_bytes: int


@dataclass
class ProcessRuntime:
    """State shared by the roles living in one rank's process (one per process)."""

    context: WorkerContext
    device: torch.device
    roles: dict[str, Worker] = field(default_factory=dict)
    meshes: dict[MeshLayout, DeviceMesh] = field(default_factory=dict)

    def mesh(self, layout: MeshLayout) -> DeviceMesh:
        if not dist.is_initialized():
            raise RuntimeError(
                f"rank {self.context.rank} of group {self.context.group!r} has no process group "
                "(the group was created with DistConfig(backend=None)), so it has no device mesh"
            )
        if layout not in self.meshes:
            raise RuntimeError(f"no device mesh was built for layout {layout}; meshes: {list(self.meshes)}")
        return self.meshes[layout]

    def build_meshes(self, layouts: list[MeshLayout]) -> None:
        """(Re)build one DeviceMesh per distinct layout; collective, same order on every rank."""
        self.meshes = {}
        for layout in dict.fromkeys(layouts):
            self.meshes[layout] = build_device_mesh(self.device, layout)


@dataclass(frozen=True)
class _Binding:
    runtime: ProcessRuntime
    role: str
    layout: MeshLayout


_constructing: ContextVar[_Binding | None] = ContextVar("raylane_worker_binding", default=None)


@contextmanager
def bind_role(runtime: ProcessRuntime, role: str, layout: MeshLayout) -> Iterator[None]:
    """Within this block, constructed Workers belong to ``role`` of ``runtime``."""
    token = _constructing.set(_Binding(runtime, role, layout))
    try:
        yield
    finally:
        _constructing.reset(token)


def _standalone_binding() -> _Binding:
    context = WorkerContext("standalone", 0, 1, 0, 1, node_id="", node_ip="127.0.0.1")
    return _Binding(ProcessRuntime(context, torch.device("cpu")), role="", layout=MeshLayout(1, 1))


def _process_memory() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = usage if sys.platform == "darwin" else usage * 1024  # Linux reports KiB, macOS bytes
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        resident = peak
    return resident, peak


class Worker:
    """Base class of a role: rank/node identity, device, and the role's DP x TP mesh.

    Constructed by a worker group inside each rank's process (constructing one outside a
    group gives a standalone rank 0 of 1 on the CPU, handy in unit tests). Subclasses need
    not call ``super().__init__()``.
    """

    _raylane: _Binding

    def __new__(cls, *args: object, **kwargs: object) -> Self:
        self = super().__new__(cls)
        # Bound in __new__ so identity is there before the subclass __init__ runs, whatever it does.
        self._raylane = _constructing.get() or _standalone_binding()
        return self

    # -- identity -------------------------------------------------------------------------

    @property
    def context(self) -> WorkerContext:
        return self._raylane.runtime.context

    @property
    def group_name(self) -> str:
        return self.context.group

    @property
    def rank(self) -> int:
        return self.context.rank

    @property
    def world_size(self) -> int:
        return self.context.world_size

    @property
    def local_rank(self) -> int:
        """Rank among the group's ranks on this node."""
        return self.context.local_rank

    @property
    def local_world_size(self) -> int:
        return self.context.local_world_size

    @property
    def node_id(self) -> str:
        return self.context.node_id

    @property
    def node_ip(self) -> str:
        return self.context.node_ip

    @property
    def role(self) -> str:
        """This object's role name in its group (``""`` in a single-role group)."""
        return self._raylane.role

    # -- layout ---------------------------------------------------------------------------

    @property
    def layout(self) -> MeshLayout:
        return self._raylane.layout

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank(self.rank)

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def mesh(self) -> DeviceMesh:
        """This role's 2-D DeviceMesh, dims ``("dp", "tp")``."""
        return self._raylane.runtime.mesh(self.layout)

    @property
    def dp_group(self) -> ProcessGroup:
        """The ranks holding the same TP shard in the other DP groups (gradient all-reduce)."""
        return self.mesh.get_group("dp")

    @property
    def tp_group(self) -> ProcessGroup:
        """The ranks of this rank's tensor-parallel group."""
        return self.mesh.get_group("tp")

    # -- process --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._raylane.runtime.device

    def colocated(self, role: str) -> Worker:
        """Another role living in this same process (hand tensors over without copies)."""
        roles = self._raylane.runtime.roles
        if role not in roles:
            raise KeyError(f"no role {role!r} in this process; roles: {sorted(roles)}")
        return roles[role]

    @register(Dispatch.ONE_TO_ALL)
    def reset_peak_memory(self) -> None:
        """Start a new peak for :meth:`device_info` (a GPU's allocator; a process's resident peak
        on the CPU cannot be reset and stays the peak since it started)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @register(Dispatch.ONE_TO_ALL)
    def device_info(self) -> DeviceInfo:
        """This rank's device and memory use."""
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return DeviceInfo(
                self.rank,
                str(self.device),
                props.name,
                props.total_memory,
                torch.cuda.memory_allocated(self.device),
                torch.cuda.max_memory_allocated(self.device),
            )
        resident, peak = _process_memory()
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return DeviceInfo(self.rank, "cpu", os.uname().machine, total, resident, max(peak, resident))
