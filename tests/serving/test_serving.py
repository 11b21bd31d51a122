"""End to end through the real cluster: HTTP ingress -> agent -> scheduler actor -> edge nodes
(gRPC) or the cloud deployment (Serve), as a user of the API sees it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from serving_settings import API_KEY, CLOUD_PRICE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"


@pytest.fixture
def oai(cluster):
    return openai.OpenAI(base_url=f"{cluster.ingress_url}/v1", api_key=API_KEY, max_retries=0)


def test_openai_client_gets_a_completion(oai):
    reply = oai.chat.completions.create(model="all-slm", messages=[{"role": "user", "content": QUESTION}])
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0
    hera = reply.model_extra["hera"]
    assert hera["trace"] and all(t["placement"] == "edge" for t in hera["trace"])


def test_openai_client_gets_a_stream(oai):
    chunks = list(oai.chat.completions.create(model="all-llm", messages=[{"role": "user", "content": QUESTION}],
                                              stream=True, stream_options={"include_usage": True}))
    steps = [c.model_extra["hera_step"] for c in chunks if c.model_extra and "hera_step" in c.model_extra]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert steps, "no progress chunk per subtask"
    assert all(s["placement"] == "cloud" for s in steps)
    assert content.strip()
    # As OpenAI streams usage: the finish reason, then one more chunk with no choices and the usage.
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    plain = list(oai.chat.completions.create(model="all-slm", messages=[{"role": "user", "content": QUESTION}],
                                             stream=True, max_tokens=16))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")


def test_text_parts_are_read_and_what_the_agent_cannot_honour_is_refused_by_name(oai, cluster):
    reply = oai.chat.completions.create(model="all-slm", max_completion_tokens=24, user="alice", messages=[
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    hera = reply.model_extra["hera"]
    assert hera["question"] == "Answer briefly.\n\n" + QUESTION and hera["user"] == "alice"
    assert sum(t["completion_tokens"] for t in hera["trace"]) <= 24  # max_completion_tokens caps the chain
    for fields, param in (({"tools": [{"type": "function", "function": {"name": "add"}}]}, "tools"),
                          ({"stop": ["\n"]}, "stop"), ({"temperature": 0.7}, "temperature"), ({"n": 2}, "n"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                           "image_url")):
        body = {"model": "all-slm", "messages": [{"role": "user", "content": QUESTION}], **fields}
        r = httpx.post(f"{cluster.ingress_url}/v1/chat/completions", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400 and param in r.json()["error"]["message"], (fields, r.text)
    assert httpx.get(f"{cluster.ingress_url}/healthz", timeout=10).json()["status"] == "ok"


def test_models_and_health(oai, cluster):
    assert {"all-slm", "all-llm", "random"} <= {m.id for m in oai.models.list()}
    health = httpx.get(f"{cluster.ingress_url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["nodes_up"] == 2
    assert health["max_concurrent_runs"] == 8 and health["runs_in_flight"] == 0


def test_hera_nodes_finds_the_cluster_hera_up_started(cluster):
    """`hera nodes` with no flags reads the registry and token of the cluster `hera up` started here."""
    out = subprocess.run([sys.executable, "-m", "hera_ray", "nodes", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout)
    assert sorted(n["node_id"] for n in nodes) == ["edge-0", "edge-1"] and {n["state"] for n in nodes} == {"up"}


def test_all_slm_trace_matches_what_ran(client, cluster):
    run = client.run(QUESTION, policy="all-slm", max_steps=3)
    assert 1 <= len(run["trace"]) <= 3
    nodes = {t["node"] for t in run["trace"]}
    assert nodes <= {"edge-0", "edge-1"} and len(nodes) == 1  # one request stays on one edge node
    for i, t in enumerate(run["trace"]):
        assert t["index"] == i
        assert t["placement"] == "edge" and t["stage"] == "all-slm" and t["model"] == "smollm2-135m"
        assert t["tokens"] == t["prompt_tokens"] + t["completion_tokens"] > 0
        assert t["cost"] == 0.0  # edge nodes advertise price 0
        assert t["latency_s"] >= t["generation_s"] > 0 and t["decision_s"] > 0
    assert run["slm_share"] == 1.0 and run["usage"]["edge_subtasks"] == len(run["trace"])


def test_all_llm_trace_is_charged_at_the_cloud_price(client):
    run = client.run(QUESTION, policy="all-llm", max_steps=2)
    assert 1 <= len(run["trace"]) <= 2
    for t in run["trace"]:
        assert t["placement"] == "cloud" and t["node"] == "cloud" and t["model"] == "smollm2-as-cloud"
        assert t["cost"] == pytest.approx(t["tokens"] * CLOUD_PRICE / 1000)
    assert run["cost"] == pytest.approx(run["usage"]["cloud_cost"]) and run["cost"] > 0
    assert run["cloud_tokens"] == sum(t["tokens"] for t in run["trace"])
    assert run["slm_share"] == 0.0


def test_random_policy_places_by_its_recorded_draw(client):
    run = client.run("List three colours, one step at a time.", policy="random", max_steps=3)
    assert 1 <= len(run["trace"]) <= 3
    for t in run["trace"]:
        expected = "edge" if t["scores"]["draw"] < t["scores"]["slm_share"] else "cloud"
        assert t["placement"] == expected


@pytest.mark.parametrize("threshold, escalates", [(0.0, False), (1.01, True)])
def test_a_cascade_reviews_the_slm_s_chain_by_its_real_token_probabilities(client, threshold, escalates):
    run = client.run(QUESTION, policy=f"cascade@{threshold:g}", max_steps=2)
    slm = [t for t in run["trace"] if t["placement"] == "edge"]
    assert slm and all(t["stage"] == "cascade-slm" for t in slm)
    conf = run["review"]["scores"]["slm_confidence"]
    assert 0.0 < conf <= 1.0 and run["review"]["scores"]["tokens"] == sum(t["completion_tokens"] for t in slm)
    assert run["review"]["stage"] == ("cascade-escalate" if escalates else "cascade-accept")
    llm = [t for t in run["trace"] if t["placement"] == "cloud"]
    assert all(t["discarded"] for t in slm) == escalates and all(not t["discarded"] for t in llm)
    assert bool(llm) == escalates and all(t["stage"] == "cascade-llm" for t in llm)
    assert run["cost"] == pytest.approx(run["usage"]["cloud_cost"])


def test_cloud_budget_cap_sends_subtasks_to_the_edge(client):
    run = client.run(QUESTION, policy="all-llm", max_steps=2, max_cloud_cost=0.0)
    assert run["trace"]
    assert all(t["placement"] == "edge" and t["fallback"] == "budget" for t in run["trace"])
    assert run["usage"]["cloud_cost"] == 0.0


def _post(cluster, path, **kw):
    headers = {"Authorization": f"Bearer {API_KEY}", **kw.pop("headers", {})}
    return httpx.post(f"{cluster.ingress_url}{path}", headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("case, kwargs, status, words", [
    ("bad json", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("unknown model", {"json": {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}}, 404, "unknown model 'gpt-9'"),
    ("missing messages", {"json": {"model": "all-slm"}}, 400, "messages"),
    ("empty messages", {"json": {"model": "all-slm", "messages": []}}, 400, "messages"),
    ("no user message", {"json": {"model": "all-slm", "messages": [{"role": "system", "content": "x"}]}}, 400, "user message"),
    ("bad role", {"json": {"model": "all-slm", "messages": [{"role": "wizard", "content": "x"}]}}, 400, "role"),
    ("oversized body", {"content": b"x" * (5 * 1024 * 1024), "headers": {"content-type": "application/json"}}, 413,
     f"the limit is {4 * 1024 * 1024}"),
    # Under the cluster's 4 MiB ingress.max_body_bytes (the old fixed 1 MiB would have refused it): read, and refused as JSON.
    ("body under the configured limit", {"content": b"x" * (2 * 1024 * 1024), "headers": {"content-type": "application/json"}},
     400, "not valid JSON"),
    # A lone UTF-16 surrogate is valid JSON but no text a model can read.
    ("lone surrogate", {"content": b'{"model": "all-slm", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
                        "headers": {"content-type": "application/json"}}, 400, "Unicode"),
    ("bad key", {"json": {"model": "all-slm", "messages": [{"role": "user", "content": "hi"}]},
                 "headers": {"Authorization": "Bearer wrong"}}, 401, "API key"),
])
def test_bad_requests_get_a_4xx_with_a_message(cluster, case, kwargs, status, words):
    r = _post(cluster, "/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_a_wrong_method_gets_405_with_every_allowed_method(cluster):
    r = httpx.delete(f"{cluster.ingress_url}/v1/agent/runs", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST", (r.headers, r.text)
    assert "Method Not Allowed" in r.json()["error"]["message"]


def test_bad_agent_runs_are_refused(cluster):
    for body, status, words in [({"question": "  "}, 400, "blank"), ({"question": "hi", "policy": "nope"}, 404, "unknown"),
                                ({"question": "hi", "max_steps": 0}, 400, "max_steps")]:
        r = _post(cluster, "/v1/agent/runs", json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    r = httpx.get(f"{cluster.ingress_url}/v1/models", timeout=10)
    assert r.status_code == 401
    assert httpx.get(f"{cluster.ingress_url}/healthz", timeout=10).status_code == 200  # still up


def test_hera_ask_prints_json_trace(cluster):
    env = {**os.environ, "HERA_URL": cluster.ingress_url}
    out = subprocess.run([sys.executable, "-m", "hera_ray", "ask", QUESTION, "--policy", "all-llm", "--max-steps", "1",
                          "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout)
    assert run["answer"]
    (entry,) = run["trace"]
    assert {"placement", "node", "tokens", "cost", "latency_s"} <= set(entry)
    assert entry["placement"] == "cloud"


def test_submit_through_ray_client(cluster, ray_head):
    script = (
        "from hera_ray import submit\n"
        f"r = submit({QUESTION!r}, policy='all-slm', address='ray://127.0.0.1:{ray_head['client_port']}', max_steps=1)\n"
        "import json; print(json.dumps({'placements': [t['placement'] for t in r['trace']], 'answer': r['answer']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["placements"] == ["edge"] and result["answer"]


def test_prometheus_metrics_count_subtasks(client, ray_head):
    client.run(QUESTION, policy="all-llm", max_steps=1)
    client.health()  # health checks refresh the per-node load gauges
    wanted = ("hera_subtasks", "hera_decision_latency_s", "hera_tokens", "hera_node_load")
    deadline = time.monotonic() + 120  # Ray exports metrics every few seconds; slower under load
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{ray_head['metrics_port']}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert 'placement="cloud"' in text and "hera_subtasks" in text
    assert "hera_decision_latency_s" in text and "hera_node_load" in text


def test_openai_backend_talks_to_an_openai_compatible_endpoint(cluster):
    """The `openai` cloud backend, pointed at a real OpenAI-compatible server: hera-ray's own ingress."""
    import asyncio

    from cloud_node.backends import OpenAIBackend
    from hera_ray.config import CloudLLMConfig
    from hera_ray.errors import ConfigError
    from hera_ray.generation import GenerationParams

    config = CloudLLMConfig(backend="openai", model="all-slm", openai_base_url=f"{cluster.ingress_url}/v1",
                            openai_api_key_env="HERA_API_KEY")
    backend = OpenAIBackend(config)
    result = asyncio.run(backend.generate(GenerationParams(messages=(("user", QUESTION),), max_tokens=32)))
    assert result.text and result.prompt_tokens > 0 and result.completion_tokens > 0
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        OpenAIBackend(config.model_copy(update={"openai_api_key_env": "NO_SUCH_KEY_VAR"}))


