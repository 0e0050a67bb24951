"""The serving application as a Serve config file names it (``serve deploy``, KubeRay's ``serveConfigV2``).

A Serve config's ``import_path`` may point at a function of one argument, the application's
``args`` mapping; this one validates that mapping as a `ServingConfig`, so a bad field fails the
deployment with pydantic's message instead of starting replicas. The proxies' addresses come from
the config file's ``http_options`` / ``grpc_options``, not from these args; with ``direct_ingress``,
the file's ``controller_options`` must also set ``runtime_env: {env_vars:
{RAY_SERVE_ENABLE_DIRECT_INGRESS: "1"}}`` (`raylane.serving.app.DIRECT_INGRESS_ENV`), which
`raylane.serving.deploy` does itself.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from raylane.serving.app import build_app, check_grpc_exposure
from raylane.serving.auth import read_api_key
from raylane.serving.config import ServingConfig

IMPORT_PATH = "raylane.serving.builder:build_app_from_args"


def build_app_from_args(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: ``args`` are the fields of a `ServingConfig`.

    The API key is read where Serve builds the application (from ``api_key_file`` or the
    ``api_key_env`` variable, as `raylane serve` reads it), and gRPC without one is refused unless
    ``grpc_without_api_key`` is set.
    """
    config = ServingConfig.model_validate(args)
    api_key = read_api_key(config)
    check_grpc_exposure(config, api_key)
    return build_app(config, api_key)
