"""Checkpoints persisted in the background and committed atomically.

A real training process (``tests/persist_child.py``, a gloo world) is SIGKILLed in the middle of a
persist and right after a commit; the lazy mode's snapshots hold their own step's state although the
next optimizer step follows each save at once, and a process killed while the disk tier copies one
resumes from the memory tier. The RL job on real Ray actors writes the same tensors in async, lazy and
sync mode, resumes from a lazy checkpoint to the weights of a straight run, and a driver killed
mid-persist resumes from the newest complete checkpoint, losing at most one step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from raylane.controllers import JobConfig, RLJob
from raylane.fault_tolerance import (
    COMPLETE_MARKER,
    CheckpointLoadError,
    CheckpointStore,
    DiskPersister,
    is_complete,
    memory_tier_dir,
    newest_checkpoint,
)
from tests.conftest import child_env
from tests.test_async_rl_recovery import start_driver
from tests.test_rl_job import _config as tiny_job_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the store ---------------------------------------------------------------------------------------


def _stage(store: CheckpointStore, step: int) -> str:
    path = store.staging(step)
    with open(os.path.join(path, "payload"), "w") as f:
        f.write(str(step))
    return path


def test_only_committed_checkpoints_count_and_keep_last_prunes_the_oldest(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    assert store.latest() is None
    for step in (1, 2, 3):
        _stage(store, step)
        store.commit(step)
    _stage(store, 4)  # a persist that never finished
    assert store.complete_steps() == [2, 3]
    assert store.latest() == store.path(3) and is_complete(store.path(3))
    assert not os.path.exists(store.path(4))
    # Staging the same step again starts from an empty folder.
    assert os.listdir(store.staging(4)) == []
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointStore(str(tmp_path), keep_last=0)


def test_the_disk_persister_waits_out_its_interval_but_not_when_drained(tmp_path):
    memory, disk = CheckpointStore(str(tmp_path / "memory")), CheckpointStore(str(tmp_path / "disk"))
    persister = DiskPersister(memory, disk, threads=1, min_interval_s=120.0)
    try:
        _stage(memory, 1)
        memory.commit(1)
        persister.offer(1)  # the first copy starts at once
        deadline = time.monotonic() + 30
        while persister.persisted != 1:
            assert time.monotonic() < deadline, "step 1 was not copied to disk"
            time.sleep(0.05)
        for step in (2, 3):
            _stage(memory, step)
            memory.commit(step)
            persister.offer(step)
        time.sleep(1.0)  # copying a one-file checkpoint takes milliseconds; the interval holds step 3 back
        assert disk.complete_steps() == [1] and persister.skipped == 1
        started = time.monotonic()
        persister.drain()
        assert time.monotonic() - started < 60, "drain waited out the interval"
        assert disk.complete_steps() == [1, 3] and persister.persisted == 3
    finally:
        persister.close()


def test_a_step_folder_without_the_marker_is_not_complete(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _stage(store, 1)
    store.commit(1)
    os.remove(os.path.join(store.path(1), COMPLETE_MARKER))
    assert store.latest() is None


# ---- a training process killed mid-persist -----------------------------------------------------------


def _start_training(root: str, steps: int, command: str = "train") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.persist_child", command, root, str(steps)],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def _kill_at(child: subprocess.Popen, line: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    for printed in child.stdout:
        if printed.strip() == line:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            return
        assert time.monotonic() < deadline, f"{line!r} not printed in {timeout_s} s"
    raise AssertionError(f"the training process ended (code {child.wait()}) before printing {line!r}")


def _child_json(*args: str, timeout_s: float = 120):
    """Run ``tests.persist_child`` with ``args`` to the end; the JSON of its last line."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.persist_child", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(root: str, which: str = "newest"):
    return _child_json("check", root, which)


def test_killed_mid_persist_resumes_from_the_previous_checkpoint_losing_one_step(tmp_path):
    root = str(tmp_path / "checkpoints")
    _kill_at(_start_training(root, 3), "snapshot 2")  # step 2 trained, its persist in flight
    assert os.path.isdir(os.path.join(root, ".step_2.partial")), "the kill did not land mid-persist"
    assert CheckpointStore(root).complete_steps() == [1]
    loaded = _check(root)
    # Two steps were trained when the process died; the resume point is the step before.
    assert loaded == {"step": 1, "same_weights": True, "same_moments": True, "same_lr": True}


def test_a_committed_checkpoint_is_whole_even_if_the_process_dies_right_after(tmp_path):
    root = str(tmp_path / "checkpoints")
    _kill_at(_start_training(root, 3), "committed 2")
    assert _check(root) == {"step": 2, "same_weights": True, "same_moments": True, "same_lr": True}
    # Two writer threads: the rank's shards went to two files.
    assert sorted(os.listdir(os.path.join(root, "step_2", "dcp"))) == [
        ".metadata",
        "__0_0.distcp",
        "__0_1.distcp",
    ]


