"""The step format (hera_ray/agent/steps.py) as plain code: where a step ends, how the chain is
joined and asked to go on, and how the answer is read from it."""

from __future__ import annotations

import pytest

from hera_ray.agent.steps import (STEP_BOUNDARY, STEP_SYSTEM_PROMPT, TURNS_NEXT, Step, StepFormat,
                                  chain_answer, chain_text, continues, make_step, one_turn_messages, read_answer, step_messages)
from hera_ray.generation import LINE_END, STOP_UNKNOWN, GenerationParams, validate_params
from hera_ray.errors import InvalidRequest


def test_a_line_end_ends_a_step_and_the_steps_join_into_what_the_model_wrote():
    a = make_step("First, 3 + 2 = 5.\n\n", "stop", LINE_END)  # llama.cpp / vLLM keep the newline token
    b = make_step("Then 5 * 2 = 10", "length", "")  # its token cap: cut mid-line, no boundary
    c = make_step(" apples.\nAnswer: 10", "stop", "")  # the model ended its message
    assert (a.boundary, a.end) == ("", False)
    assert (b.boundary, b.end) == ("", False)
    assert (c.boundary, c.end) == ("", True)
    assert chain_text([a, b, c]) == "First, 3 + 2 = 5.\n\nThen 5 * 2 = 10 apples.\nAnswer: 10"


def test_a_newline_token_that_carries_the_next_line_s_indentation_ends_the_step_as_it_is():
    """A tokenizer may hold a newline and the next line's indentation in one token: the step ends
    with it, and no second newline is added."""
    a = make_step("def f(x):\n    ", "stop", LINE_END)
    assert a == Step("def f(x):\n    ", "", False)
    assert chain_text([a, make_step("return x\n", "stop", LINE_END)]) == "def f(x):\n    return x\n"


def test_a_backend_that_drops_the_newline_gets_it_back():
    assert make_step("3 + 2 = 5.", "stop", LINE_END) == Step("3 + 2 = 5.", STEP_BOUNDARY, False)
    assert chain_text([make_step("3 + 2 = 5.", "stop", LINE_END), make_step("Answer: 5", "stop", "")]) == \
        "3 + 2 = 5.\nAnswer: 5"


def test_a_backend_that_cannot_tell_ends_the_chain_only_on_an_answer_line():
    assert make_step("Add them: 5.", "stop", STOP_UNKNOWN) == Step("Add them: 5.", STEP_BOUNDARY, False)
    assert make_step("Answer: 5", "stop", STOP_UNKNOWN) == Step("Answer: 5", "", True)


def test_the_first_step_asks_exactly_what_one_turn_asks():
    msgs = step_messages("What is 2+3?", "")
    assert msgs == one_turn_messages("What is 2+3?") and not continues(StepFormat.CONTINUE, "")
    assert msgs[0] == ("system", STEP_SYSTEM_PROMPT) and STEP_BOUNDARY == "\n"


def test_later_steps_continue_one_open_assistant_message():
    chain = chain_text([Step("2 + 3 = 5.\n")])
    msgs = step_messages("What is 2+3?", chain)
    assert msgs[-1] == ("assistant", "2 + 3 = 5.\n") and len(msgs) == 3 and continues(StepFormat.CONTINUE, chain)
    # Continuing needs an assistant message last; anything else is refused with a clear error.
    validate_params(GenerationParams(messages=msgs, continue_final_message=True, max_tokens=8))
    with pytest.raises(InvalidRequest, match="continue_final_message needs messages that end with an assistant"):
        validate_params(GenerationParams(messages=msgs[:2], continue_final_message=True, max_tokens=8))


def test_the_turns_fallback_closes_the_steps_and_asks_for_the_next():
    assert step_messages("Q?", "", StepFormat.TURNS) == one_turn_messages("Q?")
    msgs = step_messages("Q?", "a.\n\nb.\n\n", StepFormat.TURNS)
    assert msgs[2:] == (("assistant", "a.\n\nb."), ("user", TURNS_NEXT))


@pytest.mark.parametrize("chain, answer", [
    ("3 + 2 = 5.\n\nAnswer: 5", "5"),
    ("So she pays $18.\n\n**Answer:** $18", "$18"),
    ("Final Answer: 42 apples", "42 apples"),
    ("Thus the total is \\(\\boxed{1,200}\\).", "1,200"),
    ("The answer is 7.", "7."),
    ("so 3 + 2 = 5\n#### 5", "5"),
    ("answer: first\n\nLet me check again.\n\nAnswer: second", "second"),  # the last answer line counts
])
def test_the_answer_is_read_from_the_whole_chain(chain, answer):
    assert read_answer(chain)[0] == answer


def test_a_code_answer_keeps_its_block():
    chain = "Write the function.\n\nAnswer:\n```python\ndef f():\n    return 1\n```"
    answer, final_text = read_answer(chain)
    assert answer == "```python" and final_text.endswith("return 1\n```")


def test_a_step_that_only_mentions_the_answer_is_not_an_answer():
    assert read_answer("Next we present the final answer.")[0] is None
    assert read_answer("") == (None, "")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.lists(st.sampled_from(["Answer:", "\\boxed{", "}", "####", "\n", ":", " ", "7", "é"]),
                                        max_size=40).map("".join))
def test_hostile_output_never_crashes_the_answer_reader(text):
    answer, final_text = read_answer(text)
    assert answer is None or (isinstance(answer, str) and answer)
    assert isinstance(final_text, str)


def test_a_boxed_answer_on_the_answer_line_is_unwrapped():
    assert read_answer("Answer: $\\boxed{18}$")[0] == "18"


def test_an_empty_step_from_a_backend_that_cannot_tell_ends_the_chain():
    assert make_step("", "stop", STOP_UNKNOWN).end


def test_a_chain_without_an_answer_line_stands_on_its_last_line():
    assert chain_answer("3 * 8 = 24.\nSo 14 pencils are left.\n") == ("So 14 pencils are left.", "", False)
    assert chain_answer("24 - 10 = 14.\nAnswer: 14\n") == ("14", "14", True)


def test_a_boxed_answer_is_read_alone():
    assert read_answer("The final answer is: \\boxed{5}.") == ("5", "5")


def test_the_checked_text_drops_only_the_indentation_after_the_last_newline():
    from hera_ray.agent.steps import checked_text

    assert checked_text("def f(x):\n    ") == "def f(x):\n"
    assert checked_text("x = 3 + 4\n") == "x = 3 + 4\n"
    assert checked_text("return x  ") == "return x  "  # cut by its token cap mid-line: kept whole
    assert checked_text("\n\n  ") == "\n\n"
