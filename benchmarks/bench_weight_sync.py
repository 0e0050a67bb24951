"""Weight sync speed: FSDP2 trainer shards → tensor-parallel runner shards, against a raw broadcast.

Real worker groups on a local Ray cluster: an FSDP2 trainer (dp ranks) and a TP runner (tp ranks per
replica), colocated (one process per bundle hosting both roles, synced over the group's process
group) and disaggregated (separate pools, synced over a dedicated process group of both). Each sync
is timed inside the workers, after a barrier, as the slowest rank's time. The baseline is a plain
``broadcast`` of the same bytes (one full replica in the runner's dtype) from trainer rank 0, in
the same processes over the same process group and backend (none when a single trainer rank is
colocated with its runner: nothing crosses a link); a device copy of those bytes is listed too.
Prints a table and writes JSON under ``benchmarks/results/``.

    python benchmarks/bench_weight_sync.py                       # CPU, ~110 M params fp32, dp=2 -> tp=2
    python benchmarks/bench_weight_sync.py --device cuda --shape llama-1b --dtype bfloat16 --dp 1 --tp 1
    python benchmarks/bench_weight_sync.py --device cuda --shape llama-1b --dtype bfloat16 --dp 2 --tp 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

import ray
import torch
from torch.distributed.fsdp import fully_shard

from raylane.actors import Dispatch, ResourcePool, Role, WorkerGroup, register, wait_all
from raylane.controllers.weight_sync import WeightSync
from raylane.models import CausalLM, ModelConfig, TensorParallelGroup, make_tiny_tokenizer
from raylane.runner import EngineConfig, LLMEngine
from raylane.weight_transfer import WeightSyncConfig, WeightSyncSource, WeightSyncTarget

SHAPES = {
    # GPT-2-small-sized Llama: 109.5 M parameters (tied embeddings), 438 MB in fp32.
    "llama-100m": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_key_value_heads": 12, "tie_word_embeddings": True},
    # Llama-3.2-1B shape: 1.24 B parameters.
    "llama-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
}  # fmt: skip


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timed:
    """Timing helpers shared by both roles: barrier first, then time until the device is idle."""

    _buffers: dict

    def _timed(self, channel, run) -> float:
        channel.barrier()
        _sync_device(self.device)
        start = time.perf_counter()
        run()
        _sync_device(self.device)
        return time.perf_counter() - start

    def _buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        # Allocated (and touched) once, outside the timed region, like the runner's parameters.
        if not hasattr(self, "_buffers"):
            self._buffers = {}
        if key not in self._buffers:
            self._buffers[key] = torch.zeros(numel, dtype=dtype, device=self.device)
        return self._buffers[key]

    def _broadcast(self, channel, numel: int, dtype: torch.dtype) -> float:
        buffer = self._buffer("broadcast", numel, dtype)
        return self._timed(channel, lambda: channel.broadcast(buffer, root=0))

    def _copy(self, numel: int, dtype: torch.dtype) -> float:
        src, dst = self._buffer("copy_src", numel, dtype), self._buffer("copy_dst", numel, dtype)
        _sync_device(self.device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync_device(self.device)
        return time.perf_counter() - start


class BenchTrainer(WeightSyncSource, _Timed):
    """FSDP2 over all ranks, built on the meta device so no rank ever holds the full model."""

    def __init__(self, config: ModelConfig) -> None:
        with torch.device("meta"):
            model = CausalLM(config)
        mesh = self.mesh["dp"]
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.rank)
        with torch.no_grad():
            for param in model.parameters():
                param.to_local().normal_(generator=generator)
        self.model = model

    def weight_sync_module(self):
        return self.model

    @register(Dispatch.ONE_TO_ALL)
    def timed_send(self, version: int) -> float:
        return self._timed(self.weight_sync_channel, lambda: self.send_weights(version))

    @register(Dispatch.ONE_TO_ALL)
    def timed_broadcast(self, numel: int, dtype: torch.dtype) -> float:
        return self._broadcast(self.weight_sync_channel, numel, dtype)


class BenchRollout(WeightSyncTarget, _Timed):
    """The TP runner: an engine with a minimal KV cache around a TP-sharded model."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        with torch.device(self.device):
            model = CausalLM(config, TensorParallelGroup(self.tp_size, self.tp_rank, self.tp_group))
        model = model.to(dtype)
        engine_config = EngineConfig(
            model="unused",
            device=str(self.device),
            num_kv_blocks=4,
            max_model_len=64,
            max_num_seqs=1,
            max_num_batched_tokens=64,
            enforce_eager=True,
        )
        self.engine = LLMEngine(engine_config, model=model, tokenizer=make_tiny_tokenizer())

    def weight_sync_engine(self):
        return self.engine

    @register(Dispatch.ONE_TO_ALL)
    def timed_reshard(self, version: int) -> float:
        return self._timed(self.weight_sync_channel, lambda: self.reshard_colocated(version))

    @register(Dispatch.ONE_TO_ALL)
    def timed_receive(self, version: int) -> float:
        return self._timed(self.weight_sync_channel, lambda: self.receive_weights(version))

    @register(Dispatch.ONE_TO_ALL)
    def timed_broadcast(self, numel: int, dtype: torch.dtype) -> float:
        return self._broadcast(self.weight_sync_channel, numel, dtype)

    @register(Dispatch.ONE_TO_ALL)
    def timed_copy(self, numel: int, dtype: torch.dtype) -> float:
        return self._copy(numel, dtype)

    @register(Dispatch.ONE_TO_ALL)
    def weight_version(self) -> int:
        return self.engine.weight_version


