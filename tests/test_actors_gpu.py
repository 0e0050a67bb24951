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
from raylane.rlhf.batch import Batch

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
