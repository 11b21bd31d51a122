"""The generation cache (an evaluation setting): a real edge node (llama.cpp + SmolLM2 over gRPC)
answers a repeated temperature-0 request from it with the engine's own result, and misses when any
setting of the request, the engine or the model file changes."""

from __future__ import annotations

import shutil

import pytest

from edge_helpers import generate, run
from hera_ray.gencache import GenerationCache
from hera_ray.generation import GenerationParams, GenerationResult
from hera_ray.models import resolve_model

pytestmark = pytest.mark.timeout(300)

PARAMS = GenerationParams(messages=(("user", "Name a colour."),), max_tokens=8, request_id="a")


def result(text: str = "Blue.") -> GenerationResult:
    return GenerationResult(text, 12, 3, 0.2, 0.1, 0.05, "stop", "a", logprobs=[-0.1, -0.2, -0.3])


def test_a_stored_result_comes_back_marked_with_the_new_request_id(tmp_path):
    model = resolve_model("smollm2-135m").path
    cache = GenerationCache(tmp_path / "gen.sqlite", model)
    key = cache.key(PARAMS, {"n_ctx": 512})
    assert cache.get(key) is None and cache.misses == 1
    cache.put(key, result())
    hit = cache.get(cache.key(PARAMS.__class__(**{**PARAMS.to_dict(), "request_id": "b"}), {"n_ctx": 512}), "b")
    assert hit is not None and cache.hits == 1
    assert (hit.text, hit.prompt_tokens, hit.completion_tokens, hit.logprobs) == ("Blue.", 12, 3, [-0.1, -0.2, -0.3])
    assert hit.cache_hit and hit.request_id == "b" and hit.queue_s == 0.0
    # Another process (another engine on this machine) opening the same file sees it.
    assert GenerationCache(tmp_path / "gen.sqlite", model).get(key) is not None


@pytest.mark.parametrize("change", [{"max_tokens": 9}, {"stop": ("\n",)}, {"logprobs": True}, {"candidate": "Red."},
                                    {"messages": (("user", "Name a color."),)}, {"continue_final_message": False, "seed": 3},
                                    {"model": "other"}])
def test_any_changed_setting_misses(tmp_path, change):
    cache = GenerationCache(tmp_path / "gen.sqlite", resolve_model("smollm2-135m").path)
    cache.put(cache.key(PARAMS, {"n_ctx": 512}), result())
    changed = GenerationParams(**{**PARAMS.to_dict(), **change})
    assert cache.get(cache.key(changed, {"n_ctx": 512})) is None


def test_another_engine_setting_or_model_file_misses_and_sampling_is_not_cached(tmp_path):
    model = resolve_model("smollm2-135m").path
    cache = GenerationCache(tmp_path / "gen.sqlite", model)
    cache.put(cache.key(PARAMS, {"n_ctx": 512}), result())
    assert cache.get(cache.key(PARAMS, {"n_ctx": 1024})) is None
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model, copy)  # same bytes, another file: its key differs (path and mtime)
    other = GenerationCache(tmp_path / "gen.sqlite", copy)
    assert other.get(other.key(PARAMS, {"n_ctx": 512})) is None and len(other) == 0 and len(cache) == 1
    sampled = GenerationParams(**{**PARAMS.to_dict(), "temperature": 0.7})
    assert cache.key(sampled, {"n_ctx": 512}) is None and cache.get(None) is None


def test_an_edge_node_with_the_cache_answers_a_repeat_from_it_with_the_same_text(module_procs, tmp_path_factory):
    path = tmp_path_factory.mktemp("gencache") / "gen.sqlite"
    edge = module_procs.edge("edge-cached", extra_args=["--n-ctx", "512", "--generation-cache", str(path)])
    ask = dict(messages=[("user", "What is the capital of France?")], max_tokens=12)
    first = run(generate(edge.address, **ask))
    again = run(generate(edge.address, **ask))
    assert not first.cache_hit and again.cache_hit
    assert (again.text, again.prompt_tokens, again.completion_tokens) == (first.text, first.prompt_tokens, first.completion_tokens)
    shorter = run(generate(edge.address, **{**ask, "max_tokens": 5}))
    assert not shorter.cache_hit and shorter.completion_tokens <= 5
    # Sampling is not cached: the same sampled request runs the model again.
    sampled = [run(generate(edge.address, **ask, temperature=0.9, seed=1)) for _ in range(2)]
    assert not any(r.cache_hit for r in sampled)


