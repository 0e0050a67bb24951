"""Cost of the collective probes: FSDP2 training steps with the probes on against the same steps without.

Two gloo ranks (Ray actors) train a small raylane decoder with FSDP2 (per-layer all-gathers in
forward and backward, reduce-scatters of the gradients). Blocks of steps alternate between
probes off (the ProcessGroup methods as torch ships them) and probes on (wrapped, shipping to a
detector actor), so drift of a shared machine hits both alike. Reported: median step seconds of
each, the overhead in percent of step time (target < 2 %; also as the median of each "on" block
against the "off" block before it), collectives per step, and the cost of one probed collective
measured on a one-element all-reduce (times collectives per step: the overhead without the noise
of whole steps).

    python benchmarks/bench_probes.py [--blocks 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from raylane.actors import DistConfig, ResourcePool, Role, WorkerGroup, WorkerGroupConfig, register
from raylane.fault_tolerance import CollectiveProbe, ProbedWorker, active_probe, start_detector
from raylane.models import CausalLM, tiny_config
from raylane.roles.training import shard_model

RESULT = Path(__file__).parent / "results" / "bench_probes.json"
RANKS = 2


class FsdpStep(ProbedWorker):
    """A small decoder under FSDP2 with AdamW; ``steps`` times each training step."""

    def __init__(self, hidden: int, layers: int, seq_len: int, batch: int) -> None:
        torch.manual_seed(0)
        config = tiny_config(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        self.model = shard_model(CausalLM(config), self.mesh["dp"], torch.float32)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.tokens = torch.randint(0, config.vocab_size, (batch, seq_len))

    @register
    def steps(self, count: int) -> list[float]:
        seconds = []
        for _ in range(count):
            start = time.perf_counter()
            logits = self.model(self.tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.tokens.flatten())
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
        return seconds

    @register
    def tiny_all_reduces(self, count: int) -> float:
        """Mean seconds of a one-element all-reduce (the probe's fixed cost per collective shows here)."""
        x = torch.zeros(1)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(count):
            dist.all_reduce(x)
        return (time.perf_counter() - start) / count

    @register
    def probes_off(self) -> None:
        probe = active_probe()
        if probe is not None:
            probe.close()
        CollectiveProbe.uninstall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="blocks per setting, alternating")
    parser.add_argument("--steps", type=int, default=5, help="training steps per block")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tiny-ops", type=int, default=2000)
    args = parser.parse_args()

    ray.init(num_cpus=RANKS + 1, include_dashboard=False, log_to_driver=False)
    detector = start_detector()
    config = WorkerGroupConfig(dist=DistConfig(backend="gloo"), start_timeout_s=300)
    role_args = (args.hidden, args.layers, args.seq_len, args.batch)
    with (
        ResourcePool([RANKS], num_cpus_per_bundle=1) as pool,
        WorkerGroup(pool, Role(FsdpStep, role_args), name="bench", config=config) as group,
    ):
        group.steps(3)  # warm-up
        times: dict[str, list[float]] = {"off": [], "on": []}
        block_medians: dict[str, list[float]] = {"off": [], "on": []}
        tiny: dict[str, list[float]] = {"off": [], "on": []}
        for block in range(2 * args.blocks):
            setting = "on" if block % 2 else "off"
            if setting == "on":
                group.start_probes(detector)
            block = group.steps(args.steps)[0]
            times[setting] += block
            block_medians[setting].append(statistics.median(block))
            tiny[setting].append(group.tiny_all_reduces(args.tiny_ops)[0])
            if setting == "on":
                group.probes_off()
        time.sleep(1.0)
        shipped = ray.get(detector.stats.remote())
        events = ray.get(detector.events.remote())

    # Per rank and "on" block: the training steps' collectives, then the tiny all-reduces and a barrier.
    ops_per_step = (shipped["collectives"] / RANKS - args.blocks * (args.tiny_ops + 1)) / (
        args.blocks * args.steps
    )
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    # Each "on" block against the "off" block just before it: drift of a shared machine cancels.
    ratios = [100 * (b_on / b_off - 1) for b_off, b_on in zip(block_medians["off"], block_medians["on"])]
    paired = statistics.median(ratios)
    tiny_off, tiny_on = statistics.median(tiny["off"]), statistics.median(tiny["on"])
    result = {
        "benchmark": "bench_probes",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "ranks": RANKS,
        "model": {"hidden": args.hidden, "layers": args.layers, "seq_len": args.seq_len, "batch": args.batch},
        "steps_per_setting": args.blocks * args.steps,
        "step_s_probes_off": off,
        "step_s_probes_on": on,
        "overhead_pct": 100 * (on - off) / off,
        "paired_overhead_pct": paired,
        "paired_overhead_pct_per_block": ratios,
        "collectives_per_step_per_rank": ops_per_step,
        "tiny_all_reduce_us_off": 1e6 * tiny_off,
        "tiny_all_reduce_us_on": 1e6 * tiny_on,
        "probe_cost_per_collective_us": 1e6 * (tiny_on - tiny_off),
        "detector_events": [event.to_dict() for event in events],
    }
    print(f"{'setting':<12}{'median step s':>16}{'tiny all-reduce us':>22}")
    print(f"{'probes off':<12}{off:>16.4f}{1e6 * tiny_off:>22.1f}")
    print(f"{'probes on':<12}{on:>16.4f}{1e6 * tiny_on:>22.1f}")
    print(
        f"overhead {result['overhead_pct']:+.2f} % of step time (ratio {on / off:.4f}), paired by block "
        f"{paired:+.2f} % (blocks from {min(ratios):+.1f} to {max(ratios):+.1f} %); "
        f"{ops_per_step:.0f} collectives per step per rank; "
        f"{result['probe_cost_per_collective_us']:.1f} us per probed collective; "
        f"{len(events)} detector events"
    )
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
