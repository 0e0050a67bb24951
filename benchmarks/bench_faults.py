"""The fault matrix on CPU: each fault injected into a rank of a gloo training group, several trials each.

For every trial the detector must name the fault: detection latency, whether the culprit rank and
the class are right, and for crashes and hangs the time `RankReplacer` takes until the group trains
again. A fault-free run as long as all trials together counts false alarms.

Faults (rotating over the ranks of a 4-rank group):
  crash         SIGKILL from outside (a task on the rank's node), latency from the signal
  hang_outside  SIGSTOP from outside at a random moment (in compute: a non-communication hang; in a
                collective: a communication hang), latency from the signal
  hang_inside   SIGSTOP inside collective k (armed on the rank's probe), latency from the rank's
                entry into k as the detector records it
  straggler     every all-reduce of the rank 50 ms late, latency in training steps (from the
                start of the run) and in collectives (the event's ``last_in``)

The synthetic step all-reduces its gradient in ``--grad-buckets`` buckets (4 by default), as DDP
does; a step of one collective per op is the hardest case for the straggler rule, which needs
several collectives of an op (5 with 4 ranks) before chance cannot explain the order.

Rollout cells (``--rollout``): a disaggregated RL job (one trainer rank, two rollout replicas of one
rank: the elastic rollout pool) of ~200-token generations; in each faulty step a replica's process is
SIGKILLed (crash) or SIGSTOPped (hang; found once its ranks answer no ping for
``rollout_pool.hang_timeout_s``, ``--hang-timeout-s``) a third of the way into the step's generate
call (the driver sends the signal: the cluster is local), the replicas taking turns. Per trial: how long the pool takes to learn of the death (the replacement
count rising, polled every 5 ms), whether the replaced replica is the killed one (and only it),
prompts lost (answers missing from the step's batch), steps lost, and the step's extra seconds over
the median fault-free step. The same number of fault-free steps count false alarms (replacements).

Whole-node cell (``--node``): a local multi-node cluster (``ray.cluster_utils.Cluster``: a head
without CPUs and two nodes holding two ranks each); before each trial a spare node joins, then the
node of the group's last rank is removed mid-training (its raylet and workers die). Per trial: how
long the detector takes to name a crash on that node, whether the ranks replaced are exactly the
lost ones and now run on the spare, and the time until the group trains again.

Asynchronous cell (``--async-rollout``): the streaming job (one trainer rank, one rollout engine,
η = 1, in-memory stream) runs once fault-free and once with its engine SIGKILLed ``--trials`` times,
each as it is handed a group (so it dies holding groups), one every ``--fault-every`` steps' worth of
groups. Per kill: the time until the job starts replacing the engine and how long the replacement
takes; over the run: steps lost, groups generated again, accepted trajectories lost or trained twice
(by uid, from the run's ``trained.jsonl``), samples beyond the staleness bound, the wall time against
the fault-free run, and engine replacements in the fault-free run (false alarms).
``--async-trainer``: the same with two trainer ranks and fault tolerance on (a checkpoint every
step), trainer rank 1 SIGKILLed as each ``--fault-every``-th step starts (the trainer waiting for its
batch): the detector's crash event against the kill (detection), the rank replacement's seconds, the
culprit named (the killed pid, rank 1 only), and the same counts; the engine goes on generating.

The reward worker runs in the trainer ranks' processes (a role of the same actor), so its faults
are trainer-rank faults; it has no cell of its own.

Goodput (``--goodput``): the RL job of ``raylane train`` (tiny model, 2 colocated gloo trainer
ranks by default) under a fault schedule, trainer rank 1 SIGKILLed from outside during every N-th step, run
three times in one process: fault-free, with raylane's recovery (``fault_tolerance.enabled``: the
rank replaced, the last checkpoint reloaded in place), and with whole-job restart from the last
periodic checkpoint (every group torn down and the job started again with ``resume_from``, as Ray
Train and AReaL do; the driver and the Ray cluster stay up, so a restart costs new worker groups,
not a new cluster). Per mode: wall time, the fraction of it lost against the fault-free run, steps
lost (started but not kept) and rollouts lost (generated in steps not kept).

    python benchmarks/bench_faults.py [--trials 5]
    python benchmarks/bench_faults.py --rollout [--trials 5]
    python benchmarks/bench_faults.py --node [--trials 5]
    python benchmarks/bench_faults.py --async-rollout [--trials 5 --fault-every 4]
    python benchmarks/bench_faults.py --async-trainer [--trials 5 --fault-every 4]
    python benchmarks/bench_faults.py --goodput [--steps 12 --fault-every 4 --checkpoint-every 1 --trainer-ranks 2]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from raylane.actors import (
    DistConfig,
    ResourcePool,
    WorkerGroup,
    WorkerGroupConfig,
    WorkerGroupError,
    register,
)
from raylane.batch import Batch
from raylane.controllers import AsyncRLJob, JobConfig, RLJob
from raylane.fault_tolerance import (
    DetectorConfig,
    InRankFault,
    ProbedWorker,
    RankReplacer,
    find_rank,
    phase,
    remove_node,
    signal_process,
    start_detector,
)

RESULT = Path(__file__).parent / "results" / "bench_faults.json"
# The kill is sent this long into a scheduled step (it lands in the step or its checkpoint).
KILL_DELAY_S = 0.1
RANKS = 4
STEP_COMPUTE_S = 0.02
TARGETS = {"crash": 2.0, "hang_outside": 10.0, "hang_inside": 10.0, "straggler_steps": 5}


class SyntheticStep(ProbedWorker):
    """A data-parallel step without a model: compute (a sleep), the gradient all-reduced in
    ``grad_buckets`` buckets as DDP does (FSDP2 runs a reduce-scatter per layer), then a parameter
    all-gather."""

    def __init__(self) -> None:
        self.grads = torch.ones(1 << 14)
        self.params = torch.empty((1 << 14) * self.world_size)

    @register
    def train(self, steps: int, grad_buckets: int = 1) -> float:
        start = time.perf_counter()
        buckets = self.grads.chunk(grad_buckets)
        for step in range(steps):
            with phase("compute", step):
                time.sleep(STEP_COMPUTE_S)
            with phase("update", step):
                for bucket in buckets:
                    dist.all_reduce(bucket)
                dist.all_gather_into_tensor(self.params, self.grads)
                self.grads.fill_(1.0)
        return (time.perf_counter() - start) / steps


def wait_events(detector, seen: int, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = ray.get(detector.events.remote())
        if len(events) > seen:
            return events[seen:]
        time.sleep(0.02)
    return []


def run_trial(group, detector, replacer, fault: str, victim: int, seen: int, grad_buckets: int = 1) -> dict:
    """One injected fault; returns the trial's record (the group is healthy again afterwards)."""
    # An outside SIGSTOP lands at a random moment: in a collective (comm hang) or in compute.
    expected = {
        "crash": {"crash"},
        "hang_outside": {"noncomm_hang", "comm_hang"},
        "hang_inside": {"comm_hang"},
        "straggler": {"noncomm_slow"},
    }[fault]
    if fault == "straggler":
        group.on_ranks([victim]).arm_fault(InRankFault("delay", delay_s=0.05, ops=("allreduce",)))
        start = time.time()
        step_s = group.train(40, grad_buckets)[0]
        events = wait_events(detector, seen, 5.0)
        group.arm_fault(None)
        first = events[0] if events else None
        record = {
            "latency_steps": (first.detected_at - start) / step_s if first else None,
            "latency_s": first.detected_at - start if first else None,
            "step_s": step_s,
            "grad_buckets": grad_buckets,
            "last_in": first.evidence.get("last_in") if first else None,
        }
    else:
        if fault == "hang_inside":
            group.on_ranks([victim]).arm_fault(InRankFault("stop", at_seq=40, inside=True))
        pending = group.train.remote(100_000, grad_buckets)
        time.sleep(1.0)
        fault_at = None
        if fault == "crash":
            node = group.nodes[victim]
            fault_at = signal_process(node.node_id, node.pid, signal.SIGKILL)
        elif fault == "hang_outside":
            node = group.nodes[victim]
            fault_at = signal_process(node.node_id, node.pid, signal.SIGSTOP)
        events = wait_events(detector, seen, 30.0)
        first = events[0] if events else None
        if first is not None and fault == "hang_inside":
            fault_at = first.detected_at - first.evidence.get("waited_s", 0.0)
        record = {"latency_s": first.detected_at - fault_at if first and fault_at else None}
        if first is not None and first.rank >= 0:
            record |= recover(group, replacer, first, pending, grad_buckets)
    record.update(
        fault=fault,
        victim=victim,
        event=first.to_dict() if first else None,
        culprit_correct=bool(first and first.rank == victim),
        class_correct=bool(first and first.kind in expected),
        events=len(events),
    )
    return record


