"""Weight resharding from the trainer's FSDP2 shards to the runner's tensor-parallel shards.

Plan tests are pure. The Ray tests build real FSDP2 trainers (gloo) and TP runners in worker groups
and check every rollout rank's parameters bit-exactly against the trainer's full weights.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from torch.distributed.fsdp import fully_shard

from raylane.actors import (
    Dispatch,
    DistConfig,
    RankError,
    ResourcePool,
    Role,
    WorkerGroup,
    WorkerGroupConfig,
    register,
)
from raylane.controllers import WeightSync
from raylane.models import CausalLM, TensorParallelGroup, init_weights, make_tiny_tokenizer, tiny_config
from raylane.runner import EngineConfig, LLMEngine, SamplingParams
from raylane.weight_transfer import (
    FSDPLayout,
    Message,
    ParamSpec,
    TPLayout,
    WeightSyncConfig,
    WeightSyncError,
    WeightSyncSource,
    WeightSyncTarget,
    pack_message,
    param_specs,
    plan_weight_transfer,
    unpack_message,
)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Uneven on purpose: vocab 259 and intermediate 132 do not split evenly over dp=2 or dp=4.
CONFIG = tiny_config("llama", intermediate_size=132, num_attention_heads=4, num_key_value_heads=2)
SEED = 3
FAST = WorkerGroupConfig(dist=DistConfig(timeout_s=60), start_timeout_s=120)
SMALL_BUCKETS = WeightSyncConfig(bucket_bytes=48 * 1024, pack_below_bytes=2048, timeout_s=60)


def full_weights(config=CONFIG, seed=SEED) -> dict[str, torch.Tensor]:
    model = CausalLM(config)
    init_weights(model, seed, std=0.3)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def expected_shard(spec: ParamSpec, full: torch.Tensor, layout: TPLayout, rank: int) -> torch.Tensor:
    if spec.tp_shard_dim is None or layout.tp == 1:
        return full
    return full.chunk(layout.tp, dim=spec.tp_shard_dim)[layout.tp_rank(rank)]


# ---- the plan, without Ray ----------------------------------------------------------------------


def specs(dtype=torch.float32) -> tuple[ParamSpec, ...]:
    return tuple(ParamSpec(s.name, s.shape, dtype, s.tp_shard_dim) for s in param_specs(CausalLM(CONFIG)))


LAYOUTS = [
    (2, TPLayout(2), True),
    (4, TPLayout(2, 2), True),
    (2, TPLayout(2), False),
    (4, TPLayout(2, 2), False),
    (3, TPLayout(2, 2), False),
    (8, TPLayout(4), False),
    (1, TPLayout(1), True),
]


@pytest.mark.parametrize(("dp", "target", "colocated"), LAYOUTS)
def test_each_destination_gets_exactly_its_shards(dp, target, colocated):
    params = specs()
    plan = plan_weight_transfer(
        params, FSDPLayout(dp), target, colocated=colocated, bucket_bytes=40_000, pack_below_bytes=1024
    )
    summary = plan.summary()
    coverage = {
        (d, p.name): torch.zeros(target.local_shape(p, d), dtype=torch.int32)
        for d in range(target.world_size)
        for p in params
    }
    for bucket in plan.buckets:
        for piece in [s for m in bucket.messages for s in m.slices] + list(bucket.local):
            coverage[piece.dst_rank, piece.name][piece.dst_rows[0] : piece.dst_rows[1]] += 1
    # Every element of every destination tensor arrives exactly once: nothing missing, nothing extra.
    assert all(bool((count == 1).all()) for count in coverage.values())
    for d in range(target.world_size):
        shard_bytes = sum(torch.Size(target.local_shape(p, d)).numel() * p.dtype.itemsize for p in params)
        assert summary.bytes_per_dst[d] == shard_bytes
    assert summary.total_bytes == sum(summary.bytes_per_dst.values())
    assert summary.model_bytes == sum(p.nbytes for p in params)
    if not colocated:
        assert summary.local_bytes == 0
    assert (
        plan.digest
        == plan_weight_transfer(
            params, FSDPLayout(dp), target, colocated=colocated, bucket_bytes=40_000, pack_below_bytes=1024
        ).digest
    )
    # The fingerprint covers how the messages are posted (grouped or one by one) too.
    ungrouped = plan_weight_transfer(
        params,
        FSDPLayout(dp),
        target,
        colocated=colocated,
        bucket_bytes=40_000,
        pack_below_bytes=1024,
        coalesce_p2p=False,
    )
    assert (
        not ungrouped.coalesce_p2p and ungrouped.buckets == plan.buckets and ungrouped.digest != plan.digest
    )


def test_colocated_plan_copies_local_rows_and_sends_only_the_rest():
    plan = plan_weight_transfer(specs(), FSDPLayout(2), TPLayout(2), colocated=True, bucket_bytes=1 << 20)
    summary = plan.summary()
    # dp=2 -> tp=2 on the same ranks: column-parallel rows are already where they belong.
    assert summary.local_bytes > summary.network_bytes > 0
    for bucket in plan.buckets:
        assert all(m.src_rank != m.dst_rank for m in bucket.messages)
        for message in bucket.messages:
            for piece in message.slices:
                assert not piece.name.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight"))


def test_buckets_respect_the_byte_budget_and_pack_small_slices():
    bucket_bytes = 32 * 1024
    plan = plan_weight_transfer(
        specs(), FSDPLayout(2), TPLayout(1), colocated=False, bucket_bytes=bucket_bytes, pack_below_bytes=4096
    )
    assert len(plan.buckets) > 3
    for bucket in plan.buckets:
        # With one destination rank, a bucket's bytes are exactly its share of the full model.
        assert 0 < sum(m.nbytes for m in bucket.messages) <= bucket_bytes
        for message in bucket.messages:
            # Slices of 4 KiB or more travel alone; smaller ones share one message per pair of ranks.
            if message.packed:
                assert all(piece.nbytes < 4096 for piece in message.slices)
    assert any(m.packed for b in plan.buckets for m in b.messages)
    # The embedding (259 x 64 fp32 = 66 KiB) is larger than a bucket, so it is split by rows.
    assert sum("model.embed_tokens.weight" in b.names for b in plan.buckets) >= 3


def test_zero_row_fsdp_shards_and_row_parallel_columns():
    # 5 rows over dp=4 are chunks of 2, 2, 1 and 0 rows (torch.chunk), as FSDP2 holds them.
    assert [FSDPLayout(4).rows(5, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    spec = ParamSpec("w", (5, 6), torch.float32, tp_shard_dim=1)
    plan = plan_weight_transfer([spec], FSDPLayout(4), TPLayout(3), colocated=False, pack_below_bytes=0)
    slices = [s for m in plan.buckets[0].messages for s in m.slices]
    assert all(s.src_rank != 3 for s in slices)
    assert {(s.dst_rank, s.cols) for s in slices} == {(0, (0, 2)), (1, (2, 4)), (2, (4, 6))}
    assert plan.summary().bytes_per_dst == {0: 40, 1: 40, 2: 40}


@pytest.mark.parametrize("runner_dtype", [torch.float32, torch.bfloat16])
def test_packing_reassembles_tp_shards_bit_exactly(runner_dtype):
    full = full_weights()
    params = specs(runner_dtype)
    dp, target = 4, TPLayout(2, 2)
    plan = plan_weight_transfer(
        params, FSDPLayout(dp), target, colocated=True, bucket_bytes=20_000, pack_below_bytes=512
    )
    sources = {
        s: {p.name: full[p.name][slice(*FSDPLayout(dp).rows(p.shape[0], s))] for p in params}
        for s in range(dp)
    }
    targets = {
        d: {p.name: torch.full(target.local_shape(p, d), float("nan"), dtype=runner_dtype) for p in params}
        for d in range(target.world_size)
    }
    for bucket in plan.buckets:
        local = [Message(c.src_rank, c.dst_rank, runner_dtype, (c,)) for c in bucket.local]
        for message in [*bucket.messages, *local]:
            wire = pack_message(message, sources[message.src_rank]).clone()
            assert wire.dtype == runner_dtype and wire.numel() == message.numel
            unpack_message(message, wire, targets[message.dst_rank])
    for d in range(target.world_size):
        for p in params:
            assert torch.equal(
                targets[d][p.name], expected_shard(p, full[p.name], target, d).to(runner_dtype)
            )


def test_layout_errors_are_actionable():
    with pytest.raises(ValueError, match=r"dp \(4\) must equal tp \* replicas \(2 \* 1\)"):
        plan_weight_transfer(specs(), FSDPLayout(4), TPLayout(2), colocated=True)
    with pytest.raises(
        ValueError, match=r"layers.0.mlp.gate_proj.weight: dim 0 of size 132 does not split over tp=8"
    ):
        plan_weight_transfer(specs(), FSDPLayout(2), TPLayout(8), colocated=False)


# ---- real Ray actors, FSDP2 trainers and TP runners ---------------------------------------------


class FSDPTrainer(WeightSyncSource):
    """The policy under FSDP2 over all ranks of its role (per decoder layer, then the root)."""

    def __init__(self, config, seed: int) -> None:
        model = CausalLM(config)
        init_weights(model, seed, std=0.3)
        model = model.to(self.device)
        mesh = self.mesh["dp"]
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model

    def weight_sync_module(self):
        return self.model

    @register(Dispatch.ONE_TO_ALL)
    def perturb(self, step: int) -> None:
        """A fake optimizer step: every rank changes its own shard differently."""
        generator = torch.Generator().manual_seed(1000 * step + self.rank)
        with torch.no_grad():
            for param in self.model.parameters():
                local = param.to_local()
                local.add_(torch.randn(local.shape, generator=generator))

    @register(Dispatch.ONE_TO_ALL)
    def full_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.full_tensor().cpu() for name, p in self.model.named_parameters()}


class TPRollout(WeightSyncTarget):
    """The runner, tensor-parallel over the role's TP groups, starting from NaN weights (CPU or GPU)."""

    def __init__(self, config) -> None:
        tp = TensorParallelGroup(self.tp_size, self.tp_rank, self.tp_group)
        model = CausalLM(config, tp).to(self.device)
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
        engine_config = EngineConfig(
            model="unused",
            device=str(self.device),
            num_kv_blocks=8,
            max_model_len=64,
            max_num_seqs=4,
            enforce_eager=True,
        )
        self.engine = LLMEngine(engine_config, model=model, tokenizer=make_tiny_tokenizer())

    def weight_sync_engine(self):
        return self.engine

    @register(Dispatch.ONE_TO_ALL)
    def mismatches(self, full: dict[str, torch.Tensor]) -> list[str]:
        model = self.engine.model
        return [
            name
            for name, param in model.named_parameters()
            if not torch.equal(param.detach().cpu(), model.shard_for_rank(name, full[name]))
        ]

    @register(Dispatch.ONE_TO_ALL)
    def weight_version(self) -> int:
        return self.engine.weight_version

    @register(Dispatch.ONE_TO_ALL)
    def generate(self, prompt: list[int]) -> tuple[list[int], list[int]]:
        self.engine.add_request(
            "r", prompt_token_ids=prompt, sampling_params=SamplingParams(temperature=0, max_tokens=8)
        )
        out = None
        while self.engine.has_unfinished_requests():
            out = self.engine.step() or out
        completion = out[0].outputs[0]
        return completion.token_ids, completion.weight_versions


