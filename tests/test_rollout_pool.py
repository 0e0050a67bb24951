"""The elastic rollout pool of a disaggregated synchronous job, on real Ray actors (gloo): a replica
killed while it generates is replaced with the current weights and its prompts answered elsewhere,
replacements are bounded, and the pool grows and shrinks between steps by API and by CLI."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import yaml
from pydantic import ValidationError

from raylane.controllers import JobConfig, RLJob, RolloutPoolError
from raylane.fault_tolerance import kill_process
from tests.conftest import child_env
from tests.test_async_checkpoint import _metrics
from tests.test_rl_job import _config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = 2  # rollout.n of _config


def _pool_config(tmp_path, name: str, replicas: int = 2, **overrides):
    placement = {
        "mode": "disaggregated",
        "trainer_ranks": 1,
        "rollout_ranks": replicas,
        "cpus_per_bundle": 0.5,
    }
    return _config(tmp_path, name, placement=placement, **overrides)


def test_pool_config_takes_any_prompt_count_and_bounds_the_replicas():
    disaggregated = {"mode": "disaggregated", "rollout_ranks": 3}
    config = JobConfig.model_validate({"placement": disaggregated, "prompts_per_step": 64})
    assert config.uses_rollout_pool and config.rollout_pool.max_replacements == 3
    with pytest.raises(ValidationError, match=r"3 rollout replicas .* more than rollout_pool.max_replicas=2"):
        JobConfig.model_validate({"placement": disaggregated, "rollout_pool": {"max_replicas": 2}})
    with pytest.raises(ValidationError, match="max_replacements"):
        JobConfig.model_validate({"placement": disaggregated, "rollout_pool": {"max_replacements": -1}})


def _record_generate(monkeypatch, pool) -> list:
    """Keep every (prompts, samples) pair the pool's generate sees."""
    calls = []
    generate = pool.generate

    def recording(prompts):
        samples = generate(prompts)
        calls.append((prompts, samples))
        return samples

    monkeypatch.setattr(pool, "generate", recording)
    return calls


def _kill_once_dispatched(monkeypatch, pool, slots: set[int]) -> list[str]:
    """Kill the first rank of the replicas in ``slots`` right after their first share of prompts was
    submitted to them, so they die with accepted work in flight; returns the killed replicas' names."""
    killed = []
    submit = pool._submit

    def submit_then_kill(start, rows, replica):
        share = submit(start, rows, replica)
        if replica.slot in slots and replica.name not in killed:
            killed.append(replica.name)
            ray.kill(replica.group.actors[0], no_restart=True)
        return share

    monkeypatch.setattr(pool, "_submit", submit_then_kill)
    return killed


def _assert_answered_once(prompts, samples) -> None:
    counts = collections.Counter(samples["uid"])
    assert counts == {uid: SAMPLES for uid in prompts["uid"]}, counts
    pairs = list(zip(samples["uid"], samples["sample_index"]))
    assert len(pairs) == len(set(pairs)), "a sample was generated twice"
    # Rows keep the prompts' order whichever replica answered them.
    assert list(samples["uid"]) == [uid for uid in prompts["uid"] for _ in range(SAMPLES)]


def test_replica_killed_mid_generate_is_replaced_and_no_prompt_is_lost(ray_cluster, tmp_path, monkeypatch):
    job = RLJob(_pool_config(tmp_path, "pool-kill", prompts_per_step=6))
    job.build_groups()
    try:
        job.rl_step(0)
        assert job.version == 1
        pool = job.rollout_pool
        before = {name: replica.group.actors[0] for name, replica in zip(pool.names, pool._replicas)}
        calls = _record_generate(monkeypatch, pool)
        killed = _kill_once_dispatched(monkeypatch, pool, {0})
        metrics = job.rl_step(1)
        assert killed == ["rollout0"]
        ((prompts, samples),) = calls
        _assert_answered_once(prompts, samples)
        # Every sample was generated with the policy of the step (version 1), none by stale weights.
        assert set(samples["weight_version"].tolist()) == {1}
        assert pool.replacements == 1 and metrics["rollout/replacements"] == 1.0
        assert pool.size == 2 and metrics["rollout/replicas"] == 2.0
        assert pool._replicas[0].group.actors[0] != before["rollout0"]
        # The replacement took the step's weight sync with the survivor: both hold the current version.
        assert (
            pool.weight_versions() == {"rollout0": job.version, "rollout1": job.version} and job.version == 2
        )
    finally:
        job.shutdown()