def recover(group, replacer, event, pending, grad_buckets: int) -> dict:
    """Replace what ``event`` names; the seconds until the group has trained 5 steps again and the
    ranks replaced (the culprit first)."""
    replacement = replacer.replace(event, pending)
    check = time.monotonic()
    group.train(5, grad_buckets)
    return {
        "recovery_s": replacement.seconds + (time.monotonic() - check),
        "replaced_ranks": list(replacement.ranks),
    }


def fault_free_events(group, config: DetectorConfig, seconds: float, grad_buckets: int) -> list[dict]:
    """The events (false alarms) of a fresh detector over ``seconds`` of fault-free training."""
    clean = start_detector(config)
    group.start_probes(clean)
    step_s = group.train(3, grad_buckets)[0]
    group.train(max(1, int(seconds / step_s)), grad_buckets)
    time.sleep(2 * config.hang_s)
    return [e.to_dict() for e in ray.get(clean.events.remote())]


def summarize(records: list[dict]) -> dict:
    latencies = [r.get("latency_s") for r in records if r.get("latency_s") is not None]
    steps = [r.get("latency_steps") for r in records if r.get("latency_steps") is not None]
    recoveries = [r["recovery_s"] for r in records if "recovery_s" in r]
    out = {
        "trials": len(records),
        "culprit_correct_pct": 100.0 * sum(r["culprit_correct"] for r in records) / len(records),
        "class_correct_pct": 100.0 * sum(r["class_correct"] for r in records) / len(records),
    }
    if latencies:
        out |= {"latency_s_p50": statistics.median(latencies), "latency_s_max": max(latencies)}
    if steps:
        out |= {"latency_steps_p50": statistics.median(steps), "latency_steps_max": max(steps)}
    if recoveries:
        out |= {"recovery_s_p50": statistics.median(recoveries), "recovery_s_max": max(recoveries)}
    return out