def test_a_lazy_snapshot_holds_its_steps_state_not_the_next_ones(tmp_path):
    root = str(tmp_path / "checkpoints")
    child = _start_training(root, 6, "lazy")
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0 and out.split()[-1] == "drained", out
    checked = _check(root, "all")
    # Steps 1-5 were each followed at once by the next optimizer step; the disk tier may have skipped
    # some for a newer one (the memory tier keeps only step 6).
    assert len([c for c in checked if c["step"] < 6]) >= 3, checked
    assert all(c["same_weights"] and c["same_moments"] and c["same_lr"] for c in checked), checked


def test_lazy_killed_mid_disk_persist_resumes_from_the_memory_tier_losing_at_most_one_step(tmp_path):
    root = str(tmp_path / "checkpoints")
    child = _start_training(root, 8, "lazy")
    deadline = time.monotonic() + 240
    # Killed once the first shard of a checkpoint after step 1 is on its way to the disk tier.
    while not _copy_begun(root):
        assert child.poll() is None, "the training process ended before a copy to disk was caught"
        assert time.monotonic() < deadline, "no copy to the disk tier after step 1 began"
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    partial = [name for name in _listdir(root) if name.endswith(".partial")]
    assert partial, "the kill did not land mid-copy"
    trained = max(int(name[5:-3]) for name in os.listdir(f"{root}.reference"))
    newest = newest_checkpoint(CheckpointStore(root), CheckpointStore(f"{root}.memory"))
    # Every complete checkpoint of both tiers loads to what training held; the newest is the memory
    # tier's unless the disk had caught up.
    checked = _check(root, "all")
    assert all(c["same_weights"] and c["same_moments"] and c["same_lr"] for c in checked), checked
    assert _check(root) == {
        "step": int(newest.rsplit("_", 1)[1]),
        "same_weights": True,
        "same_moments": True,
        "same_lr": True,
    }
    assert trained - int(newest.rsplit("_", 1)[1]) <= 1, (trained, newest, partial)


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _copy_begun(root: str) -> bool:
    return any(
        name.endswith(".distcp")
        for folder in _listdir(root)
        if folder not in ("step_1", ".step_1.partial")
        for name in _listdir(os.path.join(root, folder, "dcp"))
    )


# ---- the RL job on Ray -------------------------------------------------------------------------------


def _job_config(tmp_path, name: str, **overrides) -> JobConfig:
    return tiny_job_config(tmp_path, name, checkpoint_every=1, **overrides)


def _saved_tensors(checkpoint: str, tmp_path, name: str) -> dict:
    target = str(tmp_path / f"{name}.pt")
    dcp_to_torch_save(os.path.join(checkpoint, "actor", "dcp"), target)
    return torch.load(target, weights_only=False)


def _flatten(state, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _flatten(value, f"{prefix}/{key}").items()}
    return {}


@pytest.mark.parametrize("mode", ["async", "lazy"])
def test_background_checkpoints_hold_the_tensors_of_sync_ones(ray_cluster, tmp_path, mode):
    # The async snapshot of step 1 is persisted while step 2 updates the same parameters in place;
    # the lazy one is taken while step 2 runs.
    background_job = RLJob(_job_config(tmp_path, mode, checkpoint_mode=mode))
    background_job.run()
    # A clean end leaves every checkpoint on disk and frees the memory tier.
    assert not os.path.exists(background_job.memory_checkpoints.root)
    sync_job = RLJob(_job_config(tmp_path, "sync", checkpoint_mode="sync"))
    sync_job.run()
    saved = {
        (name, step): _flatten(_saved_tensors(job.checkpoints.path(step), tmp_path, f"{name}{step}"))
        for name, job in ((mode, background_job), ("sync", sync_job))
        for step in (1, 2)
    }
    for step in (1, 2):
        assert saved[mode, step].keys() == saved["sync", step].keys() and len(saved["sync", step]) > 10
        for key, tensor in saved["sync", step].items():
            assert torch.equal(saved[mode, step][key], tensor), (step, key)
    # Step 2 changed the weights: the comparison above is not between identical states.
    assert any(not torch.equal(tensor, saved["sync", 2][key]) for key, tensor in saved["sync", 1].items())


def test_resume_from_a_lazy_checkpoint_reaches_the_weights_of_a_straight_run(ray_cluster, tmp_path):
    straight = RLJob(_job_config(tmp_path, "straight", steps=3, checkpoint_mode="lazy"))
    straight.run()
    resumed = RLJob(
        _job_config(
            tmp_path, "resumed", steps=3, checkpoint_mode="lazy", resume_from=straight.checkpoints.path(2)
        )
    )
    resumed.run()
    final = {
        name: _flatten(_saved_tensors(job.checkpoints.path(3), tmp_path, name))
        for name, job in (("straight", straight), ("resumed", resumed))
    }
    assert final["straight"].keys() == final["resumed"].keys() and len(final["straight"]) > 10
    for key, tensor in final["straight"].items():
        assert torch.equal(final["resumed"][key], tensor), key


