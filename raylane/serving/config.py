"""Typed configuration of a serving application: which models, how many replicas, which ports.

The defaults are sized for a continuous-batching engine: one replica batches up to
``EngineConfig.max_num_seqs`` sequences per step, so it should be offered hundreds of
concurrent requests, not the handful Ray Serve assumes for a request-at-a-time model.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from raylane.config import StrictConfig
from raylane.runner.config import EngineConfig


class AutoscalingSettings(StrictConfig):
    """Ray Serve autoscaling of one model's replicas, on the number of ongoing requests per replica."""

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


class RequestLimits(StrictConfig):
    """What one request to a model may ask for; HTTP and gRPC requests are held to the same limits.

    Checked when the request is admitted, before its prompt is tokenized; a request over a limit
    gets a 400 (gRPC INVALID_ARGUMENT) naming the field. Integer fields must also fit the engine's
    int64 tensors (`raylane.runner.SamplingParams`), and prompts its context length.
    """

    max_sequences: int = Field(
        128, ge=1, description="completions one request may ask for: n times its number of prompts"
    )
    max_stop_sequences: int = Field(4, ge=0, description="stop strings per request (OpenAI allows 4)")
    max_stop_chars: int = Field(256, ge=1, description="characters of one stop string")
    max_stop_token_ids: int = Field(64, ge=0, description="stop token ids per request")
    max_tokens: int | None = Field(
        None, ge=1, description="largest max_tokens accepted; default: the context length minus one"
    )


class ModelDeploymentConfig(StrictConfig):
    """One served model: its name in API requests, its engine, and its replicas."""

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
    limits: RequestLimits = Field(default_factory=RequestLimits)
    stream_tokens_per_chunk: int = Field(
        1,
        ge=1,
        le=64,
        description="tokens a streamed chunk gathers after the first token, which goes out alone (1: a "
        "chunk per engine step); fewer chunks cost Serve's proxy and the replica less per request",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs reserved per replica; default: 1 when the engine's device is CUDA, else 0 "
        "(Ray hides the GPUs from an actor that reserves none)",
    )

    @model_validator(mode="after")
    def _gpus_for_a_cuda_engine(self) -> ModelDeploymentConfig:
        if self._cuda and self.num_gpus == 0:
            raise ValueError(
                f"model {self.name!r}: engine device {self.engine.device!r} with num_gpus=0 would run a "
                "replica that sees no GPU; reserve one (num_gpus: 1, or a fraction) or serve on 'cpu'"
            )
        return self

    @classmethod
    def from_path(cls, path: str, name: str | None = None, **fields: Any) -> ModelDeploymentConfig:
        """A model served from the checkpoint folder ``path``; ``name`` defaults to the folder name."""
        engine = fields.pop("engine", {})
        engine = engine if isinstance(engine, EngineConfig) else EngineConfig(model=path, **engine)
        return cls(name=name or _folder_name(path), engine=engine, **fields)

    @property
    def _cuda(self) -> bool:
        return self.engine.device.startswith("cuda")

    @property
    def replica_gpus(self) -> float:
        """GPUs each replica reserves: ``num_gpus``, or by default 1 for a CUDA engine and 0 otherwise."""
        return self.num_gpus if self.num_gpus is not None else float(self._cuda)

    @property
    def deployment_name(self) -> str:
        return deployment_name_for(self.name)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options` for this model's `LLMServer`."""
        options: dict[str, Any] = {
            "name": self.deployment_name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.replica_gpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class ServingConfig(StrictConfig):
    """A serving application: its models, the Serve proxies' addresses and who may call.

    ``host``, ``port`` and ``grpc_port`` configure the cluster's Serve proxies, which are shared
    by every application and fixed when Serve first starts on the cluster. Ray Serve's gRPC proxy
    always listens on every interface (``[::]``), whatever ``host`` says, so gRPC is off unless
    ``grpc_port`` is set, and then needs an API key unless ``grpc_without_api_key`` is set.
    With ``direct_ingress``, each replica of the ingress deployment also listens on ``host`` at a
    port of its own, and a request sent there skips the proxy (see `raylane.serving.app`).
    """

    app_name: str = Field("raylane", min_length=1)
    route_prefix: str = "/"
    models: list[ModelDeploymentConfig] = Field(min_length=1)
    host: str = Field("127.0.0.1", description="HTTP host; 0.0.0.0 listens on every interface")
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="gRPC port, listening on every interface; None: no gRPC"
    )
    grpc_without_api_key: bool = Field(
        False,
        description="allow gRPC without an API key (it listens on every interface: trusted networks only)",
    )
    api_key_env: str | None = Field(
        "RAYLANE_API_KEY", description="environment variable holding the API key; unset or empty: no key"
    )
    api_key_file: str | None = Field(None, description="file holding the API key (wins over api_key_env)")
    max_request_bytes: int = Field(
        2 * 2**20, ge=1, description="largest HTTP body or gRPC message accepted; beyond: 413"
    )
    ingress: Literal["auto", "with_model", "separate"] = Field(
        "auto",
        description="where the HTTP/gRPC ingress runs: 'with_model' in the model's own replicas (one "
        "model only; a streamed chunk crosses one Ray hop, the proxy's), 'separate' in a deployment of "
        "its own that routes to one deployment per model (two hops); auto: with_model for one model",
    )

    direct_ingress: bool = Field(
        False,
        description="the ingress replicas also serve HTTP themselves, each on a port of its own (Ray "
        "Serve's direct ingress; 30000-31000 by default), so a request skips the proxy's hop; the proxy "
        "keeps serving at host:port. Clients must call a replica's address (`direct_ingress_urls`); "
        "Serve must start on the cluster with it (`start_proxies`)",
    )

    @model_validator(mode="after")
    def _unique(self) -> ServingConfig:
        names = [m.name for m in self.models]
        deployments = {m.deployment_name for m in self.models}
        if len(set(names)) != len(names) or len(deployments) != len(names):
            raise ValueError(f"model names must be unique (after mapping to deployment names), got {names}")
        return self

    @model_validator(mode="after")
    def _ingress_fits_the_models(self) -> ServingConfig:
        if self.ingress == "with_model" and len(self.models) > 1:
            raise ValueError(
                f"ingress 'with_model' serves one model, this application has {len(self.models)}: "
                "set ingress to 'separate' or 'auto', or serve one model"
            )
        return self

    @property
    def ingress_with_model(self) -> bool:
        """Whether the ingress runs in the model's replicas (see ``ingress``)."""
        return self.ingress == "with_model" or (self.ingress == "auto" and len(self.models) == 1)


def deployment_name_for(model_name: str) -> str:
    """The Serve deployment serving ``model_name`` (Serve names allow a restricted alphabet)."""
    return "LLMServer-" + re.sub(r"[^A-Za-z0-9_-]", "_", model_name)


def _folder_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path