def test_a_repeated_agent_run_is_answered_from_the_cache_and_the_bench_reports_the_hit_rate(tmp_path):
    import asyncio

    from agent_helpers import Alternate, EngineExecutor, RouterScheduler
    from edge_node.worker import EdgeWorker
    from hera_ray.agent import Agent
    from hera_ray.config import AgentConfig
    from hera_ray.eval.bench import summarise
    from hera_ray.policy import build_policies
    from hera_ray.pricing import DEFAULT_CLOUD_PRICES, FREE
    from hera_ray.scheduler.nodes import NodeSpec, NodeTable
    from hera_ray.scheduler.router import Router

    path, model = tmp_path / "gen.sqlite", resolve_model("smollm2-135m").path
    # Two engines of one machine (edge and "cloud", the same small model here) share the cache file.
    edge, cloud = (EdgeWorker(model, "smollm2-135m", n_ctx=1024, generation_cache=path) for _ in range(2))
    try:
        table = NodeTable()
        table.register(NodeSpec("edge-0", "edge-0:1", "smollm2-135m", 1024, 1, prices=FREE), "t")
        router = Router(table, {**build_policies(), "alternate": Alternate()}, "smollm2-135m", "smollm2-135m",
                        DEFAULT_CLOUD_PRICES)
        agent = Agent(RouterScheduler(router), EngineExecutor({"edge-0:1": edge}, cloud),
                      AgentConfig(max_steps=4, max_chain_tokens=64, max_tokens_per_step=24))
        question = "Tom has 3 boxes of 8 pencils. How many pencils does he have?"
        first, again = (asyncio.run(agent.run(question, "alternate")) for _ in range(2))
    finally:
        edge.close()
        cloud.close()
    assert {t.placement for t in first.trace} == {"edge", "cloud"}
    assert sum(t.cache_hits for t in first.trace) == 0 and all(t.engine_calls == 1 for t in first.trace)
    assert again.chain == first.chain and [t.cache_hits for t in again.trace] == [1] * len(first.trace)
    assert [t.cost for t in again.trace] == [t.cost for t in first.trace]  # billed as the engine's own result
    records = {(p, "q"): {"correct": True, "f1": 1.0, "subtasks": len(r.trace), "edge_subtasks": 1, "cost": r.cost,
                          "latency_s": 1.0, "decision_s": 0.0, "model_s": 0.5, "stages": {},
                          "engine_calls": sum(t.engine_calls for t in r.trace),
                          "cache_hits": sum(t.cache_hits for t in r.trace)}
               for p, r in (("all-llm", first), ("all-slm", again))}
    rates = {p: m["cache_hit_rate"] for p, m in summarise(records, ["all-llm", "all-slm"], {})["policies"].items()}
    assert rates == {"all-llm": 0.0, "all-slm": 1.0}


def test_a_broken_cache_file_is_a_miss_not_a_failure_and_other_backends_refuse_it(tmp_path):
    from pydantic import ValidationError

    from hera_ray.config import CloudLLMConfig

    cache = GenerationCache(tmp_path / "gen.sqlite", resolve_model("smollm2-135m").path)
    key = cache.key(PARAMS, {"n_ctx": 512})
    cache.put(key, result())
    cache._db.execute("DROP TABLE generations")  # the file no longer holds what the cache reads
    assert cache.get(key) is None and cache.put(key, result()).text == "Blue."
    with pytest.raises(ValidationError, match="llama_cpp backend only"):
        CloudLLMConfig(backend="openai", model="gpt-4o-mini", generation_cache=tmp_path / "gen.sqlite")


def test_a_hit_reports_no_engine_time(tmp_path):
    cache = GenerationCache(tmp_path / "gen.sqlite", resolve_model("smollm2-135m").path)
    key = cache.key(PARAMS, {"n_ctx": 512}, tokens=[1, 2, 3])
    assert key != cache.key(PARAMS, {"n_ctx": 512}, tokens=[1, 2, 4])  # the prompt as tokenised is the key
    cache.put(key, result())
    hit = cache.get(key)
    assert (hit.ttft_s, hit.decode_s, hit.queue_s) == (0.0, 0.0, 0.0) and hit.completion_tokens == 3
