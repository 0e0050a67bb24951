"""One colocated actor -> rollout transition, raylane's way against the baseline HybridFlow compares with.

HybridFlow (verl) reports 55-89 % less transition time than OpenRLHF / DeepSpeed-Chat-style systems.
This times both ways on the same model and device, in one run, in one colocated worker group that
hosts the job's ``PolicyTrainer`` and ``Rollout`` as ``RLJob.build_groups`` does for
``placement.mode=colocated`` (the reward, reference and critic roles, which a transition does not
touch, are left out), plus a small probe role of this file. Each transition:

- sleep: the engine frees its KV cache (the trainer would train now; here its weights change, a
  stand-in for an optimizer step); wake: the engine reallocates it. The same calls in both ways, when
  the job's ``rollout.free_cache_when_idle`` asks for them.
- raylane, sync: ``WeightSync.colocated`` reshards the trainer's FSDP2 shards into the engine's
  tensor-parallel parameters in place, over the group's process group.
- baseline, gather: the trainer gathers the full state dict into host memory
  (``PolicyTrainer.full_weights``: ``get_model_state_dict`` with ``full_state_dict`` and
  ``cpu_offload``, the trainer's fp32 weights, on rank 0); put: rank 0 puts it in the Ray object store;
  load: every engine rank reads it and loads it (``Rollout.update_weights``: each rank cuts its TP slice
  of the full tensors and casts it to its dtype).

After every transition each engine rank compares its parameters with the trainer's, bit for bit (and
its weight version); a mismatch stops the bench. Repeats alternate which way goes first; the first
repeat warms up and is not counted. Seconds are the driver's wall time of each call (the put is
timed in the worker, and the gather is the rest of that call). Prints a table and writes JSON.

    python benchmarks/bench_transitions.py --device cpu --config examples/grpo_reverse.yaml
    python benchmarks/bench_transitions.py --device cuda --config examples/grpo_gpu.yaml --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch

from raylane.actors import Dispatch, ResourcePool, Role, Worker, WorkerGroup, register
from raylane.config import load_config
from raylane.controllers import JobConfig
from raylane.controllers.rl import PhaseTimer
from raylane.controllers.weight_sync import WeightSync
from raylane.roles import PolicyTrainer, Rollout

RESULTS = Path(__file__).parent / "results"
RAYLANE_PHASES = ("sleep", "wake_up", "sync")
BASELINE_PHASES = ("sleep", "wake_up", "gather", "put", "load")
# What a transition is besides the weights: the same engine calls in both ways.
MEMORY_PHASES = ("sleep", "wake_up")


class TransitionProbe(Worker):
    """Colocated with the trainer (``actor``) and the engine (``rollout``): changes the trainer's
    weights, moves them the baseline's way up to the object store, and checks what the engine holds."""

    def _trainer_model(self) -> torch.nn.Module:
        return self.colocated("actor").model

    @register(Dispatch.ONE_TO_ALL)
    def perturb(self, version: int) -> None:
        """A stand-in for an optimizer step: fresh random weights, different on every rank and version,
        so that each transition has new weights to move and a way that skips a tensor leaves a stale
        one (a small step could round to the same bf16 value and hide it)."""
        generator = torch.Generator(device=self.device).manual_seed(1000 * version + self.rank)
        with torch.no_grad():
            for param in self._trainer_model().parameters():
                local = param.to_local()
                local.copy_(torch.randn(local.shape, generator=generator, device=local.device))

    @register(Dispatch.ONE_TO_ALL)
    def gather_and_put(self) -> tuple[ray.ObjectRef | None, float]:
        """The baseline up to host memory: the full state dict gathered on rank 0, put in the object
        store there. Collective. Returns rank 0's reference (None elsewhere) and the put's seconds."""
        named = self.colocated("actor").full_weights()
        if self.rank != 0:
            return None, 0.0
        start = time.perf_counter()
        ref = ray.put(named)
        return ref, time.perf_counter() - start

    @register(Dispatch.ONE_TO_ALL)
    def mismatches(self) -> list[str]:
        """The engine parameters of this rank that differ from its TP slice of the trainer's weights
        in the engine's dtype. Collective (the trainer's full tensors are gathered one by one)."""
        engine_model = self.colocated("rollout").weight_sync_engine().model
        engine = dict(engine_model.named_parameters())
        wrong = []
        with torch.no_grad():
            for name, param in self._trainer_model().named_parameters():
                full = param.full_tensor()  # every rank, in the same order: it is a collective
                if name not in engine:
                    wrong.append(f"{name} (not in the engine)")
                    continue
                expected = engine_model.shard_for_rank(name, full.to(engine[name].dtype))
                if not torch.equal(engine[name], expected.to(engine[name].device)):
                    wrong.append(name)
        return wrong

    @register(Dispatch.RANK_ZERO)
    def describe(self) -> dict:
        """The device, the engine's dtype and the size of the model, for the report."""
        trainer = list(self._trainer_model().parameters())
        engine = next(self.colocated("rollout").weight_sync_engine().model.parameters())
        if self.device.type == "cuda":
            device = torch.cuda.get_device_name(self.device)
        else:
            device = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
        return {
            "device": device,
            "device_type": self.device.type,
            "engine_dtype": str(engine.dtype),
            "parameters": sum(p.numel() for p in trainer),
            "trainer_bytes": sum(p.numel() * p.element_size() for p in trainer),
        }