class ScheduledFaultJob(RLJob):
    """The RL job with trainer rank 1 SIGKILLed ``KILL_DELAY_S`` into each step of ``fault_steps``
    (once per step over restarts: ``fired`` is shared), counting steps started and rollouts made."""

    def __init__(self, config: JobConfig, fault_steps: set[int], fired: set[int], counts: dict) -> None:
        super().__init__(config)
        self.fault_steps, self.fired, self.counts = fault_steps, fired, counts

    def rl_step(self, step: int) -> dict[str, float]:
        self.counts["steps_started"] += 1
        if step in self.fault_steps and step not in self.fired:
            self.fired.add(step)
            victim = self.trainer_group.nodes[1]
            threading.Timer(
                KILL_DELAY_S, signal_process, (victim.node_id, victim.pid, signal.SIGKILL)
            ).start()
        return super().rl_step(step)

    def train_batch(self, batch: Batch, phase) -> dict[str, float]:
        self.counts["rollouts"] += len(batch)
        return super().train_batch(batch, phase)

    def checkpoint(self, step: int) -> str:
        self.counts["last_checkpoint"] = super().checkpoint(step)
        return self.counts["last_checkpoint"]


def goodput_config(output_dir: Path, args: argparse.Namespace, tolerant: bool) -> JobConfig:
    return JobConfig.model_validate(
        {
            "output_dir": str(output_dir),
            "steps": args.steps,
            "checkpoint_every": args.checkpoint_every,
            "prompts_per_step": 4,
            "eval_every": 0,
            "eval_prompts": 8,
            "task": {"name": "add2", "n_train": 256, "n_eval": 8},
            "rollout": {"n": 4, "max_tokens": 4},
            "actor": {"micro_batch_size": 8, "optim": {"lr": 1e-3}},
            "placement": {"trainer_ranks": args.trainer_ranks, "cpus_per_bundle": 0.5},
            "sft": {"steps": 0},
            "fault_tolerance": {"enabled": tolerant},
        }
    )


def goodput_run(mode: str, root: Path, args: argparse.Namespace) -> dict:
    """One run of the job in ``mode`` (fault_free, raylane, restart); returns its record."""
    output_dir = root / mode
    shutil.rmtree(output_dir, ignore_errors=True)
    config = goodput_config(output_dir, args, tolerant=mode == "raylane")
    fault_steps = (
        set() if mode == "fault_free" else set(range(args.fault_every - 1, args.steps, args.fault_every))
    )
    fired: set[int] = set()
    counts = {"steps_started": 0, "rollouts": 0, "last_checkpoint": None}
    restarts = 0
    start = time.monotonic()
    while True:
        # A save may still have been persisting in the background when the job died: restart from
        # the newest complete checkpoint, as Ray Train restarts from its last reported one.
        resume = "latest" if counts["last_checkpoint"] else None
        job = ScheduledFaultJob(config.model_copy(update={"resume_from": resume}), fault_steps, fired, counts)
        try:
            history = job.run()
            break
        except WorkerGroupError as exc:
            if mode != "restart" or restarts >= len(fault_steps):
                raise
            restarts += 1
            print(
                f"  restart {restarts} from the newest complete checkpoint after: {str(exc)[:100]}",
                flush=True,
            )
    seconds = time.monotonic() - start
    rollouts_per_step = config.prompts_per_step * config.rollout.n
    record = {
        "mode": mode,
        "seconds": seconds,
        "faults": len(fired),
        "restarts": restarts,
        "replacements": max((r.get("fault_tolerance/replacements", 0) for r in history), default=0),
        "steps_lost": counts["steps_started"] - args.steps,
        "rollouts_lost": counts["rollouts"] - args.steps * rollouts_per_step,
        "final_reward_mean": history[-1]["reward_mean"],
    }
    print(f"  {mode}: {seconds:.1f} s, {record}", flush=True)
    return record


