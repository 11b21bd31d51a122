"""The agent's step format is parsed from whatever a model writes, and never crashes on it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hera_ray.agent import parse_step


def test_a_well_formed_step():
    step = parse_step("Subtask: add the apples\nResult: 3 + 2 = 5")
    assert (step.subtask, step.result, step.final_answer) == ("add the apples", "3 + 2 = 5", None)


def test_a_final_answer():
    assert parse_step("Final Answer: 5 apples").final_answer == "5 apples"
    assert parse_step("Subtask: sum\nResult: 5\nFinal Answer: 5").final_answer == "5"
    assert parse_step("The answer is 42.").final_answer == "42."
    assert parse_step("so 3 + 2 = 5\n#### 5").final_answer == "5"


def test_a_multi_line_final_answer_is_kept_whole():
    step = parse_step("Subtask: write it\nResult: done\nFinal Answer: ```python\ndef f():\n    return 1\n```")
    assert step.final_answer == "```python"
    assert step.final_text == "```python\ndef f():\n    return 1\n```"
    assert parse_step("Subtask: a\nResult: b").final_text == ""


def test_a_subtask_that_mentions_the_final_answer_does_not_end_the_run():
    step = parse_step("Subtask: Present the final answer.\nResult: They have 32 sheep.")
    assert step.final_answer is None and step.result == "They have 32 sheep."


def test_unformatted_output_becomes_the_result():
    step = parse_step("Paris is the capital.\nIt is in France.")
    assert step.subtask == "Paris is the capital."
    assert step.result == "It is in France."
    assert step.final_answer is None


def test_empty_and_blank_output():
    for text in ("", "   \n\n", None):
        step = parse_step(text)
        assert step.subtask == "" and step.final_answer is None


def test_case_and_spacing_are_tolerated():
    step = parse_step("SUBTASK :  look it up \n  result:  found it\nfinal answer:  yes")
    assert (step.subtask, step.result, step.final_answer) == ("look it up", "found it", "yes")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=400)
       | st.lists(st.sampled_from(["Subtask:", "Result:", "Final Answer:", "####", "\n", ":", " ", "x", "é", "\x00"]),
                  max_size=40).map("".join))
def test_hostile_output_never_crashes_the_parser(text):
    step = parse_step(text)
    assert isinstance(step.subtask, str) and isinstance(step.result, str)
    assert step.final_answer is None or (isinstance(step.final_answer, str) and step.final_answer)