def _slowest(*futures, timeout_s: float) -> float:
    """The slowest rank's seconds of calls that run at once (on one or several groups).

    A failure on either side is raised at once and a stall ends in a timeout, instead of a hang.
    """
    return max(seconds for ranks in wait_all(futures, timeout_s) for seconds in ranks)


def bench_mode(mode: str, args: argparse.Namespace, config: ModelConfig, dtype: torch.dtype) -> dict:
    gpus = 1.0 if args.device == "cuda" else 0.0
    cpus = 0.0 if gpus else 0.5
    rollout_ranks = args.tp * args.replicas
    sync_config = WeightSyncConfig(
        bucket_bytes=args.bucket_mib * 2**20, timeout_s=args.timeout_s, coalesce_p2p=not args.no_coalesce
    )
    timeout_s = args.timeout_s
    trainer_role = Role(BenchTrainer, args=(config,))
    rollout_role = Role(BenchRollout, args=(config, dtype), tp_size=args.tp)
    if mode == "colocated":
        if args.dp != rollout_ranks:
            raise SystemExit(
                f"colocated needs dp == tp * replicas, got dp={args.dp}, tp={args.tp}, replicas={args.replicas}"
            )
        pool = ResourcePool(
            [args.dp], num_cpus_per_bundle=cpus, num_gpus_per_bundle=gpus, name="bench-colocated"
        )
        groups = [WorkerGroup(pool, {"actor": trainer_role, "rollout": rollout_role}, name="colocated")]
        trainer, rollout = groups[0].actor, groups[0].rollout
        sync = WeightSync.colocated(groups[0], config=sync_config)
    else:
        pool = ResourcePool(
            [args.dp + rollout_ranks], num_cpus_per_bundle=cpus, num_gpus_per_bundle=gpus, name="bench-disagg"
        )
        trainer_pool, rollout_pool = pool.split([args.dp, rollout_ranks], names=["trainer", "rollout"])
        groups = [
            WorkerGroup(trainer_pool, trainer_role, name="trainer"),
            WorkerGroup(rollout_pool, rollout_role, name="rollout"),
        ]
        trainer, rollout = groups
        sync = WeightSync.disaggregated(trainer, rollout, config=sync_config)
    summary = sync.summary
    numel = summary.model_bytes // dtype.itemsize

    def run_sync(version: int) -> float:
        if mode == "colocated":
            return _slowest(rollout.timed_reshard.remote(version), timeout_s=timeout_s)
        return _slowest(
            trainer.timed_send.remote(version), rollout.timed_receive.remote(version), timeout_s=timeout_s
        )

    def run_broadcast() -> float:
        futures = [rollout.timed_broadcast.remote(numel, dtype)]
        if mode == "disaggregated":
            futures.append(trainer.timed_broadcast.remote(numel, dtype))
        return _slowest(*futures, timeout_s=timeout_s)

    def run_copy() -> float:
        return _slowest(rollout.on_ranks([0]).timed_copy.remote(numel, dtype), timeout_s=timeout_s)

    # One trainer rank colocated with its runner has nobody to broadcast to: no network baseline.
    broadcast_ranks = args.dp if mode == "colocated" else args.dp + rollout_ranks

    try:
        versions = range(args.warmup + args.repeats)
        sync_s = [run_sync(version) for version in versions][args.warmup :]
        if rollout.weight_version() != [versions[-1]] * rollout_ranks:
            raise RuntimeError("the runner did not record the last synced version")
        bcast_s = [run_broadcast() for _ in versions][args.warmup :] if broadcast_ranks > 1 else []
        copy_s = [run_copy() for _ in versions][args.warmup :]
    finally:
        sync.close()
        for group in groups:
            group.shutdown()
        pool.release()
    sync_t, copy_t = statistics.median(sync_s), statistics.median(copy_s)
    bcast_t = statistics.median(bcast_s) if bcast_s else None
    gb = summary.model_bytes / 1e9
    return {
        "mode": mode,
        "model_bytes": summary.model_bytes,
        "plan": {k: v for k, v in asdict(summary).items() if k not in ("bytes_per_dst", "bytes_per_src")}
        | {
            "bytes_per_dst": list(summary.bytes_per_dst.values()),
            "bytes_per_src": list(summary.bytes_per_src.values()),
        },
        "sync_s": sync_t,
        "sync_gbps": gb / sync_t,
        "sync_samples_s": sync_s,
        "broadcast_s": bcast_t,
        "broadcast_gbps": gb / bcast_t if bcast_t else None,
        "broadcast_ranks": broadcast_ranks,
        "device_copy_s": copy_t,
        "device_copy_gbps": gb / copy_t,
        "sync_vs_broadcast": bcast_t / sync_t if bcast_t else None,
    }


