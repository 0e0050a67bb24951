"""Single controllers on the driver: the RL job's config and dataflow (synchronous or streaming
asynchronous), its metrics, and weight-sync planning."""

from raylane.controllers.async_rl import AsyncRLJob
from raylane.controllers.config import (
    AlgorithmConfig,
    AsyncRLConfig,
    JobConfig,
    ModelSpec,
    PlacementConfig,
    SFTConfig,
    TaskConfig,
)
from raylane.controllers.metrics import MetricsTracker
from raylane.controllers.rl import RLJob, compute_batch_advantages, mean_rows, run_job
from raylane.controllers.weight_sync import SyncReport, WeightSync

__all__ = [
    "AlgorithmConfig",
    "AsyncRLConfig",
    "AsyncRLJob",
    "JobConfig",
    "MetricsTracker",
    "ModelSpec",
    "PlacementConfig",
    "RLJob",
    "SFTConfig",
    "SyncReport",
    "TaskConfig",
    "WeightSync",
    "compute_batch_advantages",
    "mean_rows",
    "run_job",
]
