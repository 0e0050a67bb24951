"""The two endpoints of a weight sync, mixed into worker roles: the trainer side (source) and the rollout side (target).

The runner's engine records the synced version once the last tensor landed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
import torch
import torch.distributed as dist
from torch import nn

from raylane.actors.dispatch import Dispatch, register
from raylane.actors.rendezvous import Rendezvous, RendezvousMaster
from raylane.actors.worker import Worker
from raylane.weight_transfer.plan import (
    SourceInfo,
    TargetInfo,
    TPLayout,
    TransferPlan,
    TransferStats,
    WeightSyncError,
    fsdp_local_shards,
    param_specs,
)
from raylane.weight_transfer.transport import WeightSyncChannel, join_weight_sync_group, run_transfer

if TYPE_CHECKING:
    from raylane.runner import LLMEngine


@dataclass
class _SyncState:
    plan: TransferPlan
    channel: WeightSyncChannel
    rank: int  # this process's source or destination rank in the plan
    source_role: str | None = None


def _require(state: _SyncState | None, role: str, how: str) -> _SyncState:
    if state is None:
        raise WeightSyncError(
            f"this {role} rank has no weight sync set up; build a raylane.controllers.WeightSync ({how}) first"
        )
    return state


class WeightSyncSource(Worker):
    """The trainer side of a weight sync: a role whose model is FSDP2-sharded over all of its ranks.

    Subclasses implement :meth:`weight_sync_module`; the driver's ``WeightSync`` calls the rest.
    """

    _weight_sync: _SyncState | None = None
    _weight_sync_master: RendezvousMaster | None = None

    def weight_sync_module(self) -> nn.Module:
        """The FSDP2-wrapped model to publish (parameters under their Hugging Face names)."""
        raise NotImplementedError(f"{type(self).__name__} must implement weight_sync_module()")

    def weight_sync_shards(self) -> dict[str, torch.Tensor]:
        """This rank's FSDP2 shard of every parameter."""
        return fsdp_local_shards(self.weight_sync_module(), self.world_size)

    @property
    def weight_sync_channel(self) -> WeightSyncChannel:
        """The dedicated weight-sync group this rank joined (disaggregated syncs)."""
        return _require(self._weight_sync, "trainer", "disaggregated").channel

    @register(Dispatch.RANK_ZERO)
    def weight_source_info(self) -> SourceInfo:
        """The DP size and the full shape of every parameter, for the planner."""
        if self.tp_size != 1:
            raise WeightSyncError(
                f"weight sync reads FSDP2 shards over a 1-D data-parallel mesh, but this trainer role has "
                f"tp_size={self.tp_size}; give the trainer Role(tp_size=1)"
            )
        shapes = {name: tuple(p.shape) for name, p in self.weight_sync_module().named_parameters()}
        return SourceInfo(dp=self.world_size, shapes=shapes)

    @register(Dispatch.RANK_ZERO)
    def open_weight_sync(self, world_size: int, timeout_s: float) -> Rendezvous:
        """Open the weight-sync group's store on a free port of this node; returns its address."""
        self._weight_sync_master = RendezvousMaster(ray.util.get_node_ip_address(), world_size, timeout_s)
        return self._weight_sync_master.address

    @register(Dispatch.ONE_TO_ALL)
    def join_weight_sync(self, rendezvous: Rendezvous, plan: TransferPlan, timeout_s: float) -> None:
        """Join the weight-sync group as the plan's source rank ``self.rank`` (collective with the
        rollout group's ``join_weight_sync``)."""
        self.close_weight_sync()
        master = self._weight_sync_master if self.rank == 0 else None
        channel = join_weight_sync_group(
            rendezvous, plan.src_peer(self.rank), plan.world_size, self.device, timeout_s, master
        )
        self._weight_sync_master = None
        self._weight_sync = _SyncState(plan, channel, self.rank)

    @register(Dispatch.ONE_TO_ALL)
    def send_weights(self, version: int) -> TransferStats:
        """Send this rank's slices of weight ``version`` (collective with ``receive_weights``)."""
        state = _require(self._weight_sync, "trainer", "disaggregated")
        return run_transfer(
            state.plan, state.channel, version, src_rank=self.rank, source=self.weight_sync_shards()
        )

    @register(Dispatch.ONE_TO_ALL)
    def close_weight_sync(self) -> None:
        """Leave the weight-sync group (no-op if none)."""
        if self._weight_sync is not None:
            self._weight_sync.channel.close()
            self._weight_sync = None


