"""Single controllers on the driver: the RL job's config and dataflow (synchronous or streaming
asynchronous), its metrics and loggers, weight-sync planning and the elastic rollout pool."""

from raylane.controllers.async_rl import AsyncRLJob, RolloutEngineDiedError
from raylane.controllers.config import (
    AlgorithmConfig,
    AsyncRLConfig,
    JobConfig,
    LoggersConfig,
    ModelSpec,
    PlacementConfig,
    RolloutPoolConfig,
    SFTConfig,
    TaskConfig,
)
from raylane.controllers.loggers import StepLogger, TensorBoardLogger, WandbLogger, make_loggers
from raylane.controllers.metrics import MetricsTracker, progress_line
from raylane.controllers.rl import RLJob, compute_batch_advantages, mean_rows, run_job
from raylane.controllers.rollout_pool import RolloutPool, RolloutPoolError, request_scale, rollout_status
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
    "RolloutEngineDiedError",
    "RolloutPool",
    "RolloutPoolConfig",
    "RolloutPoolError",
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
    "request_scale",
    "rollout_status",
    "run_job",
]
