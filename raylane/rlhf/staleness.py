"""The staleness bound of asynchronous RL: admission by capacity (AReaL's rule) plus oldest-first batches.

Versions count policy updates: version ``v`` is the policy after ``v`` updates, and the batch it
trains on turns it into ``v + 1``. A group's staleness is ``v - start_version``, the updates between
the policy its generation started under and the one that trains on it; every token was produced
at a version >= ``start_version``, so no token is staler than its group.

Each update consumes ``batch_groups`` groups. Two rules keep every group's staleness <= η without
throwing finished work away:

- **admission**: a group may start at version ``v`` only while fewer than ``(v + η + 1) * batch_groups``
  have started in all;
- **oldest first**: batches take groups in the order of their start versions (ties in any order),
  so the trainer waits while an older group than the ones ready is still generating.

Why it holds: every group started at a version <= ``s`` was admitted while fewer than
``(s + η + 1) * batch_groups`` had started, so there are at most that many; taken oldest first, they
all fit in the batches trained at versions ``0 .. s + η``. With η = 0 it is the synchronous loop:
one batch admitted per version, trained by that version. (Letting a younger ready group overtake an
older one still generating breaks the bound: old groups pile up behind the long tail.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StalenessBound:
    """``batch_groups`` groups per update, no group trained more than ``max_staleness`` versions late."""

    batch_groups: int
    max_staleness: int

    def __post_init__(self) -> None:
        if self.batch_groups < 1 or self.max_staleness < 0:
            raise ValueError(
                f"batch_groups must be >= 1 and max_staleness >= 0, got {self.batch_groups} and "
                f"{self.max_staleness}"
            )

    def admission_capacity(self, version: int, started: int) -> int:
        """How many more groups may start now, at ``version``, when ``started`` have started in all
        (generating, waiting and trained alike)."""
        return max(0, (version + self.max_staleness + 1) * self.batch_groups - started)

    def select_batch(
        self, ready_start_versions: Sequence[int], generating_start_versions: Sequence[int]
    ) -> list[int] | None:
        """Indices (ascending) of the ready groups that form the next batch, or None to wait: the batch
        is the ``batch_groups`` oldest groups not yet trained, and one of them is still generating.
        Among groups of the same start version, ready ones go first, the earlier-ready first."""
        if len(ready_start_versions) < self.batch_groups:
            return None
        cutoff = sorted([*ready_start_versions, *generating_start_versions])[self.batch_groups - 1]
        if any(start < cutoff for start in generating_start_versions):
            return None
        older = [i for i, start in enumerate(ready_start_versions) if start < cutoff]
        same = [i for i, start in enumerate(ready_start_versions) if start == cutoff]
        if len(older) + len(same) < self.batch_groups:
            return None
        return sorted(older + same[: self.batch_groups - len(older)])