def test_replica_sigkilled_while_it_generates_loses_no_prompt(ray_cluster, tmp_path, monkeypatch):
    # Generations of ~200 tokens and a SIGKILL a third of the way through a generate call, to the local
    # process (a Ray task on the node would take longer to start than the generation), land inside
    # the replica's engine loop. The box is shared: if the call had already ended, the death is found
    # before the weight sync instead, and the step is tried again (at most 3 times).
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
    config = _pool_config(
        tmp_path, "pool-sigkill", model={"tiny_shape": shape}, rollout={"n": SAMPLES, "max_tokens": 200}
    )
    job = RLJob(config)
    job.build_groups()
    try:
        kill_after_s = min(job.rl_step(step)["timing/generate_s"] for step in range(2)) / 3
        pool = job.rollout_pool
        calls = _record_generate(monkeypatch, pool)
        dispatched, submit = [], pool._submit

        def submit_and_arm(start, rows, replica):
            share = submit(start, rows, replica)
            dispatched.append((replica.name, share.start))
            if len(dispatched) == 2:  # rollout1, whose rows start at 2: re-queued, they keep their place
                threading.Timer(kill_after_s, kill_process, (replica.group.nodes[0].pid,)).start()
            return share

        monkeypatch.setattr(pool, "_submit", submit_and_arm)
        for attempt in range(3):
            dispatched.clear()
            calls.clear()
            job.rl_step(2 + attempt)
            _assert_answered_once(*calls[0])
            if len(dispatched) > 2:
                break
        # The killed replica's share went to the other one: it was still generating when it died.
        assert dispatched == [("rollout0", 0), ("rollout1", 2), ("rollout0", 2)]
        assert pool.replacements == attempt + 1
        assert pool.weight_versions() == {"rollout0": job.version, "rollout1": job.version}
    finally:
        job.shutdown()


def test_replacements_join_with_the_current_weights_before_taking_work(ray_cluster, tmp_path, monkeypatch):
    job = RLJob(_pool_config(tmp_path, "pool-all-dead"))
    job.build_groups()
    try:
        job.rl_step(0)
        pool = job.rollout_pool
        calls = _record_generate(monkeypatch, pool)
        killed = _kill_once_dispatched(monkeypatch, pool, {0, 1})
        job.rl_step(1)
        assert sorted(killed) == ["rollout0", "rollout1"]
        ((prompts, samples),) = calls
        _assert_answered_once(prompts, samples)
        # No replica survived: the replacements generated everything, with version 1 (a replica
        # started from the checkpoint on disk would say 0).
        assert set(samples["weight_version"].tolist()) == {1}
        assert pool.replacements == 2
    finally:
        job.shutdown()


def test_replica_dead_between_steps_is_replaced_before_the_weight_sync(ray_cluster, tmp_path):
    job = RLJob(_pool_config(tmp_path, "pool-idle-death"))
    job.build_groups()
    try:
        job.rl_step(0)
        pool = job.rollout_pool
        # It dies while the trainers train: the next sync would wait on it.
        ray.kill(pool._replicas[1].group.actors[0], no_restart=True)
        job.sync_weights()
        assert pool.replacements == 1
        assert pool.weight_versions() == {"rollout0": 2, "rollout1": 2} and job.version == 2
    finally:
        job.shutdown()


def test_replica_stopped_with_prompts_in_flight_is_taken_as_hung_and_replaced(
    ray_cluster, tmp_path, monkeypatch
):
    # SIGSTOP right after rollout1 got its share: it neither answers nor dies. Its ranks answer no
    # ping, so after hang_timeout_s it is killed, its rows go to rollout0 and it is replaced.
    hang_timeout_s = 2.0
    job = RLJob(_pool_config(tmp_path, "pool-hang", rollout_pool={"hang_timeout_s": hang_timeout_s}))
    job.build_groups()
    try:
        job.rl_step(0)
        pool = job.rollout_pool
        calls = _record_generate(monkeypatch, pool)
        stopped, submit = [], pool._submit

        def submit_then_stop(start, rows, replica):
            share = submit(start, rows, replica)
            if replica.slot == 1 and not stopped:
                stopped.append(replica.group.nodes[0].pid)
                os.kill(stopped[0], signal.SIGSTOP)
            return share

        monkeypatch.setattr(pool, "_submit", submit_then_stop)
        metrics = job.rl_step(1)
        assert len(stopped) == 1
        _assert_answered_once(*calls[0])
        # Found by its silence (one ping round past hang_timeout_s), not by Ray's RPC keepalive (minutes).
        assert hang_timeout_s <= metrics["timing/generate_s"] < hang_timeout_s + 15
        assert pool.replacements == 1 and pool._replicas[1].group.nodes[0].pid != stopped[0]
        assert pool.weight_versions() == {"rollout0": job.version, "rollout1": job.version}
    finally:
        for pid in stopped:  # a stopped process that survived a failed test would block Ray's shutdown
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.shutdown()


