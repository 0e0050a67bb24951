"""``WorkerGroup``: a gang of Ray actors, one per bundle of a resource pool, driven as one object.

    pool = ResourcePool([4], num_cpus_per_bundle=1)
    group = WorkerGroup(pool, Rollout, name="rollout")
    out = group.generate(batch)               # dispatch mode declared on Rollout.generate
    fut = group.generate.remote(batch)         # non-blocking; fut.get() later

Each rank's actor is pinned to its bundle, learns its node, and joins the group's
``torch.distributed`` process group through a rendezvous rank 0 opens on a free port.
Failures come back as ``RankError`` / ``DeadRankError`` naming the rank and node;
``replace_rank`` and ``reform_process_group`` are the hooks fault tolerance builds on.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from raylane.actors.colocate import SINGLE_ROLE, Role, registered_methods, resolve_roles
from raylane.actors.dispatch import DispatchTarget, MethodSpec
from raylane.actors.errors import DispatchError, WorkerGroupError
from raylane.actors.futures import GroupFuture
from raylane.actors.handles import HANDLE_ATTRIBUTES, RoleHandle
from raylane.actors.host import CONCURRENCY_GROUPS, NodeInfo, WorkerHost
from raylane.actors.mesh import MeshLayout
from raylane.actors.rendezvous import DistConfig
from raylane.actors.resource_pool import ResourcePool
from raylane.actors.worker import Worker, WorkerContext

__all__ = ["WorkerGroup", "WorkerGroupConfig"]

logger = logging.getLogger(__name__)

_RemoteHost = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(WorkerHost)


@dataclass(frozen=True)
class WorkerGroupConfig:
    """How a group's actors are started and called.

    ``env_vars`` and ``runtime_env`` go to every actor's Ray runtime env (for third-party
    libraries that read the environment; raylane's own settings travel in typed configs).
    ``start_timeout_s`` bounds actor start-up, rendezvous and role construction;
    ``call_timeout_s`` bounds every call (``None``: no limit; dead ranks still end a wait);
    ``poll_interval_s`` is how often a waiting call checks for a failed rank.
    """

    env_vars: Mapping[str, str] = field(default_factory=dict)
    runtime_env: Mapping[str, Any] | None = None
    dist: DistConfig = field(default_factory=DistConfig)
    start_timeout_s: float = 300.0
    call_timeout_s: float | None = None
    poll_interval_s: float = 0.1

    def actor_runtime_env(self) -> dict[str, Any] | None:
        env = dict(self.runtime_env or {})
        if self.env_vars:
            env["env_vars"] = {**env.get("env_vars", {}), **self.env_vars}
        return env or None


def _local_contexts(group: str, nodes: Sequence[NodeInfo]) -> list[WorkerContext]:
    by_node: dict[str, list[int]] = defaultdict(list)
    for rank, node in enumerate(nodes):
        by_node[node.node_id].append(rank)
    return [
        WorkerContext(
            group=group,
            rank=rank,
            world_size=len(nodes),
            local_rank=by_node[node.node_id].index(rank),
            local_world_size=len(by_node[node.node_id]),
            node_id=node.node_id,
            node_ip=node.node_ip,
        )
        for rank, node in enumerate(nodes)
    ]


class WorkerGroup:
    """One actor per bundle of ``pool``, each hosting the group's role object(s).

    ``worker`` is a Worker class or a :class:`Role` (one role: its registered methods are
    attributes of the group), or a mapping ``{name: class or Role}`` (colocated roles:
    ``group.<name>.<method>``). ``name`` prefixes the actors' Ray names.
    """

    def __init__(
        self,
        pool: ResourcePool,
        worker: type[Worker] | Role | Mapping[str, type[Worker] | Role],
        *,
        name: str,
        config: WorkerGroupConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a worker group needs a non-empty name, got {name!r}")
        self._closed = True
        self.name = name
        self.pool = pool
        self.config = config or WorkerGroupConfig()
        self._roles = resolve_roles(worker, _GROUP_ATTRIBUTES, HANDLE_ATTRIBUTES)
        self.world_size = len(pool)
        self._layouts = {
            r: MeshLayout.for_world(self.world_size, role.tp_size) for r, role in self._roles.items()
        }
        self._methods = {r: registered_methods(role.cls) for r, role in self._roles.items()}
        self._uid = uuid.uuid4().hex[:6]
        self._generation = [0] * self.world_size
        self._hosts: list[ActorHandle] = []
        self._nodes: dict[int, NodeInfo] = {}
        self._contexts: list[WorkerContext] = []
        self._roles_ref = ray.put(self._roles)
        pool.attach(self._tenant)
        self._closed = False  # from here on, shutdown() has actors to kill and a pool share to free
        try:
            for rank in range(self.world_size):
                self._hosts.append(self._spawn(rank))
            infos = self._host_call("node_info", range(self.world_size), (), self.config.start_timeout_s)
            self._nodes = dict(enumerate(infos))
            self._setup()
        except BaseException:
            self.shutdown()
            raise
        logger.info("worker group %r up: %d ranks, roles %s", name, self.world_size, list(self._roles))

    # -- start-up -------------------------------------------------------------------------

    @property
    def _tenant(self) -> str:
        return f"{self.name}-{self._uid}"

    def _spawn(self, rank: int) -> ActorHandle:
        generation = self._generation[rank]
        actor_name = f"{self._tenant}-rank{rank}" + (f".{generation}" if generation else "")
        options = self.pool.actor_options(rank)
        return _RemoteHost.options(
            name=actor_name,
            max_restarts=0,
            max_task_retries=0,
            runtime_env=self.config.actor_runtime_env(),
            **options,
        ).remote(self.name, rank)

    def _host_call(
        self, method: str, ranks: Sequence[int], args: tuple, timeout_s: float | None
    ) -> list[Any]:
        """Call a WorkerHost method on ``ranks`` and wait, with the usual failure mapping."""
        ranks = list(ranks)
        refs = [getattr(self._hosts[r], method).remote(*args) for r in ranks]
        return self._future(method, ranks, refs, [True] * len(ranks), list, timeout_s).get()

    def _setup(self) -> None:
        """Rendezvous every rank, (re)form the process group and meshes, construct missing roles."""
        contexts = _local_contexts(self.name, self.nodes)
        dist_config = self.config.dist
        rendezvous = None
        if dist_config.backend is not None:
            rendezvous = self._host_call(
                "open_rendezvous", [0], (self.world_size, dist_config.timeout_s), self.config.start_timeout_s
            )[0]
        refs = [
            host.setup.remote(contexts[rank], self._roles_ref, self._layouts, rendezvous, dist_config)
            for rank, host in enumerate(self._hosts)
        ]
        ranks = list(range(self.world_size))
        self._future(
            "setup", ranks, refs, [False] * len(ranks), lambda _: None, self.config.start_timeout_s
        ).get()
        self._contexts = contexts

    def _future(
        self,
        method: str,
        ranks: list[int],
        refs: list,
        kept: list[bool],
        collect: Any,
        timeout_s: float | None,
    ) -> GroupFuture:
        return GroupFuture(
            group=self.name,
            method=method,
            ranks=ranks,
            refs=refs,
            kept=kept,
            collect=collect,
            nodes=self._nodes,
            timeout_s=timeout_s,
            poll_interval_s=self.config.poll_interval_s,
        )

    # -- calls ----------------------------------------------------------------------------

    def _handle(self, role: str) -> RoleHandle:
        return RoleHandle(self, role, self._methods[role])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "_roles" not in self.__dict__:
            raise AttributeError(name)
        if SINGLE_ROLE in self._roles:
            return getattr(self._handle(SINGLE_ROLE), name)
        if name in self._roles:
            return self._handle(name)
        raise AttributeError(
            f"group {self.name!r} hosts colocated roles {self.roles}; call methods through a role, "
            f"e.g. group.{self.roles[0]}.<method>(...)"
        )

    def __dir__(self) -> list[str]:
        extra = self._methods[SINGLE_ROLE] if SINGLE_ROLE in self._roles else self._roles
        return [*super().__dir__(), *extra]

    def on_ranks(self, ranks: Sequence[int]) -> RoleHandle:
        """The group's methods, called on ``ranks`` only (single-role groups; else ``group.<role>.on_ranks``)."""
        if SINGLE_ROLE not in self._roles:
            raise WorkerGroupError(
                f"group {self.name!r} has roles {self.roles}; use group.<role>.on_ranks(...)"
            )
        return self._handle(SINGLE_ROLE).on_ranks(ranks)

    def _submit(
        self,
        role: str,
        method: str,
        spec: MethodSpec,
        ranks: tuple[int, ...] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> GroupFuture:
        if self._closed:
            raise WorkerGroupError(f"worker group {self.name!r} is shut down")
        label = f"{role}.{method}" if role else method
        layout = self._layouts[role]
        target = DispatchTarget(self.name, label, ranks or tuple(range(self.world_size)), layout)
        if target.is_subset and not spec.mode.supports_subset:
            raise DispatchError(
                f"{label} uses {spec.mode_name}, which needs every rank of group {self.name!r}; "
                f"it cannot be called on ranks {list(target.ranks)}"
            )
        plan = spec.mode.plan(target, args, kwargs)
        refs = [
            (
                self._hosts[call.rank].execute_control if spec.control else self._hosts[call.rank].execute
            ).remote(role, method, call.keep_result, *call.args, **call.kwargs)
            for call in plan.calls
        ]
        return self._future(
            label,
            [c.rank for c in plan.calls],
            refs,
            [c.keep_result for c in plan.calls],
            lambda results: spec.mode.collect(target, plan, results),
            self.config.call_timeout_s,
        )

    # -- introspection --------------------------------------------------------------------

    @property
    def roles(self) -> list[str]:
        """Role names (``[""]`` for a single-role group)."""
        return list(self._roles)

    def layout(self, role: str = SINGLE_ROLE) -> MeshLayout:
        """The DP x TP layout of ``role``'s ranks."""
        return self._layouts[role]

    @property
    def actors(self) -> list[ActorHandle]:
        """The rank actors, in rank order."""
        return list(self._hosts)

    @property
    def nodes(self) -> list[NodeInfo]:
        """Where each rank runs (node, IP, pid, GPUs), in rank order."""
        return [self._nodes[rank] for rank in range(self.world_size)]

    @property
    def contexts(self) -> list[WorkerContext]:
        """Each rank's context (rank, local rank, node) as its workers see it."""
        return list(self._contexts)

    # -- failures -------------------------------------------------------------------------

    def check_alive(self, timeout_s: float = 5.0) -> list[int]:
        """Ranks whose process is dead or does not answer a ping within ``timeout_s``.

        Pings go to the actors' control thread, so a rank busy in a long call still answers.
        """
        refs = [host.ping.remote() for host in self._hosts]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        silent = []
        for rank, ref in enumerate(refs):
            if ref not in ready_set:
                silent.append(rank)
                continue
            try:
                ray.get(ref)
            except RayActorError:
                silent.append(rank)
        return silent

    def replace_rank(self, rank: int) -> None:
        """Start a new actor for ``rank`` on the same bundle and re-form the process group.

        The old actor is killed if still alive. Surviving ranks keep their role objects
        and re-join a fresh process group with fresh meshes (anything a role built on the
        old ones, e.g. an FSDP-wrapped model, must be rebuilt); the new rank constructs its
        roles afresh (state such as weights must be restored by the caller, e.g. from a
        checkpoint). Survivors must not be blocked in a collective: a gloo collective fails
        once a peer it waits on dies, but a rank waiting on a live peer waits until the
        timeout (replace it too, with :meth:`replace_ranks`); NCCL communicators need aborting.
        """
        self.replace_ranks([rank])

    def replace_ranks(self, ranks: Sequence[int]) -> None:
        """:meth:`replace_rank` for several ranks at once (one re-formed process group)."""
        ranks = sorted(set(ranks))
        bad = [r for r in ranks if not 0 <= r < self.world_size]
        if bad or not ranks:
            raise ValueError(
                f"ranks {bad or ranks} are not ranks of group {self.name!r} of {self.world_size}"
            )
        for rank in ranks:
            ray.kill(self._hosts[rank], no_restart=True)
            del self._nodes[rank]
            self._generation[rank] += 1
            self._hosts[rank] = self._spawn(rank)
        infos = self._host_call("node_info", ranks, (), self.config.start_timeout_s)
        self._nodes.update(zip(ranks, infos))
        self._setup()
        logger.info("group %r: ranks %s replaced on nodes %s", self.name, ranks, [n.node_ip for n in infos])

    def freeze_heaps(self, timeout_s: float | None = None) -> list[int]:
        """``gc.freeze`` on every rank once its garbage is collected (:meth:`WorkerHost.freeze_heap`);
        returns the objects frozen per rank."""
        return self._host_call("freeze_heap", range(self.world_size), (), timeout_s)

    def rebuild_roles(self, ranks: Sequence[int]) -> None:
        """Construct the roles of ``ranks`` afresh, e.g. the survivors of :meth:`replace_ranks`,
        whose models are still sharded over the old process group (state such as weights must be
        restored by the caller)."""
        self._host_call("rebuild_roles", ranks, (self._roles_ref, self._layouts), self.config.start_timeout_s)

    def reform_process_group(self) -> None:
        """Tear down and re-form the process group (and role meshes) on every rank."""
        self._setup()

    # -- lifetime -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill the group's actors and free their share of the pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for host in self._hosts:
            ray.kill(host, no_restart=True)
        self.pool.detach(self._tenant)
        logger.info("worker group %r shut down", self.name)

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "up"
        return f"WorkerGroup({self.name!r}, ranks={self.world_size}, roles={self.roles}, pool={self.pool.name!r}, {state})"


_GROUP_ATTRIBUTES = frozenset(n for n in dir(WorkerGroup) if not n.startswith("_")) | {
    "name",
    "pool",
    "config",
    "world_size",
}
