"""Weight resharding, the worker side: plans (:mod:`.plan`), their execution over point-to-point
sends and receives (:mod:`.transport`) and the trainer / rollout roles (:mod:`.roles`).

The driver side, which plans once and triggers each sync, is :mod:`raylane.controllers.weight_sync`.
"""

from raylane.actors.weight_transfer.plan import (
    Bucket,
    FSDPLayout,
    Message,
    ParamSpec,
    PlanSummary,
    SliceCopy,
    SourceInfo,
    TargetInfo,
    TPLayout,
    TransferPlan,
    TransferStats,
    WeightSyncError,
    fsdp_local_shards,
    param_specs,
)
from raylane.actors.weight_transfer.roles import WeightSyncSource, WeightSyncTarget
from raylane.actors.weight_transfer.transport import (
    WeightSyncChannel,
    join_weight_sync_group,
    pack_message,
    run_transfer,
    unpack_message,
)

__all__ = [
    "Bucket",
    "FSDPLayout",
    "Message",
    "ParamSpec",
    "PlanSummary",
    "SliceCopy",
    "SourceInfo",
    "TPLayout",
    "TargetInfo",
    "TransferPlan",
    "TransferStats",
    "WeightSyncChannel",
    "WeightSyncError",
    "WeightSyncSource",
    "WeightSyncTarget",
    "fsdp_local_shards",
    "join_weight_sync_group",
    "pack_message",
    "param_specs",
    "run_transfer",
    "unpack_message",
]
