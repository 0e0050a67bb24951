"""Build, deploy and remove a serving application on the Ray cluster."""

from __future__ import annotations

import logging
import time

import ray
from ray import serve
from ray.serve.config import ControllerOptions, gRPCOptions
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

# Serve reads these when its controller and replicas start (ray.serve._private.constants), and the
# replicas the controller starts inherit its environment variables: with the first, an ingress
# replica serves HTTP on a port the controller gives it, and the controller lists those ports.
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # By default a stopping ingress replica keeps accepting for 30 s, for a load balancer in front to
    # deregister it; here clients ask for the addresses, and requests in flight still finish.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}
# The ports are listed once serve.run returns; a short wait covers a slow controller tick.
DIRECT_INGRESS_WAIT_S = 5.0


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
    With ``direct_ingress``, Serve starts with direct ingress on: from then on the ingress replicas
    of every application on the cluster serve on ports of their own too; the proxies serve as
    before (on the head node only).
    """
    grpc_options = None
    if config.grpc_port is not None:
        grpc_options = gRPCOptions(port=config.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION])
    controller_options = None
    if config.direct_ingress:
        controller_options = ControllerOptions(runtime_env={"env_vars": DIRECT_INGRESS_ENV})
    serve.start(
        http_options={"host": config.host, "port": config.port},
        grpc_options=grpc_options,
        controller_options=controller_options,
    )


def deploy(config: ServingConfig) -> DeploymentHandle:
    """Check the checkpoints and the API key, start the proxies if needed, deploy and wait until every
    replica is ready (with ``direct_ingress``, until its port is listed: `direct_ingress_urls`)."""
    for model in config.models:
        # Here a bad file is one clear error; in a replica it is a retried start-up traceback.
        check_checkpoint(model.engine.model)
    api_key = read_api_key(config)
    check_grpc_exposure(config, api_key)
    start_proxies(config)
    handle = serve.run(build_app(config, api_key), name=config.app_name, route_prefix=config.route_prefix)
    if config.direct_ingress:
        try:
            direct_ingress_urls(config, wait_s=DIRECT_INGRESS_WAIT_S)
        except RuntimeError:
            undeploy(config)  # reachable through the proxy only, it is not what was asked for
            raise
    logger.info(
        "serving %s as application %r: %s", [m.name for m in config.models], config.app_name, where(config)
    )
    return handle


def direct_ingress_urls(config: ServingConfig, wait_s: float = 0.0) -> list[str]:
    """The HTTP base URLs of the application's ingress replicas (``direct_ingress``), one per replica.

    A request sent to one skips Serve's proxy. Waits up to ``wait_s`` for the controller to list
    the replicas' ports; raises if Serve on this cluster was started without direct ingress.
    """
    client = _get_global_client()
    deadline = time.monotonic() + wait_s
    while True:
        # No public API lists a replica's port; the controller's target groups are what Serve's
        # own test helpers and load-balancer integration read.
        groups = ray.get(client._controller.get_target_groups.remote(config.app_name))
        targets = [t for g in groups if g.protocol == "HTTP" for t in g.targets]
        replicas = [t for t in targets if t.name.startswith("SERVE_REPLICA::")]
        if replicas or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not replicas:
        raise RuntimeError(
            f"application {config.app_name!r} has no direct-ingress replica ports (targets: "
            f"{[(t.name, t.port) for t in targets]}): Serve on this cluster was started without direct "
            "ingress. Start it with direct_ingress set (serve.shutdown() first, or a new cluster), or set "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 where the cluster starts"
        )
    host = client.get_serve_details().get("http_options", {}).get("host") or config.host
    prefix = config.route_prefix.rstrip("/")
    # A replica binds the proxies' host; the target's own IP is the one to call when that is every interface.
    return [f"http://{t.ip if host in ('0.0.0.0', '::') else host}:{t.port}{prefix}" for t in replicas]


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
    if config.direct_ingress:
        line += f", and without the proxy on {', '.join(u + '/v1' for u in direct_ingress_urls(config))}"
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
