"""Ray Serve deployments of the runner: OpenAI-compatible HTTP, gRPC, autoscaling, weight hot-swap.

An application is an `OpenAIIngress` (HTTP `/v1/completions`, `/v1/chat/completions`,
`/v1/models`; gRPC `raylane.serving.v1.LLMService`) routing by model name to each model's
`ModelServer`, which holds an `AsyncLLMEngine`: for one model, in the ingress's own replicas
(one deployment, ``LLMServer-<model>``), else in one `LLMServer` deployment per model
(`ServingConfig.ingress`)::

    RAYLANE_API_KEY=secret raylane serve --model outputs/tiny-model --port 8000 --grpc-port 9000 --max-replicas 4

    config = ServingConfig(models=[ModelDeploymentConfig.from_path("outputs/tiny-model", name="policy")])
    deploy(config)                                        # on the connected Ray cluster
    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret").completions.create(model="policy", prompt="Hi")
    LLMClient("127.0.0.1:9000", application="raylane", api_key="secret").generate_stream("Hi", model="policy")
    publish_weights("raylane", "policy", trainer_state_dict.items(), version=step)  # every replica, in place

Exports resolve on first use: Serve's gRPC proxy and the ingress replica import submodules of
this package (`proto`, `ingress`) and must not pay for loading torch and the engine, which only
the model replicas run.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AutoscalingSettings": "raylane.serving.config",
    "BadRequestError": "raylane.serving.errors",
    "GRPC_SERVICER_FUNCTION": "raylane.serving.grpc_service",
    "LLMClient": "raylane.serving.client",
    "LLMServer": "raylane.serving.deployment",
    "ModelDeploymentConfig": "raylane.serving.config",
    "ModelNotFoundError": "raylane.serving.errors",
    "ModelServer": "raylane.serving.deployment",
    "OpenAIIngress": "raylane.serving.ingress",
    "OverloadedError": "raylane.serving.errors",
    "PayloadTooLargeError": "raylane.serving.errors",
    "RequestLimits": "raylane.serving.config",
    "ServingConfig": "raylane.serving.config",
    "ServingError": "raylane.serving.errors",
    "UnauthorizedError": "raylane.serving.errors",
    "WeightPublishConfig": "raylane.serving.weights",
    "WeightStore": "raylane.serving.weights",
    "build_app": "raylane.serving.app",
    "build_app_from_args": "raylane.serving.builder",
    "deploy": "raylane.serving.app",
    "deployment_name_for": "raylane.serving.config",
    "direct_ingress_urls": "raylane.serving.app",
    "publish_weights": "raylane.serving.weights",
    "start_proxies": "raylane.serving.app",
    "undeploy": "raylane.serving.app",
}

__all__ = [
    "GRPC_SERVICER_FUNCTION",
    "AutoscalingSettings",
    "BadRequestError",
    "LLMClient",
    "LLMServer",
    "ModelDeploymentConfig",
    "ModelNotFoundError",
    "ModelServer",
    "OpenAIIngress",
    "OverloadedError",
    "PayloadTooLargeError",
    "RequestLimits",
    "ServingConfig",
    "ServingError",
    "UnauthorizedError",
    "WeightPublishConfig",
    "WeightStore",
    "build_app",
    "build_app_from_args",
    "deploy",
    "deployment_name_for",
    "direct_ingress_urls",
    "publish_weights",
    "start_proxies",
    "undeploy",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raylane.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