def _group(name: str, bundles: int) -> tuple[ResourcePool, WorkerGroup]:
    pool = ResourcePool([bundles], num_cpus_per_bundle=0.25, name=f"{name}-pool")
    roles = {
        "actor": Role(FSDPTrainer, args=(CONFIG, SEED)),
        "rollout": Role(TPRollout, args=(CONFIG,), tp_size=2),
    }
    return pool, WorkerGroup(pool, roles, name=name, config=FAST)


@pytest.fixture(scope="module")
def groups(ray_cluster):
    """Three groups, each hosting a trainer (dp = its size) and a runner (tp=2) in the same processes."""
    sizes = {"ws2a": 2, "ws2b": 2, "ws4": 4}
    with ThreadPoolExecutor(len(sizes)) as executor:
        built = dict(zip(sizes, executor.map(lambda item: _group(*item), sizes.items())))
    yield {name: group for name, (_, group) in built.items()}
    for pool, group in built.values():
        group.shutdown()
        pool.release()


def check_sync(sync: WeightSync, trainer, rollouts: list, version: int) -> None:
    report = sync.sync(version)
    assert report.version == version and {s.version for s in report.ranks} == {version}
    full = trainer.full_weights()[0]
    for rollout in rollouts:
        assert rollout.mismatches(full) == [[]] * len(rollout.ranks)
        assert rollout.weight_version() == [version] * len(rollout.ranks)


