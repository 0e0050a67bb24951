"""An elastic SFT run shrinks when a node is lost: real Ray Train on a real multi-node Ray cluster.

``ray.num_workers=2 ray.min_workers=1 ray.max_failures=1`` on a head with no CPUs and two nodes of
one CPU each, one Train worker per node. Once a checkpoint is behind the run, one node is removed
abruptly (its raylet and the worker on it are killed); Ray Train restarts the run from that
checkpoint with the one worker that still fits, DCP reshards the two workers' checkpoint onto it, and
the run finishes.

How long the restart takes is Ray Train's doing (``ray.train.v2``, Ray 2.60), in three waits:

* Ray learns the node is dead from the GCS health checks of its raylet (``health_check_period_ms``
  3 s x ``health_check_failure_threshold`` 5 by default); here 1 s x 3.
* The elastic policy (``ElasticScalingPolicy``) sizes the restarted worker group from the
  ``AutoscalingCoordinator`` actor's view of the cluster: the *total* resources of live nodes
  (``ray.nodes()``), refreshed only on the coordinator's tick, every 20 s
  (``_AutoscalingCoordinatorActor.TICK_INTERVAL_S``, no setting). Until that tick it still counts the
  lost node and decides on 2 workers again.
* That decision's placement group cannot be placed; the worker group start gives up after
  ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default, 5 s here) and the controller retries
  the decision (a controller failure, not charged to ``max_failures``) until the tick has come.

A driver connects to one Ray cluster per process and the session's cluster (tests/conftest.py) is
single-node, so the scenario runs in a child Python: this file run as a script (``python
tests/test_supervised_elastic.py OUTPUT_DIR [--ray-defaults]``), which prints what it saw as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

import pytest
from conftest import run_cluster_script

STEPS, EVERY, REMOVE_AT = 20, 5, 8
# Worker group start: how long a placement group may wait (Ray Train's default, 60 s, is what one
# decision made on the coordinator's stale view of the cluster costs); the controller's poll.
RAY_TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}
# The GCS marks a node dead after 3 failed checks of its raylet 1 s apart (a killed raylet fails each
# at once; a live one only after 5 s without an answer, so a loaded machine does not lose nodes).
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 5000,
    "health_check_failure_threshold": 3,
}
RESTART_LIMIT_S = 120


def _records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f, contextlib.suppress(json.JSONDecodeError):  # a line being written
        return [json.loads(line) for line in f if line.strip()]
    return []


def scenario(out: str, ray_defaults: bool = False) -> dict:
    """Head (no CPUs), nodes A and B (1 CPU each); the 2-worker elastic run; B removed after step
    ``REMOVE_AT``; what the run did after. ``ray_defaults``: Ray's timeouts and health checks."""
    if not ray_defaults:
        os.environ.update(RAY_TRAIN_ENV)
    import ray
    from ray.cluster_utils import Cluster
    from test_supervised import _SHAPE

    from raylane.config import load_config
    from raylane.fault_tolerance import remove_node
    from raylane.supervised import SFTJobConfig, run_sft

    start = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": {} if ray_defaults else FAST_NODE_DEATH,
        },
    )
    cluster.add_node(num_cpus=1)
    node_b = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    seen: dict = {"cluster_s": time.monotonic() - start, "error": None}
    config = load_config(
        SFTJobConfig,
        None,
        [
            _SHAPE,
            f"output_dir={out}",
            f"steps={STEPS}",
            "eval_every=0",
            f"checkpoint_every={EVERY}",
            "ray.num_workers=2",
            "ray.min_workers=1",
            "ray.max_failures=1",
        ],
    )

    def job() -> None:
        try:
            run_sft(config)
        except Exception as exc:  # reported to the test
            seen["error"] = repr(exc)

    try:
        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        metrics = os.path.join(out, "metrics.jsonl")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and thread.is_alive():
            records = _records(metrics)
            if records and records[-1]["step"] >= REMOVE_AT:
                break
            time.sleep(0.05)
        seen["removed_after_step"] = max([-1, *(r["step"] for r in _records(metrics))])
        removed = time.monotonic()
        seen["run_to_removal_s"] = removed - start - seen["cluster_s"]
        remove_node(cluster, node_b)
        deadline = removed + RESTART_LIMIT_S
        while time.monotonic() < deadline and thread.is_alive():
            if any("resumed_from_step" in r for r in _records(metrics)):
                seen["restart_s"] = time.monotonic() - removed
                break
            time.sleep(0.05)
        if "restart_s" in seen:
            thread.join(timeout=300)
        seen["finished"] = not thread.is_alive() and seen["error"] is None
        seen["after_removal_s"] = time.monotonic() - removed
        seen["history"] = [
            {k: r[k] for k in ("step", "sft/loss", "train/workers", "resumed_from_step") if k in r}
            for r in _records(metrics)
        ]
        last = os.path.join(config.storage_path, os.path.basename(out), f"step_{STEPS}")
        seen["last_checkpoint_rng_files"] = (
            sorted(f for f in os.listdir(last) if f.startswith("rng_")) if os.path.isdir(last) else None
        )
        return seen
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_elastic_run_goes_on_with_fewer_workers_after_a_node_is_lost(tmp_path):
    seen = run_cluster_script(__file__, str(tmp_path / "sft_shrink"), timeout=RESTART_LIMIT_S + 300)
    print(json.dumps({k: v for k, v in seen.items() if k != "history"}))
    check_shrunk(seen)


def check_shrunk(seen: dict) -> None:
    """What the scenario must have seen: the run finished on one worker, from the last checkpoint."""
    assert seen["finished"], seen
    history = seen["history"]
    assert [r["step"] for r in history] == list(range(STEPS + 1)), history
    (resumed,) = [int(r["resumed_from_step"]) for r in history if "resumed_from_step" in r]
    # Restarted from the last checkpoint before the node was lost: at most one interval redone.
    assert resumed % EVERY == 0 and EVERY <= resumed <= seen["removed_after_step"], (resumed, seen)
    assert seen["removed_after_step"] - resumed <= EVERY, seen
    # Two workers trained the steps up to the checkpoint, one worker every step after it.
    workers = {r["step"]: r["train/workers"] for r in history if r["step"] > 0}
    assert {workers[s] for s in range(1, resumed + 1)} == {2.0}, workers
    assert {workers[s] for s in range(resumed + 1, STEPS + 1)} == {1.0}, workers
    assert seen["last_checkpoint_rng_files"] == ["rng_rank0.pt"], seen
    # The weights and optimizer went on from the checkpoint: the first step after the restart has about
    # the checkpoint's loss, not the first step's, and the run kept learning.
    loss = {r["step"]: r["sft/loss"] for r in history if "sft/loss" in r}
    assert loss[resumed + 1] < loss[resumed] + 0.25 * (loss[1] - loss[resumed]), loss
    assert loss[STEPS] < 0.5 * loss[1], loss


if __name__ == "__main__":
    print(json.dumps(scenario(sys.argv[1], ray_defaults="--ray-defaults" in sys.argv[2:])))