class WeightSyncTarget(Worker):
    """The rollout side of a weight sync: a role whose engine runs the model tensor-parallel over
    the role's TP groups (``CausalLM`` built with this rank's ``TensorParallelGroup``).

    Subclasses implement :meth:`weight_sync_engine`. A sync writes this rank's shards into the
    engine's parameters in place and then calls ``engine.set_weight_version``; the engine must not
    be stepping meanwhile (sync between steps, or pause it).
    """

    _weight_sync: _SyncState | None = None

    def weight_sync_engine(self) -> LLMEngine:
        """The engine whose model receives the weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement weight_sync_engine()")

    def _weight_sync_targets(self, plan: TransferPlan, dst_rank: int) -> dict[str, torch.Tensor]:
        engine = self.weight_sync_engine()
        # A decode step launched ahead may still read the weights about to be overwritten.
        engine.synchronize()
        model = engine.model
        if model.tp.size != plan.target.tp or model.tp.rank != plan.target.tp_rank(dst_rank):
            raise WeightSyncError(
                f"rollout rank {self.rank} runs TP rank {model.tp.rank} of {model.tp.size}, but the plan expects "
                f"TP rank {plan.target.tp_rank(dst_rank)} of {plan.target.tp}: build the model with "
                "TensorParallelGroup(self.tp_size, self.tp_rank, self.tp_group)"
            )
        return {name: param.detach() for name, param in model.named_parameters()}

    @property
    def weight_sync_channel(self) -> WeightSyncChannel:
        """The process group this rank syncs over (dedicated, or the group's own when colocated)."""
        return _require(self._weight_sync, "rollout", "colocated or disaggregated").channel

    @register(Dispatch.RANK_ZERO)
    def weight_target_info(self) -> TargetInfo:
        """The TP layout and the parameters of the runner model, for the planner."""
        model = self.weight_sync_engine().model
        if model.tp.size != self.tp_size:
            raise WeightSyncError(
                f"the rollout role has tp_size={self.tp_size} but its model was built with TP size {model.tp.size}"
            )
        return TargetInfo(TPLayout(self.tp_size, self.dp_size), param_specs(model))

    @register(Dispatch.ONE_TO_ALL)
    def join_weight_sync(
        self, rendezvous: Rendezvous, plan: TransferPlan, timeout_s: float, first_dst_rank: int = 0
    ) -> None:
        """Join the weight-sync group as the plan's destination rank ``first_dst_rank + self.rank``
        (several rollout groups can share one sync, each holding whole replicas); collective with
        the trainer group's ``join_weight_sync``."""
        dst_rank = first_dst_rank + self.rank
        self._weight_sync_targets(plan, dst_rank)
        self.close_weight_sync()
        channel = join_weight_sync_group(
            rendezvous, plan.dst_peer(dst_rank), plan.world_size, self.device, timeout_s
        )
        self._weight_sync = _SyncState(plan, channel, dst_rank)

    @register(Dispatch.ONE_TO_ALL)
    def receive_weights(self, version: int) -> TransferStats:
        """Receive this rank's shards of weight ``version`` in place (collective with ``send_weights``)."""
        state = _require(self._weight_sync, "rollout", "disaggregated")
        stats = run_transfer(
            state.plan,
            state.channel,
            version,
            dst_rank=state.rank,
            target=self._weight_sync_targets(state.plan, state.rank),
        )
        self.weight_sync_engine().set_weight_version(version)
        return stats

    @register(Dispatch.ONE_TO_ALL)
    def attach_colocated_source(self, plan: TransferPlan, source_role: str) -> None:
        """Sync from the trainer role ``source_role`` hosted in this same process, over this group's
        process group."""
        if not plan.colocated:
            raise WeightSyncError("attach_colocated_source needs a plan made with colocated=True")
        source = self.colocated(source_role)
        if not isinstance(source, WeightSyncSource):
            raise WeightSyncError(
                f"role {source_role!r} is a {type(source).__name__}, not a WeightSyncSource: "
                "the trainer role must subclass raylane.actors.WeightSyncSource"
            )
        self._weight_sync_targets(plan, self.rank)
        if not dist.is_initialized():
            raise WeightSyncError(
                "colocated weight sync needs the worker group's process group (DistConfig backend)"
            )
        self.close_weight_sync()
        channel = WeightSyncChannel(dist.group.WORLD, self.device)
        self._weight_sync = _SyncState(plan, channel, self.rank, source_role)

    @register(Dispatch.ONE_TO_ALL)
    def reshard_colocated(self, version: int) -> TransferStats:
        """Reshard weight ``version`` from the colocated trainer role into this engine (collective)."""
        state = _require(self._weight_sync, "rollout", "colocated")
        if state.source_role is None:
            raise WeightSyncError(
                "this rank joined a disaggregated weight sync; call receive_weights instead"
            )
        source = self.colocated(state.source_role)
        stats = run_transfer(
            state.plan,
            state.channel,
            version,
            src_rank=self.rank,
            source=source.weight_sync_shards(),
            dst_rank=self.rank,
            target=self._weight_sync_targets(state.plan, self.rank),
        )
        self.weight_sync_engine().set_weight_version(version)
        return stats

    @register(Dispatch.ONE_TO_ALL)
    def close_weight_sync(self) -> None:
        """Forget the weight sync and leave a dedicated group (no-op if none)."""
        if self._weight_sync is not None:
            self._weight_sync.channel.close()
            self._weight_sync = None
