"""Fault tolerance inside the RL job on real Ray (gloo, 2 colocated trainer ranks): a rank killed or
stopped mid-run is named, replaced, the last checkpoint reloaded, and the run ends where a fault-free
one does; past the replacement budget the job stops with its fault report."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raylane.controllers import RLJob
from raylane.fault_tolerance import FaultStopError, InRankFault
from raylane.models import load_model
from tests import test_rl_job

# SFT moves the policy off its initial weights and gives GRPO non-zero advantages, so a rank that
# came back without the checkpoint's weights would show in every later step.
BASE = {"steps": 4, "checkpoint_every": 1, "sft.steps": 40, "rollout.n": 4, "rollout.max_tokens": 3}
# The victim's collectives since its probe started: the step-0 checkpoint and the first RL steps.
FAULT_AT_SEQ = 45


def _config(tmp_path, name: str, **overrides):
    return test_rl_job._config(tmp_path, name, **{**BASE, **overrides})


def _tolerant(tmp_path, name: str, **fault_tolerance):
    settings = {"enabled": True, "detector": {"hang_s": 2.0}, **fault_tolerance}
    return _config(tmp_path, name, fault_tolerance=settings)


class FaultyJob(RLJob):
    """The RL job with ``fault`` armed on the probe of trainer rank 1 once the probes run."""

    fault: InRankFault

    def _start_fault_tolerance(self) -> None:
        super()._start_fault_tolerance()
        self.actor.on_ranks([1]).arm_fault(self.fault)


def _run_with(config, fault: InRankFault) -> list[dict]:
    job = FaultyJob(config)
    job.fault = fault
    return job.run()


def _lines(config) -> list[dict]:
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_weights(config) -> dict[str, torch.Tensor]:
    return load_model(os.path.join(config.output_dir, "final_model")).state_dict()


@pytest.fixture(scope="module")
def fault_free(ray_cluster, tmp_path_factory):
    """The same job without a fault: its metrics and final weights are what recovery must reach."""
    config = _config(tmp_path_factory.mktemp("fault-free"), "reference")
    return RLJob(config).run(), _final_weights(config)


def _assert_same_run(history: list[dict], config, fault_free) -> None:
    reference, reference_weights = fault_free
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in _lines(config) if "step" in r] == [0, 1, 2, 3, 4]
    assert any(r["reward_mean"] > 0 for r in reference[1:]), "the job learns nothing: the check is blind"
    for ours, theirs in zip(history[1:], reference[1:]):
        assert ours["reward_mean"] == theirs["reward_mean"], (ours["step"], ours, theirs)
        assert ours["actor/pg_loss"] == pytest.approx(theirs["actor/pg_loss"], abs=1e-5)
    weights = _final_weights(config)
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0, msg=name)


def _recoveries(history: list[dict]) -> list[dict]:
    return [r for r in history if "fault_tolerance/steps_lost" in r]


def test_killed_trainer_rank_is_replaced_and_the_run_matches_a_fault_free_one(fault_free, tmp_path):
    config = _tolerant(tmp_path, "killed")
    history = _run_with(config, InRankFault("kill", at_seq=FAULT_AT_SEQ, inside=True))

    events = [r for r in _lines(config) if r.get("event") == "crash"]
    assert [(e["worker_group"], e["rank"]) for e in events] == [("rl", 1)], events
    # Named from the failed step call, not after the heartbeat's silence_s.
    assert events[0]["evidence"]["reason"] == "actor died (a group call on it failed)", events
    [recovery] = _recoveries(history)
    assert recovery["fault_tolerance/steps_lost"] <= 1
    assert recovery["fault_tolerance/replacements"] == 1
    _assert_same_run(history, config, fault_free)


def test_rank_stopped_inside_a_collective_is_named_and_replaced(fault_free, tmp_path):
    config = _tolerant(tmp_path, "stopped")
    history = _run_with(config, InRankFault("stop", at_seq=FAULT_AT_SEQ, inside=True))

    hangs = [r for r in _lines(config) if r.get("event") in ("comm_hang", "noncomm_hang")]
    assert hangs and hangs[0]["rank"] == 1, hangs
    assert hangs[0]["evidence"]["silent_ranks"] == [1]
    [recovery] = _recoveries(history)
    assert recovery["fault_tolerance/steps_lost"] <= 1
    _assert_same_run(history, config, fault_free)


@pytest.mark.parametrize(
    ("settings", "reason", "outcome"),
    [
        ({"max_replacements": 0}, "max_replacements=0", "retries exhausted"),
        ({"policies": {"crash": "stop"}}, "its policy is stop", "stop: stopped the job"),
    ],
    ids=["retries_exhausted", "stop_policy"],
)
def test_a_fault_the_job_may_not_recover_from_stops_it_with_its_report(
    ray_cluster, tmp_path, settings, reason, outcome
):
    config = _tolerant(tmp_path, "stops", **settings)
    with pytest.raises(FaultStopError) as stopped:
        _run_with(config, InRankFault("kill", at_seq=FAULT_AT_SEQ, inside=True))
    report = str(stopped.value)
    assert reason in report, report
    assert "crash: rank 1 of 'rl'" in report and outcome in report, report
