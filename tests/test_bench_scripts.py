"""The pure parts of the measurement scripts in bench/: how they count outcomes and read verdicts.
The scripts themselves need a running cluster; these parts do not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raised(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` as raised ``from inner`` (the way LangChain re-raises openai's errors)."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


# -- bench/agent_dropin.py ------------------------------------------------------------------------


class Answered(Exception):
    def __init__(self, status_code: int):
        super().__init__(f"Error code: {status_code}")
        self.status_code = status_code


@pytest.mark.parametrize(("status", "kind"), [(500, "errors_5xx"), (503, "errors_5xx"), (510, "errors_5xx"),
                                              (599, "errors_5xx"), (400, "errors_4xx"), (422, "errors_4xx"),
                                              (404, "errors_4xx")])
def test_a_failed_call_counts_as_5xx_by_its_status_not_its_message(status, kind):
    dropin = script("agent_dropin")
    assert dropin.status_kind(status) == kind
    # The message of a 4xx may hold " 50"; only the status decides.
    assert dropin.error_kind(Answered(status)) == (kind, status)


def test_the_status_is_found_under_the_exception_that_wraps_it():
    dropin = script("agent_dropin")
    assert dropin.error_kind(raised(RuntimeError("wrapped"), Answered(502))) == ("errors_5xx", 502)


def test_no_answer_is_a_connection_error_or_a_timeout_not_a_5xx():
    dropin = script("agent_dropin")
    assert dropin.error_kind(raised(RuntimeError("x"), httpx.ConnectError("refused"))) == ("connection_errors", None)
    assert dropin.error_kind(ConnectionRefusedError()) == ("connection_errors", None)
    assert dropin.error_kind(raised(RuntimeError("x"), httpx.ReadTimeout("slow"))) == ("timeouts", None)
    assert dropin.error_kind(ValueError("a reply LangChain could not read")) == ("other_errors", None)


def test_the_5xx_target_counts_every_policy_and_says_what_got_no_answer():
    dropin = script("agent_dropin")
    run = {"calls": [], "answer": "", "correct": False}
    runs = {"all-llm": [{**run, "error": "", "error_kind": ""}, {**run, "error": "x", "error_kind": "errors_5xx"}],
            "all-slm": [{**run, "error": "x", "error_kind": "connection_errors"},
                        {**run, "error": "x", "error_kind": "errors_4xx"}]}
    summary = dropin.summarize(runs)
    assert summary["all-llm"]["errors_5xx"] == 1 and summary["all-slm"]["connection_errors"] == 1
    assert summary["all-slm"]["errors"] == 2
    assert dropin.targets(summary) == {"parse_failures_as_5xx": {"target": 0, "measured": 1, "met": False,
                                                                 "unanswered_tasks": 1}}
    clean = dropin.summarize({"all-llm": [{**run, "error": "", "error_kind": ""}]})
    assert dropin.targets(clean)["parse_failures_as_5xx"]["met"]


# -- bench/load.py --------------------------------------------------------------------------------


def outcomes(**kw: int) -> dict[str, int]:
    return {"completed": 10, "errors": 0, "lost": 0, "refused_at_end": 0, "duplicates": 0, "throttled_429": 0, **kw}


def test_a_throttled_soak_misses_its_target_even_when_every_429_was_retried():
    load = script("load")
    checks = load.verdict(outcomes(throttled_429=5), soak=True)
    assert list(checks) == ["refused_at_end", "throttled_429", "errors", "lost", "duplicates"]
    assert not checks["throttled_429"]["met"] and checks["throttled_429"]["measured"] == 5
    assert all(v["met"] for k, v in checks.items() if k != "throttled_429")
    assert all(v["met"] for v in load.verdict(outcomes(), soak=True).values())


def test_stress_has_no_target_on_refusals():
    load = script("load")
    checks = load.verdict(outcomes(throttled_429=1500, refused_at_end=24), soak=False)
    assert set(checks) == {"errors", "lost", "duplicates"} and all(v["met"] for v in checks.values())
    assert not load.verdict(outcomes(lost=1), soak=False)["lost"]["met"]
