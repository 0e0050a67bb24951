"""Weight resharding from trainers' FSDP shards to engines' tensor-parallel shards: the plan
(:mod:`.plan`), its execution over point-to-point sends and receives (:mod:`.transport`) and the
endpoints a trainer role and a rollout role mix in (:mod:`.endpoints`).

The driver side, which plans once and triggers each sync, is :mod:`raylane.controllers.weight_sync`.
"""

from raylane.weight_transfer.endpoints import WeightSyncSource, WeightSyncTarget
from raylane.weight_transfer.plan import (
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
    WeightSyncConfig,
    WeightSyncError,
    fsdp_local_shards,
    param_specs,
    plan_between,
    plan_weight_transfer,
)
from raylane.weight_transfer.transport import (
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
    "WeightSyncConfig",
    "WeightSyncError",
    "WeightSyncSource",
    "WeightSyncTarget",
    "fsdp_local_shards",
    "join_weight_sync_group",
    "pack_message",
    "param_specs",
    "plan_between",
    "plan_weight_transfer",
    "run_transfer",
    "unpack_message",
]