def _cell(value: float | None, spec: str, width: int, suffix: str = "") -> str:
    """A right-aligned table cell; ``-`` where the run has no such number."""
    text = "-" if value is None else f"{value:{spec}}{suffix}"
    return f"{text:>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-100m")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="runner dtype (default: fp32 on CPU, bf16 on CUDA)",
    )
    parser.add_argument("--dp", type=int, default=2, help="trainer FSDP ranks")
    parser.add_argument("--tp", type=int, default=2, help="runner tensor-parallel size")
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="runner replicas (default: dp / tp colocated, 1 disaggregated)",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["colocated", "disaggregated"], default=["colocated", "disaggregated"]
    )
    parser.add_argument("--bucket-mib", type=int, default=128)
    parser.add_argument(
        "--no-coalesce",
        action="store_true",
        help="post each message on its own instead of one NCCL group call",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="bound on forming the sync group and on each timed call",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--output",
        default=None,
        help="JSON path (default: benchmarks/results/bench_weight_sync_<device>.json)",
    )
    args = parser.parse_args()  # fmt: skip
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    config = ModelConfig(architecture="LlamaForCausalLM", torch_dtype="float32", **SHAPES[args.shape])
    ray.init(
        num_cpus=max(8, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}} if args.device == "cpu" else None,
    )
    results = []
    for mode in args.modes:
        mode_args = argparse.Namespace(**vars(args))
        mode_args.replicas = args.replicas or (args.dp // args.tp if mode == "colocated" else 1)
        results.append(bench_mode(mode, mode_args, config, dtype))
    ray.shutdown()
    model_bytes = results[0]["model_bytes"]
    print(
        f"\nweight sync, {args.shape} ({model_bytes / dtype.itemsize / 1e6:.1f} M params, "
        f"{str(dtype).removeprefix('torch.')}, "
        f"{model_bytes / 1e6:.0f} MB), dp={args.dp} -> tp={args.tp}, {args.device}, median of {args.repeats}"
    )
    header = f"{'mode':<14} {'net MB':>8} {'sync s':>8} {'GB/s':>7} {'bcast s':>8} {'GB/s':>7} {'copy GB/s':>10} {'sync/bcast':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['mode']:<14} {r['plan']['network_bytes'] / 1e6:>8.0f} {r['sync_s']:>8.3f} {r['sync_gbps']:>7.2f} "
            f"{_cell(r['broadcast_s'], '.3f', 8)} {_cell(r['broadcast_gbps'], '.2f', 7)} "
            f"{r['device_copy_gbps']:>10.2f} {_cell(r['sync_vs_broadcast'], '.2f', 11, 'x')}"
        )
    report = {
        "benchmark": "bench_weight_sync",
        "command": " ".join(["python", *sys.argv]),
        "shape": args.shape,
        "model_config": SHAPES[args.shape],
        "parameters": model_bytes // dtype.itemsize,
        "runner_dtype": str(dtype).removeprefix("torch."),
        "trainer_dtype": "float32",
        "device": args.device,
        "dp": args.dp,
        "tp": args.tp,
        "bucket_mib": args.bucket_mib,
        "coalesce_p2p": not args.no_coalesce,
        "statistic": (
            "median over repeats of the slowest rank's seconds after a barrier; GB/s = model bytes (one replica, "
            "runner dtype) / seconds; baseline: broadcast of the model bytes from trainer rank 0 over the same "
            "process group; sync_vs_broadcast = broadcast seconds / sync seconds"
        ),
        "environment": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1m_at_end": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "results": results,
    }
    output = args.output or os.path.join(
        os.path.dirname(__file__), "results", f"bench_weight_sync_{args.device}.json"
    )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
