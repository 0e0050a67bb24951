"""Errors the serving layer reports to clients, with their HTTP status and OpenAI error shape."""

from __future__ import annotations

from typing import Any

import grpc

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class ServingError(Exception):
    """An error meant for the client: an HTTP status, an OpenAI error ``type`` and optional ``param``/``code``.

    Raised inside model replicas and re-raised by Ray Serve in the ingress, so it must pickle
    with all its fields (hence `__reduce__`).
    """

    status_code = 500
    error_type = "server_error"
    # What ``param`` and ``code`` are when the raiser leaves them out.
    default_param: str | None = None
    default_code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param if param is not None else self.default_param
        self.code = code if code is not None else self.default_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param, self.code))

    def to_dict(self) -> dict[str, Any]:
        """The body OpenAI's API returns for an error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_CODES.get(self.status_code, grpc.StatusCode.INTERNAL)


class BadRequestError(ServingError):
    """Invalid parameters, malformed JSON or a prompt longer than the model accepts (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLargeError(ServingError):
    """The request body (HTTP) or message (gRPC) is over ``max_request_bytes`` (HTTP 413)."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class UnauthorizedError(ServingError):
    """The API key is missing or wrong (HTTP 401, gRPC UNAUTHENTICATED)."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFoundError(ServingError):
    """The request names a model this application does not serve (HTTP 404)."""

    status_code = 404
    error_type = "invalid_request_error"
    default_param = "model"
    default_code = "model_not_found"


class OverloadedError(ServingError):
    """The engine's waiting queue or Serve's request queue is full; retry later (HTTP 503)."""

    status_code = 503
    error_type = "server_error"
    default_code = "overloaded"
