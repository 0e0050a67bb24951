"""Single controllers on the driver: the RL job's config and dataflow, its metrics, and weight-sync planning."""

from raylane.controllers.config import (
    AlgorithmConfig,
    JobConfig,
    ModelSpec,
    PlacementConfig,
    SFTConfig,
    TaskConfig,
)
from raylane.controllers.metrics import MetricsTracker, progress_line
from raylane.controllers.rl import RLJob, compute_batch_advantages, mean_rows, run_job
from raylane.controllers.weight_sync import SyncReport, WeightSync

__all__ = [
    "AlgorithmConfig",
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
    "progress_line",
    "run_job",
]
