"""Fault tolerance in the asynchronous job on real Ray (gloo, 2 trainer ranks, 1 rollout engine): a
trainer rank SIGKILLed mid-run is named and replaced, the trainer rolls back to its last checkpoint
in place while the engine goes on generating, and the stream delivers again what the trainer took
since: the run finishes every step, at most one step is redone, and every accepted trajectory is
trained exactly once (by uid, over the run's lineage). A rollout engine that dies is replaced while
the trainer goes on, and the groups it held are generated again; past the replacement limit the job
stops naming it."""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest

from raylane.controllers import AsyncRLJob, RolloutEngineDiedError
from raylane.fault_tolerance import signal_process
from tests.test_rl_job import _config

STEPS, PROMPTS, SAMPLES, MAX_STALENESS = 5, 4, 2, 1
KILL_STEP = 3  # 1-based: the step during which rank 1 dies


class KilledAsyncJob(AsyncRLJob):
    """The async job with trainer rank 1 SIGKILLed once during step ``KILL_STEP``, at ``phase``:
    ``"before_update"`` (the trainer is waiting for its batch: the next call on the rank fails) or
    ``"before_checkpoint"`` (the step's update and weight sync are done, its checkpoint not begun)."""

    phase: str = "before_update"
    killed_pid: int | None = None
    replacements: tuple = ()

    def __init__(self, config) -> None:
        super().__init__(config)
        self.admitted: list[str] = []  # every group sent to the engine, in order

    def _admit(self):
        requests = super()._admit()
        self.admitted += [request.group_id for request in requests]
        return requests

    def _kill_rank_1(self) -> None:
        if self.killed_pid is None:
            node = self.trainer_group.nodes[1]
            signal_process(node.node_id, node.pid, signal.SIGKILL)
            self.killed_pid = node.pid

    def rl_step(self, step: int) -> dict[str, float]:
        if self.phase == "before_update" and step + 1 == KILL_STEP:
            # The engine first finishes every group the bound admits and the trainer reads them all:
            # after the rollback none is generating or may start, and only the stream has them.
            while self._generating or self._admissible() > 0:
                self._take(self.stream.get(PROMPTS, block_s=0.05))
            self._kill_rank_1()
        return super().rl_step(step)

    def checkpoint(self, step: int) -> str:
        if self.phase == "before_checkpoint" and step == KILL_STEP:
            self._kill_rank_1()
        return super().checkpoint(step)

    def _recover(self, step_in_flight: int) -> None:
        super()._recover(step_in_flight)
        self.replacements = tuple(self.supervisor.replacer.history)


def _job_config(tmp_path, stream: dict):
    return _config(
        tmp_path,
        "job",
        steps=STEPS,
        prompts_per_step=PROMPTS,
        checkpoint_every=1,
        rollout={"n": SAMPLES, "max_tokens": 6, "engine": {"max_num_seqs": 4}},
        placement={"mode": "disaggregated", "trainer_ranks": 2, "rollout_ranks": 1, "cpus_per_bundle": 0.5},
        async_rl={"max_staleness": MAX_STALENESS, "engine_steps_per_call": 2, "stream": stream},
        fault_tolerance={"enabled": True, "detector": {"hang_s": 2.0}},
        **{"actor.loss": {"off_policy_correction": "decoupled"}},
    )


def _lines(output_dir: str, name: str) -> list[dict]:
    with open(os.path.join(output_dir, name)) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(("phase", "backend"), [("before_update", "memory"), ("before_checkpoint", "redis")])
