"""The HTTP ingress: an OpenAI-compatible chat API whose model name picks the routing policy,
plus ``POST /v1/agent/runs`` (answer and trace), ``/v1/models`` and ``/healthz``.

Transport only: each request becomes one :class:`~hera_ray.agent.Agent` run. Errors come back in
OpenAI's error shape with the status mapped once in ``hera_ray.errors`` (4xx for bad input).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time
# inside Serve replicas, where string annotations do not resolve.
import asyncio
import json
import logging
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Optional

import ray
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import WithJsonSchema
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from hera_ray import __version__
from hera_ray.agent import Agent, AgentRun, StepFormat, TraceEntry
from hera_ray.config import HeraConfig
from hera_ray.errors import (HeraError, InvalidRequest, ModelNotFound, PermissionDenied, RateLimited, RunNotFound, UnknownPolicy,
                             error_to_dict)
from hera_ray.scheduler.actor import get_or_create_scheduler
from hera_ray.serve.admission import AdmissionGate
from hera_ray.serve.executor import ActorScheduler, ClusterExecutor
from hera_ray.serve.keys import ApiKey, KeyBook, RateLimiter, cloud_cost, run_cloud_cap
from hera_ray.serve import step_mode
from hera_ray.serve.protocol import (CHAT_KINDS, AgentChatCompletionRequest, AgentRunRequest, ChatCompletionRequest,
                                    ErrorResponse, StepChatCompletionRequest, check_limits, error_body, publish_limits)

log = logging.getLogger(__name__)

INGRESS_NAME = "HeraIngress"
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}

api = FastAPI(title="hera-ray", version=__version__,
              description="Agents whose subtasks run on edge SLMs or the cloud LLM, decided per subtask.")
api.state.max_body_bytes = 1024 * 1024

_ERROR_WHEN = {
    400: "Invalid request: the message names the field at fault (a body that is not JSON, or not of this schema, "
         "or over one of this server's limits, or a conversation whose tool messages do not answer the calls issued "
         "before them, whose tool-call arguments are not a JSON object, or with two tools of one name).",
    401: "The API key is missing or wrong (when the ingress has keys).",
    402: "The API key has spent its cloud budget.",
    403: "The API key may not do this.",
    404: "Not found.",
    413: "The request body is over the ingress's limit (ingress.max_body_bytes).",
    429: "Too many requests: the API key's rate limit, or this ingress's runs in flight (ingress.max_concurrent_runs). "
         "Retry-After says when to try again.",
    503: "Unavailable: no node can take the work now, or the scheduler does not answer.",
}


def _errors(*statuses: int, **when: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for the error statuses a route answers, each with the error body (``when``:
    what a status means on this route, as ``s404="..."``)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": when.get(f"s{status}", _ERROR_WHEN[status])}
        if status == 429:
            out[status]["headers"] = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                                      "schema": {"type": "integer", "minimum": 1}}}
    return out


#: Every route but /healthz starts with the API key check and its rate limit.
_KEYED = (401, 429)
#: The routes that start an agent run or a step-mode call.
_RUNS = (400, *_KEYED, 402, 404, 413, 503)


def _this_ingress():
    """The HeraIngress of the Serve replica this runs in, else None. Module state will not do: Serve
    runs a copy of ``api`` (and of what it calls), so what the replica's constructor sets there is not
    what its middleware and routes read."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not in a replica (a test, the driver)
        return None


def _replica_settings() -> tuple[Any, bool]:
    """(the cluster's AgentConfig, whether a key is needed) of the ingress replica this runs in;
    outside one, the defaults and no key."""
    from hera_ray.config import AgentConfig

    ingress = _this_ingress()
    if ingress is None or not hasattr(ingress, "keys"):
        return AgentConfig(), False
    return ingress.config.agent, ingress.keys.required


