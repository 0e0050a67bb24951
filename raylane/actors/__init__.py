"""The actor layer: resource pools, worker groups, dispatch modes, rank rendezvous and colocation.

This is the single-controller programming model: a driver builds worker groups on
resource pools and calls them like objects, while each group's ranks run SPMD code with
``torch.distributed`` among themselves.

    from raylane.actors import Dispatch, ResourcePool, Worker, WorkerGroup, register

    class Doubler(Worker):
        @register(Dispatch.DP_SHARD)
        def double(self, x):
            return x * 2

    with ResourcePool([2], num_cpus_per_bundle=1) as pool, WorkerGroup(pool, Doubler, name="d") as group:
        group.double(torch.arange(4))   # tensor([0, 2, 4, 6]), half on each rank
"""

from raylane.actors.colocate import Role
from raylane.actors.dispatch import (
    DISPATCH_MODES,
    CallPlan,
    Dispatch,
    DispatchMode,
    DispatchTarget,
    MethodSpec,
    RankCall,
    register,
)
from raylane.actors.errors import (
    DeadRankError,
    DispatchError,
    GroupTimeoutError,
    RankError,
    ResourcePoolError,
    WorkerGroupError,
)
from raylane.actors.futures import GroupFuture, wait_all
from raylane.actors.handles import GroupMethod, RoleHandle
from raylane.actors.host import NodeInfo
from raylane.actors.mesh import MeshLayout
from raylane.actors.rendezvous import DistConfig
from raylane.actors.resource_pool import Placement, ResourcePool, ResourcePoolConfig
from raylane.actors.worker import DeviceInfo, Worker, WorkerContext
from raylane.actors.worker_group import WorkerGroup, WorkerGroupConfig

__all__ = [
    "DISPATCH_MODES",
    "CallPlan",
    "DeadRankError",
    "DeviceInfo",
    "Dispatch",
    "DispatchError",
    "DispatchMode",
    "DispatchTarget",
    "DistConfig",
    "GroupFuture",
    "GroupMethod",
    "GroupTimeoutError",
    "MeshLayout",
    "MethodSpec",
    "NodeInfo",
    "Placement",
    "RankCall",
    "RankError",
    "ResourcePool",
    "ResourcePoolConfig",
    "ResourcePoolError",
    "Role",
    "RoleHandle",
    "Worker",
    "WorkerContext",
    "WorkerGroup",
    "WorkerGroupConfig",
    "WorkerGroupError",
    "register",
    "wait_all",
]
