"""The rows that several rollout ranks generate for one call are merged into one batch even though
each rank pads only to the longest prompt and response of its own shard."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from raylane.actors.dispatch import CallPlan, method_spec
from raylane.batch import Batch
from raylane.rlhf import concat_samples, sample_tensors
from raylane.roles import Rollout

PAD = 7
# Two shards whose longest prompts (3 vs 5 tokens) and responses (4 vs 1) differ.
SHARDS = [
    ([[1, 2, 3], [4]], [[10, 11, 12, 13], [14]]),
    ([[5, 6, 7, 8, 9], [2, 3]], [[15], []]),
]


def _shard_batch(prompts, responses, version: int) -> Batch:
    log_probs = [[-0.5 - i for i in range(len(r))] for r in responses]
    tensors = sample_tensors(prompts, responses, log_probs, PAD)
    tensors["weight_version"] = torch.full((len(prompts),), version)
    return Batch(tensors, {"response_text": [str(r) for r in responses]}, {"pad_token_id": PAD, "n": 1})


def test_concat_samples_equals_padding_all_rows_at_once():
    merged = concat_samples([_shard_batch(p, r, v) for v, (p, r) in enumerate(SHARDS)])
    prompts = [p for shard_prompts, _ in SHARDS for p in shard_prompts]
    responses = [r for _, shard_responses in SHARDS for r in shard_responses]
    log_probs = [[-0.5 - i for i in range(len(r))] for r in responses]
    expected = sample_tensors(prompts, responses, log_probs, PAD)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    assert merged["weight_version"].tolist() == [0, 0, 1, 1]
    assert list(merged["response_text"]) == [str(r) for r in responses]


def test_rollout_generate_merges_its_ranks_shards_of_different_widths():
    mode = method_spec(Rollout.generate).mode
    plan = CallPlan([], SimpleNamespace(rows=4, padding=0))
    merged = mode.collect(None, plan, [_shard_batch(p, r, 0) for p, r in SHARDS])
    assert merged["prompts"].shape == (4, 5) and merged["responses"].shape == (4, 4)
    assert merged["response_mask"].sum(dim=1).tolist() == [4, 1, 1, 0]
