"""The transition benchmark's two ways (benchmarks/bench_transitions.py) on real Ray actors (gloo): raylane's
resharding sync and the baseline's full state dict through the object store both leave every engine
rank with exactly the trainer's weights."""

from __future__ import annotations

import pytest

from benchmarks.bench_transitions import WAYS, build_group, check_engine_weights, transition
from raylane.controllers import JobConfig


@pytest.fixture(scope="module")
def colocated(ray_cluster, tmp_path_factory):
    """The trainer (dp=2) and an engine (tp=2) colocated in two processes, with the bench's probe."""
    config = JobConfig.model_validate(
        {
            "output_dir": str(tmp_path_factory.mktemp("transitions")),
            "placement": {"trainer_ranks": 2, "rollout_tp": 2, "cpus_per_bundle": 0.5},
            "model": {"tiny_shape": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "max_position_embeddings": 64}},
        }
    )  # fmt: skip
    pool, group, sync = build_group(config, config.model.materialize(config.output_dir))
    yield group, sync
    sync.close()
    group.shutdown()
    pool.release()


def test_the_check_sees_weights_the_engine_was_not_given(colocated):
    group, _ = colocated
    group.probe.perturb(100)  # the trainer changes, nothing moves
    wrong = group.probe.mismatches()
    assert len(wrong) == 2 and all(len(names) >= 10 for names in wrong), wrong
    with pytest.raises(RuntimeError, match="does not hold the trainer's weights"):
        check_engine_weights(group, version=0, way="none")


def test_both_ways_leave_the_engine_with_the_trainers_weights(colocated):
    group, sync = colocated
    # Each way after the other, so neither passes on weights the other one moved.
    for version, way in enumerate(["raylane", "baseline", "raylane", "baseline"], start=1):
        seconds = transition(group, sync, WAYS[way], version, sleeps=True, way=way)  # raises on a mismatch
        moved = {"sync"} if way == "raylane" else {"gather", "put", "load"}
        assert set(seconds) == {"sleep", "wake_up"} | moved
        assert all(s >= 0 for s in seconds.values())
    assert group.rollout.weight_version() == [4, 4]
