"""Worker groups on the local Ray cluster: gloo collectives, colocation, dispatch modes, failures."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import ray
import torch
import torch.distributed as dist

from raylane.actors import (
    CallPlan,
    DeadRankError,
    Dispatch,
    DispatchError,
    DispatchMode,
    DistConfig,
    GroupFuture,
    GroupTimeoutError,
    Placement,
    RankCall,
    RankError,
    ResourcePool,
    ResourcePoolError,
    Role,
    Worker,
    WorkerGroup,
    WorkerGroupConfig,
    register,
)
from raylane.actors.dispatch import DISPATCH_MODES, DispatchTarget
from raylane.actors.mesh import MeshLayout
from raylane.batch import Batch

# Ray workers cannot import this test module: ship its Worker classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAST = WorkerGroupConfig(dist=DistConfig(timeout_s=60), start_timeout_s=120)


@DISPATCH_MODES.register("test_sum")
class SumAll(DispatchMode):
    """A custom mode: same arguments to every rank, results added up."""

    def plan(self, target, args, kwargs):
        return CallPlan([RankCall(rank, args, kwargs) for rank in target.ranks])

    def collect(self, target, plan, results):
        return sum(results)


class Trainer(Worker):
    """The 'actor' role of the colocated test group (dp=4)."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr
        self.weights = torch.full((4,), float(self.rank))
        self._released = threading.Event()

    @register(Dispatch.ONE_TO_ALL)
    def all_reduce_ranks(self) -> float:
        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item()

    @register(Dispatch.ALL_TO_ALL)
    def all_reduce_values(self, value: float) -> float:
        tensor = torch.tensor([value])
        dist.all_reduce(tensor)
        return tensor.item()

    @register(Dispatch.ONE_TO_ALL)
    def identity(self) -> dict:
        return {
            "rank": self.rank,
            "world": self.world_size,
            "local_rank": self.local_rank,
            "node": self.node_id,
            "pid": os.getpid(),
            "dp": (self.dp_rank, self.dp_size),
            "lr": self.lr,
        }

    @register(Dispatch.DP_SHARD)
    def update(self, batch: Batch) -> dict:
        return {"rows": len(batch)}

    @register(Dispatch.ONE_TO_ALL)
    def fail_on(self, rank: int) -> int:
        if self.rank == rank:
            raise ValueError(f"bad input on rank {rank}")
        return self.rank

    @register(Dispatch.ONE_TO_ALL)
    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.rank

    @register(Dispatch.ONE_TO_ALL)
    def wait_for_release(self, timeout_s: float) -> bool:
        released = self._released.wait(timeout_s)
        self._released.clear()
        return released

    @register(Dispatch.ONE_TO_ALL, control=True)
    def release(self) -> None:
        self._released.set()

    @register("test_sum")
    def rank_plus(self, offset: int) -> int:
        return self.rank + offset

    @register(Dispatch.RANK_ZERO)
    def save(self, tag: str) -> str:
        return f"{tag}@{self.rank}"

    def not_registered(self) -> None:
        """Plain methods stay private to the process."""