def test_failures_past_max_replacements_stop_the_job_with_a_report(ray_cluster, tmp_path, monkeypatch):
    job = RLJob(_pool_config(tmp_path, "pool-limit", rollout_pool={"max_replacements": 1}))
    job.build_groups()
    try:
        _kill_once_dispatched(monkeypatch, job.rollout_pool, {0, 1})
        with pytest.raises(
            RolloutPoolError,
            match=r"rollout replica 'rollout\d' died .*1 replica\(s\) were already replaced this run, "
            r"rollout_pool\.max_replacements=1: stopping the job",
        ):
            job.rl_step(0)
    finally:
        job.shutdown()


def test_scale_rollout_grows_and_shrinks_between_steps(ray_cluster, tmp_path, monkeypatch):
    job = RLJob(_pool_config(tmp_path, "pool-scale", replicas=1, rollout_pool={"max_replicas": 3}))
    job.build_groups()
    try:
        job.rl_step(0)
        pool = job.rollout_pool
        job.scale_rollout(3)
        # The new replicas hold the current policy before they take any work.
        assert pool.weight_versions() == {"rollout0": 1, "rollout1": 1, "rollout2": 1}
        calls = _record_generate(monkeypatch, pool)
        assert job.rl_step(1)["rollout/replicas"] == 3.0
        _assert_answered_once(*calls[-1])
        assert set(calls[-1][1]["weight_version"].tolist()) == {1}
        job.scale_rollout(1)
        assert pool.names == ["rollout0"] and pool.weight_versions() == {"rollout0": 2}
        job.rl_step(2)
        _assert_answered_once(*calls[-1])
        # Refused with a reason, and the pool left as it was.
        with pytest.raises(ValueError, match="at least 1 replica"):
            job.scale_rollout(0)
        with pytest.raises(ValueError, match=r"rollout_pool\.max_replicas is 3"):
            job.scale_rollout(4)
        pool.config = pool.config.model_copy(update={"max_replicas": 64})
        with pytest.raises(ValueError, match=r"cannot add 63 rollout replica\(s\).*free"):
            job.scale_rollout(64)
        assert pool.size == 1
    finally:
        job.shutdown()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylane.cli", "rollout", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_scales_the_pool_of_a_running_job(ray_cluster, tmp_path):
    # More steps than the test waits for: the driver is stopped once the scale shows in its metrics.
    config = _pool_config(tmp_path, "cli-job", replicas=1, steps=10_000, rollout_pool={"max_replicas": 2})
    job = {**config.model_dump(mode="json"), "ray_address": ray.get_runtime_context().gcs_address}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    driver = subprocess.Popen(
        [sys.executable, "-m", "raylane.cli", "train", str(path)],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = ["--job", "cli-job", "--address", ray.get_runtime_context().gcs_address]
    try:
        _wait_for(driver, lambda: [r for r in _metrics(config.output_dir) if r["step"] >= 1], "step 1")
        grown = _cli("scale", "2", *address, "--timeout", "60")
        assert grown.returncode == 0, grown.stderr
        assert "rollout pool of job 'cli-job' now has 2 replicas" in grown.stderr
        refused = _cli("scale", "3", *address)
        assert refused.returncode == 2 and "rollout_pool.max_replicas is 2" in refused.stderr, refused.stderr
        status = _cli("status", *address)
        assert status.returncode == 0 and json.loads(status.stdout)["rollout/replicas"] == 2.0, status
        _wait_for(
            driver, lambda: _metrics(config.output_dir)[-1].get("rollout/replicas") == 2.0, "2 replicas"
        )
    finally:
        driver.kill()
        driver.wait(timeout=30)
    steps = [r for r in _metrics(config.output_dir) if "rollout/replicas" in r]
    assert steps[0]["rollout/replicas"] == 1.0 and steps[-1]["rollout/replicas"] == 2.0
    assert all(r["rollout/replacements"] == 0.0 for r in steps)
    # The mailbox goes with its driver.
    deadline = time.monotonic() + 60
    while (missing := _cli("status", *address)).returncode == 0:
        assert time.monotonic() < deadline, "the mailbox outlived its driver"
    assert missing.returncode == 2 and "no running job named 'cli-job'" in missing.stderr, missing.stderr


def _wait_for(driver: subprocess.Popen, condition, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert driver.poll() is None, f"the driver exited early: {driver.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"the job did not reach {what} in {timeout_s} s"
        time.sleep(0.1)