def build_group(config: JobConfig, model_dir: str) -> tuple[ResourcePool, WorkerGroup, WeightSync]:
    """The trainer and the engine in one colocated group (as ``RLJob.build_groups``), with the probe."""
    placement = config.placement
    actor = config.actor.model_copy(update={"model": model_dir})
    roles = {
        "actor": Role(PolicyTrainer, (actor,)),
        "rollout": Role(Rollout, (model_dir, config.rollout), tp_size=placement.rollout_tp),
        "probe": Role(TransitionProbe),
    }
    pool = ResourcePool(
        [placement.trainer_ranks],
        name="transitions",
        num_cpus_per_bundle=placement.cpus_per_bundle,
        num_gpus_per_bundle=placement.gpus_per_bundle,
    )
    group = WorkerGroup(pool, roles, name="transitions")
    return pool, group, WeightSync.colocated(group, source_role="actor", target_role="rollout")


def move_raylane(group: WorkerGroup, sync: WeightSync, timer: PhaseTimer, version: int) -> None:
    """raylane's way: reshard in place."""
    with timer("sync"):
        sync.sync(version)


def move_baseline(group: WorkerGroup, sync: WeightSync, timer: PhaseTimer, version: int) -> None:
    """The baseline's way: full state dict -> object store -> every engine rank loads it."""
    start = time.perf_counter()
    ref, put_s = group.probe.gather_and_put()[0]
    timer.seconds["put"] = put_s
    timer.seconds["gather"] = time.perf_counter() - start - put_s
    with timer("load"):
        group.rollout.update_weights(ref, version)  # Ray resolves the reference on each rank


Move = Callable[[WorkerGroup, WeightSync, PhaseTimer, int], None]


def check_engine_weights(group: WorkerGroup, version: int, way: str) -> None:
    """Fail loudly unless every engine rank holds exactly the trainer's weights, as ``version``."""
    wrong = group.probe.mismatches()
    versions = group.rollout.weight_version()
    if any(wrong) or set(versions) != {version}:
        raise RuntimeError(
            f"after the {way} transition to version {version} the engine does not hold the trainer's "
            f"weights: mismatched tensors per rank {wrong}, weight versions {versions}"
        )


def transition(
    group: WorkerGroup, sync: WeightSync, move: Move, version: int, sleeps: bool, way: str
) -> dict[str, float]:
    """One colocated transition to new trainer weights ``version``; its seconds per phase, checked."""
    timer = PhaseTimer()
    if sleeps:
        with timer("sleep"):
            group.rollout.sleep()
    group.probe.perturb(version)  # the trainer's update, not timed
    if sleeps:
        with timer("wake_up"):
            group.rollout.wake_up()
    move(group, sync, timer, version)
    check_engine_weights(group, version, way)
    return timer.seconds


WAYS: dict[str, Move] = {"raylane": move_raylane, "baseline": move_baseline}