class Rollout(Worker):
    """The 'rollout' role of the colocated test group (dp=2 x tp=2)."""

    @register(Dispatch.ONE_TO_ALL)
    def identity(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "dp": self.dp_rank, "tp": self.tp_rank}

    @register(Dispatch.DP_SHARD, pad=True)
    def generate(self, prompts: Batch, scale: int = 1) -> Batch:
        # Every rank of a TP group must see the same shard: check it with a collective.
        checksum = prompts["x"].sum().reshape(1).float()
        gathered = [torch.zeros(1) for _ in range(self.tp_size)]
        dist.all_gather(gathered, checksum, group=self.tp_group)
        same_in_tp = all(torch.equal(g, checksum) for g in gathered)
        rows = len(prompts)
        return Batch(
            {
                "y": prompts["x"] * scale,
                "rank": torch.full((rows,), self.rank),
                "padding": torch.full((rows,), prompts.num_padding),
                "same_in_tp": torch.full((rows,), same_in_tp),
            },
            {"prompt": prompts["prompt"]},
        )

    @register(Dispatch.DP_SHARD)
    def scale_tensor(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        return x * factor + self.dp_rank * 1000

    @register(Dispatch.ONE_TO_ALL)
    def tp_sum_of_ranks(self) -> int:
        value = torch.tensor([self.rank])
        dist.all_reduce(value, group=self.tp_group)
        return int(value.item())

    @register(Dispatch.ONE_TO_ALL)
    def trainer_weights_shared(self) -> bool:
        trainer = self.colocated("actor")
        return trainer.weights.data_ptr() == self.colocated("actor").weights.data_ptr() and float(
            trainer.weights[0]
        ) == float(self.rank)


@pytest.fixture(scope="module")
def hybrid(ray_cluster):
    """Four bundles, each one process hosting a Trainer ('actor', dp=4) and a Rollout ('rollout', dp=2 x tp=2)."""
    with ResourcePool([4], num_cpus_per_bundle=0.5, name="hybrid-pool") as pool:
        group = WorkerGroup(
            pool,
            {"actor": Role(Trainer, kwargs={"lr": 0.5}), "rollout": Role(Rollout, tp_size=2)},
            name="hybrid",
            config=FAST,
        )
        with group:
            yield group


def test_four_ranks_all_reduce_through_torch_distributed(hybrid):
    assert hybrid.actor.all_reduce_ranks() == [10.0] * 4
    assert hybrid.actor.all_reduce_values([0.5, 1.5, 2.0, 6.0]) == [10.0] * 4


def test_colocated_roles_share_one_process_per_bundle(hybrid):
    actor = hybrid.actor.identity()
    rollout = hybrid.rollout.identity()
    assert [a["pid"] for a in actor] == [r["pid"] for r in rollout]
    assert len({a["pid"] for a in actor}) == 4
    assert [a["pid"] for a in actor] == [n.pid for n in hybrid.nodes]
    # roles see each other's objects in place, no copy
    assert hybrid.rollout.trainer_weights_shared() == [True] * 4


def test_rank_identity_and_layouts(hybrid):
    actor = hybrid.actor.identity()
    assert [a["rank"] for a in actor] == [0, 1, 2, 3]
    assert {a["world"] for a in actor} == {4}
    assert [a["local_rank"] for a in actor] == [0, 1, 2, 3]  # one node
    assert [a["dp"] for a in actor] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert {a["lr"] for a in actor} == {0.5}
    rollout = hybrid.rollout.identity()
    assert [(r["dp"], r["tp"]) for r in rollout] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert hybrid.layout("rollout") == MeshLayout(dp=2, tp=2)
    # the TP sub-mesh groups ranks (0, 1) and (2, 3)
    assert hybrid.rollout.tp_sum_of_ranks() == [1, 1, 5, 5]
    assert [c.local_world_size for c in hybrid.contexts] == [4] * 4


def test_dp_shard_dp2_tp2_splits_and_gathers(hybrid):
    prompts = Batch({"x": torch.arange(8)}, {"prompt": [f"q{i}" for i in range(8)]})
    out = hybrid.rollout.generate(prompts, scale=3)
    assert torch.equal(out["y"], torch.arange(8) * 3)
    assert list(out["prompt"]) == [f"q{i}" for i in range(8)]
    # rows 0-3 went to DP group 0 (ranks 0, 1), rows 4-7 to DP group 1; one result per DP group
    assert out["rank"].tolist() == [0] * 4 + [2] * 4
    assert bool(out["same_in_tp"].all())
    assert out["padding"].tolist() == [0] * 8


def test_dp_shard_pads_and_unpads_uneven_batch(hybrid):
    prompts = Batch({"x": torch.arange(7)}, {"prompt": [f"q{i}" for i in range(7)]})
    out = hybrid.rollout.generate(prompts)
    assert len(out) == 7
    assert torch.equal(out["y"], torch.arange(7))
    assert list(out["prompt"]) == [f"q{i}" for i in range(7)]
    # DP group 1 got rows 4-6 plus one padding row (a copy of row 0), marked as padding
    assert out["rank"].tolist() == [0] * 4 + [2] * 3
    assert out["padding"].tolist() == [0] * 4 + [1] * 3


def test_dp_shard_refuses_uneven_batch_without_padding(hybrid):
    with pytest.raises(DispatchError, match=r"6 rows.*4 data-parallel ranks.*pad=True"):
        hybrid.actor.update(Batch({"x": torch.arange(6)}))
    assert hybrid.actor.update(Batch({"x": torch.arange(8)})) == [{"rows": 2}] * 4


def test_dp_shard_tensor_argument_with_replicated_scalar(hybrid):
    out = hybrid.rollout.scale_tensor(torch.arange(6.0).reshape(6, 1), 2.0)
    expected = torch.arange(6.0).reshape(6, 1) * 2 + torch.tensor([[0.0]] * 3 + [[1000.0]] * 3)
    assert torch.equal(out, expected)
    with pytest.raises(DispatchError, match="no Batch, tensor or array"):
        hybrid.rollout.scale_tensor(3, 2.0)


def test_dispatch_puts_shared_data_once(ray_cluster):
    batch = Batch({"x": torch.arange(16)})
    target = DispatchTarget("g", "f", (0, 1, 2, 3), MeshLayout(dp=2, tp=2))
    plan = DISPATCH_MODES.get(Dispatch.ONE_TO_ALL)().plan(target, (batch,), {"note": "small"})
    refs = [call.args[0] for call in plan.calls]
    assert all(ref is refs[0] for ref in refs)  # one ray.put, one reference for every rank
    assert all(call.kwargs["note"] == "small" for call in plan.calls)  # scalars travel inline
    plan = DISPATCH_MODES.get(Dispatch.DP_SHARD)().plan(target, (batch,), {})
    shards = [call.args[0] for call in plan.calls]
    assert shards[0] is shards[1] and shards[2] is shards[3] and shards[0] != shards[2]
    assert [call.keep_result for call in plan.calls] == [True, False, True, False]
    assert torch.equal(ray_cluster.get(shards[2])["x"], torch.arange(8, 16))


def test_rank_zero_subsets_futures_and_custom_modes(hybrid):
    assert hybrid.actor.save("ckpt") == "ckpt@0"
    assert hybrid.actor.rank_plus(1) == 1 + 2 + 3 + 4  # a mode registered by name in this module
    assert [i["rank"] for i in hybrid.actor.on_ranks([1, 3]).identity()] == [1, 3]
    with pytest.raises(DispatchError, match="needs every rank"):
        hybrid.rollout.on_ranks([0, 1]).generate(Batch({"x": torch.arange(2)}, {"prompt": ["a", "b"]}))
    with pytest.raises(ValueError, match="distinct ints"):
        hybrid.actor.on_ranks([0, 0])
    slow = hybrid.actor.sleep.remote(0.3)
    fast = hybrid.actor.on_ranks([0, 1]).fail_on.remote(-1)
    assert isinstance(slow, GroupFuture)
    assert fast.get() == [0, 1]
    assert slow.get() == [0, 1, 2, 3] and slow.done()


def test_remote_exception_names_rank_node_and_traceback(hybrid):
    with pytest.raises(RankError) as info:
        hybrid.actor.fail_on(2)
    error = info.value
    assert error.rank == 2 and error.group == "hybrid" and error.method == "actor.fail_on"
    assert error.node_ip == hybrid.nodes[2].node_ip and error.pid == hybrid.nodes[2].pid
    assert isinstance(error.cause, ValueError)
    assert "bad input on rank 2" in str(error)
    assert "in fail_on" in error.remote_traceback and "raise ValueError" in error.remote_traceback
    assert hybrid.actor.fail_on(-1) == [0, 1, 2, 3]  # the group is still usable


def test_call_timeout_names_pending_ranks(hybrid):
    future = hybrid.actor.on_ranks([3]).sleep.remote(1.5)
    with pytest.raises(GroupTimeoutError, match=r"ranks \[3\]"):
        future.get(timeout_s=0.2)
    assert future.get() == [3]


def test_control_method_runs_beside_the_call_in_progress(hybrid):
    # release() queued behind wait_for_release() would come only after its 10 s ran out (False).
    waiting = hybrid.actor.wait_for_release.remote(10.0)
    time.sleep(0.2)
    started = time.monotonic()
    hybrid.actor.release()
    assert waiting.get(timeout_s=15) == [True] * 4
    assert time.monotonic() - started < 5


def test_method_lookup_errors_are_actionable(hybrid):
    with pytest.raises(AttributeError, match=r"@register"):
        hybrid.actor.not_registered  # noqa: B018
    with pytest.raises(AttributeError, match=r"group.actor.<method>"):
        hybrid.identity  # noqa: B018
    assert "generate" in hybrid.rollout.methods and "device_info" in hybrid.rollout.methods


def test_device_info_reports_cpu_memory(hybrid):
    infos = hybrid.actor.device_info()
    assert [i.rank for i in infos] == [0, 1, 2, 3]
    assert all(i.device == "cpu" and 0 < i.used_bytes <= i.peak_bytes < i.total_bytes for i in infos)


class Summer(Worker):
    @register
    def group_sum(self) -> tuple[int, float]:
        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return os.getpid(), value.item()

    @register
    def timed_sleep(self, seconds: float) -> tuple[float, float]:
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()


def test_disjoint_pools_run_side_by_side(ray_cluster):
    with ResourcePool([4], num_cpus_per_bundle=0.5, name="split-pool") as pool:
        left, right = pool.split([2, 2], names=["left", "right"])
        with (
            WorkerGroup(left, Summer, name="left", config=FAST) as a,
            WorkerGroup(right, Summer, name="right", config=FAST) as b,
        ):
            with pytest.raises(ResourcePoolError, match="max_colocate"):
                WorkerGroup(left, Summer, name="third")
            assert pool.tenants == sorted([a._tenant, b._tenant])
            with pytest.raises(ResourcePoolError, match="shut"):
                pool.release()
            (pid_a0, sum_a), (pid_a1, _) = a.group_sum()
            (pid_b0, sum_b), (pid_b1, _) = b.group_sum()
            assert sum_a == sum_b == 3.0  # two independent 2-rank process groups
            assert len({pid_a0, pid_a1, pid_b0, pid_b1}) == 4
            futures = [a.timed_sleep.remote(1.0), b.timed_sleep.remote(1.0)]
            spans = [span for future in futures for span in future.get()]
            assert max(s for s, _ in spans) < min(e for _, e in spans)  # all four overlapped
        assert pool.tenants == []


def test_spread_pool_and_release(ray_cluster):
    pool = ResourcePool([2], num_cpus_per_bundle=0.25, placement=Placement.SPREAD, name="spread")
    assert len(pool.bundle_node_ids()) == 2
    pool.release()
    with pytest.raises(ResourcePoolError, match="released"):
        pool.attach("late")
    with pytest.raises(ResourcePoolError, match="could not reserve"):
        ResourcePool([1], num_cpus_per_bundle=1000, ready_timeout_s=0.5, name="too-big")


class Blocker(Worker):
    @register
    def pid(self) -> int:
        return os.getpid()

    @register
    def wait_for_peer(self) -> int:
        # Rank 1 never reaches the barrier; rank 0 waits for it inside a collective.
        if self.rank == 1:
            time.sleep(120)
        dist.barrier()
        return self.rank

    @register
    def rank_sum(self) -> float:
        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item()


def test_killed_rank_is_reported_dead_within_seconds_and_can_be_replaced(ray_cluster):
    with (
        ResourcePool([2], num_cpus_per_bundle=0.5, name="kill-pool") as pool,
        WorkerGroup(pool, Blocker, name="victim", config=FAST) as group,
    ):
        old_pids = group.pid()
        future = group.wait_for_peer.remote()
        time.sleep(0.5)  # both ranks are inside the call
        os.kill(old_pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(DeadRankError) as info:
            future.get()
        elapsed = time.monotonic() - start
        assert elapsed < 5.0, f"dead rank took {elapsed:.1f} s to surface"
        assert info.value.rank == 1 and info.value.group == "victim" and info.value.pid == old_pids[1]
        assert group.check_alive(timeout_s=5) == [1]
        with pytest.raises(DeadRankError):
            group.on_ranks([1]).pid()

        group.replace_rank(1)
        new_pids = group.pid()
        assert new_pids[0] == old_pids[0] and new_pids[1] != old_pids[1]
        assert group.rank_sum() == [3.0, 3.0]
        assert group.check_alive() == []


class BrokenInit(Worker):
    def __init__(self) -> None:
        if self.rank == 0:
            raise RuntimeError("cannot load weights")

    @register
    def noop(self) -> None:
        return None


def test_failed_start_reports_rank_and_frees_the_pool(ray_cluster):
    with ResourcePool([2], num_cpus_per_bundle=0.5, name="broken-pool") as pool:
        with pytest.raises(RankError, match=r"rank 0 .*cannot load weights") as info:
            WorkerGroup(pool, BrokenInit, name="broken", config=FAST)
        assert info.value.method == "setup"
        assert pool.tenants == []


class EnvProbe(Worker):
    @register
    def probe(self) -> tuple[str | None, bool]:
        try:
            _ = self.mesh
            has_mesh = True
        except RuntimeError:
            has_mesh = False
        return os.environ.get("RAYLANE_PROBE"), has_mesh


def test_env_vars_actor_names_and_no_process_group(ray_cluster):
    config = WorkerGroupConfig(env_vars={"RAYLANE_PROBE": "on"}, dist=DistConfig(backend=None))
    with (
        ResourcePool([1], num_cpus_per_bundle=0.25, name="env-pool") as pool,
        WorkerGroup(pool, EnvProbe, name="probe", config=config) as group,
    ):
        assert group.probe() == [("on", False)]
        names = ray.util.list_named_actors()
        assert any(n.startswith("probe-") and n.endswith("-rank0") for n in names)


class _Finalised:
    """Writes ``path`` when the collector frees it."""

    def __init__(self, path: str) -> None:
        self.path, self.me = path, self  # a reference cycle: only the collector frees it

    def __del__(self) -> None:
        with open(self.path, "w") as f:
            f.write("collected")


class CycleHolder(Worker):
    def __init__(self, path: str) -> None:
        self.cycle = _Finalised(path)

    @register
    def ping(self) -> int:
        return os.getpid()


def test_frozen_heap_is_unfrozen_when_roles_are_rebuilt(ray_cluster, tmp_path):
    marker = tmp_path / "collected"
    config = WorkerGroupConfig(dist=DistConfig(backend=None))
    with (
        ResourcePool([1], num_cpus_per_bundle=0.25, name="freeze-pool") as pool,
        WorkerGroup(pool, Role(CycleHolder, (str(marker),)), name="freeze", config=config) as group,
    ):
        (frozen,) = group.freeze_heaps()
        assert frozen > 1000  # the process's modules, Ray's and torch's objects
        # The role (and its reference cycle) was built before the freeze: rebuilding the roles must
        # hand the old cycle back to the collector, or what it holds (a model's tensors) stays for good.
        group.rebuild_roles([0])
        assert marker.read_text() == "collected"
        assert len(group.ping()) == 1


def test_config_errors_are_caught_before_any_actor_starts(ray_cluster):
    with ResourcePool([2], num_cpus_per_bundle=0.25, name="config-pool") as pool:
        with pytest.raises(ValueError, match="tp_size=4 does not divide"):
            WorkerGroup(pool, Role(Summer, tp_size=4), name="bad-tp")
        with pytest.raises(TypeError, match=r"subclass raylane\.actors\.Worker"):
            WorkerGroup(pool, Role(object), name="bad-class")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"clashes with WorkerGroup\.shutdown"):
            WorkerGroup(pool, {"shutdown": Summer}, name="bad-role")
        assert pool.tenants == []
    with pytest.raises(ValueError, match="unknown dispatch mode 'scatter'"):
        register("scatter")
    with pytest.raises(TypeError, match="bad options"):
        register(Dispatch.DP_SHARD, padding=True)


def test_worker_outside_a_group_is_a_standalone_rank():
    worker = Summer()
    assert (worker.rank, worker.world_size, worker.dp_size, worker.tp_size) == (0, 1, 1, 1)
    assert worker.device == torch.device("cpu")
