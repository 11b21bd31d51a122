"""API keys through the real ingress: a key's rate limit (429 + Retry-After), its cloud budget
(charged by the scheduler actor, then 402), a wrong key (401), and ``/v1/keys/me``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from serving_settings import API_KEY, BUDGET_KEY, CLOUD_PRICE, LIMITED_KEY, OPEN_KEY, TINY_BUDGET

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"


def _get(cluster, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.get(f"{cluster.ingress_url}{path}", headers=headers, timeout=60)


def _run(cluster, key: str, **body) -> httpx.Response:
    return httpx.post(f"{cluster.ingress_url}/v1/agent/runs", headers={"Authorization": f"Bearer {key}"},
                      json={"question": QUESTION, **body}, timeout=300)


def test_a_rate_limited_key_gets_429_with_retry_after(cluster):
    # 2 requests a minute, burst 2: the first two pass, the third (a second later at most) waits ~30 s.
    assert [_get(cluster, "/v1/models", LIMITED_KEY).status_code for _ in range(2)] == [200, 200]
    r = _get(cluster, "/v1/models", LIMITED_KEY)
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 30
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert "'limited'" in error["message"] and "2 requests per minute" in error["message"]
    # The limit is the key's own: another key and the health check are not held back.
    assert _get(cluster, "/v1/models", OPEN_KEY).status_code == 200
    assert _get(cluster, "/healthz", None).status_code == 200


def test_wrong_and_missing_keys_get_401(cluster):
    for key in ("wrong-key", LIMITED_KEY[:-1], LIMITED_KEY + "x", None):
        r = _get(cluster, "/v1/keys/me", key)
        assert r.status_code == 401, (key, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{cluster.ingress_url}/v1/keys/me", headers={"Authorization": OPEN_KEY}, timeout=60)  # no "Bearer "
    assert r.status_code == 401, r.text
    r = _run(cluster, "wrong-key", policy="all-slm", max_steps=1)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    # The key is checked first: a request without one is a 401 whatever else is wrong with it
    # (a bad body, a bad query), as OpenAI's API answers; with a key, the same request is a 400.
    bad = [("post", "/v1/chat/completions", {"json": {"model": "all-slm", "messages": []}}),
           ("post", "/v1/agent/runs", {"json": {"question": 5}}),
           ("post", "/v1/agent/runs", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
           ("get", "/v1/agent/runs?limit=zero", {})]
    for method, path, kwargs in bad:
        headers = kwargs.pop("headers", {})
        for key, status in ((None, 401), ("wrong-key", 401), (OPEN_KEY, 400)):
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.request(method, f"{cluster.ingress_url}{path}", headers={**headers, **auth}, timeout=60, **kwargs)
            assert r.status_code == status, (method, path, key, r.text)


def test_the_env_key_still_works_as_default(cluster):
    me = _get(cluster, "/v1/keys/me", API_KEY).json()
    assert me["name"] == "default"
    assert me["requests_per_minute"] is None and me["cloud_budget"] is None


def test_a_cloud_budget_is_charged_then_refused_with_402(cluster, ray_head):
    before = _get(cluster, "/v1/keys/me", BUDGET_KEY).json()
    assert before == {"name": "tiny-budget", "requests_per_minute": None, "burst": None, "cloud_budget": TINY_BUDGET,
                      "cloud_spend": 0.0, "cloud_budget_left": TINY_BUDGET}

    r = _run(cluster, BUDGET_KEY, policy="all-llm", max_steps=2)
    assert r.status_code == 200, r.text
    run = r.json()
    cloud = [t for t in run["trace"] if t["placement"] == "cloud"]
    # The first step may use the cloud (nothing spent yet); once it has, the rest fall back to the edge.
    assert len(cloud) == 1 and run["trace"][0]["placement"] == "cloud"
    assert all(t["placement"] == "edge" and t["fallback"] == "budget" for t in run["trace"][1:])
    spent = cloud[0]["cost"]
    assert spent == pytest.approx(cloud[0]["tokens"] * CLOUD_PRICE / 1000) and spent > TINY_BUDGET

    me = _get(cluster, "/v1/keys/me", BUDGET_KEY).json()
    assert me["cloud_spend"] == pytest.approx(spent) and me["cloud_budget_left"] == 0.0

    for policy in ("all-llm", "all-slm"):  # refused before it runs, whatever it would have spent
        r = _run(cluster, BUDGET_KEY, policy=policy, max_steps=1)
        assert r.status_code == 402, r.text
        message = r.json()["error"]["message"]
        assert "'tiny-budget'" in message and f"{spent:.6f}" in message and "budget of 1e-06" in message
        assert r.json()["error"]["type"] == "budget_exceeded_error"
    # A streaming request is refused with the status too, not inside the stream.
    r = httpx.post(f"{cluster.ingress_url}/v1/chat/completions", headers={"Authorization": f"Bearer {BUDGET_KEY}"},
                   json={"model": "all-llm", "stream": True, "messages": [{"role": "user", "content": QUESTION}]},
                   timeout=60)
    assert r.status_code == 402, r.text
    assert _get(cluster, "/v1/keys/me", BUDGET_KEY).json()["cloud_spend"] == pytest.approx(spent)  # refusals cost nothing

    # The handle path (hera_ray.submit over ray://) checks the same budget when given the key, and
    # refuses a wrong one. In a process of its own, as a user's: a Serve handle made in this test
    # process would share its router loop with the handles of the test packages before it.
    script = (
        "import json\n"
        "from hera_ray import submit\n"
        "out = []\n"
        f"for policy, key in (('all-llm', {BUDGET_KEY!r}), ('all-slm', 'wrong-key')):\n"
        "    try:\n"
        f"        submit({QUESTION!r}, policy=policy, address='ray://127.0.0.1:{ray_head['client_port']}', max_steps=1, api_key=key)\n"
        "        out.append(['answered', ''])\n"
        "    except Exception as e:\n"
        "        out.append([type(e).__name__, str(e)])\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (budget, wrong) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert budget[0] == "BudgetExceeded" and "'tiny-budget'" in budget[1], budget
    assert wrong[0] == "Unauthenticated", wrong
