"""Scorers on hand-worked answers: right, wrong, malformed, empty and None, one kind at a time."""

from __future__ import annotations

import pytest

from hera_ray.eval.datasets import SPAN_SEP, Item
from hera_ray.eval.scorers import SCORERS, Score, drop_metrics, extract_code, gsm8k_correct, score


def number_item(gold: str) -> Item:
    return Item("gsm8k", "1", "How many?", gold)


def span_item(*golds: str) -> Item:
    return Item("drop", "q", "Passage ... Question ...", golds[0], golds=golds, kind="span")


def yesno_item(gold: str) -> Item:
    return Item("strategyqa", "q", "Is it?", gold, kind="yesno")


CHOICES = ("Sunlight is the source of energy.", "Most ecosystems are on land.", "Carbon dioxide is common.",
           "The producers are plants.")


def choice_item(gold: str = "B") -> Item:
    return Item("arc_easy", "q", "Which?", gold, kind="choice", choices=CHOICES)


PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n    5\n    """\n'
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n"


def code_item() -> Item:
    return Item("humaneval", "HumanEval/x", "Complete add", PROMPT + "    return a + b\n", kind="code",
                prompt=PROMPT, tests=TESTS, entry_point="add")


# -- number ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, correct", [
    ("$1,234.00", True),
    ("The answer is 1234", True),
    ("1234.5", False),
    ("1,235", False),
    ("no idea", False),
    ("", False),
    (None, False),
])
def test_number_scorer(answer, correct):
    s = score(number_item("1234"), answer)
    assert s.correct is correct
    assert s.em == s.f1 == float(correct)


def test_number_without_number_says_so_and_falls_back_to_the_output():
    assert score(number_item("18"), "I am not sure").detail == "no number"
    assert score(number_item("18"), "", "16 - 3 - 4 = 9 eggs, 9 * 2 = 18").correct


def test_gsm8k_correct_kept_for_old_callers():
    assert gsm8k_correct("$1,234.00", "1234") and not gsm8k_correct("12", "1234")
    assert SCORERS["gsm8k"] is gsm8k_correct


# -- span (DROP) ----------------------------------------------------------------------------------


def test_drop_articles_and_case_are_ignored():
    assert score(span_item("the Bears"), "Bears") == Score(True, 1.0, 1.0, "")
    assert score(span_item("Bears"), "THE bears.").correct


def test_drop_partial_overlap_f1():
    # "the Chicago Bears" -> {chicago, bears}; "Bears defense" -> {bears, defense}:
    # 1 common token, P = R = 1/2, F1 = 0.5
    s = score(span_item("the Chicago Bears"), "Bears defense")
    assert (s.correct, s.em, s.f1) == (False, 0.0, 0.5)
    # gold {john, kasay}, predicted {kasay, kicked, field, goal}: P = 1/4, R = 1/2, F1 = 1/3 -> 0.33
    assert score(span_item("John Kasay"), "Kasay kicked a field goal").f1 == 0.33


def test_drop_numbers_are_normalised():
    assert score(span_item("1000"), "1,000").correct
    assert score(span_item("5"), "5.0").correct
    assert score(span_item("5 yards"), "5.0 yards").correct


def test_drop_numbers_must_match_for_any_f1():
    # {24, yards} vs {23, yards} share "yards", but the numbers differ: F1 0
    assert score(span_item("24 yards"), "23 yards").f1 == 0.0


def test_drop_max_over_golds():
    s = score(span_item("1507", "1477"), "1477")
    assert s.correct and s.f1 == 1.0


def test_drop_multi_span_gold():
    gold = SPAN_SEP.join(["Spain", "Italy", "the Netherlands"])
    assert score(span_item(gold), "Spain, Italy and Netherlands").correct
    assert score(span_item(gold), "Netherlands, Spain, Italy").correct  # order does not matter
    # two of three spans right: aligned F1 (1 + 1 + 0) / 3 = 0.67, no EM
    s = score(span_item(gold), "Spain, Italy")
    assert (s.em, s.f1) == (0.0, 0.67)
    # commas inside numbers do not cut spans; "and" inside a gold span is kept when that fits better
    assert score(span_item(SPAN_SEP.join(["15,557 people", "4,365 families"])), "15,557 people, 4,365 families").correct
    assert score(span_item(SPAN_SEP.join(["28 and 37 yards", "26-yard"])), "28 and 37 yards, 26-yard").correct


def test_drop_long_junk_answer_is_cheap():
    s = score(span_item(SPAN_SEP.join("abcdef")), "x, " * 50_000)
    assert s == Score(False, 0.0, 0.0, "no exact match")


def test_drop_metric_matches_the_official_examples():
    assert drop_metrics("Bears", "the Bears") == (1.0, 1.0)
    assert drop_metrics(["Spain", "Italy"], ["Italy", "Spain"]) == (1.0, 1.0)
    assert drop_metrics("two", "2") == (0.0, 0.0)


@pytest.mark.parametrize("answer", ["", "   ", None])
def test_drop_empty_answer_scores_zero(answer):
    assert score(span_item("the Bears"), answer, "the Bears") == Score(False, 0.0, 0.0, "empty answer")


# -- yes/no ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, gold, correct", [
    ("Yes", "yes", True),
    ("yes.", "yes", True),
    ("No, because frost is rare then.", "no", True),
    ("True", "yes", True),
    ("false", "no", True),
    ("No", "yes", False),
    ("Yes, there is no doubt", "yes", True),  # the first yes/no word counts
])
def test_yesno_scorer(answer, gold, correct):
    assert score(yesno_item(gold), answer).correct is correct


def test_yesno_without_yes_or_no():
    s = score(yesno_item("yes"), "Maybe", "I cannot tell")
    assert s == Score(False, 0.0, 0.0, "no yes/no")
    assert score(yesno_item("yes"), None).detail == "no yes/no"


def test_yesno_falls_back_to_the_last_word_of_the_output():
    assert score(yesno_item("no"), "", "Is there any? Yes, some... so the answer is no.").correct


# -- choice ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["B", "(B)", "B.", "B) Most ecosystems are on land.", "The answer is B",
                                    "Answer: (B)", "**B**", "b", "Most ecosystems are on land."])
def test_choice_forms_of_the_right_letter(answer):
    assert score(choice_item("B"), answer).correct, answer


@pytest.mark.parametrize("answer", ["A", "The answer is C", "The producers are plants."])
def test_choice_wrong_letter(answer):
    assert not score(choice_item("B"), answer).correct


@pytest.mark.parametrize("answer", ["", None, "I am not sure", "F", "The answer is a plant"])
def test_choice_without_a_letter(answer):
    assert score(choice_item("B"), answer) == Score(False, 0.0, 0.0, "no choice letter")


@pytest.mark.parametrize("answer", ["A, B, C, D", "B or C", "A/B"])
def test_choice_naming_several_letters_is_wrong_even_if_the_output_says_more(answer):
    assert score(choice_item("B"), answer, "so the answer is B") == Score(False, 0.0, 0.0, "several choices")


def test_choice_fallback_reads_only_letters_of_real_choices():
    assert score(choice_item("B"), "", "the answer is E").detail == "no choice letter"


def test_choice_falls_back_to_the_output():
    assert score(choice_item("B"), "", "Sunlight matters, but the answer is B.").correct


# -- code -----------------------------------------------------------------------------------------


def test_code_full_function_in_a_block_passes():
    output = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    from hera_ray.eval.sandbox import PYTHON_BLOCK, isolation

    scored = score(code_item(), "", output)
    # the program ran under this host's sandbox layers, which the bench records per run
    assert scored == Score(True, 1.0, 1.0, "", isolation()) and scored.isolation[-1] == PYTHON_BLOCK
    assert score(code_item(), "", "no program here").isolation == ()  # nothing ran


def test_code_body_only_completes_the_prompt():
    assert score(code_item(), "", "```python\n    return a + b\n```").correct


def test_code_in_the_answer_or_as_plain_text():
    assert score(code_item(), "def add(a, b): return a + b").correct


def test_code_prefers_the_block_that_defines_the_entry_point():
    output = "```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1, 2))\n```"
    assert score(code_item(), "", output).correct


def test_code_wrong_solution_fails_with_assertion_error():
    scored = score(code_item(), "", "```python\ndef add(a, b):\n    return a - b\n```")
    assert (scored.correct, scored.em, scored.f1, scored.detail) == (False, 0.0, 0.0, "AssertionError")


def test_code_is_judged_by_the_item_s_tests_not_the_model_s_own():
    """The model's own top-level test code (a wrong assert, a print, a __main__ block) is dropped
    before the item's tests run, as EvalPlus's sanitizer does; its definitions stay."""
    output = ("```python\nimport math\n\nOFFSET = 0\n\ndef add(a, b):\n    return a + b + OFFSET\n\n"
              "assert add(2, 2) == 5  # the model's wrong guess\nprint(add(1, 2))\n"
              "if __name__ == '__main__':\n    raise SystemExit(1)\n```")
    assert score(code_item(), "", output).correct
    wrong = "```python\ndef add(a, b):\n    return a - b\n\nassert add(2, 2) == 0\n```"
    assert score(code_item(), "", wrong).detail == "AssertionError"  # the item's tests still fail it


def test_code_syntax_error_fails():
    assert score(code_item(), "", "```python\ndef add(a, b) return a + b\n```").detail == "SyntaxError"


def test_code_infinite_loop_fails_as_timeout():
    from hera_ray.eval.scorers import score_code

    s = score_code(code_item(), "", "```python\ndef add(a, b):\n    while True:\n        pass\n```", timeout_s=2)
    assert (s.correct, s.detail) == (False, "timeout") and s.isolation


@pytest.mark.parametrize("answer, output", [("", ""), (None, None), ("just words", "no code here"),
                                            (b"\x00\xff\xfe junk", b"\x89PNG\r\n\x1a\n\x00")])
def test_code_without_code(answer, output):
    assert score(code_item(), answer, output) == Score(False, 0.0, 0.0, "no code found")


def test_code_with_nul_bytes_fails_without_raising():
    s = score(code_item(), "", "```python\ndef add(a, b):\x00 return a + b\n```")
    assert not s.correct and s.detail


def test_extract_code_takes_the_last_block():
    assert extract_code("```python\nA = 1\n```\ntext\n```py\nB = 2\n```") == "B = 2\n"
    assert extract_code("```python\nunclosed = 1\n") == "unclosed = 1\n"
    assert extract_code("```bash\nls\n```") is None


def test_unknown_kind_is_incorrect_not_an_error():
    assert score(Item("x", "1", "q", "a", kind="essay"), "a").detail == "no scorer for kind 'essay'"


def test_gold_only_scorers_for_the_profiler():
    assert SCORERS["drop"]("Bears", "the Bears")
    assert SCORERS["strategyqa"]("No.", "no") and not SCORERS["boolq"]("no", "yes")
    assert SCORERS["arc_easy"]("(C)", "C")


def test_code_written_without_a_fence_among_prose_is_found_and_run():
    from hera_ray.eval.scorers import extract_code

    text = ("The function is defined with two parameters.\nCheck: it matches.\n\n"
            "from math import gcd\ndef greatest_common_divisor(a: int, b: int) -> int:\n"
            "    while b != 0:\n        a, b = b, a % b\n\n    return a\nThat is the Euclidean algorithm.\n")
    code = extract_code(text, "greatest_common_divisor")
    assert code.startswith("from math import gcd\ndef greatest_common_divisor") and "return a" in code
    assert "Euclidean" not in code and "Check" not in code
    assert extract_code("no code at all, only words", "f") is None