def goodput(args: argparse.Namespace) -> None:
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    root = Path(args.output_dir)
    records = {mode: goodput_run(mode, root, args) for mode in ("fault_free", "raylane", "restart")}
    clean_s = records["fault_free"]["seconds"]
    for record in records.values():
        record["lost_s"] = record["seconds"] - clean_s
        record["time_lost_fraction"] = record["lost_s"] / record["seconds"]
    print(
        f"\n{'mode':<12}{'wall s':>9}{'lost s':>9}{'lost %':>9}{'faults':>8}{'steps lost':>12}{'rollouts lost':>15}"
    )
    for mode, r in records.items():
        print(
            f"{mode:<12}{r['seconds']:>9.1f}{r['lost_s']:>9.1f}{100 * r['time_lost_fraction']:>9.1f}"
            f"{r['faults']:>8}{r['steps_lost']:>12}{r['rollouts_lost']:>15}"
        )
    ratio = (
        records["restart"]["lost_s"] / records["raylane"]["lost_s"]
        if records["raylane"]["lost_s"] > 0
        else None
    )
    print(f"time lost, whole-job restart / raylane: {ratio:.2f}x" if ratio else "raylane lost no time")
    write_result(
        Path(__file__).parent / "results" / f"bench_faults_goodput_{args.trainer_ranks}ranks.json",
        trainer_ranks=args.trainer_ranks,
        steps=args.steps,
        fault_every=args.fault_every,
        checkpoint_every=args.checkpoint_every,
        kill_delay_s=KILL_DELAY_S,
        modes=records,
        restart_over_raylane_time_lost=ratio,
    )


TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


def rollout_config(output_dir: Path, hang_timeout_s: float) -> JobConfig:
    return JobConfig.model_validate(
        {
            "output_dir": str(output_dir),
            "steps": 10**6,
            "prompts_per_step": 8,
            "sft": {"steps": 0},
            "task": {"name": "reverse", "n_train": 512, "n_eval": 8},
            "model": {"tiny_shape": TINY_SHAPE},
            "rollout": {"n": 4, "max_tokens": 200},
            "actor": {"micro_batch_size": 32},
            "placement": {
                "mode": "disaggregated",
                "trainer_ranks": 1,
                "rollout_ranks": 2,
                "cpus_per_bundle": 0.5,
            },
            "rollout_pool": {"max_replacements": 10_000, "control": False, "hang_timeout_s": hang_timeout_s},
        }
    )


class _Answers:
    """Counts each step's answered prompts where the job gets them: the pool's ``generate``."""

    def __init__(self, pool) -> None:
        self.uids: list[list] = []
        self._generate = pool.generate
        pool.generate = self

    def __call__(self, prompts: Batch) -> Batch:
        samples = self._generate(prompts)
        self.uids.append(list(samples["uid"]))
        return samples


def _watch_replacements(pool, stop: threading.Event, seen_at: list[float]) -> None:
    start = pool.replacements
    while not stop.is_set():
        if pool.replacements > start:
            seen_at.append(time.time())
            return
        time.sleep(0.005)


def rollout_trial(
    job: RLJob, answers: _Answers, step: int, victim: int | None, signum: int, kill_after_s: float
) -> dict:
    """One step; with ``victim``, that replica's process sent ``signum`` ``kill_after_s`` into it."""
    pool = job.rollout_pool
    pids = [find_rank(name, 0).pid for name in pool.names]
    replacements = pool.replacements
    killed_at: list[float] = []
    seen_at: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_replacements, args=(pool, stop, seen_at), daemon=True)

    def kill() -> None:
        killed_at.append(time.time())
        os.kill(pids[victim], signum)

    timer = threading.Timer(kill_after_s, kill) if victim is not None else None
    watcher.start()
    if timer is not None:
        timer.start()
    started = time.perf_counter()
    try:
        job.rl_step(step)
        completed = True
    except Exception as error:  # the bench reports a failed step as lost rather than stopping
        print(f"step {step} failed: {error!r}", flush=True)
        completed = False
    seconds = time.perf_counter() - started
    if killed_at and signum == signal.SIGSTOP:  # replaced, hence killed, unless the step failed first
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[victim], signal.SIGKILL)
    stop.set()
    watcher.join()
    after = [find_rank(name, 0).pid for name in pool.names]
    changed = [i for i, (a, b) in enumerate(zip(pids, after)) if a != b]
    answered = collections.Counter(answers.uids[-1] if completed else [])
    prompts = len(answered)
    record = {
        "step": step,
        "victim": victim,
        "step_s": seconds,
        "completed": completed,
        "replacements": pool.replacements - replacements,
        "replaced": changed,
        "prompts_answered": prompts,
        "prompts_lost": job.config.prompts_per_step - prompts,
        "answers_per_prompt_ok": completed and set(answered.values()) == {job.config.rollout.n},
    }
    if victim is not None and killed_at and seen_at:
        record["detection_s"] = seen_at[0] - killed_at[0]
    record["culprit_ok"] = changed == ([victim] if victim is not None else [])
    return record


def _rollout_summary(records: list[dict]) -> dict:
    clean = [r for r in records if r["victim"] is None]
    faulty = [r for r in records if r["victim"] is not None]
    base = statistics.median(r["step_s"] for r in clean)
    detections = [r["detection_s"] for r in faulty if "detection_s" in r]
    return {
        "trials": len(faulty),
        "faults_inside_generate": sum(r["replacements"] == 1 and "detection_s" in r for r in faulty),
        "detection_s_p50": statistics.median(detections) if detections else None,
        "detection_s_max": max(detections) if detections else None,
        "culprit_correct_pct": 100 * sum(r["culprit_ok"] for r in faulty) / len(faulty),
        "steps_lost": sum(not r["completed"] for r in faulty),
        "prompts_lost": sum(r["prompts_lost"] for r in faulty),
        "recovery_s_p50": statistics.median(r["step_s"] - base for r in faulty),
        "recovery_s_max": max(r["step_s"] - base for r in faulty),
        "fault_free_step_s_p50": base,
        "false_alarms": sum(r["replacements"] for r in clean),
    }


