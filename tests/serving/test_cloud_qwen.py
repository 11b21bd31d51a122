"""The real cloud deployment: Qwen2.5-Coder-1.5B on llama.cpp behind Ray Serve, small max_tokens."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def qwen_handle(cluster, ray_head, monkeypatch_module):
    import ray
    from ray import serve

    from cloud_node.deployment import build_cloud_deployment
    from hera_ray.config import CloudLLMConfig
    from hera_ray.models import resolve_model

    # The joined file lives in the user's cache (make install joins it once); the session's
    # HERA_CACHE_DIR points elsewhere, so resolve it without that override.
    monkeypatch_module.delenv("HERA_CACHE_DIR")
    path = resolve_model("qwen2.5-coder-1.5b").path
    monkeypatch_module.undo()
    if not ray.is_initialized():
        ray.init(address=ray_head["address"], namespace="hera", log_to_driver=False)
    config = CloudLLMConfig(model=str(path), model_id="qwen2.5-coder-1.5b", n_ctx=1024, threads=2, num_cpus=1,
                            autoscaling={"min_replicas": 1, "max_replicas": 1})
    handle = serve.run(build_cloud_deployment(config), name="qwen-cloud", route_prefix=None)
    yield handle
    handle.shutdown()  # stop this driver's router thread before Ray goes away
    serve.delete("qwen-cloud")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_qwen_deployment_answers_and_counts_tokens(qwen_handle):
    out = qwen_handle.generate.remote({
        "messages": [["user", "What is 12 * 4? Reply with the number only."]],
        "max_tokens": 8, "temperature": 0.0,
    }).result(timeout_s=300)
    assert "error" not in out, out
    assert "48" in out["text"]
    assert 0 < out["completion_tokens"] <= 8 and out["prompt_tokens"] > 10
    assert out["ttft_s"] > 0


def test_qwen_deployment_refuses_bad_input_as_data(qwen_handle):
    out = qwen_handle.generate.remote({"prompt": "hi", "max_tokens": 0}).result(timeout_s=60)
    assert out["error"]["type"] == "InvalidRequest" and "max_tokens" in out["error"]["message"]
    out = qwen_handle.generate.remote({"prompt": "hi", "max_tokens": 4, "model": "gpt-9"}).result(timeout_s=60)
    assert out["error"]["type"] == "ModelNotFound"


def test_qwen_deployment_streams(qwen_handle):
    chunks = list(qwen_handle.options(stream=True).stream.remote({
        "messages": [["user", "Name a prime number greater than 10. Reply with the number only."]],
        "max_tokens": 6, "temperature": 0.0,
    }))
    deltas = [c["delta"] for c in chunks if "delta" in c]
    final = chunks[-1]["final"]
    assert "".join(deltas) == final["text"] and final["completion_tokens"] <= 6