@pytest.mark.parametrize("name", ["ws2a", "ws4"])
def test_colocated_reshard_is_bit_exact(groups, name):
    group = groups[name]
    with WeightSync.colocated(group, config=SMALL_BUCKETS) as sync:
        assert sync.plan.source.dp == group.world_size and sync.plan.target.tp == 2
        check_sync(sync, group.actor, [group.rollout], version=1)
        group.actor.perturb(1)
        check_sync(sync, group.actor, [group.rollout], version=2)
        received = sum(s.bytes_received for s in sync.sync(3).ranks)
        assert received == sync.summary.network_bytes < sync.summary.model_bytes * sync.plan.target.replicas


@pytest.mark.parametrize(
    ("source", "targets"),
    [("ws2a", ["ws2b"]), ("ws4", ["ws2a", "ws2b"]), ("ws2a", ["ws4"])],
    ids=["dp2-tp2", "dp4-tp2x2", "dp2-tp2x2-one-group"],
)
def test_disaggregated_sync_is_bit_exact(groups, source, targets):
    # dp4 -> tp2 x 2 feeds two rollout groups of one replica each (two engines) in one sync;
    # dp2 -> tp2 x 2 feeds one rollout group holding both replicas.
    trainer, rollouts = groups[source].actor, [groups[name].rollout for name in targets]
    with WeightSync.disaggregated(trainer, rollouts, config=SMALL_BUCKETS) as sync:
        rollout_ranks = sum(groups[name].world_size for name in targets)
        assert (sync.plan.target.tp, sync.plan.target.replicas) == (2, rollout_ranks // 2)
        assert sync.plan.world_size == groups[source].world_size + rollout_ranks
        check_sync(sync, trainer, rollouts, version=7)
        trainer.perturb(7)
        check_sync(sync, trainer, rollouts, version=8)
        received = [s.bytes_received for s in sync.sync(9).ranks[len(trainer.ranks) :]]
        assert received == [sync.summary.bytes_per_dst[d] for d in range(rollout_ranks)]


def test_synced_runner_generates_like_the_full_model(groups):
    group = groups["ws2b"]
    with WeightSync.colocated(group) as sync:
        sync.sync(11)
    full = group.actor.full_weights()[0]
    reference = CausalLM(CONFIG)
    reference.load_weights(full.items())
    engine_config = EngineConfig(model="unused", device="cpu", num_kv_blocks=8, max_model_len=64)
    engine = LLMEngine(engine_config, model=reference, tokenizer=make_tiny_tokenizer())
    prompt = [5, 17, 42, 99, 3]
    engine.add_request(
        "r", prompt_token_ids=prompt, sampling_params=SamplingParams(temperature=0, max_tokens=8)
    )
    expected = None
    while engine.has_unfinished_requests():
        expected = engine.step() or expected
    tokens = expected[0].outputs[0].token_ids
    assert group.rollout.generate(prompt) == [(tokens, [11] * len(tokens))] * 2


def test_mismatched_versions_fail_on_every_rank_before_any_weight_moves(groups):
    trainer, rollout = groups["ws2a"].actor, groups["ws2b"].rollout
    with WeightSync.disaggregated(trainer, rollout, config=SMALL_BUCKETS) as sync:
        sync.sync(20)
        sent, received = trainer.send_weights.remote(21), rollout.receive_weights.remote(22)
        for future in (sent, received):
            with pytest.raises(RankError, match=r"different versions \(21 .. 22\)") as info:
                future.get(timeout_s=60)
            assert isinstance(info.value.__cause__, WeightSyncError)
        assert rollout.weight_version() == [20, 20]
        check_sync(sync, trainer, [rollout], version=23)
