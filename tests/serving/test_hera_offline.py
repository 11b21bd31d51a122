"""HERA end to end on the real cluster: `hera profile` on its models, `hera train` on that profile,
the trained adapters loaded and predicting, and agent runs under the hera / hybridllm policies
whose traces say which stage decided and with what scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HERA_STAGES = {"urc", "sse", "cd", "sd", "llm"}
QUESTION = "A farmer has 12 cows and buys 7 more, then sells 4. How many cows does he have?"


def hera(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "hera_ray", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_profile(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    args = ("profile", "--n", "3", "--out", str(out), "--max-steps", "3", "--max-depth", "2", "--max-tokens", "48",
            "--max-distance", "1", "--match-threshold", "0.5")
    done = hera(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, args, done


def test_profile_records_both_candidates_at_every_node_and_resumes(tiny_profile):
    out, args, done = tiny_profile
    records = [json.loads(line) for line in (out / "profile.jsonl").read_text().splitlines()]
    assert len(records) == 3 and "profile of 3 request(s)" in done.stdout
    for r in records:
        assert r["all_slm"]["steps"] and r["all_llm"]["steps"]
        assert isinstance(r["all_slm"]["correct"], bool) and isinstance(r["all_llm"]["correct"], bool)
        assert 1 <= len(r["nodes"]) <= 2
        for n in r["nodes"]:
            assert n["slm"]["by"] == "slm" and n["llm"]["by"] == "llm"
            assert n["slm"]["subtask"] and n["llm"]["subtask"] and "output" in n["slm"] and "output" in n["llm"]
            assert -1.0 <= n["similarity"] <= 1.0001
            assert n["distance"] is None or 0 <= n["distance"] <= 1
            assert n["llm_path_correct"] == r["all_llm"]["correct"]
            assert len(n["context"]) == n["depth"]
        # Every SLM step carries its tokens' log-probabilities; the LLM checked the SLM's path.
        for s in r["all_slm"]["steps"]:
            assert len(s["logprobs"]) == s["completion_tokens"] > 0 and all(lp <= 0 for lp in s["logprobs"])
        assert all(s["logprobs"] is None for s in r["all_llm"]["steps"])
        assert [c["index"] for c in r["slm_checks"]] == [i for i, s in enumerate(r["all_slm"]["steps"]) if s["output"].strip()]
        for c in r["slm_checks"]:
            assert c["llm_logprobs"] and len(c["llm_logprobs"]) == len(c["llm_top_logprobs"]) and c["check_prompt_tokens"] > 0
            assert all(lp <= top + 1e-6 for lp, top in zip(c["llm_logprobs"], c["llm_top_logprobs"]))
            assert c["llm"]["by"] == "llm" and c["agree"] == (c["similarity"] >= 0.5)
    # Resume: a second run finds every request done and adds nothing.
    again = hera(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(3 already there)" in again.stderr and len((out / "profile.jsonl").read_text().splitlines()) == 3
    # Different settings are refused, not mixed in.
    other = hera(*args[:-2], "--match-threshold", "0.9")
    assert other.returncode != 0 and "other settings" in other.stderr


def test_train_a_tiny_profile_gives_adapters_that_load_and_predict(tiny_profile, tmp_path):
    out, _, _ = tiny_profile
    est_dir = tmp_path / "estimators"
    done = hera("train", "--profile", str(out), "--out", str(est_dir), "--max-examples", "6", "--max-eval", "3",
                "--encoder-epochs", "1", "--causal-epochs", "1", "--max-len", "256")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "paper" in done.stdout and "urc" in done.stdout
    manifest = json.loads((est_dir / "manifest.json").read_text())
    assert manifest["profile"]["requests"] == 3 and len(manifest["profile"]["data_sha256"]) == 64
    assert {"urc", "hybridllm", "routellm", "dp", "sp_slm", "sp_llm"} <= set(manifest["estimators"])
    assert manifest["estimators"]["routellm"]["labels"] == ["strong", "tie", "weak"]
    assert manifest["estimators"]["sp_llm"]["base"] == "qwen2.5-coder-0.5b" and manifest["sp_format"] == "chain"
    assert manifest["estimators"]["sp_slm"]["path"] is None  # the SLM itself predicts its next step
    assert manifest["estimators"]["urc"]["paper_accuracy"] == 77.9
    assert (est_dir / "sp_llm" / "adapter.gguf").stat().st_size > 100_000
    # hera-verify's step classifier, where the policy looks for it, with its held-out figures.
    from hera_ray.policy.verify import StepClassifier

    verifier = StepClassifier.load(est_dir / "verifier.json")
    assert manifest["estimators"]["verifier"]["kind"] == "logistic" and "accuracy" in verifier.metrics
    assert 0.0 <= verifier.p_good({"mean_logprob": -0.3}) <= 1.0

    import asyncio

    from hera_ray.estimators.trained import LocalEstimators
    from hera_ray.policy.base import SubtaskContext

    est = LocalEstimators(est_dir)
    try:
        ctx = SubtaskContext("r", QUESTION, 0)
        p = asyncio.run(est.request_simple_prob(QUESTION))
        assert 0.0 <= p <= 1.0 and 0.0 <= asyncio.run(est.strong_win_prob(QUESTION)) <= 1.0
        predicted = asyncio.run(est.predict_subtask("llm", ctx))
        assert isinstance(predicted, str) and predicted.strip()
        # Greedy: the same prompt is answered from the memo, with the same prediction.
        assert asyncio.run(est.predict_subtask("llm", ctx)) == predicted and est.memo_hits == 1
        d = asyncio.run(est.distance(ctx, "Add 12 and 7"))
        assert d is None or 0 <= d <= 1
        # DP reads the SLM's next subtask with its confidence (the default input). Asked without the
        # log-probabilities (SP_SLM predicted the step), it scores the step on SP_SLM's model itself.
        assert manifest["dp_input"] == "confidence" and manifest["estimators"]["dp"]["kind"] == "logistic"
        scored = est.slm_logprobs(QUESTION, [], "Add 12 and 7")
        assert scored and all(lp <= 0 for lp in scored)
        assert asyncio.run(est.distance(ctx, "Add 12 and 7", scored)) == d
        assert -1.0 <= asyncio.run(est.similarity(predicted, "Add 12 and 7")) <= 1.0001
        # Beyond value ranges: asked about a profiled request, SP_LLM's prediction of the LLM's first
        # step is about that request: closer (SBERT) to the step the LLM wrote there than an
        # unrelated sentence is.
        from hera_ray.offline.profile import read_profile

        first = read_profile(out)[0]
        actual = first["all_llm"]["steps"][0]["subtask"]
        guess = asyncio.run(est.predict_subtask("llm", SubtaskContext("p", first["question"], 0)))
        unrelated = "The Eiffel Tower is in Paris and was finished in 1889."
        assert asyncio.run(est.similarity(guess, actual)) > asyncio.run(est.similarity(unrelated, actual)), (guess, actual)
    finally:
        est.close()
    # Re-running with the same data and settings reuses every estimator (resume).
    again = hera("train", "--profile", str(out), "--out", str(est_dir), "--max-examples", "6", "--max-eval", "3",
                 "--encoder-epochs", "1", "--causal-epochs", "1", "--max-len", "256")
    assert again.returncode == 0 and "LoRA" not in again.stderr


def test_hera_policy_trace_shows_the_stage_and_scores_of_every_decision(client):
    run = client.run(QUESTION, policy="hera", max_steps=3)
    assert run["trace"]
    for t in run["trace"]:
        assert t["stage"] in HERA_STAGES, t
        assert t["scores"]["kappa"] == pytest.approx(0.6 + min(t["index"], 5) * 0.02)
        assert "urc_p_simple" in t["scores"]
        if t["stage"] != "urc":
            assert "sse_sim" in t["scores"]
        assert (t["placement"] == "cloud") == (t["stage"] == "llm")
        assert t["decision_s"] > 0


def test_ablation_without_urc_never_decides_by_urc(client):
    run = client.run(QUESTION, policy="hera-no-urc", max_steps=2)
    assert run["trace"] and all(t["stage"] in HERA_STAGES - {"urc"} for t in run["trace"])
    assert all("urc_p_simple" not in t["scores"] for t in run["trace"])


def test_hybridllm_places_the_whole_request_on_one_side(client):
    run = client.run(QUESTION, policy="hybridllm", max_steps=3)
    assert run["trace"] and {t["stage"] for t in run["trace"]} == {"hybridllm"}
    assert len({t["placement"] for t in run["trace"]}) == 1


def test_models_and_estimators_endpoints_list_hera(client, cluster):
    import httpx

    from serving_settings import API_KEY

    headers = {"Authorization": f"Bearer {API_KEY}"}
    models = httpx.get(f"{cluster.ingress_url}/v1/models", headers=headers).json()
    assert {"hera", "hera-no-urc", "hera-no-cd", "hera-no-sd", "hybridllm"} <= {m["id"] for m in models["data"]}
    manifest = httpx.get(f"{cluster.ingress_url}/v1/estimators", headers=headers, timeout=30).json()
    assert manifest["estimators"]["urc"]["kind"] == "encoder" and "data_sha256" in manifest["profile"]


def test_a_learned_set_is_swapped_in_while_runs_go_on(cluster, client, tmp_path):
    """hera learn --apply: the estimator deployment takes a new set through Serve's in-place update
    while hera runs are in flight; none fails, and the ingress then reports the new manifest."""
    import json
    import shutil
    import threading

    from hera_ray.cluster import apply_estimators, load_state
    from hera_ray.estimators.trained import estimators_path

    current = estimators_path(None)
    learned = tmp_path / "learned"
    shutil.copytree(current, learned)
    manifest = json.loads((learned / "manifest.json").read_text())
    manifest["history"] = [{"at": "test", "set": str(learned), "estimators": {}}]
    (learned / "manifest.json").write_text(json.dumps(manifest))

    outcomes: list = []

    def ask(i: int) -> None:
        try:
            outcomes.append(client.run(f"What is {i} + {i}?", policy="hera", max_steps=2)["answer"] is not None)
        except Exception as e:  # noqa: BLE001 - what the test counts
            outcomes.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        apply_estimators(str(learned), log=lambda m: None)
        for t in threads:
            t.join(300)
        assert outcomes == [True] * 4, outcomes
        assert client._call("GET", "/v1/estimators")["history"][0]["set"] == str(learned)
        assert load_state().estimators_serving == str(learned)
        assert client.run("What is 2 + 2?", policy="hera", max_steps=1)["trace"]  # and it serves
    finally:
        apply_estimators(str(current), log=lambda m: None)
    assert "history" not in client._call("GET", "/v1/estimators")
