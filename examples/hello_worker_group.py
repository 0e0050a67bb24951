"""Hello, worker group: raylane's single-controller programming model on a laptop CPU.

This script is the *driver* (the single controller). It reserves 4 CPU bundles, starts a
worker group of 4 Ray actors on them (one rank each, joined by torch.distributed/gloo),
and calls the group like a plain object. How each call fans out to the ranks is declared
on the worker method with @register.

    python examples/hello_worker_group.py
"""

from __future__ import annotations

import ray
import torch
import torch.distributed as dist

from raylane.actors import Dispatch, ResourcePool, Worker, WorkerGroup, register
from raylane.batch import Batch


class Squarer(Worker):
    """Runs inside every rank's process; self.rank, self.world_size, self.device are set up for you."""

    @register(Dispatch.ONE_TO_ALL)  # every rank runs it; the driver gets a list, one result per rank
    def hello(self) -> str:
        return f"rank {self.rank} of {self.world_size} on node {self.node_ip}, device {self.device}"

    @register(Dispatch.DP_SHARD)  # the batch is split by rows across ranks, results are concatenated
    def square(self, batch: Batch) -> Batch:
        return Batch(
            {"x": batch["x"], "x_squared": batch["x"] ** 2, "rank": torch.full((len(batch),), self.rank)}
        )

    @register(Dispatch.ONE_TO_ALL)
    def total(self, value: float) -> float:
        # Ranks talk to each other with ordinary torch.distributed collectives.
        tensor = torch.tensor([value * (self.rank + 1)])
        dist.all_reduce(tensor)
        return tensor.item()


def main() -> None:
    ray.init()
    with (
        ResourcePool([4], num_cpus_per_bundle=0.5, name="hello-pool") as pool,
        WorkerGroup(pool, Squarer, name="squarer") as group,
    ):
        for line in group.hello():
            print(line)

        result = group.square(Batch({"x": torch.arange(8.0)}))
        print("x        ", result["x"].tolist())
        print("x squared", result["x_squared"].tolist())
        print("by rank  ", result["rank"].tolist())

        future = group.total.remote(1.0)  # .remote(...) returns at once; .get() waits
        print("all-reduced 1*1 + 1*2 + 1*3 + 1*4 on every rank:", future.get())
    ray.shutdown()


if __name__ == "__main__":
    main()
