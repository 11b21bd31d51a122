"""The HTTP ingress: an OpenAI-compatible chat API whose model name picks the routing policy,
plus ``POST /v1/agent/runs`` (answer and trace), ``/v1/models`` and ``/healthz``.

Transport only: each request becomes one :class:`~hera_ray.agent.Agent` run. Errors come back in
OpenAI's error shape with the status mapped once in ``hera_ray.errors`` (4xx for bad input).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time
# inside Serve replicas, where string annotations do not resolve.
import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator

import ray
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from hera_ray import __version__
from hera_ray.agent import Agent, AgentRun, TraceEntry
from hera_ray.config import HeraConfig
from hera_ray.errors import HeraError, InvalidRequest, Unauthenticated, UnknownPolicy, error_to_dict
from hera_ray.scheduler.actor import get_or_create_scheduler
from hera_ray.serve.executor import ActorScheduler, ClusterExecutor
from hera_ray.serve.protocol import AgentRunRequest, ChatCompletionRequest, error_body

log = logging.getLogger(__name__)

INGRESS_NAME = "HeraIngress"
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}

api = FastAPI(title="hera-ray", version=__version__,
              description="Agents whose subtasks run on edge SLMs or the cloud LLM, decided per subtask.")
api.state.api_key = None
api.state.max_body_bytes = 1024 * 1024


def _json_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"), param),
                        status_code=status)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over the limit, whether it declares its length or streams it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = api.state.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _json_error(400, "Content-Length is not a number")(scope, receive, send)
            if int(declared) > limit:
                return await _json_error(413, f"request body is {int(declared)} bytes; the limit is {limit}")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _json_error(413, f"request body is over the limit of {limit} bytes")(scope, receive, send)


api.add_middleware(BodyLimitMiddleware)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _json_error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return _json_error(400, f"{where}: {first['msg']}" if where else first["msg"], where or None)


@api.exception_handler(HeraError)
async def _hera_error(request: Request, exc: HeraError) -> JSONResponse:
    return _json_error(exc.http_status, exc.message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _json_error(exc.status_code, str(exc.detail))


async def require_api_key(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    presented = auth[7:] if auth.startswith("Bearer ") else ""
    if not presented or not hmac.compare_digest(presented.encode(), key.encode()):
        raise Unauthenticated("invalid or missing API key: send 'Authorization: Bearer <key>' (the server's HERA_API_KEY)")


_AUTH = [Depends(require_api_key)]


def _usage(run: AgentRun) -> dict[str, int]:
    prompt = sum(t.prompt_tokens for t in run.trace)
    completion = sum(t.completion_tokens for t in run.trace)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(model: str, run: AgentRun) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{run.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": run.answer},
                     "finish_reason": "stop" if run.finished else "length"}],
        "usage": _usage(run),
        "hera": run.to_dict(),
    }


# Module-level helpers used by the class are defined above it: Serve may pickle the class by
# value, and only names bound when it is pickled travel with it.
@serve.deployment(name=INGRESS_NAME)
@serve.ingress(api)
class HeraIngress:
    """Runs agents: the scheduler actor places each subtask, the executors run it."""

    def __init__(self, config: dict[str, Any], cloud_handle, estimators_handle=None):
        self.config = HeraConfig.model_validate(config)
        self.estimators = estimators_handle  # the HERA estimators' deployment (the scheduler calls it by name)
        api.state.api_key = os.environ.get(self.config.ingress.api_key_env) or None
        api.state.max_body_bytes = self.config.ingress.max_body_bytes
        self.actor = get_or_create_scheduler(self.config)
        self.policies = {p["name"]: p for p in ray.get(self.actor.policies.remote())}
        self.agent = Agent(ActorScheduler(self.actor), ClusterExecutor(cloud_handle, self.config.cloud.request_timeout_s),
                           self.config.agent)
        self.cloud = cloud_handle

    async def _check_policy(self, name: str) -> None:
        if name in self.policies:
            return
        base, at, _ = name.partition("@")
        if at and base in self.policies:
            problem = await self.actor.check_policy.remote(name)  # the value: the actor's own check
            if problem is None:
                return
            raise UnknownPolicy(problem)
        raise UnknownPolicy(f"unknown model {name!r}: the model names a routing policy, one of {', '.join(sorted(self.policies))}"
                            " (or <policy>@<value> for a policy with a knob)")

    async def run_agent(self, question: str, policy: str = "all-slm", max_steps: int | None = None,
                        max_cloud_cost: float | None = None, request_id: str | None = None) -> dict[str, Any]:
        """For DeploymentHandle callers (``hera_ray.submit``): the run as a dict, or ``{"error": ...}``."""
        try:
            req = AgentRunRequest(question=question, policy=policy, max_steps=max_steps,
                                  max_cloud_cost=max_cloud_cost, request_id=request_id)
            await self._check_policy(req.policy)
            run = await self.agent.run(req.question, req.policy, req.request_id, req.max_steps, req.max_cloud_cost)
            return run.to_dict()
        except HeraError as e:
            return {"error": error_to_dict(e)}
        except ValueError as e:
            return {"error": error_to_dict(InvalidRequest(str(e)))}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            status = await asyncio.wait_for(self.actor.ping.remote(), 5)
        except Exception as e:  # noqa: BLE001 - any failure means not healthy
            return _json_error(503, f"scheduler unreachable: {e}")
        return JSONResponse({"status": "ok", **status})

    @api.get("/v1/estimators", dependencies=_AUTH)
    async def estimators_manifest(self) -> dict[str, Any]:
        """The trained estimators the hera policy uses: base models, data hash, held-out accuracy."""
        if self.estimators is None:
            raise HeraError("the HERA estimators are not deployed (hera.enabled is false)")
        return await self.estimators.manifest.remote()

    @api.get("/v1/models", dependencies=_AUTH)
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "hera-ray", "description": p["description"]}
            for name, p in sorted(self.policies.items())]}

    @api.post("/v1/agent/runs", dependencies=_AUTH)
    async def agent_runs(self, req: AgentRunRequest) -> dict[str, Any]:
        await self._check_policy(req.policy)
        run = await self.agent.run(req.question, req.policy, req.request_id, req.max_steps, req.max_cloud_cost)
        return run.to_dict()

    @api.post("/v1/chat/completions", dependencies=_AUTH)
    async def chat_completions(self, req: ChatCompletionRequest):
        await self._check_policy(req.model)
        if req.stream:
            return StreamingResponse(self._stream(req), media_type="text/event-stream")
        run = await self.agent.run(req.question(), req.model, None, req.max_steps, req.max_cloud_cost)
        return _completion(req.model, run)

    async def _stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        steps: asyncio.Queue[TraceEntry] = asyncio.Queue()
        task = asyncio.ensure_future(self.agent.run(req.question(), req.model, None, req.max_steps, req.max_cloud_cost,
                                                    on_step=steps.put_nowait))
        cid, created = f"chatcmpl-{int(time.time() * 1000)}", int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        try:
            while not (task.done() and steps.empty()):
                getter = asyncio.ensure_future(steps.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    entry = getter.result()
                    yield chunk({}, hera_step=entry.__dict__)  # progress: one chunk per finished subtask
                else:
                    getter.cancel()
            run = task.result()
            yield chunk({"content": run.answer})
            yield chunk({}, "stop" if run.finished else "length", usage=_usage(run),
                        hera={k: v for k, v in run.to_dict().items() if k != "trace"})
        except HeraError as e:
            yield f"data: {json.dumps(error_body(e.message, _ERROR_TYPES.get(e.http_status, 'server_error')))}\n\n"
        finally:
            if not task.done():
                task.cancel()
        yield "data: [DONE]\n\n"
