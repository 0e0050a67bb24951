"""The NCCL path of worker groups: needs 2 CUDA devices, skipped on CPU machines."""

from __future__ import annotations

import sys

import pytest
import ray
import torch
import torch.distributed as dist

from raylane.actors import (
    Dispatch,
    DistConfig,
    ResourcePool,
    Role,
    Worker,
    WorkerGroup,
    WorkerGroupConfig,
    register,
)
from raylane.batch import Batch
from raylane.controllers import WeightSync
from raylane.weight_transfer import WeightSyncConfig
from tests.test_weight_sync import CONFIG, SEED, FSDPTrainer, TPRollout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CudaWorker(Worker):
    @register(Dispatch.ONE_TO_ALL)
    def all_reduce_on_device(self) -> tuple[str, float]:
        value = torch.full((1024,), float(self.rank + 1), device=self.device)
        dist.all_reduce(value)
        return str(value.device), value[0].item()

    @register(Dispatch.ONE_TO_ALL)
    def cpu_all_reduce(self) -> float:
        # The "auto" backend keeps gloo for CPU tensors next to NCCL for CUDA ones.
        value = torch.tensor([1.0])
        dist.all_reduce(value)
        return value.item()

    @register(Dispatch.DP_SHARD)
    def double(self, batch: Batch) -> Batch:
        on_device = batch.to(self.device)
        return Batch({"y": on_device["x"] * 2}).to("cpu")


def test_nccl_group_all_reduces_cuda_tensors(ray_cluster):
    config = WorkerGroupConfig(dist=DistConfig(backend="auto", timeout_s=120))
    with (
        ResourcePool([2], num_cpus_per_bundle=0.5, num_gpus_per_bundle=1, name="gpu-pool") as pool,
        WorkerGroup(pool, Role(CudaWorker), name="cuda", config=config) as group,
    ):
        assert group.all_reduce_on_device() == [("cuda:0", 3.0), ("cuda:0", 3.0)]
        assert group.cpu_all_reduce() == [2.0, 2.0]
        assert torch.equal(group.double(Batch({"x": torch.arange(8.0)}))["y"], torch.arange(8.0) * 2)
        infos = group.device_info()
        assert all(i.device == "cuda:0" and i.total_bytes > 0 for i in infos)
        gpu_ids = [n.gpu_ids for n in group.nodes]
        assert gpu_ids[0] != gpu_ids[1]  # one GPU per rank


@pytest.mark.parametrize("coalesce_p2p", [True, False], ids=["grouped", "one-by-one"])
def test_disaggregated_weight_sync_over_nccl_is_bit_exact(ray_cluster, coalesce_p2p):
    """Trainer on one GPU, runner on the other (the CPU tests' roles, here on CUDA), synced over the
    dedicated NCCL group; bounded in time, so a transport that stalls fails instead of hanging.
    Both ways of posting a bucket's messages, so a stall can be pinned on grouped point-to-point."""
    config = WorkerGroupConfig(dist=DistConfig(backend="auto", timeout_s=60))
    with ResourcePool([2], num_cpus_per_bundle=0.5, num_gpus_per_bundle=1, name="ws-gpu") as pool:
        trainer_pool, rollout_pool = pool.split([1, 1], names=["ws-trainer", "ws-rollout"])
        with (
            WorkerGroup(
                trainer_pool, Role(FSDPTrainer, args=(CONFIG, SEED)), name="ws-trainer", config=config
            ) as trainer,
            WorkerGroup(
                rollout_pool, Role(TPRollout, args=(CONFIG,)), name="ws-rollout", config=config
            ) as rollout,
            WeightSync.disaggregated(
                trainer, rollout, config=WeightSyncConfig(timeout_s=60, coalesce_p2p=coalesce_p2p)
            ) as sync,
        ):
            report = sync.sync(1)
            assert {s.version for s in report.ranks} == {1}
            assert rollout.mismatches(trainer.full_weights()[0]) == [[]]
