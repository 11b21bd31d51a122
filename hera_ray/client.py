"""Python API: ``Client`` over HTTP, and ``submit`` through a Ray client connection.

>>> from hera_ray import Client
>>> run = Client("http://127.0.0.1:8000").run("What is 17 * 3?", policy="all-llm")  # doctest: +SKIP
>>> run["answer"], run["slm_share"], run["cost"]  # doctest: +SKIP

>>> from hera_ray import submit
>>> submit("What is 17 * 3?", policy="all-slm", address="ray://head:10001")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from hera_ray.errors import HeraError, error_from_dict

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(HeraError):
    """The server answered with an error; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.http_status = status


def _epoch(when: float | str | None) -> float | str | None:
    """An ISO 8601 time as epoch seconds (the ingress takes those or RFC 3339); anything else as given."""
    if not isinstance(when, str):
        return when
    from datetime import datetime, timezone

    try:
        return float(when)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return when  # the ingress says what is wrong with it
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


class Client:
    """A small client for the hera-ray ingress. The API key defaults to ``$HERA_API_KEY``."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 1800.0):
        self.base_url = (base_url or os.environ.get("HERA_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("HERA_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw) -> Any:
        r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise ClientError(r.status_code, message)
        return r.json()

    def run(self, question: str, policy: str = "all-slm", max_steps: int | None = None,
            max_cloud_cost: float | None = None, request_id: str | None = None) -> dict[str, Any]:
        """Answer ``question`` with the agent; returns ``{"answer", "trace", "slm_share", "cost", ...}``."""
        body = {"question": question, "policy": policy, "max_steps": max_steps, "max_cloud_cost": max_cloud_cost,
                "request_id": request_id}
        return self._call("POST", "/v1/agent/runs", json={k: v for k, v in body.items() if v is not None})

    def runs(self, key: str | None = None, policy: str | None = None, since: float | str | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Stored runs, newest first (summaries; a keyed caller sees its own runs only). ``since``: epoch
        seconds or an ISO 8601 time (without an offset: UTC), sent as epoch seconds."""
        params = {k: v for k, v in {"key": key, "policy": policy, "since": _epoch(since), "limit": limit}.items()
                  if v is not None}
        return self._call("GET", "/v1/agent/runs", params=params)["data"]

    def get_run(self, run_id: str) -> dict[str, Any]:
        """A stored run with its whole trace (``run``)."""
        from urllib.parse import quote

        return self._call("GET", f"/v1/agent/runs/{quote(run_id, safe='')}")

    def models(self) -> list[str]:
        return [m["id"] for m in self._call("GET", "/v1/models")["data"]]

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def submit(question: str, policy: str = "all-slm", address: str = "ray://127.0.0.1:10001", app_name: str = "hera",
           max_steps: int | None = None, max_cloud_cost: float | None = None, api_key: str | None = None) -> dict[str, Any]:
    """Run one agent request through a Ray client connection (``ray://host:10001``).

    The request runs as a Ray task inside the cluster, which calls the Serve app's handle; only
    the result crosses the client connection. With ``api_key`` the run counts against that key's
    rate limit and cloud budget, as over HTTP; without, it runs unmetered.
    """
    # Ray turns on token auth after its first start; the client must say so to send the token.
    # Ray reads these when it is imported, so they are set first.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=address, log_to_driver=False)
    try:
        out = ray.get(_cluster_task().remote(app_name, question, policy, max_steps, max_cloud_cost, api_key))
    finally:
        if owns:
            ray.shutdown()
    if "error" in out:
        raise error_from_dict(out["error"])
    return out


def _remote_run(app_name: str, question: str, policy: str, max_steps: int | None, max_cloud_cost: float | None,
                api_key: str | None = None):
    from ray import serve

    handle = serve.get_app_handle(app_name)
    return handle.run_agent.remote(question, policy, max_steps, max_cloud_cost, api_key=api_key).result()


_TASK = None


def _cluster_task():
    """The Ray task, defined on first use so importing hera_ray.client does not import Ray."""
    global _TASK
    if _TASK is None:
        import ray

        _TASK = ray.remote(num_cpus=0)(_remote_run)
    return _TASK
