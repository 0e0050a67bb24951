"""Step metrics to TensorBoard and Weights & Biases, under the names ``metrics.jsonl`` uses.

Both are optional dependencies (the ``loggers`` extra), imported only when the job's
``loggers`` config turns them on.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Protocol

from raylane.controllers.config import LoggersConfig

logger = logging.getLogger(__name__)

__all__ = ["StepLogger", "TensorBoardLogger", "WandbLogger", "make_loggers"]


class StepLogger(Protocol):
    """Receives each step's metrics, keyed as in ``metrics.jsonl``."""

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _optional_import(module: str, setting: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{setting}=true needs the {module} package: pip install 'raylane[loggers]', "
            f"or set {setting}=false"
        ) from None


class TensorBoardLogger:
    """One scalar per metric and step in TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str) -> None:
        tensorboardx = _optional_import("tensorboardX", "loggers.tensorboard")
        self.log_dir = log_dir
        self._writer = tensorboardx.SummaryWriter(log_dir)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        # A step is seconds apart: flushing each keeps TensorBoard current and costs nothing.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A Weights & Biases run: one history row per step, the job's config as the run's config."""

    def __init__(
        self, config: LoggersConfig, output_dir: str, run_name: str, job_config: dict[str, Any]
    ) -> None:
        wandb = _optional_import("wandb", "loggers.wandb")
        self._run = wandb.init(
            project=config.wandb_project,
            entity=config.wandb_entity,
            mode=config.wandb_mode,
            dir=output_dir,
            name=run_name,
            config=job_config,
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


def make_loggers(
    config: LoggersConfig, output_dir: str, run_name: str, job_config: dict[str, Any]
) -> list[StepLogger]:
    """The loggers ``config`` turns on, writing under ``output_dir``."""
    loggers: list[StepLogger] = []
    if config.tensorboard:
        loggers.append(TensorBoardLogger(os.path.join(output_dir, "tensorboard")))
        logger.info("TensorBoard: tensorboard --logdir %s", loggers[-1].log_dir)
    if config.wandb:
        loggers.append(WandbLogger(config, output_dir, run_name, job_config))
    return loggers
