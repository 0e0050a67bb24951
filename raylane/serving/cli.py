"""`raylane serve`: run a serving application on a local or existing Ray cluster until Ctrl-C.

Heavy imports (Ray, the engine's config and torch behind it) wait for the command to run, so
registering the parser keeps `raylane --help` fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raylane.serving.config import ServingConfig

logger = logging.getLogger(__name__)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` command on the ``raylane`` parser's subparsers; its handler is `run_serve`."""
    parser = subparsers.add_parser(
        "serve",
        help="serve models over OpenAI-compatible HTTP and gRPC with Ray Serve",
        description="Deploy a Ray Serve application for one or more checkpoints and block until Ctrl-C.",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]DIR",
        help="checkpoint folder to serve, optionally named (default name: the folder's); repeatable",
    )
    parser.add_argument("--name", help="served model name when a single --model is given")
    parser.add_argument(
        "--config", help="YAML file holding a full ServingConfig (flags below override its fields)"
    )
    parser.add_argument("--app-name", help="Serve application name (default raylane)")
    parser.add_argument("--route-prefix", help="HTTP path prefix of the application (default /)")
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1; 0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument(
        "--grpc-port",
        type=int,
        help="serve gRPC on this port (default off; -1 disables). It listens on every interface, "
        "so it needs an API key unless --grpc-without-api-key",
    )
    parser.add_argument(
        "--grpc-without-api-key",
        action="store_true",
        default=None,
        help="allow gRPC with no API key (trusted networks only)",
    )
    parser.add_argument(
        "--api-key-env", help="environment variable holding the API key (default RAYLANE_API_KEY)"
    )
    parser.add_argument("--api-key-file", help="file holding the API key (wins over --api-key-env)")
    parser.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    parser.add_argument(
        "--ingress",
        choices=["auto", "with_model", "separate"],
        help="where the HTTP/gRPC ingress runs: with_model (in the model's replicas, one model only), "
        "separate (its own deployment); default auto: with_model for one model",
    )
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        default=None,
        help="the ingress replicas also serve HTTP on ports of their own (Ray Serve's direct ingress, "
        "printed at start), skipping the proxy's hop; the proxy keeps serving at --host/--port",
    )
    scaling = parser.add_argument_group("scaling (per model)")
    scaling.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    scaling.add_argument("--min-replicas", type=int, help="enable autoscaling with this minimum")
    scaling.add_argument("--max-replicas", type=int, help="enable autoscaling with this maximum")
    scaling.add_argument(
        "--target-ongoing-requests", type=float, help="autoscaling target per replica (default 64)"
    )
    scaling.add_argument(
        "--max-ongoing-requests", type=int, help="requests routed to one replica at once (default 256)"
    )
    scaling.add_argument("--num-cpus", type=float, help="CPUs per replica (default 1)")
    scaling.add_argument("--num-gpus", type=float, help="GPUs per replica (default 0)")
    engine = parser.add_argument_group("engine (per model)")
    engine.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    engine.add_argument("--device", help="'auto', 'cpu', 'cuda'")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--max-num-seqs", type=int, help="sequences batched per engine step")
    parser.set_defaults(func=run_serve)
    return parser


def _model_args(spec: str, name: str | None) -> tuple[str | None, str]:
    if "=" in spec:
        model_name, path = spec.split("=", 1)
        return model_name, path
    return name, spec


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    """The `ServingConfig` the command line describes (``--config`` file first, then flags)."""
    from raylane.config import load_config_data
    from raylane.serving.config import ModelDeploymentConfig, ServingConfig

    base: dict[str, Any] = load_config_data(ServingConfig, args.config)
    if args.model:
        if args.name and len(args.model) > 1:
            raise ValueError("--name names a single model; with several, write --model NAME=DIR")
        base["models"] = []
        for spec in args.model:
            model_name, path = _model_args(spec, args.name)
            base["models"].append(ModelDeploymentConfig.from_path(path, name=model_name).model_dump())
    if not base.get("models"):
        raise ValueError("nothing to serve: pass --model DIR (or a --config listing models)")
    for field in (
        "app_name",
        "route_prefix",
        "host",
        "port",
        "grpc_without_api_key",
        "api_key_env",
        "api_key_file",
        "ingress",
        "direct_ingress",
    ):
        if getattr(args, field) is not None:
            base[field] = getattr(args, field)
    if args.grpc_port is not None:
        base["grpc_port"] = None if args.grpc_port < 0 else args.grpc_port
    for model in base["models"]:
        _apply_model_flags(model, args)
    return ServingConfig.model_validate(base)


def _apply_model_flags(model: dict[str, Any], args: argparse.Namespace) -> None:
    from raylane.serving.config import AutoscalingSettings

    for flag, field in (
        ("replicas", "num_replicas"),
        ("max_ongoing_requests", "max_ongoing_requests"),
        ("num_cpus", "num_cpus"),
        ("num_gpus", "num_gpus"),
    ):
        if getattr(args, flag) is not None:
            model[field] = getattr(args, flag)
    autoscaling = {
        field: getattr(args, field)
        for field in ("min_replicas", "max_replicas", "target_ongoing_requests")
        if getattr(args, field) is not None
    }
    if autoscaling:
        if args.replicas is not None:
            raise ValueError("give either --replicas (fixed) or --min/--max-replicas (autoscaling), not both")
        model["autoscaling"] = AutoscalingSettings(
            **{**(model.get("autoscaling") or {}), **autoscaling}
        ).model_dump()
    engine = model.setdefault("engine", {})
    for flag in ("dtype", "device", "max_model_len", "max_num_seqs"):
        if getattr(args, flag) is not None:
            engine[flag] = getattr(args, flag)


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``raylane serve``: deploy, report the addresses, block until Ctrl-C or SIGTERM, then clean up."""
    import ray

    from raylane.serving.app import deploy, undeploy, where

    config = config_from_args(args)
    ray.init(address=args.address, ignore_reinit_error=True)
    deploy(config)
    names = ", ".join(m.name for m in config.models)
    print(f"raylane serve: {names}. {where(config)} (Ctrl-C to stop)", file=sys.stderr)
    # SIGTERM is how Kubernetes and process managers stop a server; a shell starts background
    # jobs with SIGINT ignored. Both must reach the clean-up below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        logger.info("stopping application %s", config.app_name)
    finally:
        undeploy(config)
    return 0
