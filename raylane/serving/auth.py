"""API keys: read the key where `raylane serve` runs, check callers against its digest in the ingress.

Only a SHA-256 digest of the key reaches the Serve application (its arguments are stored in the
cluster); requests present the key as ``Authorization: Bearer KEY``, an HTTP header or a gRPC
metadata entry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from raylane.serving.errors import UnauthorizedError

if TYPE_CHECKING:
    # Only for typing: the ingress imports this module and must not load the engine (and torch).
    from raylane.serving.config import ServingConfig


def read_api_key(config: ServingConfig) -> str | None:
    """The API key from ``config.api_key_file`` or else the ``config.api_key_env`` variable (None: no key)."""
    if config.api_key_file is not None:
        try:
            with open(config.api_key_file) as f:
                key = f.read().strip()
        except OSError as exc:
            raise ValueError(
                f"cannot read the API key file {config.api_key_file!r} ({exc.strerror}): "
                "fix api_key_file or unset it"
            ) from None
        if not key:
            raise ValueError(f"the API key file {config.api_key_file!r} is empty: write the key into it")
        return key
    if config.api_key_env:
        return os.environ.get(config.api_key_env, "").strip() or None
    return None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyCheck:
    """Checks the bearer key of a request against a key digest (None: every caller is let in)."""

    def __init__(self, digest: str | None) -> None:
        self.digest = digest

    def check(self, authorization: str | None) -> None:
        """Raise `UnauthorizedError` unless ``authorization`` is ``Bearer <the key>``."""
        if self.digest is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnauthorizedError(
                "this server needs an API key: send the header 'Authorization: Bearer KEY'"
            )
        if not hmac.compare_digest(key_digest(key.strip()), self.digest):
            raise UnauthorizedError("the API key is wrong")

    def check_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        """`check` on the ``authorization`` entry of gRPC metadata."""
        self.check(next((value for name, value in metadata if name.lower() == "authorization"), None))
