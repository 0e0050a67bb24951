"""Typed configuration of a serving application: which models, how many replicas, which ports.

The defaults are sized for a continuous-batching engine: one replica batches up to
``EngineConfig.max_num_seqs`` sequences per step, so it should be offered hundreds of
concurrent requests, not the handful Ray Serve assumes for a request-at-a-time model.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylane.runner.config import EngineConfig


class AutoscalingSettings(BaseModel):
    """Ray Serve autoscaling of one model's replicas, on the number of ongoing requests per replica."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(
        64, gt=0, description="requests per replica the autoscaler aims for"
    )
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0, description="long: a new replica must load a model")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump()


class ModelDeploymentConfig(BaseModel):
    """One served model: its name in API requests, its engine, and its replicas."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, description="the `model` clients send; defaults to the checkpoint folder name"
    )
    engine: EngineConfig
    num_replicas: int = Field(1, ge=1, description="fixed replica count, used when autoscaling is unset")
    autoscaling: AutoscalingSettings | None = None
    max_ongoing_requests: int = Field(256, ge=1, description="requests Serve routes to one replica at once")
    max_queued_requests: int = Field(
        1024,
        ge=-1,
        description="requests Serve queues per caller once replicas are full (-1: unbounded); beyond: 503",
    )
    max_waiting_seqs: int | None = Field(
        512, ge=0, description="sequences the engine queues before answering 503 (None: unbounded)"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica")

    @classmethod
    def from_path(cls, path: str, name: str | None = None, **fields: Any) -> ModelDeploymentConfig:
        """A model served from the checkpoint folder ``path``; ``name`` defaults to the folder name."""
        engine = fields.pop("engine", {})
        engine = engine if isinstance(engine, EngineConfig) else EngineConfig(model=path, **engine)
        return cls(name=name or _folder_name(path), engine=engine, **fields)

    @property
    def deployment_name(self) -> str:
        return deployment_name_for(self.name)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options` for this model's `LLMServer`."""
        options: dict[str, Any] = {
            "name": self.deployment_name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class ServingConfig(BaseModel):
    """A serving application: its models and the Serve proxies' addresses.

    ``host``, ``port`` and ``grpc_port`` configure the cluster's Serve proxies, which are shared
    by every application and fixed when Serve first starts on the cluster.
    """

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field("raylane", min_length=1)
    route_prefix: str = "/"
    models: list[ModelDeploymentConfig] = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(9000, ge=0, le=65535, description="None: no gRPC proxy")

    @model_validator(mode="after")
    def _unique(self) -> ServingConfig:
        names = [m.name for m in self.models]
        deployments = {m.deployment_name for m in self.models}
        if len(set(names)) != len(names) or len(deployments) != len(names):
            raise ValueError(f"model names must be unique (after mapping to deployment names), got {names}")
        return self


def deployment_name_for(model_name: str) -> str:
    """The Serve deployment serving ``model_name`` (Serve names allow a restricted alphabet)."""
    return "LLMServer-" + re.sub(r"[^A-Za-z0-9_-]", "_", model_name)


def _folder_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path
