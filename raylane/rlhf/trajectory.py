"""Finished trajectories as the rollout stream carries them, and their JSON encoding.

A trajectory keeps everything the trainer needs without asking the engine again: the token ids,
the behaviour log-prob of every sampled token, and the policy version that produced every token
(a partial rollout continued across a weight update has several). ``start_version`` is the
version at which its generation started; the staleness rule reasons about it. Samples of one
prompt form a group (GRPO normalises within it), and a group is the unit the stream stores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


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
