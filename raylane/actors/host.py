"""``WorkerHost``: the Ray actor behind one rank; it hosts the rank's role objects.

Group calls run one at a time on the actor's default thread. A separate ``control``
concurrency group answers liveness and identity queries even while a long call (or a
stuck collective) holds the default thread, which is what failure detection needs.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray

from raylane.actors.colocate import Role
from raylane.actors.mesh import MeshLayout
from raylane.actors.rendezvous import (
    DistConfig,
    Rendezvous,
    RendezvousMaster,
    init_process_group,
    pick_device,
)
from raylane.actors.worker import ProcessRuntime, WorkerContext, bind_role

__all__ = ["NodeInfo", "WorkerHost"]

logger = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 1}


@dataclass(frozen=True)
class NodeInfo:
    """Where a rank's actor process runs."""

    node_id: str
    node_ip: str
    hostname: str
    pid: int
    gpu_ids: tuple[str, ...]


class WorkerHost:
    """One rank's process. Created by ``WorkerGroup``; not meant to be used directly."""

    def __init__(self, group: str, rank: int) -> None:
        self._group = group
        self._rank = rank
        self._runtime: ProcessRuntime | None = None
        self._master: RendezvousMaster | None = None

    @ray.method(concurrency_group="control")
    def node_info(self) -> NodeInfo:
        context = ray.get_runtime_context()
        return NodeInfo(
            node_id=context.get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()),
        )

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        return os.getpid()

    def open_rendezvous(self, world_size: int, timeout_s: float) -> Rendezvous:
        """Rank 0 only: listen on a free port for the other ranks; returns the address to join."""
        self._master = RendezvousMaster(ray.util.get_node_ip_address(), world_size, timeout_s)
        return self._master.address

    def setup(
        self,
        context: WorkerContext,
        roles: Mapping[str, Role],
        layouts: Mapping[str, MeshLayout],
        rendezvous: Rendezvous | None,
        dist_config: DistConfig,
    ) -> None:
        """(Re)join the process group, (re)build the role meshes, construct roles not built yet.

        On a rank that already hosts its roles (after another rank was replaced) this
        re-forms the process group and leaves the role objects as they are.
        """
        if self._runtime is None:
            self._runtime = ProcessRuntime(context, pick_device())
        else:
            self._runtime.context = context
            # The old process group and meshes go: let the collector reach them again.
            gc.unfreeze()
        if rendezvous is not None:
            init_process_group(
                rank=context.rank,
                world_size=context.world_size,
                rendezvous=rendezvous,
                config=dist_config,
                device=self._runtime.device,
                master=self._master if context.rank == 0 else None,
            )
            self._runtime.build_meshes([layouts[name] for name in roles])
        for name, role in roles.items():
            if name not in self._runtime.roles:
                with bind_role(self._runtime, name, layouts[name]):
                    self._runtime.roles[name] = role.cls(*role.args, **role.kwargs)
        logger.info("rank %d of %r ready with roles %s", context.rank, self._group, list(roles))

    def rebuild_roles(self, roles: Mapping[str, Role], layouts: Mapping[str, MeshLayout]) -> None:
        """Construct every role afresh on the current meshes (a role sharded over meshes of a process
        group since re-formed cannot run another collective on them)."""
        self._runtime.roles.clear()
        # Roles built before a freeze_heap are in the permanent generation, where a reference cycle
        # of theirs (a module and its hooks) would keep their tensors alive for good.
        gc.unfreeze()
        gc.collect()
        for name, role in roles.items():
            with bind_role(self._runtime, name, layouts[name]):
                self._runtime.roles[name] = role.cls(*role.args, **role.kwargs)
        logger.info("rank %d of %r rebuilt roles %s", self._rank, self._group, list(roles))

    @ray.method(concurrency_group="control")
    def freeze_heap(self) -> int:
        """Collect garbage, then move every live object to the collector's permanent generation
        (``gc.freeze``), so later full collections scan only objects made since; returns how many
        objects are frozen.

        Call it once the rank's long-lived state exists (after a first step): a colocated GPU rank
        holds ~870k objects once its compiles are done, and a full collection of them paused it
        for 0.36-0.44 s every 8-10 s. :meth:`setup` on a re-joining rank and :meth:`rebuild_roles`
        unfreeze, so the objects they drop can be freed. Runs on the control thread, beside a call
        in progress.
        """
        gc.collect()
        gc.freeze()
        return gc.get_freeze_count()

    def execute(self, role: str, method: str, keep_result: bool, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` of ``role`` on this rank; ``None`` back when nobody collects the result."""
        if self._runtime is None:
            raise RuntimeError(f"rank {self._rank} of {self._group!r} was called before its setup finished")
        result = getattr(self._runtime.roles[role], method)(*args, **kwargs)
        return result if keep_result else None

    @ray.method(concurrency_group="control")
    def execute_control(self, role: str, method: str, keep_result: bool, /, *args: Any, **kwargs: Any) -> Any:
        """:meth:`execute` on the control thread, beside the call in progress (``register(control=True)``)."""
        return self.execute(role, method, keep_result, *args, **kwargs)
