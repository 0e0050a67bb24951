"""Single controllers on the driver: the RL job's config and dataflow (synchronous or streaming
asynchronous), its metrics and loggers, and weight-sync planning."""

from raylane.controllers.async_rl import AsyncRLJob
from raylane.controllers.config import (
    AlgorithmConfig,
    AsyncRLConfig,
    JobConfig,
    LoggersConfig,
    ModelSpec,
    PlacementConfig,
    SFTConfig,
    TaskConfig,
)
from raylane.controllers.loggers import StepLogger, TensorBoardLogger, WandbLogger, make_loggers
from raylane.controllers.metrics import MetricsTracker, progress_line
from raylane.controllers.rl import RLJob, compute_batch_advantages, mean_rows, run_job
from raylane.controllers.weight_sync import SyncReport, WeightSync

__all__ = [
    "AlgorithmConfig",
    "AsyncRLConfig",
    "AsyncRLJob",
    "JobConfig",
    "LoggersConfig",
    "MetricsTracker",
    "ModelSpec",
    "PlacementConfig",
    "RLJob",
    "SFTConfig",
    "StepLogger",
    "SyncReport",
    "TaskConfig",
    "TensorBoardLogger",
    "WandbLogger",
    "WeightSync",
    "compute_batch_advantages",
    "make_loggers",
    "mean_rows",
    "progress_line",
    "run_job",
]
