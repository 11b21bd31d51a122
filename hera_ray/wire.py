"""The gRPC wire: generated stubs, server/channel options, auth metadata and error mapping.

Stubs are generated from ``protos/`` by ``scripts/gen_protos.py`` (pip runs it at build time).
This module imports grpc but not Ray or torch.
"""

from __future__ import annotations

import functools
import hmac
import inspect
from typing import Any, Callable, Iterable

import grpc

from hera_ray.errors import HeraError, Unauthenticated

try:
    from hera_ray._proto.hera.v1 import edge_pb2, edge_pb2_grpc, registry_pb2, registry_pb2_grpc
except ImportError as e:  # pragma: no cover - only in a checkout that was never installed
    raise ImportError(
        "hera-ray's gRPC stubs are missing: install the package (pip install -e .) or run "
        "python scripts/gen_protos.py"
    ) from e

__all__ = [
    "edge_pb2",
    "edge_pb2_grpc",
    "registry_pb2",
    "registry_pb2_grpc",
    "AUTH_HEADER",
    "auth_metadata",
    "bearer_token",
    "check_token",
    "grpc_errors",
    "grpc_options",
    "status_code",
]

AUTH_HEADER = "authorization"


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options shared by our servers and channels: explicit message size limits."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTH_HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


def check_token(presented: str | None, accepted: Iterable[str]) -> str:
    """Return the accepted token that ``presented`` equals, comparing in constant time."""
    if not presented:
        raise Unauthenticated("missing token: send 'authorization: Bearer <token>' metadata")
    match = None
    for token in accepted:  # no early exit: the time does not depend on which token matched
        if hmac.compare_digest(presented.encode(), token.encode()):
            match = token
    if match is None:
        raise Unauthenticated("wrong token")
    return match


def status_code(err: HeraError) -> grpc.StatusCode:
    return grpc.StatusCode[err.grpc_code]


def grpc_errors(method: Callable) -> Callable:
    """Turn a HeraError raised by a servicer method into a gRPC status with its message.

    Works on coroutine methods and on async-generator (server-streaming) methods.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except HeraError as e:
                await context.abort(status_code(e), e.message)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except HeraError as e:
            await context.abort(status_code(e), e.message)

    return unary_wrapper
