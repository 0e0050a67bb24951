"""Partial rollouts on a real engine: a group interrupted by a weight update continues correctly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raylane.models import load_model, make_tiny_model
from raylane.rlhf import TrajectoryGroup, log_probs_from_logits
from raylane.roles import RolloutConfig
from raylane.roles.partial_rollout import GroupRequest, PartialRollouts
from raylane.runner import EngineConfig, LLMEngine

REQUEST = GroupRequest(
    group_id="g0",
    prompt_index=0,
    prompt="partial rollout",
    messages=None,
    ground_truth="x",
    reward_fn="exact_match",
    extra=None,
    seed=7,
)
UPDATE_AFTER = 4  # engine steps, so tokens, before the new weights land


@pytest.fixture(scope="module")
def new_policy(tmp_path_factory):
    return load_model(make_tiny_model(str(tmp_path_factory.mktemp("new")), seed=3, std=0.3))


def generate(model_dir: str, mode: str, new_policy=None) -> tuple[TrajectoryGroup, int]:
    """One group of 3 samples; with ``new_policy``, loaded as version 1 after UPDATE_AFTER steps."""
    engine = LLMEngine(EngineConfig(model=model_dir))
    partial = PartialRollouts(engine, RolloutConfig(n=3, max_tokens=12, temperature=1.0), mode)
    partial.admit(REQUEST, engine.tokenizer.encode(REQUEST.prompt))
    steps = 0
    while engine.has_unfinished_requests():
        if steps == UPDATE_AFTER and new_policy is not None:
            engine.update_weights(new_policy.named_parameters(), version=1)
        partial.before_step()
        for out in engine.step(return_unfinished=False):
            partial.take(out)
        steps += 1
    (group,) = partial.pop_finished()
    return group, partial.resumed_samples


def recomputed_log_probs(model, prompt_ids, response_ids) -> list[float]:
    """Each response token's log-prob under ``model``, computed over the whole sequence at once."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids)[:, len(prompt_ids) - 1 : -1]
    return log_probs_from_logits(logits.float(), torch.tensor([list(response_ids)]))[0].tolist()


@pytest.mark.parametrize("mode", ["abort_resume", "keep"])
def test_a_sample_interrupted_by_an_update_continues_correctly(tiny_model_dir, new_policy, mode):
    reference, _ = generate(tiny_model_dir, mode)
    group, resumed = generate(tiny_model_dir, mode, new_policy)
    assert group.uids == ("g0-0", "g0-1", "g0-2") and group.start_version == 0
    crossed = 0
    for before, after in zip(reference.trajectories, group.trajectories):
        kept = min(UPDATE_AFTER, len(before.response_ids))
        # The tokens sampled before the update are unchanged, with the log-probs they were sampled with.
        assert after.response_ids[:kept] == before.response_ids[:kept]
        assert after.behaviour_log_probs[:kept] == before.behaviour_log_probs[:kept]
        # Every token carries the version that produced it.
        assert after.weight_versions == (0,) * kept + (1,) * (len(after.response_ids) - kept)
        if len(after.response_ids) > kept:
            crossed += 1
            new = recomputed_log_probs(new_policy, after.prompt_ids, after.response_ids)[kept:]
            continued = after.behaviour_log_probs[kept:]
            if mode == "abort_resume":
                # The prefix was recomputed by the new weights: the continuation is the new policy's.
                assert continued == pytest.approx(new, abs=1e-4)
            else:
                # The old weights' KV cache stays: the continuation is not exactly the new policy's.
                assert continued != pytest.approx(new, abs=1e-4)
    assert crossed > 0
    assert resumed == (crossed if mode == "abort_resume" else 0)


def test_a_group_still_queued_at_an_update_is_left_to_the_new_weights(tiny_model_dir, new_policy):
    """abort_resume continues the samples the old weights touched; a group not yet started is not
    split into continuations: the new weights generate it from its prompt, as admitted."""
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, max_num_seqs=3))
    partial = PartialRollouts(engine, RolloutConfig(n=3, max_tokens=12, temperature=1.0), "abort_resume")
    queued = dataclasses.replace(REQUEST, group_id="g1", seed=11)
    for request in (REQUEST, queued):
        partial.admit(request, engine.tokenizer.encode(request.prompt))
    for out in engine.step(return_unfinished=False):
        partial.take(out)
    assert engine.has_started("g0") and not engine.has_started("g1")  # g0's samples fill the engine
    engine.update_weights(new_policy.named_parameters(), version=1)
    while engine.has_unfinished_requests():
        partial.before_step()
        for out in engine.step(return_unfinished=False):
            partial.take(out)
    groups = {group.group_id: group for group in partial.pop_finished()}
    crossed = sum(len(t.response_ids) > 1 for t in groups["g0"].trajectories)
    assert partial.resumed_samples == crossed  # g0's samples only
    for trajectory in groups["g1"].trajectories:
        assert trajectory.weight_versions == (1,) * len(trajectory.response_ids)
        new = recomputed_log_probs(new_policy, trajectory.prompt_ids, trajectory.response_ids)
        assert trajectory.behaviour_log_probs == pytest.approx(new, abs=1e-4)


def test_yield_ends_the_stream_call_in_progress_and_loses_nothing(tiny_model_dir, ray_cluster):
    """A weight sync asks the engine to yield: its long call returns after the current step, with
    samples still in flight, and the next call finishes them; every group reaches the stream once."""
    import threading

    from raylane.roles import Rollout
    from raylane.streaming import StreamConfig, open_rollout_stream

    config = RolloutConfig(n=2, max_tokens=40, temperature=1.0, engine={"max_num_seqs": 1})
    rollout = Rollout(tiny_model_dir, config)
    stream = open_rollout_stream(StreamConfig(stream_key="yield-test"), "trainer")
    rollout.open_stream(stream, "abort_resume")
    requests = [
        GroupRequest(f"g{i}", i, f"prompt {i}", None, "x", "exact_match", None, seed=i) for i in range(8)
    ]
    reports = []
    call = threading.Thread(target=lambda: reports.append(rollout.stream_generate(requests, 100_000)))
    call.start()
    rollout.yield_stream()
    call.join(timeout=60)
    (first,) = reports
    # One sequence at a time over 16 samples of up to 40 tokens: far from done when it yields.
    assert first.samples_in_flight > 0
    second = rollout.stream_generate([], 100_000)
    assert second.samples_in_flight == 0
    finished = [group_id for report in (first, second) for group_id, _ in report.finished]
    assert sorted(finished) == sorted(r.group_id for r in requests)
    entries = stream.get(16)
    assert sorted(e.group.group_id for e in entries) == sorted(finished)
