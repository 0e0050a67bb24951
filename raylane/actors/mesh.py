"""The data-parallel x tensor-parallel layout of a role's ranks, and its torch DeviceMesh."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MeshLayout", "build_device_mesh"]


@dataclass(frozen=True)
class MeshLayout:
    """``dp`` groups of ``tp`` consecutive ranks: rank = dp_rank * tp + tp_rank.

    TP is the inner dimension so each tensor-parallel group is a run of neighbouring
    ranks, which a PACK pool places on one node (TP traffic is the heaviest).
    """

    dp: int
    tp: int = 1

    def __post_init__(self) -> None:
        if self.dp < 1 or self.tp < 1:
            raise ValueError(f"mesh sizes must be >= 1, got dp={self.dp}, tp={self.tp}")

    @classmethod
    def for_world(cls, world_size: int, tp: int) -> MeshLayout:
        """The layout of ``world_size`` ranks in TP groups of ``tp``."""
        if tp < 1 or world_size % tp:
            raise ValueError(f"tp_size={tp} does not divide the group's {world_size} ranks")
        return cls(dp=world_size // tp, tp=tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_leaders(self) -> list[int]:
        """The rank with tp_rank 0 of every DP group, in DP order."""
        return [d * self.tp for d in range(self.dp)]


def build_device_mesh(device: torch.device, layout: MeshLayout) -> DeviceMesh:
    """A 2-D DeviceMesh with dims ``("dp", "tp")``; collective: every rank must call it."""
    return init_device_mesh(device.type, (layout.dp, layout.tp), mesh_dim_names=("dp", "tp"))