def rollout_matrix(args: argparse.Namespace) -> None:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    output_dir = Path(args.output_dir) / "rollout"
    shutil.rmtree(output_dir, ignore_errors=True)
    job = RLJob(rollout_config(output_dir, args.hang_timeout_s))
    job.build_groups()
    signals = {"crash": signal.SIGKILL, "hang": signal.SIGSTOP}
    records: dict[str, list[dict]] = {fault: [] for fault in args.rollout_faults}
    try:
        generate_s = statistics.median(job.rl_step(step)["timing/generate_s"] for step in range(2))
        answers = _Answers(job.rollout_pool)
        step = 2
        for fault in args.rollout_faults:
            for trial in range(args.trials):
                for victim in (None, trial % 2):
                    record = rollout_trial(
                        job, answers, step, victim, signals[fault], kill_after_s=generate_s / 3
                    )
                    step += 1
                    records[fault].append(record)
                    print(
                        f"{fault} step {record['step']}: victim {victim}, replaced {record['replaced']}, "
                        f"detection {record.get('detection_s')}, prompts lost {record['prompts_lost']}, "
                        f"{record['step_s']:.2f} s",
                        flush=True,
                    )
    finally:
        job.shutdown()
    summaries = {fault: _rollout_summary(fault_records) for fault, fault_records in records.items()}
    print(f"\nrollout replica faults inside generate ({args.trials} trials each, as many fault-free steps)")
    print(f"{'':<24}" + "".join(f"{fault:>12}" for fault in summaries))
    for key in next(iter(summaries.values())):
        cells = [summary[key] for summary in summaries.values()]
        print(f"{key:<24}" + "".join(f"{c:>12.3f}" if isinstance(c, float) else f"{c!s:>12}" for c in cells))
    write_result(
        RESULT.with_name("bench_faults_rollout.json"),
        generate_s_fault_free=generate_s,
        hang_timeout_s=args.hang_timeout_s,
        summary=summaries,
        records=records,
    )


ASYNC_PROMPTS, ASYNC_SAMPLES = 4, 2


def async_config(
    output_dir: Path, steps: int, max_replacements: int, trainer_faults: bool = False
) -> JobConfig:
    """The asynchronous job of the async cells; ``trainer_faults``: two trainer ranks, fault tolerance
    on (a replaced rank rolls the trainer back to the checkpoint of the step before)."""
    return JobConfig.model_validate(
        {
            "output_dir": str(output_dir),
            "steps": steps,
            "checkpoint_every": 1 if trainer_faults else 0,
            "fault_tolerance": {"enabled": trainer_faults, "max_replacements": 2 * max_replacements + 1},
            "prompts_per_step": ASYNC_PROMPTS,
            "eval_every": 0,
            "sft": {"steps": 0},
            "task": {"name": "reverse", "n_train": 512, "n_eval": 8},
            "model": {"tiny_shape": TINY_SHAPE},
            "rollout": {"n": ASYNC_SAMPLES, "max_tokens": 32, "engine": {"max_num_seqs": 4}},
            "actor": {"micro_batch_size": 8, "loss": {"off_policy_correction": "decoupled"}},
            "placement": {
                "mode": "disaggregated",
                "trainer_ranks": 2 if trainer_faults else 1,
                "rollout_ranks": 1,
                "cpus_per_bundle": 0.5,
            },
            "rollout_pool": {"max_replacements": max_replacements},
            "async_rl": {
                "max_staleness": 1,
                "engine_steps_per_call": 2,
                "stream": {"stream_key": f"bench-faults-{output_dir.name}-{time.time_ns()}"},
            },
        }
    )


class _AdmissionRecordingJob(AsyncRLJob):
    """The asynchronous job recording every group sent to an engine and each kill's time and pid.
    A subclass's ``fault_timings()`` gives, per kill, the seconds until the job acted on it and until
    it was repaired, and how many kills had their culprit named (the killed pid, and only it)."""

    def __init__(self, config: JobConfig) -> None:
        super().__init__(config)
        self.admitted: list[str] = []
        self.kills: list[tuple[float, int]] = []  # (time, pid)

    def _admit(self):
        requests = super()._admit()
        self.admitted += [request.group_id for request in requests]
        return requests

    def _kill(self, group) -> None:
        node = group.nodes[-1]
        self.kills.append((time.time(), node.pid))
        signal_process(node.node_id, node.pid, signal.SIGKILL)