def test_an_endpoint_that_cannot_continue_a_message_gets_the_turns_format(cluster):
    """The agent over the `openai` backend pointed at a real OpenAI-compatible server (hera-ray's own
    ingress, which neither continues an assistant message nor says which stop string ended a reply):
    each step is asked for in the documented turns format, the newline the server drops is put back,
    and the trace says which format ran."""
    import asyncio

    from agent_helpers import RouterScheduler
    from cloud_node.backends import OpenAIBackend
    from hera_ray.agent import Agent, StepFormat
    from hera_ray.config import AgentConfig, CloudLLMConfig
    from hera_ray.policy import build_policies
    from hera_ray.pricing import DEFAULT_CLOUD_PRICES
    from hera_ray.scheduler.nodes import NodeTable
    from hera_ray.scheduler.router import Router

    # Step mode (model step:all-slm): each call answered as it stands, its stop string honoured.
    backend = OpenAIBackend(CloudLLMConfig(backend="openai", model="step:all-slm", openai_base_url=f"{cluster.ingress_url}/v1",
                                           openai_api_key_env="HERA_API_KEY"))
    sent = []

    class OverTheAPI:
        async def cloud(self, params):
            sent.append(params)
            return await backend.generate(params)

        async def edge(self, address, params):  # pragma: no cover - all-llm places nothing on the edge
            raise AssertionError("no edge step expected")

    router = Router(NodeTable(), build_policies(), "slm", "step:all-slm", DEFAULT_CLOUD_PRICES)
    agent = Agent(RouterScheduler(router), OverTheAPI(), AgentConfig(max_steps=2, max_tokens_per_step=32),
                  cloud_step_format=StepFormat.TURNS)
    run = asyncio.run(agent.run(QUESTION, "all-llm"))
    assert run.trace and all(t.step_format == "turns" and t.placement == "cloud" for t in run.trace)
    assert not any(p.continue_final_message for p in sent) and all(p.stop == () and p.stop_at_line_end for p in sent)
    assert run.chain == "".join(t.output + t.boundary for t in run.trace)
    assert all(t.cost > 0 for t in run.trace)
    from hera_ray.errors import InvalidRequest
    from hera_ray.generation import GenerationParams

    with pytest.raises(InvalidRequest, match="not set to continue an open assistant message"):
        asyncio.run(backend.generate(GenerationParams(messages=(("user", "q"), ("assistant", "so far")),
                                                      continue_final_message=True, max_tokens=8)))