def published_openapi(app: FastAPI = api, agent=None, keys_required: bool | None = None) -> dict[str, Any]:
    """The OpenAPI document as this ingress answers: invalid input is a 400 with the error body (not
    FastAPI's 422), the cluster's limits are the schema's bounds, and the routes that take an API key
    say so when the ingress has keys."""
    if agent is None or keys_required is None:
        replica_agent, replica_keys = _replica_settings()
        agent = agent or replica_agent
        keys_required = replica_keys if keys_required is None else keys_required
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if keys_required and path != "/healthz":
                operation["security"] = [{"ApiKey": []}]
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    publish_limits(schemas, agent)
    if keys_required:
        doc["components"]["securitySchemes"] = {"ApiKey": {"type": "http", "scheme": "bearer",
                                                           "description": "An API key of this ingress."}}
    return doc


api.openapi = published_openapi  # type: ignore[method-assign]


def _json_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                                   param, code), status_code=status)


def cloud_step_format(cloud) -> StepFormat:
    """How the agent asks the cloud backend for a step: llama.cpp and vLLM continue the open assistant
    message; an OpenAI-compatible endpoint does only when configured to (else the turns fallback)."""
    if cloud.backend == "openai" and not cloud.openai_continue_final_message:
        return StepFormat.TURNS
    return StepFormat.CONTINUE


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over the limit, whether it declares its length or streams it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress = _this_ingress()
        limit = ingress.config.ingress.max_body_bytes if hasattr(ingress, "config") else api.state.max_body_bytes
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


def _unauthenticated(request: Request) -> JSONResponse | None:
    """The 401 for a request without a valid key, where this ingress needs one; else None. The
    handlers of malformed requests ask first, so that the key is checked before the body or the
    query, as OpenAI's API answers (FastAPI validates those before a route's code runs)."""
    keys = getattr(_this_ingress(), "keys", None)
    if keys is None or not keys.required or request.url.path == "/healthz":
        return None
    try:
        keys.authenticate(_bearer(request))
    except HeraError as e:
        return _json_error(e.http_status, e.message)
    return None


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    if (refused := _unauthenticated(request)) is not None:
        return refused
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _json_error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [p for p in first.get("loc", ()) if p not in ("body", "query")]
    if loc and loc[0] in CHAT_KINDS:  # the chat request's kind (agent or step mode), which the model name picks
        loc = loc[1:]
    where = ".".join(str(p) for p in loc)
    return _json_error(400, f"{where}: {first['msg']}" if where else first["msg"], where or None)


@api.exception_handler(HeraError)
async def _hera_error(request: Request, exc: HeraError) -> JSONResponse:
    response = _json_error(exc.http_status, exc.message, getattr(exc, "param", None), exc.error_code)
    if isinstance(exc, RateLimited):  # whole seconds, rounded up: the header takes no fraction
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return response


@api.exception_handler(UnicodeError)
async def _not_text(request: Request, exc: UnicodeError) -> JSONResponse:
    if (refused := _unauthenticated(request)) is not None:
        return refused
    # JSON may escape a lone UTF-16 surrogate ("\ud800"); no engine can encode it as text.
    return _json_error(400, f"the request holds text that is not valid Unicode (a lone surrogate?): {exc}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    response = _json_error(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:  # Allow: every method of the path (Starlette names the first route's only)
        response.headers["Allow"] = ", ".join(sorted(_methods_of(request.app.router.routes, request.scope)))
    return response


def _methods_of(routes: Any, scope: Any) -> set[str]:
    """The methods of every route whose path matches ``scope``'s, in included routers too (Serve's
    class routes live in one)."""
    methods: set[str] = set()
    for route in routes:
        if route.matches(scope)[0] == Match.NONE:
            continue
        inner = getattr(route, "original_router", None)
        if inner is not None:
            methods |= _methods_of(inner.routes, scope)
        elif getattr(route, "methods", None):
            methods |= set(route.methods)
    return methods


def _policy_settings(config: HeraConfig) -> dict[str, Any]:
    """The settings that change what the routing policies decide, for a benchmark to record."""
    hera = config.hera.model_dump(include={"threshold_base", "kappa_step", "tau_req", "tau_hybrid",
                                           "routellm_threshold", "use_urc", "use_cd", "use_sd", "max_distance"})
    verify = config.verify.model_dump(mode="json", exclude={"classifier"})
    return {"hera": hera, "hera-verify": verify}


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else ""


def _run_view(row: dict[str, Any]) -> dict[str, Any]:
    """A stored run as the API shows it: ``id``, the summary columns, and ``run`` when it was read."""
    view = {"id": row["run_id"], "object": "agent.run", **{k: v for k, v in row.items() if k not in ("row_id", "run_id", "api_key")},
            "key": row.get("api_key")}
    return view


SINCE_HELP = "Only runs started at or after this time: epoch seconds, or an RFC 3339 date-time (2026-01-31T12:00:00Z)."
SINCE_SCHEMA = {"anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]}
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})")