def test_resume_refuses_an_incomplete_checkpoint(ray_cluster, tmp_path):
    job = RLJob(_job_config(tmp_path, "job"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        job.resume("latest")
    with pytest.raises(CheckpointLoadError, match="not a complete checkpoint"):
        job.resume(job.checkpoints.staging(1))


@contextlib.contextmanager
def _within(seconds: int):
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs) mounted where a job's disk tier goes: a full disk."""
    folder = tmp_path / "full" / "checkpoints"
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_a_full_disk_stops_a_lazy_job_with_what_to_do_and_resume_loses_nothing(
    ray_cluster, tmp_path, small_disk
):
    config = _job_config(tmp_path, "full", steps=4, checkpoint_mode="lazy")
    assert os.path.join(config.output_dir, "checkpoints") == str(small_disk)
    job = RLJob(config)
    # Every checkpoint reaches the memory tier; the first copy to the disk runs out of space and the
    # next checkpoint stops the job, naming where the newest checkpoints are and what to do. A job
    # that waited on a copy that will never come would hang: bounded.
    with pytest.raises(RuntimeError, match="free disk space") as stopped, _within(120):
        job.run()
    assert "No space left on device" in repr(stopped.value.__cause__)
    assert job.checkpoints.complete_steps() == []
    memory = job.memory_checkpoints.complete_steps()
    trained = max(r["step"] for r in _metrics(config.output_dir))
    assert memory and trained - memory[-1] <= 1, (memory, trained)
    # Space freed (the disk tier unmounted), the job resumes from the memory tier's newest checkpoint.
    subprocess.run(["umount", str(small_disk)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small_disk)], check=True)
    resumed = RLJob(config.model_copy(update={"resume_from": "latest"}))
    resumed.run()
    assert resumed.start_step == memory[-1]
    steps = [r["step"] for r in _metrics(config.output_dir) if "reward_mean" in r]
    # Steps after the newest checkpoint are trained again, every step up to the end at least once.
    assert sorted(set(steps)) == [1, 2, 3, 4], steps
    assert resumed.checkpoints.complete_steps()[-1] == 4


def _metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.mark.parametrize("mode", ["async", "lazy"])
def test_driver_killed_mid_persist_resumes_from_the_latest_losing_at_most_one_step(
    ray_cluster, tmp_path, mode
):
    steps = 4
    config = _job_config(
        tmp_path, "job", steps=steps, checkpoint_mode=mode, ray_address=ray.get_runtime_context().gcs_address
    )
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    driver = start_driver(str(config_path))
    disk = CheckpointStore(os.path.join(config.output_dir, "checkpoints"))
    # Lazy mode writes to the memory tier first (a tmpfs folder named after output_dir).
    memory = CheckpointStore(memory_tier_dir(config.output_dir))
    written = memory if mode == "lazy" else disk
    deadline = time.monotonic() + 240
    # Killed as soon as the save of step 2 has begun: its persist is in flight unless it was quicker
    # than this poll.
    while not any(os.path.isdir(os.path.join(written.root, name)) for name in (".step_2.partial", "step_2")):
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the checkpoint of step 2 not begun"
        time.sleep(0.001)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    before = {row["step"]: row for row in _metrics(config.output_dir)}
    trained = max(before)
    newest = newest_checkpoint(disk, memory)
    assert trained >= 2 and newest is not None
    assert trained - int(newest.rsplit("_", 1)[1]) <= 1

    resumed = start_driver(str(config_path), "resume_from=latest")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert not os.path.exists(memory.root)
    after = _metrics(config.output_dir)
    assert [row["step"] for row in after] == list(range(steps + 1))
    # The steps trained again after the resume see the same prompts and weights as before the kill.
    for row in after[1 : trained + 1]:
        assert row["reward_mean"] == before[row["step"]]["reward_mean"], row["step"]
        assert row["actor/pg_loss"] == pytest.approx(before[row["step"]]["actor/pg_loss"], abs=1e-5)


def test_lazy_checkpoints_link_host_buffers_reused_once_no_checkpoint_holds_them(tmp_path):
    # The lazy snapshot is copied into files on the memory tier's filesystem, which the checkpoint then
    # links: no second copy of the state. A buffer a kept checkpoint still links is never written again.
    root = str(tmp_path / "checkpoints")
    seen = _child_json("slots", root, timeout_s=300)
    shards, slots = {int(step): inode for step, inode in seen["shards"].items()}, dict(seen["slots"])
    assert len(slots) == 3, slots  # step 1's, step 2's (held while steps 3 and 4 ran), and one more
    assert set(shards.values()) == set(slots.values()), (shards, slots)
    # Step 3 reuses step 1's buffer (its checkpoint was removed); step 4 may not reuse step 2's or 3's.
    assert shards[3] == shards[1] and len({shards[2], shards[3], shards[4]}) == 3, shards
    checked = _check(f"{root}.memory", "all")
    assert [c["step"] for c in checked] == [2, 3, 4]
    assert all(c["same_weights"] and c["same_moments"] and c["same_lr"] for c in checked), checked