class EngineKilledAsyncJob(_AdmissionRecordingJob):
    """The rollout engine SIGKILLed as it is handed the first group numbered at least each of
    ``kill_at`` (so it dies holding groups); each replacement's start, end and the pids it found dead."""

    def __init__(self, config: JobConfig, kill_at: list[int]) -> None:
        super().__init__(config)
        self.kill_at = sorted(kill_at)
        self.replacements: list[tuple[float, float, list[int]]] = []  # (start, end, pids found dead)

    def _admit(self):
        requests = super()._admit()
        if self.kill_at and any(int(request.group_id[1:]) >= self.kill_at[0] for request in requests):
            self.kill_at.pop(0)
            self._kill(self.rollout_group)
        return requests

    def _replace_engine(self, error: BaseException) -> None:
        started = time.time()
        dead = [self.rollout_group.nodes[rank].pid for rank in self.rollout_group.check_alive()]
        super()._replace_engine(error)
        self.replacements.append((started, time.time(), dead))

    def fault_timings(self) -> tuple[list[float], list[float], int]:
        detections = [start - killed for (killed, _), (start, _, _) in zip(self.kills, self.replacements)]
        recoveries = [end - start for start, end, _ in self.replacements]
        named = sum(dead == [pid] for (_, pid), (_, _, dead) in zip(self.kills, self.replacements))
        return detections, recoveries, named


class TrainerKilledAsyncJob(_AdmissionRecordingJob):
    """Trainer rank 1 (of 2) SIGKILLed as each step of ``kill_steps`` starts, while the trainer waits
    for its batch; the detector names the crash and the supervisor replaces the rank."""

    def __init__(self, config: JobConfig, kill_steps: list[int]) -> None:
        super().__init__(config)
        self.kill_steps = set(kill_steps)
        self.replaced: tuple = ()  # the supervisor's replacements, kept past the run's shutdown

    def _recover(self, step_in_flight: int) -> None:
        super()._recover(step_in_flight)
        self.replaced = tuple(self.supervisor.replacer.history)

    def rl_step(self, step: int) -> dict[str, float]:
        if step in self.kill_steps:
            self.kill_steps.discard(step)
            self._kill(self.trainer_group)
        return super().rl_step(step)

    def fault_timings(self) -> tuple[list[float], list[float], int]:
        done = self.replaced
        detections = [r.event.detected_at - killed for (killed, _), r in zip(self.kills, done)]
        named = sum(
            r.event.kind == "crash" and r.ranks == (1,) and r.old_pid == pid
            for (_, pid), r in zip(self.kills, done)
        )
        return detections, [r.seconds for r in done], named


def async_run(root: Path, name: str, steps: int, make_job) -> dict:
    """One asynchronous run of the job ``make_job(output_dir)`` builds; what it trained read back
    from its ``trained.jsonl`` lineage."""
    output_dir = root / name
    shutil.rmtree(output_dir, ignore_errors=True)
    job = make_job(output_dir)
    started = time.monotonic()
    history = job.run()
    wall_s = time.monotonic() - started
    with open(output_dir / "trained.jsonl") as f:
        lineage = [json.loads(line) for line in f]
    trained = [uid for row in lineage for uid in row["trajectories"]]
    # Accepted: every sample of every group sent to an engine (a group the dead engine held is
    # generated again, so each is expected once).
    expected = {f"{group}-{s}" for group in set(job.admitted) for s in range(ASYNC_SAMPLES)}
    detections, recoveries, culprits_named = job.fault_timings()
    return {
        "wall_s": wall_s,
        "kills": len(job.kills),
        "replacements": len(recoveries),
        "culprits_named": culprits_named,
        "detection_s": detections,
        "recovery_s": recoveries,
        "steps_done": sum(1 for row in history if row["step"] > 0),
        "steps_lost": sum(row.get("fault_tolerance/steps_lost", 0) for row in history),
        "requeued_groups": sum(row.get("rollout/requeued_groups", 0) for row in history),
        "accepted": len(expected),
        "accepted_lost": len(expected - set(trained)),
        "trained_twice": len(trained) - len(set(trained)),
        "stale_beyond_bound": sum(
            row["policy_version"] - v > 1
            for row in lineage
            for vs in row["trajectories"].values()
            for v in vs
        ),
    }


