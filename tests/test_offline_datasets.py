"""What each estimator learns from: the data sets ``hera train`` builds from profile records."""

from __future__ import annotations

import pytest

from hera_ray.estimators.prompts import sp_chain_request
from hera_ray.estimators.prompts import clean_prediction, parse_parts, sp_messages
from hera_ray.offline import datasets as ds


def step(subtask, output="", final=None, by="llm"):
    return {"subtask": subtask, "output": output, "final_answer": final, "by": by, "tokens": 10, "seconds": 0.1}


def record(request_id="gsm8k-1", slm_correct=False, llm_correct=True):
    l0, l1 = step("Add 2 and 3", "5"), step("Final Answer: 5", "5", "5")
    s0 = step("Think about numbers", "hm", by="slm")
    s1, s2 = step("Add 2 plus 3", "5", by="slm"), step("Final Answer: 6", "6", "6", by="slm")
    return {
        "request_id": request_id, "question": "What is 2 + 3?", "gold": "5",
        "all_llm": {"answer": "5", "correct": llm_correct, "steps": [l0, l1]},
        "all_slm": {"answer": "6", "correct": slm_correct, "steps": [s0, s1, s2]},
        "nodes": [
            {"depth": 0, "context": [], "slm": s0, "llm": l0, "similarity": 0.3, "distance": 1,
             "slm_rollout": [s0, s1, s2]},
            {"depth": 1, "context": [l0], "slm": step("Final Answer: 5", "5", "5", by="slm"), "llm": l1,
             "similarity": 0.99, "distance": 0, "slm_rollout": [step("Final Answer: 5", "5", "5", by="slm")]},
        ],
    }


def test_urc_label_is_simple_when_the_slm_alone_loses_nothing():
    assert ds.request_simple(record(slm_correct=True, llm_correct=True))
    assert ds.request_simple(record(slm_correct=False, llm_correct=False))  # the LLM fails too: the SLM is as good
    assert not ds.request_simple(record(slm_correct=False, llm_correct=True))
    split = ds.urc_examples([record("a", llm_correct=True), record("b", llm_correct=False)])
    assert sorted(y for _, y in split.train + split.heldout) == ["complex", "simple"]


def test_sp_examples_are_what_each_side_actually_wrote_after_each_context():
    slm = [ex[1] for ex in ds.sp_examples([record()], "slm").train + ds.sp_examples([record()], "slm").heldout]
    llm = [ex[1] for ex in ds.sp_examples([record()], "llm").train + ds.sp_examples([record()], "llm").heldout]
    assert "Think about numbers" in slm and "Add 2 plus 3" in slm and "Add 2 and 3" not in slm
    assert llm.count("Add 2 and 3") == 1  # spine and node give the same (context, subtask): deduplicated
    assert "Final Answer: 5" in llm and "Think about numbers" not in llm
    # The SP prompt holds the request and the steps so far, and asks for the next step by number.
    prompt = sp_messages("What is 2 + 3?", [("Add 2 and 3", "5")])[1]["content"]
    assert prompt.startswith("Task: What is 2 + 3?") and "Step 1: Add 2 and 3" in prompt and prompt.endswith("Step 2:")


def test_sp_examples_in_the_chain_format_continue_the_agents_own_message():
    from hera_ray.agent.steps import STEP_SYSTEM_PROMPT

    examples = ds.sp_examples([record()], "llm", "chain").train + ds.sp_examples([record()], "llm", "chain").heldout
    by_target = {ex[1]: ex for ex in examples}
    first = by_target["Add 2 and 3"]  # step 0: asked as one turn, nothing to continue
    assert first[2] is False and [m["role"] for m in first[0]] == ["system", "user"]
    assert first[0][0]["content"] == STEP_SYSTEM_PROMPT
    later = by_target["Final Answer: 5"]  # later: the steps so far are the open assistant message
    assert later[2] is True and later[0][-1] == {"role": "assistant", "content": "5"}
    messages, cont = sp_chain_request("q", [("Add 2 and 3", "Add 2 and 3\n")], extra=["So it is 5"])
    assert cont and messages[-1]["content"] == "Add 2 and 3\nSo it is 5\n"