def test_killed_trainer_rank_is_replaced_and_every_accepted_trajectory_is_trained_once(
    ray_cluster, request, tmp_path, phase, backend
):
    stream = {"stream_key": f"async-ft-{uuid.uuid4().hex}"}
    if backend == "redis":
        stream["redis_url"] = request.getfixturevalue("redis_url")
    config = _job_config(tmp_path, stream)
    job = KilledAsyncJob(config)
    job.phase = phase
    history = job.run()

    # The culprit named, and only it replaced first.
    events = [r for r in _lines(config.output_dir, "metrics.jsonl") if r.get("event") == "crash"]
    assert [(e["worker_group"], e["rank"]) for e in events] == [("trainer", 1)], events
    [replacement] = job.replacements
    assert replacement.ranks[0] == 1 and replacement.old_pid == job.killed_pid != replacement.new_pid
    # Every step finished, the one in flight redone from the checkpoint before it.
    assert [r["step"] for r in history] == list(range(STEPS + 1))
    [recovery] = [r for r in history if "fault_tolerance/steps_lost" in r]
    assert recovery["step"] == KILL_STEP and recovery["fault_tolerance/steps_lost"] == 1
    # The engine went on with its groups: none was generated twice.
    assert sorted(job.admitted) == sorted(f"g{g}" for g in range(STEPS * PROMPTS))
    # Each accepted trajectory trained once in the run's lineage, none lost, none beyond the bound.
    lineage = _lines(config.output_dir, "trained.jsonl")
    assert [r["step"] for r in lineage] == list(range(1, STEPS + 1))
    trained = [uid for r in lineage for uid in r["trajectories"]]
    expected = {f"g{g}-{s}" for g in range(STEPS * PROMPTS) for s in range(SAMPLES)}
    assert len(trained) == len(set(trained)) and set(trained) == expected
    assert all(
        r["policy_version"] - v <= MAX_STALENESS
        for r in lineage
        for vs in r["trajectories"].values()
        for v in vs
    )
    # The stream recorded exactly those as trained, and holds nothing else.
    assert all(job.stream._trained(sorted(expected)))
    assert job.stream.depth() == 0


class EngineKilledJob(AsyncRLJob):
    """The async job with its rollout engine SIGKILLed as it is handed the groups of the third batch
    (so it dies holding them); records every group sent to an engine, in order."""

    killed_pid: int | None = None

    def __init__(self, config) -> None:
        super().__init__(config)
        self.admitted: list[str] = []

    def _admit(self):
        requests = super()._admit()
        self.admitted += [request.group_id for request in requests]
        if self.killed_pid is None and any(int(r.group_id[1:]) >= 2 * PROMPTS for r in requests):
            node = self.rollout_group.nodes[0]
            signal_process(node.node_id, node.pid, signal.SIGKILL)
            self.killed_pid = node.pid
        return requests


def test_a_dead_rollout_engine_is_replaced_and_what_it_held_is_generated_again(ray_cluster, tmp_path):
    config = _job_config(tmp_path, {"stream_key": f"async-ft-{uuid.uuid4().hex}"})
    job = EngineKilledJob(config)
    history = job.run()

    assert [r["step"] for r in history] == list(range(STEPS + 1))
    [replaced] = [r for r in history if "rollout/engine_replacements" in r]
    assert replaced["rollout/engine_replacements"] == 1
    assert job.rollout_group.nodes[0].pid != job.killed_pid
    # The groups the dead engine held went to the new one; every other group was admitted once.
    requeued = int(replaced["rollout/requeued_groups"])
    again = [g for g in set(job.admitted) if job.admitted.count(g) > 1]
    assert requeued >= 1 and len(again) == requeued, (requeued, job.admitted)
    assert sorted(set(job.admitted)) == sorted(f"g{g}" for g in range(STEPS * PROMPTS))
    # Nothing lost, nothing trained twice, nothing beyond the bound; no trainer rank was replaced.
    lineage = _lines(config.output_dir, "trained.jsonl")
    trained = [uid for r in lineage for uid in r["trajectories"]]
    assert sorted(trained) == sorted(f"g{g}-{s}" for g in range(STEPS * PROMPTS) for s in range(SAMPLES))
    assert all(
        r["policy_version"] - v <= MAX_STALENESS
        for r in lineage
        for vs in r["trajectories"].values()
        for v in vs
    )
    assert not [r for r in _lines(config.output_dir, "metrics.jsonl") if r.get("event") == "crash"]


def test_a_dead_rollout_engine_past_the_replacement_limit_stops_the_job_naming_it(ray_cluster, tmp_path):
    # The failure may surface on a trainer rank (its weight send finds the connection closed) or in
    # the rollout loop; either way the engine is named, not the trainer rank that reported it.
    config = _job_config(tmp_path, {"stream_key": f"async-ft-{uuid.uuid4().hex}"})
    config = config.model_copy(
        update={"rollout_pool": config.rollout_pool.model_copy(update={"max_replacements": 0})}
    )
    job = EngineKilledJob(config)
    with pytest.raises(RolloutEngineDiedError) as stopped:
        job.run()
    message = str(stopped.value)
    assert f"rank 0 (pid {job.killed_pid}) of worker group 'rollout'" in message, message
    assert "rollout_pool.max_replacements=0" in message, message
