"""The streaming asynchronous RL job on real Ray actors: the synchronous curve at max_staleness 0,
and the staleness bound read from every trained token's recorded weight version."""

from __future__ import annotations

import json
import os

import pytest

from raylane.controllers import AsyncRLJob, RLJob
from raylane.controllers.async_rl import GroupAdmission
from raylane.rlhf import PromptExample, PromptLoader
from raylane.roles.partial_rollout import request_seed
from tests.test_metrics_export import _node_metrics_url, _scrape_until_all_exported
from tests.test_rl_job import _config, _weighted_task

DISAGGREGATED = {"mode": "disaggregated", "trainer_ranks": 1, "rollout_ranks": 1, "cpus_per_bundle": 0.5}


def _async_config(tmp_path, name: str, async_rl: dict, **overrides):
    return _config(tmp_path, name, placement=DISAGGREGATED, async_rl=async_rl, **overrides)


def read_trained(config) -> list[dict]:
    with open(os.path.join(config.output_dir, "trained.jsonl")) as f:
        return [json.loads(line) for line in f]


def graded_task(tmp_path) -> dict:
    """Prompts scored by the first character of the response: samples of a prompt score
    differently, so every GRPO step moves the policy."""
    return {**_weighted_task(tmp_path, [0.0] * 32, [0.0] * 8), "reward_fn": "tests.user_code:first_character"}


def test_zero_staleness_gives_the_synchronous_curve(ray_cluster, tmp_path):
    common = {"steps": 3, "task": graded_task(tmp_path), "rollout": {"n": 4, "max_tokens": 4}}
    sync = RLJob(_config(tmp_path, "sync", placement=DISAGGREGATED, **common)).run()
    streamed = AsyncRLJob(_async_config(tmp_path, "async", {"max_staleness": 0}, **common)).run()
    assert sync[1]["advantage_abs_mean"] > 0
    for key in ("reward_mean", "actor/pg_loss", "actor/grad_norm", "response_length"):
        assert [r[key] for r in streamed[1:]] == [r[key] for r in sync[1:]], key
    assert streamed[-1]["eval_reward_mean"] == sync[-1]["eval_reward_mean"]
    assert all(r["rollout/staleness_max"] == 0 for r in streamed[1:])


@pytest.mark.parametrize("mode", ["abort_resume", "keep"])
def test_no_trained_token_is_staler_than_the_bound(ray_cluster, tmp_path, mode):
    # Answers of heavy-tailed lengths; a short warm-start teaches the model to stop, at mixed lengths.
    max_staleness = 1
    config = _async_config(
        tmp_path,
        mode,
        {"max_staleness": max_staleness, "partial_rollout": mode, "engine_steps_per_call": 2},
        steps=6,
        task={"name": "repeat", "n_train": 128, "n_eval": 8},
        # Few sequences at a time: generation is slower than training, so updates land mid-sample.
        rollout={"n": 4, "max_tokens": 24, "engine": {"max_num_seqs": 4}},
        sft={"steps": 12, "batch_size": 32, "lr": 3e-3},
        **{"actor.loss": {"off_policy_correction": "decoupled"}},
    )
    history = AsyncRLJob(config).run()
    trained = read_trained(config)
    assert [r["step"] for r in trained] == list(range(1, 7))
    uids = [uid for r in trained for uid in r["trajectories"]]
    assert len(uids) == len(set(uids)) == 6 * 4 * 4
    lengths, spans, worst = set(), 0, 0
    for record in trained:
        for versions in record["trajectories"].values():
            lengths.add(len(versions))
            spans += len(set(versions)) > 1  # a sample generated across a weight update
            worst = max(worst, max(record["policy_version"] - v for v in versions))
    assert worst <= max_staleness
    assert worst == max_staleness  # generation really ran ahead of training
    assert len(lengths) > 3 and spans > 0, (lengths, spans)
    assert max(r["rollout/staleness_max"] for r in history[1:]) == worst
    assert "actor/importance_weight_mean" in history[-1]
    # What the dashboard shows of the stream, from the node's Prometheus endpoint: the last step's values.
    dashboard = {
        "raylane_stream_depth": "stream/depth",
        "raylane_rollout_staleness_max": "rollout/staleness_max",
    }
    ours, last = (
        f'job="{mode}"',
        {name: [r[key] for r in history if key in r][-1] for name, key in dashboard.items()},
    )

    def exported(seen: dict, name: str) -> list[float]:
        return [value for labels, value in seen.get(name, []) if ours in labels]

    # The agent publishes what the driver pushed every few seconds: wait for the last step's values.
    found = _scrape_until_all_exported(
        _node_metrics_url(),
        tuple(dashboard),
        timeout_s=40,
        settled=lambda seen: all(exported(seen, name)[-1:] == [last[name]] for name in dashboard),
    )
    for name in dashboard:
        assert exported(found, name)[-1:] == [last[name]], (name, exported(found, name), last[name])


def test_group_admission_resumes_mid_batch_with_the_same_groups_and_seeds():
    data = [PromptExample(index=i, ground_truth=str(i), prompt=f"{i}=") for i in range(10)]
    running = GroupAdmission(PromptLoader(data, batch_size=4, seed=3), seed=5)
    taken = [running.next() for _ in range(6)]  # a batch and a half
    state = running.state_dict()
    resumed = GroupAdmission(PromptLoader(data, batch_size=4, seed=3), seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    ahead = [running.next() for _ in range(7)]  # across an epoch boundary, too
    assert [resumed.next() for _ in range(7)] == ahead
    assert [group_id for group_id, _, _ in taken + ahead] == [f"g{i}" for i in range(13)]
    # The groups of one batch share the batch's seed, mixed with each prompt's row, as in the synchronous loop.
    first_batch = [(example.index, seed) for _, example, seed in taken[:4]]
    assert [seed for _, seed in first_batch] == [request_seed(5 * 100_003, index) for index, _ in first_batch]
