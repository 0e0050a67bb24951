"""Resource pools: bundles of CPUs/GPUs reserved through Ray placement groups, one bundle per rank.

A worker group puts one actor on every bundle of its pool. Several groups may share a
pool (colocated: each actor takes ``1 / max_colocate`` of its bundle) or use disjoint
pools (disaggregated), and one reservation can be split into disjoint sub-pools.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylane.actors.errors import ResourcePoolError

__all__ = ["Placement", "ResourcePool", "ResourcePoolConfig"]

logger = logging.getLogger(__name__)


class Placement(StrEnum):
    """How the bundles of one node entry are placed.

    ``PACK``: the entry's bundles all land on one node (Ray ``STRICT_PACK``), so local
    ranks share a host (shared memory, NVLink). ``SPREAD``: the entry's bundles are
    spread over as many nodes as Ray can (Ray ``SPREAD``), so one node loss takes fewer
    ranks with it.
    """

    PACK = "PACK"
    SPREAD = "SPREAD"


_RAY_STRATEGY = {Placement.PACK: "STRICT_PACK", Placement.SPREAD: "SPREAD"}


@ray.remote(num_cpus=0, max_retries=-1)
def _node_of_bundle() -> str:
    return ray.get_runtime_context().get_node_id()


@dataclass(frozen=True)
class ResourcePoolConfig:
    """What a pool reserves.

    ``bundles_per_node`` has one entry per node: ``(8, 8)`` is two nodes of 8 bundles.
    ``max_colocate`` is how many worker groups may share each bundle.
    """

    bundles_per_node: tuple[int, ...] = (1,)
    num_cpus_per_bundle: float = 1.0
    num_gpus_per_bundle: float = 0.0
    placement: Placement = Placement.PACK
    max_colocate: int = 1
    name: str = "pool"
    ready_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundles_per_node", tuple(self.bundles_per_node))
        object.__setattr__(self, "placement", Placement(self.placement))
        if not self.bundles_per_node or any(not isinstance(n, int) or n <= 0 for n in self.bundles_per_node):
            raise ValueError(
                f"bundles_per_node needs positive ints, one per node; got {self.bundles_per_node}"
            )
        if self.num_cpus_per_bundle < 0 or self.num_gpus_per_bundle < 0:
            raise ValueError("num_cpus_per_bundle and num_gpus_per_bundle must be >= 0")
        if self.num_cpus_per_bundle == 0 and self.num_gpus_per_bundle == 0:
            raise ValueError(
                "a bundle must hold some CPU or GPU: set num_cpus_per_bundle or num_gpus_per_bundle"
            )
        if self.max_colocate < 1:
            raise ValueError(f"max_colocate must be >= 1, got {self.max_colocate}")


@dataclass
class _Bundle:
    """One reserved bundle and the worker groups that have an actor on it."""

    placement_group: PlacementGroup
    index: int
    tenants: list[str] = field(default_factory=list)
    released: bool = False


class ResourcePool:
    """A reserved, ordered set of bundles; bundle ``i`` hosts rank ``i`` of each group on the pool.

    Use as a context manager, or call :meth:`release`, to give the reservation back.
    """

    def __init__(
        self,
        bundles_per_node: Sequence[int] = (1,),
        *,
        num_cpus_per_bundle: float = 1.0,
        num_gpus_per_bundle: float = 0.0,
        placement: Placement | str = Placement.PACK,
        max_colocate: int = 1,
        name: str = "pool",
        ready_timeout_s: float = 60.0,
    ) -> None:
        config = ResourcePoolConfig(
            bundles_per_node=tuple(bundles_per_node),
            num_cpus_per_bundle=num_cpus_per_bundle,
            num_gpus_per_bundle=num_gpus_per_bundle,
            placement=Placement(placement),
            max_colocate=max_colocate,
            name=name,
            ready_timeout_s=ready_timeout_s,
        )
        self.config = config
        self._owned = self._reserve(config)
        self._bundles = [_Bundle(pg, i) for pg in self._owned for i in range(len(pg.bundle_specs))]

    @classmethod
    def from_config(cls, config: ResourcePoolConfig) -> ResourcePool:
        """Reserve the bundles ``config`` describes."""
        return cls(
            config.bundles_per_node,
            num_cpus_per_bundle=config.num_cpus_per_bundle,
            num_gpus_per_bundle=config.num_gpus_per_bundle,
            placement=config.placement,
            max_colocate=config.max_colocate,
            name=config.name,
            ready_timeout_s=config.ready_timeout_s,
        )

    @staticmethod
    def _reserve(config: ResourcePoolConfig) -> list[PlacementGroup]:
        bundle = {"CPU": config.num_cpus_per_bundle, "GPU": config.num_gpus_per_bundle}
        bundle = {k: v for k, v in bundle.items() if v > 0}
        groups = [
            placement_group(
                [dict(bundle) for _ in range(count)],
                strategy=_RAY_STRATEGY[config.placement],
                name=f"{config.name}-node{i}",
            )
            for i, count in enumerate(config.bundles_per_node)
        ]
        ready, _ = ray.wait(
            [pg.ready() for pg in groups], num_returns=len(groups), timeout=config.ready_timeout_s
        )
        if len(ready) < len(groups):
            for pg in groups:
                remove_placement_group(pg)
            raise ResourcePoolError(
                f"resource pool {config.name!r} could not reserve {sum(config.bundles_per_node)} bundles of "
                f"{bundle} ({config.placement.value}, per node {list(config.bundles_per_node)}) within "
                f"{config.ready_timeout_s:g} s; available now: {ray.available_resources()}. "
                "Free resources (release other pools) or ask for fewer/smaller bundles."
            )
        logger.info("pool %r reserved bundles %s of %s", config.name, list(config.bundles_per_node), bundle)
        return groups

    @classmethod
    def _view(cls, parent: ResourcePool, bundles: list[_Bundle], name: str) -> ResourcePool:
        pool = cls.__new__(cls)
        pool.config = ResourcePoolConfig(
            bundles_per_node=(len(bundles),),
            num_cpus_per_bundle=parent.config.num_cpus_per_bundle,
            num_gpus_per_bundle=parent.config.num_gpus_per_bundle,
            placement=parent.config.placement,
            max_colocate=parent.config.max_colocate,
            name=name,
            ready_timeout_s=parent.config.ready_timeout_s,
        )
        pool._owned = []
        pool._bundles = bundles
        return pool

    # -- shape ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    def __len__(self) -> int:
        return len(self._bundles)

    @property
    def num_bundles(self) -> int:
        return len(self._bundles)

    def split(self, sizes: Sequence[int], names: Sequence[str] | None = None) -> list[ResourcePool]:
        """Disjoint sub-pools over consecutive bundles, e.g. ``pool.split([4, 4])``.

        Sub-pools share this pool's reservation: releasing this pool releases them, and
        a sub-pool's own :meth:`release` does nothing.
        """
        if any(size <= 0 for size in sizes) or sum(sizes) > len(self):
            raise ResourcePoolError(
                f"cannot split pool {self.name!r} of {len(self)} bundles into {list(sizes)}: "
                "sizes must be positive and add up to at most the pool size"
            )
        if names is not None and len(names) != len(sizes):
            raise ResourcePoolError(f"split got {len(sizes)} sizes but {len(names)} names")
        pools, start = [], 0
        for i, size in enumerate(sizes):
            name = names[i] if names is not None else f"{self.name}[{i}]"
            pools.append(ResourcePool._view(self, self._bundles[start : start + size], name))
            start += size
        return pools

    def wait_placed(self, timeout_s: float | None = None) -> None:
        """Block until every bundle of this pool is on a node that runs work: after a node is lost,
        Ray moves its bundles to a node with room once it has declared the node dead, and an actor
        started into a bundle before that dies with the node. A task run in each bundle (retried
        while its node is lost) is the barrier. Raises :class:`ResourcePoolError` after
        ``timeout_s`` (default ``ready_timeout_s``)."""
        timeout_s = self.config.ready_timeout_s if timeout_s is None else timeout_s
        refs = [
            _node_of_bundle.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=bundle.placement_group, placement_group_bundle_index=bundle.index
                )
            ).remote()
            for bundle in self._bundles
        ]
        pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[1]
        if pending:
            for ref in pending:
                ray.cancel(ref, force=True)
            missing = [i for i, ref in enumerate(refs) if ref in pending]
            raise ResourcePoolError(
                f"bundles {missing} of pool {self.name!r} are not on a live node after {timeout_s:g} s "
                f"(a node was lost and no other has room for them: add a node or free resources); "
                f"available now: {ray.available_resources()}"
            )

    def move_off(self, node_id: str) -> list[int]:
        """Reserve again, on other nodes, this pool's placement groups that have a bundle on node
        ``node_id`` (isolated: Ray places nothing new there, and never moves bundles off a node that
        is alive). Removing a placement group kills the actors in it; returns the indices of the
        bundles moved, whose actors must be started again. Only a pool that reserved its bundles
        can move them, not a sub-pool of :meth:`split`."""
        if not self._owned:
            raise ResourcePoolError(
                f"pool {self.name!r} is a sub-pool or released: move bundles on the pool that reserved them"
            )
        moved: list[int] = []
        for k, old in enumerate(self._owned):
            table = placement_group_table(old)
            if node_id not in table["bundles_to_node_id"].values():
                continue
            remove_placement_group(old)
            new = placement_group(list(old.bundle_specs), strategy=table["strategy"], name=table["name"])
            if not ray.wait([new.ready()], timeout=self.config.ready_timeout_s)[0]:
                remove_placement_group(new)
                raise ResourcePoolError(
                    f"pool {self.name!r} could not reserve {len(old.bundle_specs)} bundles away from node "
                    f"{node_id} within {self.config.ready_timeout_s:g} s; available now: "
                    f"{ray.available_resources()}. Add a node with room for them."
                )
            self._owned[k] = new
            for i, bundle in enumerate(self._bundles):
                if bundle.placement_group.id == old.id:
                    bundle.placement_group = new
                    moved.append(i)
        logger.info("pool %r: bundles %s moved off node %s", self.name, moved, node_id)
        return moved

    # -- placing actors -------------------------------------------------------------------

    def actor_options(self, bundle: int) -> dict[str, Any]:
        """Ray actor options that pin an actor to ``bundle``, taking its share of the bundle."""
        share = self.config.max_colocate
        slot = self._bundles[bundle]
        return {
            "num_cpus": self.config.num_cpus_per_bundle / share,
            "num_gpus": self.config.num_gpus_per_bundle / share,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=slot.placement_group, placement_group_bundle_index=slot.index
            ),
        }

    def attach(self, group: str) -> None:
        """Record that worker group ``group`` puts one actor on every bundle of this pool."""
        if any(b.released for b in self._bundles):
            raise ResourcePoolError(f"pool {self.name!r} was released; reserve a new pool")
        full = [i for i, b in enumerate(self._bundles) if len(b.tenants) >= self.config.max_colocate]
        if full:
            tenants = sorted({t for i in full for t in self._bundles[i].tenants})
            raise ResourcePoolError(
                f"pool {self.name!r} allows {self.config.max_colocate} worker group(s) per bundle and bundles "
                f"{full} already host {tenants}; shut one down, create the pool with a larger max_colocate, "
                f"or host both roles in one colocated group"
            )
        for bundle in self._bundles:
            bundle.tenants.append(group)

    def detach(self, group: str) -> None:
        """Forget worker group ``group`` (called when the group shuts down)."""
        for bundle in self._bundles:
            if group in bundle.tenants:
                bundle.tenants.remove(group)

    @property
    def tenants(self) -> list[str]:
        """Names of the worker groups with actors on this pool."""
        return sorted({t for b in self._bundles for t in b.tenants})

    def bundle_node_ids(self) -> list[str]:
        """The Ray node id each bundle was reserved on, in bundle order."""
        tables = {pg.id: placement_group_table(pg) for pg in {b.placement_group for b in self._bundles}}
        return [tables[b.placement_group.id]["bundles_to_node_id"][b.index] for b in self._bundles]

    # -- lifetime -------------------------------------------------------------------------

    def release(self) -> None:
        """Give the reserved bundles back to the cluster (a no-op on a sub-pool)."""
        if not self._owned:
            return
        if self.tenants:
            raise ResourcePoolError(
                f"pool {self.name!r} still hosts worker groups {self.tenants}; call shutdown() on them first"
            )
        for pg in self._owned:
            remove_placement_group(pg)
        for bundle in self._bundles:
            bundle.released = True
        self._owned = []
        logger.info("pool %r released", self.name)

    def __enter__(self) -> ResourcePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"ResourcePool({self.name!r}, bundles={len(self)}, cpus/bundle={self.config.num_cpus_per_bundle:g}, "
            f"gpus/bundle={self.config.num_gpus_per_bundle:g}, tenants={self.tenants})"
        )
