"""The serving application as a Serve config file names it (``serve deploy``, KubeRay's ``serveConfigV2``).

A Serve config's ``import_path`` may point at a function of one argument, the application's
``args`` mapping; this one validates that mapping as a `ServingConfig`, so a bad field fails the
deployment with pydantic's message instead of starting replicas. The proxies' addresses come from
the config file's ``http_options`` / ``grpc_options``, not from these args.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from raylane.serving.app import build_app
from raylane.serving.config import ServingConfig

IMPORT_PATH = "raylane.serving.builder:build_app_from_args"


def build_app_from_args(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: ``args`` are the fields of a `ServingConfig`."""
    return build_app(ServingConfig.model_validate(args))
