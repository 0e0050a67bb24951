"""The staleness bound of asynchronous RL: admission by capacity (AReaL's rule) plus deadline-aware batches.

Versions count policy updates: version ``v`` is the policy after ``v`` updates, and the batch it
trains on turns it into ``v + 1``. A group's staleness is ``v - start_version``, the updates between
the policy its generation started under and the one that trains on it; every token was produced
at a version >= ``start_version``, so no token is staler than its group.

Each update consumes ``batch_groups`` groups. Two rules keep every group's staleness within the
bound ``b`` without throwing finished work away:

- **admission**: a group may start at version ``v`` only while fewer than
  ``(v + max_staleness + 1) * batch_groups + extra_groups`` have started in all;
- **deadlines**: a group started at ``s`` must be trained by version ``s + b``. A batch is the
  ``batch_groups`` oldest *ready* groups (so a short young group may overtake a long old one still
  generating) as long as every deadline stays reachable: after it, at most ``(t - v) * batch_groups``
  untrained groups (ready or generating) may be due by each later version ``t``. Otherwise the
  trainer waits for older groups to finish.

Why it holds: with ``b = max_staleness + ceil(extra_groups / batch_groups)``, every group started at
a version <= ``s`` was admitted while fewer than ``(s + b + 1) * batch_groups`` had started, so at
most that many are due by ``s + b``: the batches of versions ``0 .. s + b`` can hold them all, and a
batch is only formed when the ones after it still can. With ``b = 0`` it is the synchronous loop:
one batch admitted per version, all of it trained at that version. ``extra_groups`` is APRIL's
over-provisioning: more groups generate than the bound alone admits, and each ``batch_groups`` of
them (rounded up) buys one version of staleness, as the partial rollouts they leave behind are
continued into later batches.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StalenessBound:
    """``batch_groups`` groups per update, no group trained more than :attr:`bound` versions late."""

    batch_groups: int
    max_staleness: int
    extra_groups: int = 0

    def __post_init__(self) -> None:
        if self.batch_groups < 1 or self.max_staleness < 0 or self.extra_groups < 0:
            raise ValueError(
                f"batch_groups must be >= 1, max_staleness >= 0 and extra_groups >= 0, got "
                f"{self.batch_groups}, {self.max_staleness} and {self.extra_groups}"
            )

    @property
    def bound(self) -> int:
        """The staleness no trained group exceeds: ``max_staleness`` plus what over-provisioning adds."""
        return self.max_staleness + math.ceil(self.extra_groups / self.batch_groups)

    def admission_capacity(self, version: int, started: int) -> int:
        """How many more groups may start now, at ``version``, when ``started`` have started in all
        (generating, waiting and trained alike)."""
        return max(0, (version + self.max_staleness + 1) * self.batch_groups + self.extra_groups - started)

    def select_batch(
        self, version: int, ready_start_versions: Sequence[int], generating_start_versions: Sequence[int]
    ) -> list[int] | None:
        """Indices (ascending) of the ready groups that form the batch trained at ``version``, or None
        to wait: the ``batch_groups`` oldest ready groups, earlier-ready first among equals, provided
        that no group due now is still generating and every later deadline stays reachable."""
        due = version - self.bound  # groups started at or before this are due now
        if any(start <= due for start in generating_start_versions):
            return None
        if len(ready_start_versions) < self.batch_groups:
            return None
        order = sorted(range(len(ready_start_versions)), key=lambda i: ready_start_versions[i])
        chosen = order[: self.batch_groups]
        left = Counter(ready_start_versions[i] for i in order[self.batch_groups :])
        left.update(generating_start_versions)
        if any(start <= due for start in left):
            raise RuntimeError(
                f"more than {self.batch_groups} groups are due at version {version}: they were admitted "
                "past the capacity rule"
            )
        # Due by version t: the groups started at or before t - bound; t - version batches remain for them.
        pending = 0
        for start in sorted(left):
            pending += left[start]
            if pending > (start + self.bound - version) * self.batch_groups:
                return None
        return sorted(chosen)