def measure(group: WorkerGroup, sync: WeightSync, repeats: int, sleeps: bool) -> dict[str, list[dict]]:
    """``repeats`` transitions each way after one warm-up each, alternating which way goes first."""
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    version = 0
    for repeat in range(repeats + 1):
        order = list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS))
        for way in order:
            version += 1
            seconds = transition(group, sync, WAYS[way], version, sleeps, way)
            print(f"repeat {repeat}, {way}: {sum(seconds.values()):.4f} s", flush=True)
            if repeat > 0:  # repeat 0 warms up
                runs[way].append(seconds)
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Median seconds per phase and of the per-repeat totals; the ratios, whole and weights only."""

    def medians(way: str, phases: tuple[str, ...]) -> dict[str, float]:
        rows = runs[way]
        out = {phase: statistics.median(r.get(phase, 0.0) for r in rows) for phase in phases}
        out["total"] = statistics.median(sum(r.values()) for r in rows)
        out["weights"] = statistics.median(
            sum(s for p, s in r.items() if p not in MEMORY_PHASES) for r in rows
        )
        return out

    raylane, baseline = medians("raylane", RAYLANE_PHASES), medians("baseline", BASELINE_PHASES)
    return {
        "raylane_s": raylane,
        "baseline_s": baseline,
        "ratio": baseline["total"] / raylane["total"],
        "less_transition_time": 1 - raylane["total"] / baseline["total"],
        "ratio_weights_only": baseline["weights"] / raylane["weights"],
        "less_weight_move_time": 1 - raylane["weights"] / baseline["weights"],
    }


def print_table(summary: dict, info: dict) -> None:
    raylane, baseline = summary["raylane_s"], summary["baseline_s"]
    print(
        f"\n{info['device']}, {info['parameters'] / 1e6:.1f} M parameters "
        f"(trainer fp32 {info['trainer_bytes'] / 2**20:.0f} MiB), engine {info['engine_dtype']}"
    )
    print(f"{'phase':<10}{'raylane s':>12}{'phase':>10}{'baseline s':>12}")
    pairs = [("sleep", "sleep"), ("wake_up", "wake_up"), ("sync", "gather"), ("", "put"), ("", "load")]
    for ours, theirs in pairs:
        left = f"{raylane[ours]:>12.4f}" if ours else f"{'':>12}"
        print(f"{ours:<10}{left}{theirs:>10}{baseline[theirs]:>12.4f}")
    print(f"{'total':<10}{raylane['total']:>12.4f}{'total':>10}{baseline['total']:>12.4f}")
    print(
        f"baseline / raylane: {summary['ratio']:.2f}x, {summary['less_transition_time']:.1%} less transition "
        f"time; weights only (sync vs gather + put + load): {summary['ratio_weights_only']:.2f}x, "
        f"{summary['less_weight_move_time']:.1%} less"
    )


def job_config(args: argparse.Namespace, output_dir: str) -> JobConfig:
    """The job of ``--config`` and ``--set``, colocated, on ``--device`` (CPU: no GPU per bundle)."""
    forced = [f"output_dir={output_dir}", "placement.mode=colocated"]
    if args.device == "cpu":
        forced.append("placement.gpus_per_bundle=0")
    config = load_config(JobConfig, args.config, [*args.set, *forced])
    if args.device == "cuda" and config.placement.gpus_per_bundle == 0:
        raise SystemExit("--device cuda needs placement.gpus_per_bundle > 0 (the config or --set)")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--config", default="examples/grpo_reverse.yaml", help="a job YAML")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    parser.add_argument("--repeats", type=int, default=5, help="transitions each way, after a warm-up")
    parser.add_argument(
        "--output", type=Path, help="default: benchmarks/results/bench_transitions_<device>.json"
    )
    args = parser.parse_args()
    output = args.output or RESULTS / f"bench_transitions_{args.device}.json"

    output_dir = tempfile.mkdtemp(prefix="bench_transitions_")
    config = job_config(args, output_dir)
    ray.init(include_dashboard=False, log_to_driver=False)
    pool, group, sync = build_group(config, config.model.materialize(output_dir))
    try:
        info = group.probe.describe()
        if info["device_type"] != args.device:
            raise SystemExit(f"--device {args.device}, but the workers got {info['device_type']}")
        runs = measure(group, sync, args.repeats, config.rollout.free_cache_when_idle)
    finally:
        sync.close()
        group.shutdown()
        pool.release()
        ray.shutdown()
        shutil.rmtree(output_dir, ignore_errors=True)

    summary = summarize(runs)
    print_table(summary, info)
    result = {
        "benchmark": "bench_transitions",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "config": args.config,
        "overrides": args.set,
        "trainer_ranks": config.placement.trainer_ranks,
        "rollout_tp": config.placement.rollout_tp,
        "model": config.model.model_dump(mode="json"),
        **info,
        "repeats": args.repeats,
        "weights_checked": "every engine rank bit-identical to the trainer after every transition",
        **summary,
        "runs": runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
