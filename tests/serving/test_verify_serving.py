"""hera-verify on the live test cluster: the SLM writes every step; the trace shows steps kept by
their confidence, by the step classifier and by the LLM's check, each with the scores that
decided it, and the LLM's check is billed but not counted as a subtask."""

from __future__ import annotations

import pytest

from serving_settings import VERIFY_CONFIDENCE_KEEP

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTIONS = ("A farmer has 12 cows and buys 7 more, then sells 4. How many cows does he have?",
             "Write a python function that returns the sum of a list of numbers.")


def runs(client, policy: str) -> list[dict]:
    return [client.run(q, policy=policy, max_steps=3) for q in QUESTIONS]


def test_steps_are_kept_by_confidence_the_classifier_and_the_llm_check(client):
    lenient = runs(client, "hera-verify@0")  # the classifier keeps what confidence does not
    strict = runs(client, "hera-verify@1")  # P(good) never reaches 1: the LLM checks what confidence does not
    entries = [t for run in lenient + strict for t in run["trace"]]
    stages = {t["stage"] for t in entries}
    assert {"confidence", "classifier", "llm-check"} <= stages <= {"confidence", "classifier", "llm-check", "blank"}, [
        (t["stage"], t["scores"]) for t in entries]
    for t in entries:
        s = t["scores"]
        assert t["placement"] == "edge" and 0.0 < s["slm_confidence"] <= 1.0
        if t["stage"] == "confidence":
            assert s["slm_confidence"] >= VERIFY_CONFIDENCE_KEEP and "p_good" not in s
        elif t["stage"] == "blank":  # a paragraph break: kept, nothing to check
            assert not t["output"].strip() and "p_good" not in s
        else:
            assert s["slm_confidence"] < VERIFY_CONFIDENCE_KEEP and 0.0 < s["p_good"] < 1.0
        if t["stage"] == "classifier":
            assert s["p_good"] >= s["keep"] == 0.0 and t["check_cost"] == 0 and "llm_score" not in s
        if t["stage"] == "llm-check":
            # The same model on both sides here: the LLM would have written these very tokens.
            assert s["keep"] == 1.0 and s["llm_score"] >= s["llm_accept"]
            if t["check_steps"]:  # the first step its check read: the check's prefill is billed here
                assert t["check_prompt_tokens"] > t["prompt_tokens"] and t["check_cost"] > 0
            else:  # read by an earlier step's batched check (verify.check_batch): billed there
                assert t["check_prompt_tokens"] == 0 and t["check_cost"] == 0
    checked = [t for run in strict for t in run["trace"] if t["stage"] == "llm-check"]
    # every step the LLM scored is read by exactly one check: the checks' step counts add up
    assert sum(t["check_steps"] for t in checked) == len(checked) and any(t["check_cost"] > 0 for t in checked)
    for run in lenient + strict:
        # A check is billed to the cloud but is no subtask of its own.
        assert run["usage"]["subtasks"] == len(run["trace"])
        checks = sum(t["check_cost"] for t in run["trace"])
        assert run["usage"]["cloud_cost"] == pytest.approx(checks)
        assert run["cost"] == pytest.approx(sum(t["cost"] + t["check_cost"] for t in run["trace"]))


def test_a_bad_knob_is_refused_with_a_message_that_names_it(client):
    from hera_ray.client import ClientError

    with pytest.raises(ClientError) as e:
        client.run(QUESTIONS[0], policy="hera-verify@1.5", max_steps=1)
    assert e.value.status == 404 and "keep must be in [0, 1]" in str(e.value), str(e.value)