def _since(value: str | None) -> float | None:
    """``since`` as SINCE_SCHEMA states it: a JSON number (finite) or an RFC 3339 date-time, in epoch seconds."""
    if value is None:
        return None
    if _JSON_NUMBER.fullmatch(value):
        when = float(value)
        if math.isfinite(when):
            return when
    elif _RFC3339.fullmatch(value):
        from datetime import datetime

        try:
            return datetime.fromisoformat(value.upper()).timestamp()
        except ValueError:
            pass
    raise InvalidRequest(f"since: {value!r} is neither epoch seconds nor an RFC 3339 date-time", param="since")


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no inf or NaN (the HERA policy scores
    a missing distance as inf), and Starlette refuses to encode them, which would be a 500."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _usage(run: AgentRun) -> dict[str, Any]:
    prompt = sum(t.prompt_tokens + t.check_prompt_tokens for t in run.trace)  # checks read tokens too
    completion = sum(t.completion_tokens + t.check_completion_tokens for t in run.trace)
    cached = sum(t.cached_prompt_tokens + t.check_cached_prompt_tokens for t in run.trace)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _content(run: AgentRun) -> str:
    """The reply's text: the answer, or the whole of it when it runs over several lines (a code block)."""
    return run.final_text if "\n" in run.final_text.strip() else run.answer


