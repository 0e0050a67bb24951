"""Build, deploy and remove a serving application on the Ray cluster."""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.handle import DeploymentHandle

from raylane.serving.config import ServingConfig
from raylane.serving.deployment import LLMServer
from raylane.serving.grpc_service import GRPC_SERVICER_FUNCTION
from raylane.serving.ingress import OpenAIIngress
from raylane.serving.weights import delete_weight_store

logger = logging.getLogger(__name__)


def build_app(config: ServingConfig) -> serve.Application:
    """The Serve application: an `OpenAIIngress` routing to one `LLMServer` deployment per model."""
    models = {
        m.name: LLMServer.options(**m.deployment_options()).bind(m, config.app_name) for m in config.models
    }
    return OpenAIIngress.bind(models)


def start_proxies(config: ServingConfig) -> None:
    """Start Serve on the connected Ray cluster with HTTP (and gRPC) proxies at the configured addresses.

    The proxies are shared by every application on the cluster and keep the addresses they were
    first started with; if Serve already runs, this is a no-op and the running addresses stay.
    """
    grpc_options = None
    if config.grpc_port is not None:
        grpc_options = gRPCOptions(port=config.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION])
    serve.start(http_options={"host": config.host, "port": config.port}, grpc_options=grpc_options)


def deploy(config: ServingConfig) -> DeploymentHandle:
    """Start the proxies if needed, deploy the application and wait until every replica is ready."""
    start_proxies(config)
    handle = serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    logger.info(
        "serving %s as application %r on http://%s:%d%s",
        [m.name for m in config.models],
        config.app_name,
        config.host,
        config.port,
        config.route_prefix,
    )
    return handle


def undeploy(config: ServingConfig) -> None:
    """Delete the application and the weight stores of its models."""
    serve.delete(config.app_name)
    for model in config.models:
        delete_weight_store(config.app_name, model.name)