def async_matrix(args: argparse.Namespace, role: str) -> None:
    """A crash of the asynchronous job's rollout engine or trainer rank (``role``): ``--trials``
    kills in one run, one every ``--fault-every`` steps (the engine: steps' worth of groups), against
    a fault-free run of as many steps."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    root = Path(args.output_dir) / f"async_{role}"
    steps = args.fault_every * (args.trials + 1)
    kill_at = [(trial + 1) * args.fault_every for trial in range(args.trials)]

    def make_job(faults: list[int]):
        def build(output_dir: Path) -> _AdmissionRecordingJob:
            config = async_config(output_dir, steps, len(faults), trainer_faults=role == "trainer")
            if role == "trainer":
                return TrainerKilledAsyncJob(config, faults)
            return EngineKilledAsyncJob(config, [step * ASYNC_PROMPTS for step in faults])

        return build

    fault_free = async_run(root, "fault_free", steps, make_job([]))
    faulty = async_run(root, "faulty", steps, make_job(kill_at))
    ray.shutdown()
    detections, recoveries = faulty["detection_s"], faulty["recovery_s"]
    summary = {
        "trials": faulty["kills"],
        "replaced": faulty["replacements"],
        "culprit_correct_pct": 100 * faulty["culprits_named"] / max(faulty["kills"], 1),
        "detection_s_p50": statistics.median(detections) if detections else None,
        "detection_s_max": max(detections) if detections else None,
        "recovery_s_p50": statistics.median(recoveries) if recoveries else None,
        "recovery_s_max": max(recoveries) if recoveries else None,
        "steps_lost": faulty["steps_lost"] + steps - faulty["steps_done"],
        "requeued_groups": faulty["requeued_groups"],
        "accepted_rollouts_lost": faulty["accepted_lost"],
        "trained_twice": faulty["trained_twice"],
        "stale_beyond_bound": faulty["stale_beyond_bound"],
        "false_alarms": fault_free["replacements"],
        "wall_s_fault_free": fault_free["wall_s"],
        "wall_s_faulty": faulty["wall_s"],
        "time_lost_pct": 100 * (faulty["wall_s"] / fault_free["wall_s"] - 1),
    }
    victim = "trainer rank 1 of 2" if role == "trainer" else "rollout engine"
    print(f"\n{victim} SIGKILLed in the asynchronous job ({steps} steps, a kill every {args.fault_every})")
    for key, value in summary.items():
        print(f"{key:<26}{value:>12.3f}" if isinstance(value, float) else f"{key:<26}{value!s:>12}")
    write_result(
        RESULT.with_name(
            "bench_faults_async.json" if role == "engine" else "bench_faults_async_trainer.json"
        ),
        summary=summary,
        runs={"fault_free": fault_free, "faulty": faulty},
    )


def node_trial(cluster, group, detector, replacer, seen: int, grad_buckets: int) -> dict:
    """A spare node joins, then the node of the group's last rank is removed mid-training: the ranks
    on it must be named (crash) and replaced on the spare, and the group must train again."""
    spare = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    lost_id = group.nodes[RANKS - 1].node_id
    victims = [r for r in range(RANKS) if group.nodes[r].node_id == lost_id]
    pending = group.train.remote(100_000, grad_buckets)
    time.sleep(1.0)
    lost = next(node for node in cluster.worker_nodes if node.node_id == lost_id)
    fault_at = time.time()
    remove_node(cluster, lost)
    events = wait_events(detector, seen, 30.0)
    first = events[0] if events else None
    record = {
        "victims": victims,
        "latency_s": first.detected_at - fault_at if first else None,
        "event": first.to_dict() if first else None,
        "class_correct": bool(first and first.kind == "crash"),
        "culprit_correct": bool(first and first.rank in victims and first.node_id == lost_id),
    }
    if first is not None and first.rank in victims:
        record |= recover(group, replacer, first, pending, grad_buckets)
        record |= {
            "victims_replaced": sorted(record["replaced_ranks"]) == victims,
            "victims_now_on_spare": all(group.nodes[r].node_id == spare.node_id for r in victims),
        }
    return record


def node_matrix(args: argparse.Namespace) -> None:
    """The whole-node cells, on a local multi-node Ray cluster (a head without CPUs, two nodes of
    two ranks each, and a spare node added before each trial)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(RANKS // 2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    config = DetectorConfig()
    detector = start_detector(config)
    group_config = WorkerGroupConfig(dist=DistConfig(backend="gloo", timeout_s=120), start_timeout_s=300)
    records = []
    try:
        with (
            ResourcePool([2] * (RANKS // 2), num_cpus_per_bundle=1) as pool,
            WorkerGroup(pool, SyntheticStep, name="trainer", config=group_config) as group,
        ):
            group.start_probes(detector)
            replacer = RankReplacer(group, detector, max_replacements=10_000)
            started = time.monotonic()
            for trial in range(args.trials):
                seen = len(ray.get(detector.events.remote()))
                record = node_trial(cluster, group, detector, replacer, seen, args.grad_buckets)
                records.append(record)
                print(
                    f"node trial {trial}: ranks {record['victims']} lost, event "
                    f"{record['event']['event'] if record['event'] else None} rank "
                    f"{record['event']['rank'] if record['event'] else None}, latency {record['latency_s']} s, "
                    f"replaced {record.get('replaced_ranks')}, recovery {record.get('recovery_s')}",
                    flush=True,
                )
                ray.get(detector.forget_group.remote(group.name))
                group.start_probes(detector)
            faulty_s = time.monotonic() - started
            false_alarms = fault_free_events(group, config, faulty_s, args.grad_buckets)
    finally:
        ray.shutdown()
        cluster.shutdown()
    cell = summarize(records) | {
        "victims_replaced_pct": 100.0 * sum(r.get("victims_replaced", False) for r in records) / len(records),
        "victims_on_spare_pct": 100.0
        * sum(r.get("victims_now_on_spare", False) for r in records)
        / len(records),
    }
    print(f"\nwhole node ({args.trials} trials): {json.dumps(cell, indent=1)}")
    print(f"false alarms in a fault-free run of {faulty_s:.0f} s: {len(false_alarms)}")
    write_result(
        RESULT.with_name("bench_faults_node.json"),
        ranks=RANKS,
        grad_buckets=args.grad_buckets,
        detector=config.model_dump(),
        cells={"node_lost": cell},
        fault_free_seconds=faulty_s,
        false_alarms=false_alarms,
        trials=records,
    )


def write_result(path: Path, **fields) -> None:
    """``fields`` as JSON at ``path``, after what was run where and when."""
    result = {
        "benchmark": path.stem,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--faults", nargs="*", default=["crash", "hang_outside", "hang_inside", "straggler"])
    parser.add_argument("--goodput", action="store_true", help="the goodput comparison instead of the matrix")
    parser.add_argument(
        "--rollout", action="store_true", help="the rollout-replica cells instead of the matrix"
    )
    parser.add_argument(
        "--node", action="store_true", help="the whole-node cells (a multi-node local cluster) instead"
    )
    parser.add_argument(
        "--async-rollout",
        action="store_true",
        help="the rollout-engine crash in the asynchronous job instead",
    )
    parser.add_argument(
        "--async-trainer",
        action="store_true",
        help="a trainer-rank crash in the asynchronous job (fault tolerance on) instead",
    )
    parser.add_argument("--rollout-faults", nargs="*", default=["crash", "hang"], choices=["crash", "hang"])
    parser.add_argument("--hang-timeout-s", type=float, default=5.0, help="rollout_pool.hang_timeout_s")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--fault-every", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--trainer-ranks", type=int, default=2)
    parser.add_argument("--output-dir", default="/tmp/bench_faults_goodput")
    parser.add_argument(
        "--grad-buckets",
        type=int,
        default=4,
        help="gradient all-reduces per step of the matrix's synthetic step",
    )
    parser.add_argument("--output", type=Path, default=RESULT, help="the matrix's JSON")
    args = parser.parse_args()
    if args.goodput:
        goodput(args)
        return
    if args.rollout:
        rollout_matrix(args)
        return
    if args.node:
        node_matrix(args)
        return
    if args.async_rollout or args.async_trainer:
        async_matrix(args, "engine" if args.async_rollout else "trainer")
        return

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    config = DetectorConfig()
    detector = start_detector(config)
    group_config = WorkerGroupConfig(dist=DistConfig(backend="gloo", timeout_s=120), start_timeout_s=300)
    started = time.monotonic()
    with (
        ResourcePool([RANKS], num_cpus_per_bundle=0.25) as pool,
        WorkerGroup(pool, SyntheticStep, name="trainer", config=group_config) as group,
    ):
        group.start_probes(detector)
        replacer = RankReplacer(group, detector, max_replacements=10_000)
        records = []
        for fault in args.faults:
            for trial in range(args.trials):
                seen = len(ray.get(detector.events.remote()))
                record = run_trial(
                    group, detector, replacer, fault, 1 + trial % (RANKS - 1), seen, args.grad_buckets
                )
                records.append(record)
                latency = record.get("latency_steps") if fault == "straggler" else record["latency_s"]
                print(
                    f"{fault:<13} trial {trial}: victim {record['victim']}, "
                    f"event {record['event']['event'] if record['event'] else None} "
                    f"rank {record['event']['rank'] if record['event'] else None}, "
                    f"latency {latency} {'steps' if fault == 'straggler' else 's'}, "
                    f"recovery {record.get('recovery_s')}",
                    flush=True,
                )
                ray.get(detector.forget_group.remote(group.name))  # fresh sequence numbers per trial
                group.start_probes(detector)
        faulty_s = time.monotonic() - started
        false_alarms = fault_free_events(group, config, faulty_s, args.grad_buckets)

    cells = {fault: summarize([r for r in records if r["fault"] == fault]) for fault in args.faults}
    print(
        f"\n{'fault':<14}{'trials':>7}{'culprit %':>10}{'p50':>9}{'max':>9}{'unit':>7}{'recovery p50 s':>16}"
    )
    for fault, cell in cells.items():
        unit = "steps" if fault == "straggler" else "s"
        p50 = cell.get("latency_steps_p50" if unit == "steps" else "latency_s_p50", float("nan"))
        worst = cell.get("latency_steps_max" if unit == "steps" else "latency_s_max", float("nan"))
        recovery = cell.get("recovery_s_p50", float("nan"))
        print(
            f"{fault:<14}{cell['trials']:>7}{cell['culprit_correct_pct']:>10.0f}{p50:>9.2f}{worst:>9.2f}"
            f"{unit:>7}{recovery:>16.2f}"
        )
    print(f"false alarms in a fault-free run of {faulty_s:.0f} s: {len(false_alarms)}")
    write_result(
        args.output,
        ranks=RANKS,
        grad_buckets=args.grad_buckets,
        detector=config.model_dump(),
        targets=TARGETS,
        cells=cells,
        fault_free_seconds=faulty_s,
        false_alarms=false_alarms,
        trials=records,
    )


if __name__ == "__main__":
    main()
