"""The gRPC wire: generated stubs, server/channel options, auth metadata and error mapping.

Stubs are generated from ``protos/`` by ``scripts/gen_protos.py`` (pip runs it at build time).
This module imports grpc but not Ray or torch.
"""

from __future__ import annotations

import functools
import hmac
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterable

import grpc

from hera_ray.errors import ContextLengthExceeded, HeraError, InvalidRequest, ModelNotFound, Overloaded, Unauthenticated, Unavailable
from hera_ray.generation import GenerationParams, GenerationResult
from hera_ray.pricing import PriceSheet, parse_prices
from hera_ray.scheduler.nodes import NodeLoad

if TYPE_CHECKING:
    from hera_ray.tls import TLSFiles

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
    "keepalive_options",
    "reconnect_options",
    "server_options",
    "status_code",
    "status_message",
]

AUTH_HEADER = "authorization"


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options shared by our servers and channels: explicit message size limits."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def reconnect_options(max_backoff_ms: int = 1000) -> list[tuple[str, Any]]:
    """Channel options that retry a lost connection at least every ``max_backoff_ms`` (gRPC's
    default backs off to two minutes, far too slow to notice a restarted registry or node)."""
    return [
        ("grpc.initial_reconnect_backoff_ms", min(200, max_backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(200, max_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
    ]


#: Keepalive pings on a connection with calls in flight: every KEEPALIVE_MS, and a ping not acked
#: within KEEPALIVE_TIMEOUT_MS ends the connection, failing its calls with UNAVAILABLE. Without them a
#: call over a cut link (a cable pulled, a host's link down: no RST ever comes) hangs to its deadline.
KEEPALIVE_MS = 2000
KEEPALIVE_TIMEOUT_MS = 2000


def keepalive_options(interval_ms: int = KEEPALIVE_MS, timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, Any]]:
    """Channel options that notice a dead connection under a long call (see ``KEEPALIVE_MS``); pings
    go only while calls are in flight, and keep going through a call that sends nothing for a while."""
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Server options: size limits, no SO_REUSEPORT (so a port already in use fails loudly instead of
    two servers silently sharing it), and room for the clients' keepalive pings (gRPC's default takes
    a ping more often than every 5 minutes as abuse and drops the connection)."""
    return [*grpc_options(max_message_bytes), ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2)]


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


# The message travels percent-encoded in the grpc-message trailer, and a trailer over the peer's
# metadata limit (8-16 KiB) replaces the whole status with RESOURCE_EXHAUSTED "Stream removed".
# Messages quote the caller's input, which may be megabytes: keep their start and end.
MAX_STATUS_MESSAGE_CHARS = 480


def status_message(err: HeraError) -> str:
    m = err.message
    if len(m) <= MAX_STATUS_MESSAGE_CHARS:
        return m
    half = MAX_STATUS_MESSAGE_CHARS // 2
    return f"{m[:half]} ... [{len(m) - 2 * half} characters cut] ... {m[-half:]}"


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
                await context.abort(status_code(e), status_message(e))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except HeraError as e:
            await context.abort(status_code(e), status_message(e))

    return unary_wrapper


def params_to_pb(p: GenerationParams) -> "edge_pb2.GenerateRequest":
    request = edge_pb2.GenerateRequest(
        request_id=p.request_id, model=p.model, prompt=p.prompt, max_tokens=p.max_tokens,
        temperature=p.temperature, stop=list(p.stop), continue_final_message=p.continue_final_message,
        stop_at_line_end=p.stop_at_line_end, logprobs=p.logprobs, candidate=p.candidate, chat=p.chat, tools=p.tools,
        candidate_splits=list(p.candidate_splits), rewrite_below=list(p.rewrite_below))
    for role, content in p.messages:
        request.messages.add(role=role, content=content)
    if p.top_p is not None:
        request.top_p = p.top_p
    if p.top_k is not None:
        request.top_k = p.top_k
    if p.seed is not None:
        request.seed = p.seed
    return request


def params_from_pb(r: "edge_pb2.GenerateRequest") -> GenerationParams:
    return GenerationParams(
        prompt=r.prompt,
        messages=tuple((m.role, m.content) for m in r.messages),
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p if r.HasField("top_p") else None,
        top_k=r.top_k if r.HasField("top_k") else None,
        seed=r.seed if r.HasField("seed") else None,
        stop=tuple(r.stop),
        model=r.model,
        request_id=r.request_id,
        continue_final_message=r.continue_final_message,
        stop_at_line_end=r.stop_at_line_end,
        logprobs=r.logprobs,
        candidate=r.candidate,
        candidate_splits=tuple(r.candidate_splits),
        rewrite_below=tuple(r.rewrite_below),
        chat=r.chat,
        tools=r.tools,
    )


def result_from_pb(r: "edge_pb2.GenerateResponse") -> GenerationResult:
    return GenerationResult(text=r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                            ttft_s=r.ttft_s, decode_s=r.decode_s, queue_s=r.queue_s,
                            finish_reason=r.finish_reason, request_id=r.request_id, stop_reason=r.stop_reason,
                            logprobs=list(r.logprobs) if r.has_logprobs else None,
                            top_logprobs=list(r.top_logprobs) if r.has_logprobs and r.top_logprobs else None,
                            cache_hit=r.cache_hit, segment_tokens=list(r.segment_tokens) or None,
                            rewritten_segment=r.rewritten_segment if r.HasField("rewritten_segment") else None)


# A failed call to an edge node, as the caller should treat it: retry elsewhere, or give up.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
              grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable, grpc.StatusCode.CANCELLED: Unavailable}
_FINAL = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest, grpc.StatusCode.OUT_OF_RANGE: ContextLengthExceeded,
          grpc.StatusCode.NOT_FOUND: ModelNotFound}


def error_from_rpc(e: grpc.RpcError, where: str) -> HeraError:
    """Map a gRPC failure to the HeraError a caller acts on (retryable ones are Unavailable/Overloaded)."""
    code = e.code()
    cls = _RETRYABLE.get(code) or _FINAL.get(code) or Unavailable
    return cls(f"{where}: {code.name}: {e.details()}")


def edge_load(address: str, timeout_s: float = 2.0, token: str | None = None, tls: TLSFiles | None = None) -> NodeLoad:
    """An edge node's load as it reports it now (its ``Info``), by address; a blocking call, for
    tools and tests (the scheduler reads the heartbeats instead). Over TLS when ``tls`` has a
    ``ca_file`` (the scheduler's ``tls``, as it dials the edges). Raises grpc.RpcError."""
    from hera_ray.tls import channel_credentials

    secure = tls is not None and tls.dials_tls
    with (grpc.secure_channel(address, channel_credentials(tls)) if secure else grpc.insecure_channel(address)) as channel:
        info = edge_pb2_grpc.EdgeWorkerStub(channel).Info(edge_pb2.InfoRequest(), timeout=timeout_s,
                                                           metadata=auth_metadata(token) or None)
    return load_from_pb(info.load)


def load_to_pb(load: NodeLoad) -> "edge_pb2.NodeLoad":
    return edge_pb2.NodeLoad(in_flight=load.in_flight, queued=load.queued, tokens_per_s=load.tokens_per_s,
                             completed=load.completed, tokens_generated=load.tokens_generated)


def load_from_pb(m: "edge_pb2.NodeLoad") -> NodeLoad:
    return NodeLoad(in_flight=m.in_flight, queued=m.queued, tokens_per_s=m.tokens_per_s, completed=m.completed,
                    tokens_generated=m.tokens_generated)


_PRICE_FIELDS = ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok")


def prices_to_pb_fields(prices: PriceSheet) -> dict[str, float]:
    """A price sheet as the fields of a NodeSpec or InfoResponse; the deprecated flat
    ``price_per_1k_tokens`` is sent as 0, which tells the reader to use the sheet."""
    return {**{name: getattr(prices, name) for name in _PRICE_FIELDS}, "price_per_1k_tokens": 0.0}


def prices_from_pb(m: "registry_pb2.NodeSpec | edge_pb2.InfoResponse") -> PriceSheet:
    """The sheet a NodeSpec or InfoResponse carries. A node that predates the sheet sends only the
    flat ``price_per_1k_tokens``: that price for every kind. Bad prices are InvalidRequest."""
    sheet = {name: getattr(m, name) for name in _PRICE_FIELDS}
    flat = m.price_per_1k_tokens
    if flat == 0:  # NaN != 0, so a NaN flat price is refused below
        return parse_prices(sheet)
    if any(value != 0 for value in sheet.values()):
        raise InvalidRequest("price_per_1k_tokens is a deprecated alias of input_per_mtok, cached_input_per_mtok "
                             "and output_per_mtok: send it as 0 alongside them")
    try:
        return PriceSheet.flat(flat)
    except ValueError:  # pydantic's ValidationError is one
        raise InvalidRequest(f"price_per_1k_tokens must be a finite number >= 0, got {flat}") from None