def _completion(model: str, run: AgentRun, user: str | None = None) -> dict[str, Any]:
    hera = _json_safe(run.to_dict())
    if user is not None:
        hera["user"] = user
    return {
        "id": f"chatcmpl-{run.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": _content(run)},
                     "finish_reason": "stop" if run.finished else "length"}],
        "usage": _usage(run),
        "hera": hera,
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
        # On the instance, not in module state: Serve serves a copy of `api` made when the class was
        # decorated, so module-level code reading `api.state` would not see what this replica set.
        self.keys = KeyBook.load(self.config.ingress.api_keys_file, os.environ.get(self.config.ingress.api_key_env))
        self.rate_limiter = RateLimiter()
        self.admission = AdmissionGate(self.config.ingress.max_concurrent_runs)
        self.actor = get_or_create_scheduler(self.config)
        self.policies = {p["name"]: p for p in ray.get(self.actor.policies.remote())}
        self.agent = Agent(ActorScheduler(self.actor), ClusterExecutor(cloud_handle, self.config.cloud.request_timeout_s,
                                                                   edge_timeout_s=self.config.agent.edge_timeout_s,
                                                                   tls=self.config.scheduler.tls),
                           self.config.agent, cloud_step_format=cloud_step_format(self.config.cloud))
        self.cloud = cloud_handle
        # Step mode: where this replica placed each session's calls, by position (the policy's history).
        self._placements: OrderedDict[str, dict[int, str]] = OrderedDict()

    async def _check_policy(self, name: str) -> None:
        step = step_mode.step_policy(name)
        if step is not None and step.partition("@")[0] in step_mode.CHAIN_ONLY:
            raise UnknownPolicy(f"unknown model {name!r}: {step!r} reviews a whole answer chain, which step mode does not "
                                f"have; use it as {step!r} (hera's own agent) or pick another step:<policy>")
        name = step or name
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

    def _authorize(self, presented: str | None) -> Optional[ApiKey]:
        """The caller's key (401 if wrong) with a token taken from its rate bucket (429 if none is
        left); None when this ingress needs no key. Every route but /healthz starts with it."""
        if not self.keys.required:
            return None
        key = self.keys.authenticate(presented)
        self.rate_limiter.acquire(key)
        return key

    async def _start_run(self, key: Optional[ApiKey], question: str, policy: str, request_id: str | None,
                         max_steps: int | None, max_cloud_cost: float | None,
                         on_step: Callable[[TraceEntry], Awaitable[None] | None] | None = None,
                         max_chain_tokens: int | None = None) -> "asyncio.Task[AgentRun]":
        """Admit a run and start it: 429 past ``max_concurrent_runs`` runs in flight, 402 if ``key``
        has spent its cloud budget, else a task whose cloud cap is what is left of the budget. When
        the task ends, however it ends, its slot is freed and its cloud cost charged to ``key``."""
        self.admission.enter()
        try:
            if key is not None and key.cloud_budget is not None:
                spent = await self.actor.key_spend.remote(key.name)
                max_cloud_cost = run_cloud_cap(key, spent, max_cloud_cost, self.config.scheduler.max_cloud_cost_per_request)
        except BaseException:
            self.admission.leave()
            raise
        done: list[TraceEntry] = []
        charges: list[Any] = []
        # The server's own id names the run's charges and its stored row: a caller's request_id may be
        # reused (by it or another key), and must not hide a charge or replace another's run.
        row_id = uuid.uuid4().hex
        run_id = request_id or row_id
        created_at = time.time()

        def record(entry: TraceEntry):
            done.append(entry)
            cost = cloud_cost([entry])
            if key is not None and cost > 0:  # charged as each step ends, so a budget check is at most a step behind
                charges.append(self.actor.charge_key.remote(key.name, cost, f"{row_id}:{len(done)}"))
            return on_step(entry) if on_step is not None else None

        async def run() -> AgentRun:
            result: AgentRun | None = None
            status, error = "error", ""
            try:
                result = await self.agent.run(question, policy, run_id, max_steps, max_cloud_cost, on_step=record,
                                              max_chain_tokens=max_chain_tokens)
                status = "ok"
                return result
            except asyncio.CancelledError:
                status, error = "cancelled", "the caller went away"
                raise
            except Exception as e:
                error = e.message if isinstance(e, HeraError) else f"{type(e).__name__}: {e}"
                raise
            finally:
                # Submitted as the steps ended (charged even if we are cancelled); acknowledged here.
                for charge in charges:
                    try:
                        await charge
                    except Exception as e:  # noqa: BLE001 - the run's own outcome matters more than the charge's
                        log.warning("could not charge API key %r for run %s: %s", key.name, run_id, e)
                await self._record_run(result, run_id, key, policy, question, done, status, error, created_at, row_id)

        started = time.monotonic()
        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda _: self.admission.leave(run_s=time.monotonic() - started))
        return task

    async def _record_run(self, result: Optional[AgentRun], run_id: str, key: Optional[ApiKey], policy: str, question: str,
                          done: list[TraceEntry], status: str, error: str, created_at: float, row_id: str) -> None:
        """Keep the finished run (or what a failed one did) in the store; a failure to is logged, not raised."""
        if result is not None:
            run = result.to_dict()
        else:
            run = {"request_id": run_id, "policy": policy, "question": question, "answer": "", "finished": False,
                   "trace": [asdict(t) for t in done], "cost": sum(t.cost + t.speculative_cost + t.check_cost for t in done)}
            run["slm_share"] = (sum(t.placement == "edge" for t in done) / len(done)) if done else 0.0
            if status == "ok" and done:  # a step-mode call: its one step is the answer
                run["answer"] = done[-1].output
        if error:
            run["error"] = error
        try:
            await self.actor.record_run.remote(_json_safe(run), key.name if key else None, status, created_at, None, row_id)
        except Exception as e:  # noqa: BLE001 - the run's own outcome matters more than its record
            log.warning("could not store run %s: %s", run_id, e)

    async def run_agent(self, question: str, policy: str = "all-slm", max_steps: int | None = None,
                        max_cloud_cost: float | None = None, request_id: str | None = None,
                        api_key: str | None = None) -> dict[str, Any]:
        """For DeploymentHandle callers (``hera_ray.submit``): the run as a dict, or ``{"error": ...}``.

        With ``api_key``, the run is checked and charged like an HTTP one (rate limit, budget);
        without, it runs unmetered: a handle caller is inside the cluster already."""
        try:
            req = AgentRunRequest(question=question, policy=policy, max_steps=max_steps,
                                  max_cloud_cost=max_cloud_cost, request_id=request_id)
            key = self._authorize(api_key) if api_key is not None else None
            check_limits(req, self.config.agent)
            await self._check_policy(req.policy)
            task = await self._start_run(key, req.question, req.policy, req.request_id, req.max_steps, req.max_cloud_cost)
            run = await task
            return run.to_dict()
        except HeraError as e:
            return {"error": error_to_dict(e)}
        except ValueError as e:
            return {"error": error_to_dict(InvalidRequest(str(e)))}

    @api.get("/healthz", responses=_errors(503, s503="The scheduler does not answer."))
    async def healthz(self) -> JSONResponse:
        try:
            status = await asyncio.wait_for(self.actor.ping.remote(), 5)
        except Exception as e:  # noqa: BLE001 - any failure means not healthy
            return _json_error(503, f"scheduler unreachable: {e}")
        # This ingress replica's admission: runs it works on now, and how many it takes before 429.
        a = self.config.agent
        return JSONResponse({"status": "ok", **status, "runs_in_flight": self.admission.in_flight,
                             "max_concurrent_runs": self.admission.limit,
                             # What changes a run's answers and costs, so that a benchmark can record it.
                             "cloud_prices": self.config.cloud.prices.model_dump(),
                             "cloud_step_format": self.agent.cloud_step_format.value,
                             "agent": {"max_steps": a.max_steps, "max_tokens_per_step": a.max_tokens_per_step,
                                       "max_chain_tokens": a.max_chain_tokens, "temperature": a.temperature},
                             # An evaluation setting: engines answer repeated temperature-0 calls from this file.
                             "generation_cache": str(self.config.cloud.generation_cache or "") or None,
                             # The policies' operating points (what `hera-verify` and `hera` decide with).
                             "policy_settings": _policy_settings(self.config)})

    @api.get("/v1/estimators", responses=_errors(*_KEYED, 404, s404="This cluster does not deploy the estimators."))
    async def estimators_manifest(self, request: Request) -> dict[str, Any]:
        """The trained estimators the hera policy uses: base models, data hash, held-out accuracy."""
        self._authorize(_bearer(request))
        if self.estimators is None:
            raise ModelNotFound("the HERA estimators are not deployed (hera.enabled is false)")
        return await self.estimators.manifest.remote()

    @api.get("/v1/models", responses=_errors(*_KEYED))
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(_bearer(request))
        agent = [{"id": name, "object": "model", "created": 0, "owned_by": "hera-ray", "description": p["description"]}
                 for name, p in sorted(self.policies.items())]
        step = [{"id": f"{step_mode.STEP_PREFIX}{name}", "object": "model", "created": 0, "owned_by": "hera-ray",
                 "description": f"Step mode: each call of your agent is one subtask, placed by {name}."}
                for name in sorted(self.policies) if name not in step_mode.CHAIN_ONLY]
        return {"object": "list", "data": agent + step}

    @api.get("/v1/keys/me", responses=_errors(400, *_KEYED, s400="This ingress needs no API key."))
    async def keys_me(self, request: Request) -> dict[str, Any]:
        """The caller's key: its name, rate limit, cloud budget and what it has spent on the cloud."""
        key = self._authorize(_bearer(request))
        if key is None:
            raise InvalidRequest("this ingress needs no API key, so there is no key to describe")
        spent = await self.actor.key_spend.remote(key.name)
        left = None if key.cloud_budget is None else max(0.0, key.cloud_budget - spent)
        return {**key.describe(), "cloud_spend": spent, "cloud_budget_left": left}

    @api.post("/v1/agent/runs", responses=_errors(*_RUNS, s404="No such routing policy."))
    async def agent_runs(self, req: AgentRunRequest, request: Request) -> dict[str, Any]:
        key = self._authorize(_bearer(request))
        check_limits(req, self.config.agent)
        await self._check_policy(req.policy)
        task = await self._start_run(key, req.question, req.policy, req.request_id, req.max_steps, req.max_cloud_cost)
        run = await task
        return _json_safe(run.to_dict())

    @api.get("/v1/agent/runs/{run_id}", responses=_errors(*_KEYED, 404, s404="No stored run of this id (that this API key may see)."))
    async def get_agent_run(self, run_id: str, request: Request) -> dict[str, Any]:
        """A stored run: where each step ran, which stage decided with which scores, and its cost. A
        key sees only its own runs (another's is 404, as one that does not exist)."""
        key = self._authorize(_bearer(request))
        row = await self.actor.get_run.remote(run_id, key.name if key else None, key is None)
        if row is None:
            raise RunNotFound(f"no stored run {run_id!r}" + (" of this API key" if key else ""))
        return _json_safe(_run_view(row))

    @api.get("/v1/agent/runs", responses=_errors(400, *_KEYED, 403, s403="An API key may list its own runs only."))
    async def list_agent_runs(
            self, request: Request,
            # Typed str, not Optional[str]: a query parameter is absent or a string, never null.
            key_name: Annotated[str, Query(alias="key", description="Only this API key's runs (a key may ask for its own only).")] = None,
            policy: Annotated[str, Query(description="Only runs of this routing policy.")] = None,
            since: Annotated[str, WithJsonSchema(SINCE_SCHEMA), Query(description=SINCE_HELP)] = None,
            limit: Annotated[int, Query(ge=1, le=1000, description="Runs at most.")] = 50) -> dict[str, Any]:
        """Stored runs, newest first. A key lists its own runs only."""
        key = self._authorize(_bearer(request))
        unknown = sorted(set(request.query_params) - {"key", "policy", "since", "limit"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter(s) {', '.join(unknown)}: use key, policy, since and limit",
                                 param=unknown[0])
        if key is not None and key_name is not None and key_name != key.name:
            raise PermissionDenied(f"API key {key.name!r} may list its own runs only, not those of {key_name!r}")
        runs = await self.actor.list_runs.remote(key.name if key else key_name, key is None and key_name is None,
                                                 policy or None, _since(since), limit)
        return _json_safe({"object": "list", "data": [_run_view(r) for r in runs]})

    @api.post("/v1/chat/completions", responses={
        200: {"description": "The completion, or with stream: true its chunks as server-sent events.",
              "content": {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1): a chunk's JSON, then [DONE]
                  "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}},
        **_errors(*_RUNS, s404="No such model: the model names a routing policy (GET /v1/models).")})
    async def chat_completions(self, req: Annotated[ChatCompletionRequest, Body()], request: Request):
        key = self._authorize(_bearer(request))
        check_limits(req, self.config.agent)
        await self._check_policy(req.model)
        policy = step_mode.step_policy(req.model)
        if policy is not None:
            return await self._step_call(req, request, key, policy)
        question = req.question()
        cap = req.max_output_tokens()
        if req.stream:
            steps: asyncio.Queue[TraceEntry] = asyncio.Queue()
            # Started here, so a refusal (429, 402) is the response's status, not an error inside the stream.
            task = await self._start_run(key, question, req.model, None, req.max_steps, req.max_cloud_cost,
                                         on_step=steps.put_nowait, max_chain_tokens=cap)
            return StreamingResponse(self._stream(req, task, steps), media_type="text/event-stream")
        task = await self._start_run(key, question, req.model, None, req.max_steps, req.max_cloud_cost,
                                     max_chain_tokens=cap)
        run = await task
        return _completion(req.model, run, req.user)

    async def _step_call(self, req: StepChatCompletionRequest, request: Request, key: Optional[ApiKey], policy: str):
        """Step mode (:mod:`hera_ray.serve.step_mode`): the call is one subtask of the caller's agent."""
        session = step_mode.session_id(req, request.headers.get(step_mode.SESSION_HEADER), key.name if key else None)
        index = step_mode.position(req)
        question, history = step_mode.context(req, self._placements.get(session))
        call = step_mode.call_params(req, self.config.agent.step_max_tokens, self.config.agent.temperature)
        self.admission.enter()
        started, created_at = time.monotonic(), time.time()
        entry, error = None, ""
        try:
            max_cloud_cost = req.max_cloud_cost
            if key is not None and key.cloud_budget is not None:
                spent = await self.actor.key_spend.remote(key.name)
                max_cloud_cost = run_cloud_cap(key, spent, max_cloud_cost, self.config.scheduler.max_cloud_cost_per_request)
            entry = await self.agent.call(call, policy, session, index, question, history, max_cloud_cost)
        except BaseException as e:
            error = e.message if isinstance(e, HeraError) else f"{type(e).__name__}: {e}"
            raise
        finally:
            self.admission.leave(run_s=time.monotonic() - started)
            cost = 0.0 if entry is None else cloud_cost([entry])
            if key is not None and cost > 0:
                try:
                    await self.actor.charge_key.remote(key.name, cost, f"step-{uuid.uuid4().hex}")
                except Exception as e:  # noqa: BLE001 - the call's own outcome matters more than the charge's
                    log.warning("could not charge %.6f to API key %r: %s", cost, key.name, e)
            # The call is stored as a run of one step, id <session>:<position> (one sent again: the newest).
            done = [entry] if entry is not None else []
            await self._record_run(None, f"{session}:{index}", key, req.model, question, done,
                                   "ok" if entry is not None else "error", error, created_at, uuid.uuid4().hex)
        placements = self._placements.setdefault(session, {})
        placements[index] = entry.placement
        self._placements.move_to_end(session)
        while len(self._placements) > 10_000:
            self._placements.popitem(last=False)
        reply = step_mode.parse_reply(req, entry.output)
        hera = _json_safe(step_mode.hera_field(entry, session, index, reply, req.model))
        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            chunks = step_mode.stream_chunks(req.model, entry, reply, hera, include)

            async def events() -> AsyncIterator[str]:
                for c in chunks:
                    yield f"data: {json.dumps(c)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return step_mode.completion(req.model, entry, reply, hera)

    async def _stream(self, req: AgentChatCompletionRequest, task: "asyncio.Task[AgentRun]",
                      steps: "asyncio.Queue[TraceEntry]") -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{int(time.time() * 1000)}", int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(_json_safe(body))}\n\n"

        try:  # from the first chunk: a client gone at any point cancels the run and frees its slot
            yield chunk({"role": "assistant", "content": ""})
            while not (task.done() and steps.empty()):
                getter = asyncio.ensure_future(steps.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    entry = getter.result()
                    yield chunk({}, hera_step=entry.__dict__)  # progress: one chunk per finished subtask
                else:
                    getter.cancel()
            run = task.result()
            yield chunk({"content": _content(run)})
            yield chunk({}, "stop" if run.finished else "length",
                        hera={k: v for k, v in run.to_dict().items() if k != "trace"})
            if req.stream_options is not None and req.stream_options.include_usage:
                # As OpenAI streams it: one more chunk, with no choices, holding the usage.
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [], "usage": _usage(run)}
                yield f"data: {json.dumps(body)}\n\n"
        except HeraError as e:
            yield f"data: {json.dumps(error_body(e.message, _ERROR_TYPES.get(e.http_status, 'server_error')))}\n\n"
        finally:
            if not task.done():
                task.cancel()
        yield "data: [DONE]\n\n"