def test_step_mode_places_each_call_of_the_caller_s_agent_and_says_where_it_ran(oai, cluster):
    """Model step:<policy>: the call is one subtask of the caller's agent; the chosen model answers
    the conversation as it stands, and the response's hera field says where, why, and for which session."""
    models = {m.id for m in oai.models.list()}
    assert {"step:all-slm", "step:all-llm", "step:hera-verify"} <= models
    convo = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    first = oai.chat.completions.create(model="step:all-llm", messages=convo, max_tokens=12, user="agent-7")
    hera = first.model_extra["hera"]
    assert (hera["mode"], hera["placement"], hera["model"], hera["position"]) == ("step", "cloud", "smollm2-as-cloud", 0)
    assert hera["session"] == "default:user-agent-7"  # the user field names the session
    assert hera["cost"] > 0 and first.choices[0].message.content
    assert first.usage.completion_tokens <= 12 and first.choices[0].finish_reason in ("stop", "length")
    # The next call of the same agent: one assistant turn later, same session (here from the opening messages).
    convo2 = convo + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "Another one."}]
    a = oai.chat.completions.create(model="step:all-slm", messages=convo2, max_tokens=8).model_extra["hera"]
    b = oai.chat.completions.create(model="step:all-slm", messages=convo2 + [
        {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And one more."}], max_tokens=8).model_extra["hera"]
    assert (a["placement"], a["position"], b["position"]) == ("edge", 1, 2) and a["session"] == b["session"]
    assert a["session"].startswith("default:conv-")  # no header, no user: derived from the opening messages
    assert a["cost"] == 0.0
    headers = {"X-Hera-Session": "run-42"}
    c = oai.chat.completions.create(model="step:all-slm", messages=convo, max_tokens=4, extra_headers=headers)
    assert c.model_extra["hera"]["session"] == "default:session-run-42"  # under the caller's API key
    # Streamed as OpenAI streams: role, content, the finish reason (with hera), then the usage.
    chunks = list(oai.chat.completions.create(model="step:all-slm", messages=convo, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].model_extra["hera"]["placement"] == "edge"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_step_mode_refuses_what_it_cannot_honour_by_name(cluster):
    add = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    cases = [({"tools": [add], "tool_choice": "required"}, "tool_choice"), ({"max_steps": 3}, "max_steps"),
             ({"max_tokens": 30_000}, "step_max_tokens_limit"),
             ({"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": 5}}}]}, "tools"),
             ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "1"}]}, "tool_call_id"),
             # what JSON Schema cannot state across messages (the schema says it in words)
             ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}]},
              "messages.1.tool_call_id: 'call_1' answers no call"),
             ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "call_9", "content": "5"}]},
              "messages.2.tool_call_id: 'call_9' was never issued"),
             ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
                 {**call, "function": {"name": "add", "arguments": "{a: 2"}}]}]},
              "messages.1.tool_calls.0.function.arguments: the arguments of call 'call_1': not JSON"),
             ({"tools": [add, add]}, "tools.1.function.name: a tool named 'add' is declared twice")]
    for fields, param in cases:
        body = {"model": "step:all-slm", "messages": [{"role": "user", "content": "hi"}], **fields}
        r = _post(cluster, "/v1/chat/completions", json=body)
        assert r.status_code == 400 and param in r.json()["error"]["message"], (fields, r.text)
        if ": " in param:  # the field at fault, as OpenAI's error names it
            assert r.json()["error"]["param"] == param.split(": ")[0], r.text
    # A conversation longer than every model's window (the edges', then the cloud's 8192): OpenAI's
    # code for it, which SDKs branch on, and a message that names the window.
    body = {"model": "step:all-slm", "messages": [{"role": "user", "content": "word " * 12_000}], "max_tokens": 16}
    r = _post(cluster, "/v1/chat/completions", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded", r.text
    assert "context window of 8192 tokens" in error["message"], r.text
    # Not models step mode serves (nor GET /v1/models lists): a 404, as for any unknown model.
    for model, words in (("step:gpt-9", "gpt-9"), ("step:cascade", "chain")):
        r = _post(cluster, "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and words in r.json()["error"]["message"], r.text
    models = {m["id"] for m in httpx.get(f"{cluster.ingress_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                                         timeout=30).json()["data"]}
    assert "cascade" in models and "step:cascade" not in models and "step:all-slm" in models
