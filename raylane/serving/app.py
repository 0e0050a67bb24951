"""Build, deploy and remove a serving application on the Ray cluster."""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle

from raylane.models import check_checkpoint
from raylane.serving.auth import key_digest, read_api_key
from raylane.serving.config import ServingConfig
from raylane.serving.deployment import LLMServer
from raylane.serving.grpc_service import GRPC_SERVICER_FUNCTION
from raylane.serving.ingress import OpenAIIngress
from raylane.serving.weights import delete_weight_store

logger = logging.getLogger(__name__)


# Ray Serve's gRPC proxy binds this address whatever the HTTP host is (ray.serve._private.grpc_util).
GRPC_LISTEN_HOST = "[::]"


def build_app(config: ServingConfig, api_key: str | None = None) -> serve.Application:
    """The Serve application: an `OpenAIIngress` routing to one `LLMServer` deployment per model, or,
    with the ingress in the model's replicas (`ServingConfig.ingress`), one deployment that is both,
    named and sized as the model's.

    With ``api_key``, generation requests must bring it; only its digest enters the application.
    """
    digest = key_digest(api_key) if api_key is not None else None
    if config.ingress_with_model:
        (model,) = config.models
        ingress = OpenAIIngress.options(**model.deployment_options())
        return ingress.bind({model.name: model}, config.app_name, digest, config.max_request_bytes)
    models = {
        m.name: LLMServer.options(**m.deployment_options()).bind(m, config.app_name) for m in config.models
    }
    return OpenAIIngress.bind(models, config.app_name, digest, config.max_request_bytes)


def check_grpc_exposure(config: ServingConfig, api_key: str | None) -> None:
    """Refuse gRPC without an API key unless asked for: its proxy listens on every interface."""
    if config.grpc_port is not None and api_key is None and not config.grpc_without_api_key:
        raise ValueError(
            f"gRPC would listen on every interface ({GRPC_LISTEN_HOST}:{config.grpc_port}; Ray Serve's gRPC "
            f"proxy cannot bind to one host) with no API key: set one in ${config.api_key_env} or "
            "api_key_file, or set grpc_without_api_key on a trusted network, or drop grpc_port"
        )


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
    """Check the checkpoints and the API key, start the proxies if needed, deploy and wait until every
    replica is ready."""
    for model in config.models:
        # Here a bad file is one clear error; in a replica it is a retried start-up traceback.
        check_checkpoint(model.engine.model)
    api_key = read_api_key(config)
    check_grpc_exposure(config, api_key)
    start_proxies(config)
    handle = serve.run(build_app(config, api_key), name=config.app_name, route_prefix=config.route_prefix)
    logger.info(
        "serving %s as application %r: %s", [m.name for m in config.models], config.app_name, where(config)
    )
    return handle


def where(config: ServingConfig) -> str:
    """Where the running Serve proxies listen, as Serve reports them, and whether a key is required.

    Serve keeps the addresses it first started with, which may differ from ``config``'s.
    """
    details = _get_global_client().get_serve_details()
    http = details.get("http_options") or {}
    grpc = details.get("grpc_options") or {}
    auth = "API key required" if read_api_key(config) is not None else "no API key"
    prefix = config.route_prefix.rstrip("/")
    line = f"HTTP on http://{http.get('host')}:{http.get('port')}{prefix}/v1 ({auth})"
    if grpc.get("grpc_servicer_functions"):
        line += (
            f"; gRPC on {GRPC_LISTEN_HOST}:{grpc.get('port')}, every interface: Ray Serve's gRPC proxy "
            f"cannot bind one host ({auth})"
        )
    else:
        line += "; gRPC off"
    return line


def undeploy(config: ServingConfig) -> None:
    """Delete the application and the weight stores of its models."""
    serve.delete(config.app_name)
    for model in config.models:
        delete_weight_store(config.app_name, model.name)
