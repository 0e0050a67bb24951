"""The asynchronous job on a Redis rollout stream survives its driver's SIGKILL and a Redis restart:
resumed from its last checkpoint, every accepted trajectory is trained exactly once (counted by
uid over the run's lineage) and none is lost. The driver is a real subprocess on the session's
Ray cluster; Redis is a real redis-server."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import redis
import yaml

from raylane.fault_tolerance import CheckpointStore, is_complete, memory_tier_dir
from raylane.rlhf import TrajectoryGroup
from tests.conftest import child_env

STEPS, PROMPTS, SAMPLES = 6, 4, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_job(
    tmp_path, redis_url: str, stream_key: str, reconnect_s: float = 30.0, checkpoint_mode: str = "sync"
) -> str:
    job = {
        "output_dir": str(tmp_path / "job"),
        "steps": STEPS,
        "prompts_per_step": PROMPTS,
        "checkpoint_every": 3,
        "checkpoint_mode": checkpoint_mode,
        "eval_every": 0,
        "eval_prompts": 4,
        "task": {"name": "add2", "n_train": 64, "n_eval": 4},
        "rollout": {"n": SAMPLES, "max_tokens": 6, "engine": {"max_num_seqs": 4}},
        "actor": {"micro_batch_size": 8, "optim": {"lr": 1e-3}, "loss": {"off_policy_correction": "decoupled"}},
        "sft": {"steps": 0},
        "placement": {"mode": "disaggregated", "trainer_ranks": 1, "rollout_ranks": 1, "cpus_per_bundle": 0.5},
        "model": {"tiny_shape": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}},
        "async_rl": {
            "max_staleness": 1,
            "engine_steps_per_call": 2,
            "stream": {"redis_url": redis_url, "stream_key": stream_key, "claim_idle_s": 2.0,
                       "reconnect_s": reconnect_s},
        },
        "ray_address": ray.get_runtime_context().gcs_address,
    }  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def start_driver(config_path: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "raylane.cli", "train", config_path, *overrides],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def trained_steps(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "trained.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for_step(driver: subprocess.Popen, output_dir: str, step: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while len(trained_steps(output_dir)) < step:
        assert driver.poll() is None, f"the driver exited early: {driver.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout_s} s"
        time.sleep(0.02)


def finish(driver: subprocess.Popen, timeout_s: float = 150) -> tuple[int, str]:
    _, err = driver.communicate(timeout=timeout_s)
    return driver.returncode, err


def latest_checkpoint(output_dir: str) -> str:
    steps = glob.glob(os.path.join(output_dir, "checkpoints", "step_*"))
    assert steps, "no checkpoint was written"
    return max(steps, key=lambda path: int(path.rsplit("_", 1)[1]))


def check_exactly_once(output_dir: str, redis_url: str, stream_key: str) -> None:
    lineage = trained_steps(output_dir)
    assert [r["step"] for r in lineage] == list(range(1, STEPS + 1))
    trained = [uid for r in lineage for uid in r["trajectories"]]
    assert len(trained) == len(set(trained)), "a trajectory was trained twice"
    # Every admitted group (g0 .. g23) was accepted into the stream and trained: none was lost.
    expected = {f"g{g}-{s}" for g in range(STEPS * PROMPTS) for s in range(SAMPLES)}
    assert set(trained) == expected
    client = redis.Redis.from_url(redis_url)
    committed = {uid.decode() for uid in client.smembers(f"{stream_key}:trained")}
    assert committed == expected
    # What is left in the stream are copies regenerated after the crash of groups already trained.
    for _, fields in client.xrange(stream_key):
        assert set(TrajectoryGroup.decode(fields[b"group"]).uids) <= expected


@pytest.mark.parametrize("checkpoint_mode", ["sync", "async", "lazy"])
def test_driver_killed_mid_run_resumes_and_trains_each_trajectory_once(
    ray_cluster, redis_url, tmp_path, checkpoint_mode
):
    key = f"kill-driver-{checkpoint_mode}"
    config = write_job(tmp_path, redis_url, key, checkpoint_mode=checkpoint_mode)
    output_dir = str(tmp_path / "job")
    if checkpoint_mode == "lazy":
        # A checkpoint every step, the disk tier held back after its first copy: the run is killed
        # with newer checkpoints in memory than on disk, whose batches the stream has not acknowledged.
        overrides, kill_after = (
            ["checkpoint_every=1", "checkpoint_disk_interval_s=600"],
            os.path.join(memory_tier_dir(output_dir), "step_3"),
        )
    else:
        overrides, kill_after = [], os.path.join(output_dir, "checkpoints", "step_3")
    driver = start_driver(config, *overrides)
    wait_for_step(driver, output_dir, 4)
    # An async checkpoint commits (and acknowledges its batches) at the end of the next step, once
    # that step has trained.
    while not os.path.isdir(kill_after):
        assert driver.poll() is None, f"the driver exited early: {driver.stderr.read()[-3000:]}"
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    if checkpoint_mode == "lazy":
        assert latest_checkpoint(output_dir).endswith("step_1"), "the disk tier was not held back"
        newest_in_memory = CheckpointStore(memory_tier_dir(output_dir)).complete_steps()[-1]
        resumed = start_driver(config, *overrides, "resume_from=latest")
    else:
        # Step 4 was trained after the last checkpoint (step 3): its groups were taken but not committed.
        assert latest_checkpoint(output_dir).endswith("step_3")
        resumed = start_driver(config, f"resume_from={latest_checkpoint(output_dir)}")
    code, err = finish(resumed)
    assert code == 0, err[-3000:]
    check_exactly_once(output_dir, redis_url, key)
    if checkpoint_mode == "lazy":
        # The resume acknowledged the batches trained up to that memory checkpoint, so it went to disk
        # first (the disk tier, held back, would not have copied it): a lost node cannot undo them.
        assert is_complete(os.path.join(output_dir, "checkpoints", f"step_{newest_in_memory}"))
    if checkpoint_mode != "sync":
        # The check below compares the stream's commits with the resumed step, whichever way that
        # checkpoint was written (resuming from an async or lazy one is checked just above): once is enough.
        return
    # Resuming from an older checkpoint than the stream's commits stops with what to do, not a hang.
    stale = start_driver(config, f"resume_from={os.path.join(output_dir, 'checkpoints', 'step_3')}")
    code, err = finish(stale)
    assert code != 0 and "resume from the latest checkpoint" in err, err[-3000:]


@pytest.mark.parametrize("outage", ["within_reconnect_s", "beyond_reconnect_s"])
def test_redis_restarted_mid_run(ray_cluster, durable_redis, tmp_path, outage):
    # A short outage is ridden out; a longer one stops the job with what to do, and a resume finishes it.
    short = outage == "within_reconnect_s"
    key = f"restart-redis-{outage}"
    config = write_job(tmp_path, durable_redis.url, key, reconnect_s=30.0 if short else 0.5)
    output_dir = str(tmp_path / "job")
    driver = start_driver(config)
    wait_for_step(driver, output_dir, 4)  # past the checkpoint of step 3
    durable_redis.kill()
    time.sleep(1.0 if short else 3.0)
    durable_redis.restart()
    code, err = finish(driver)
    if short:
        assert code == 0, err[-3000:]
    else:
        assert code != 0
        assert "StreamUnavailableError" in err and "resume the job from its last checkpoint" in err, err[
            -3000:
        ]
        resumed = start_driver(config, f"resume_from={latest_checkpoint(output_dir)}")
        code, err = finish(resumed)
        assert code == 0, err[-3000:]
    check_exactly_once(output_dir, durable_redis.url, key)