def test_dp_labels_are_distance_classes_and_sd_parts_come_from_converged_slm_steps():
    dp = ds.dp_examples([record()])
    labels = sorted(y for _, y in dp.train + dp.heldout)
    assert labels == ["0", "1"]
    sd = ds.sd_examples([record()])
    (messages, target), = sd.train + sd.heldout  # only the node with d = 1 gives a decomposition
    assert "Step: Add 2 and 3" in messages[1]["content"]
    assert parse_parts(target) == ["Think about numbers", "Add 2 plus 3"]
    cd = ds.cd_labels([record()], max_distance=0)
    assert sorted(c for _, c in cd.train + cd.heldout) == [False, True]


def test_dp_context_plus_slm_input_ends_with_the_slm_subtask_at_the_node():
    r = record()
    plain = [t for t, _ in ds.dp_examples([r]).train + ds.dp_examples([r]).heldout]
    with_slm = [t for t, _ in ds.dp_examples([r], "context+slm").train + ds.dp_examples([r], "context+slm").heldout]
    slm_steps = sorted(n["slm"]["subtask"] for n in r["nodes"])
    assert all("SLM next:" not in t for t in plain)
    assert sorted(t.rsplit("SLM next: ", 1)[1] for t in with_slm) == slm_steps
    assert [t.rsplit("\nSLM next: ", 1)[0] for t in with_slm] == plain  # the same context before it


@pytest.mark.parametrize("slm, llm, outcome", [(False, True, "strong"), (True, False, "weak"), (True, True, "tie"),
                                               (False, False, "tie")])
def test_routellm_labels_say_who_wins_the_request(slm, llm, outcome):
    r = record()
    r["all_slm"]["correct"], r["all_llm"]["correct"] = slm, llm
    assert ds.request_outcome(r) == outcome
    (question, label), = ds.routellm_examples([r]).train + ds.routellm_examples([r]).heldout
    assert (question, label) == (r["question"], outcome)


def test_heldout_is_by_whole_request_and_stable():
    ids = [f"gsm8k-{i}" for i in range(500)]
    held = [i for i in ids if ds.is_heldout(i)]
    assert 60 < len(held) < 140  # about 20%
    assert held == [i for i in ids if ds.is_heldout(i)]
    many = [record(i) for i in ids[:50]]
    split = ds.sp_examples(many, "llm")
    assert split.heldout and split.train and len(split.train) + len(split.heldout) == 50 * 2


def test_sp_output_cleaning():
    assert clean_prediction("Step 3: Multiply 4 by 2\nResult: 8") == "Multiply 4 by 2"
    assert clean_prediction("Subtask: Add them") == "Add them"
    assert clean_prediction("") == ""
    assert parse_parts("- a\n2. b\n\n* c") == ["a", "b", "c"]


def test_sd_learns_the_llms_own_split_where_the_slm_never_lined_up():
    r = record()
    r["nodes"][0]["distance"] = None  # the SLM never reached the LLM's subtask here ...
    r["nodes"][0]["llm_decomposition"] = ["Take 2", "Add 3 to it"]  # ... so the LLM's split is the target
    r["nodes"][1]["llm_decomposition"] = ["only one part"]  # one part is no decomposition
    sd = ds.sd_examples([r])
    (messages, target), = sd.train + sd.heldout
    assert parse_parts(target) == ["Take 2", "Add 3 to it"]


def test_dp_reads_the_slm_step_as_sp_predicts_it_whatever_form_it_comes_in():
    from hera_ray.estimators.prompts import encoder_context

    forms = ["Add 2 and 3\n", "Step 2: Add 2 and 3", "  Add 2   and 3  ", "Add 2 and 3\nthen more"]
    assert len({encoder_context("q", [("a", "a")], f) for f in forms}) == 1
