"""Finished trajectories as the rollout stream carries them, and their JSON encoding.

A trajectory keeps everything the trainer needs without asking the engine again: the token ids,
the behaviour log-prob of every sampled token, and the policy version that produced every token
(a partial rollout continued across a weight update has several). ``start_version`` is the
version at which its generation started; the staleness rule reasons about it. Samples of one
prompt form a group (GRPO normalises within it), and a group is the unit the stream stores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from raylane.batch import Batch


@dataclass(frozen=True)
class Trajectory:
    """One sampled response to one prompt; ``uid`` is unique over the whole job."""

    uid: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    behaviour_log_probs: tuple[float, ...]
    weight_versions: tuple[int, ...]
    score: float
    start_version: int

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if len(self.behaviour_log_probs) != n or len(self.weight_versions) != n:
            raise ValueError(
                f"trajectory {self.uid!r}: response_ids ({n}), behaviour_log_probs "
                f"({len(self.behaviour_log_probs)}) and weight_versions ({len(self.weight_versions)}) "
                "need one entry per response token"
            )
        # Versions only grow while a request runs, and none precedes the version it started under.
        if any(b < a for a, b in zip(self.weight_versions, self.weight_versions[1:])) or (
            n and self.weight_versions[0] < self.start_version
        ):
            raise ValueError(
                f"trajectory {self.uid!r}: weight_versions must be non-decreasing and >= start_version "
                f"({self.start_version}), got {list(self.weight_versions)}"
            )


@dataclass(frozen=True)
class TrajectoryGroup:
    """The samples of one prompt: ``prompt_index`` is the dataset row, ``group_id`` unique over the job."""

    group_id: str
    prompt_index: int
    trajectories: tuple[Trajectory, ...]

    def __post_init__(self) -> None:
        if not self.trajectories:
            raise ValueError(f"trajectory group {self.group_id!r} is empty")
        uids = self.uids
        if len(set(uids)) != len(uids):
            raise ValueError(f"trajectory group {self.group_id!r} repeats a uid: {list(uids)}")

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(t.uid for t in self.trajectories)

    @property
    def start_version(self) -> int:
        """The oldest version any sample of the group started under."""
        return min(t.start_version for t in self.trajectories)

    def encode(self) -> bytes:
        """JSON bytes; Python floats round-trip exactly, so log-probs come back bit for bit."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | str) -> TrajectoryGroup:
        raw = json.loads(data)
        trajectories = tuple(
            Trajectory(
                uid=t["uid"],
                prompt_ids=tuple(t["prompt_ids"]),
                response_ids=tuple(t["response_ids"]),
                behaviour_log_probs=tuple(t["behaviour_log_probs"]),
                weight_versions=tuple(t["weight_versions"]),
                score=t["score"],
                start_version=t["start_version"],
            )
            for t in raw["trajectories"]
        )
        return cls(group_id=raw["group_id"], prompt_index=raw["prompt_index"], trajectories=trajectories)


def sample_tensors(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    log_probs: Sequence[Sequence[float]],
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """The trainer's layout of sampled rows: prompts left-padded and responses right-padded to the
    longest of each, ``attention_mask``, ``response_mask`` and the sampled ``rollout_log_probs``."""
    prompt_len = max(map(len, prompt_ids))
    response_len = max(1, max(map(len, response_ids)))
    pad = pad_token_id
    # Rows are built as lists and turned into tensors once: a thousand small tensor writes per
    # batch cost more than the engine's own work on short responses.
    prompts, responses, attention, response_mask, padded_log_probs = [], [], [], [], []
    for ids, out, lp in zip(prompt_ids, response_ids, log_probs):
        ids, out = list(ids), list(out)
        left, right = prompt_len - len(ids), response_len - len(out)
        prompts.append([pad] * left + ids)
        responses.append(out + [pad] * right)
        attention.append([0] * left + [1] * (len(ids) + len(out)) + [0] * right)
        response_mask.append([1.0] * len(out) + [0.0] * right)
        padded_log_probs.append(list(lp) + [0.0] * right)
    return {
        "prompts": torch.tensor(prompts, dtype=torch.long),
        "responses": torch.tensor(responses, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
        "response_mask": torch.tensor(response_mask),
        "rollout_log_probs": torch.tensor(padded_log_probs),
    }


def concat_samples(batches: Sequence[Batch]) -> Batch:
    """The rows of ``batches`` (each in :func:`sample_tensors`' layout, with ``pad_token_id`` in its
    meta) in order, re-padded to the longest prompt and response of them all: each engine pads only
    to the longest of its own rows, so the shards of one generate call differ in width."""
    prompt_len = max(batch["prompts"].shape[1] for batch in batches)
    response_len = max(batch["responses"].shape[1] for batch in batches)
    widened = []
    for batch in batches:
        left = prompt_len - batch["prompts"].shape[1]
        right = response_len - batch["responses"].shape[1]
        pad = batch.meta["pad_token_id"]
        tensors = {
            **batch.tensors,
            "prompts": F.pad(batch["prompts"], (left, 0), value=pad),
            "responses": F.pad(batch["responses"], (0, right), value=pad),
            "attention_mask": F.pad(batch["attention_mask"], (left, right)),
            "response_mask": F.pad(batch["response_mask"], (0, right)),
            "rollout_log_probs": F.pad(batch["rollout_log_probs"], (0, right)),
        }
        widened.append(Batch(tensors, batch.non_tensors, batch.meta, num_padding=batch.num_padding))
    return Batch.concat(widened)


def groups_to_batch(groups: Sequence[TrajectoryGroup], pad_token_id: int) -> Batch:
    """The rows of ``groups`` (group-major) in the trainer's layout (see :func:`sample_tensors`),
    with ``scores``, ``uid`` (the group id: GRPO normalises within it), ``trajectory_uid``,
    ``weight_version`` (the oldest of each row's tokens) and ``start_version``."""
    rows = [t for group in groups for t in group.trajectories]
    tensors = sample_tensors(
        [t.prompt_ids for t in rows],
        [t.response_ids for t in rows],
        [t.behaviour_log_probs for t in rows],
        pad_token_id,
    )
    return Batch.from_dict(
        {
            **tensors,
            "scores": torch.tensor([t.score for t in rows]),
            "weight_version": torch.tensor([min(t.weight_versions, default=t.start_version) for t in rows]),
            "start_version": torch.tensor([t.start_version for t in rows]),
            "uid": [group.group_id for group in groups for _ in group.trajectories],
            "trajectory_uid": [t.uid for t in rows],
        }
    )
