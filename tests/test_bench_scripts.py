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


# -- bench/faults.py ------------------------------------------------------------------------------


def step(index: int, node: str, failures: list[str] = (), fallback: str = "") -> dict:
    return {"index": index, "node": node, "failures": list(failures), "retries": len(failures), "fallback": fallback}


def test_an_edge_round_counts_only_when_the_trace_shows_the_failure_and_the_retry():
    faults = script("faults")
    moved = {"trace": [step(0, "edge-1"), step(1, "edge-1", ["edge-0: UNAVAILABLE: node froze"])]}
    assert faults.met_fault("edge_freeze", moved, "edge-0")[0] == "trace"
    # The step finished on the struck node (SIGCONT came too soon): the fault was not met.
    stayed = {"trace": [step(0, "edge-0"), step(1, "edge-0")]}
    assert faults.met_fault("edge_freeze", stayed, "edge-0") == ("", "")
    assert faults.met_fault("edge_kill", moved, "edge-1") == ("", "")
    replica = {"trace": [step(0, "cloud", ["cloud: cloud replica failed: died"])]}
    assert faults.met_fault("replica_kill", replica, "cloud")[0] == "trace"


def test_a_scheduler_kill_is_met_by_timing_only_and_says_so():
    faults = script("faults")
    run = {"trace": [step(0, "edge-0"), step(1, "cloud", fallback="no-edge")]}
    met_by, evidence = faults.met_fault("actor_kill", run, "scheduler")
    assert met_by == "timing" and "1 step(s)" in evidence
    assert faults.met_fault("actor_kill", run, "") == ("", "")  # answered before the actor was back


def test_a_failed_round_is_reported_beside_the_others():
    faults = script("faults")

    class Args:
        rounds = 2

    ok = {"request_id": "a", "struck": "scheduler", "status": 200, "met_fault": True, "met_by": "timing", "evidence": "x"}
    failed = {"request_id": "b", "struck": "", "status": 200, "met_fault": False, "met_by": "", "evidence": "",
              "failure": {"kind": "TimeoutError", "message": "not recovered within 300s"}}
    result = faults.report(Args(), {"actor_kill": [{"actor_back_s": 1.0}], "edge_kill": []},
                           {"actor_kill": [ok], "edge_kill": [failed]}, complete=True)
    assert result["rounds_met_fault"] == {"actor_kill": {"trace": 0, "timing": 1, "of": 1},
                                          "edge_kill": {"trace": 0, "timing": 0, "of": 1}}
    assert result["failed_rounds"] == [{"fault": "edge_kill", "request_id": "b", "kind": "TimeoutError",
                                        "message": "not recovered within 300s"}]
    assert set(result["summary"]) == {"actor_kill"} and result["answered_200"] == 2


def test_a_restarted_edge_gets_the_flags_hera_up_gave_it():
    from hera_ray.cluster import local_edge_args
    from hera_ray.config import HeraConfig

    # Given in full: a settings file or HERA_* variables on this machine must not decide the test.
    plain = {"cloud": {"generation_cache": None}, "scheduler": {"tls": {}}}
    assert local_edge_args(HeraConfig.model_validate(plain)) == []
    config = HeraConfig.model_validate({"cloud": {"generation_cache": "/tmp/g.sqlite"},
                                        "scheduler": {"tls": {"cert_file": "/c.pem", "key_file": "/k.pem",
                                                              "ca_file": "/ca.pem", "client_auth": False}}})
    assert local_edge_args(config) == ["--tls-cert-file", "/c.pem", "--tls-key-file", "/k.pem", "--tls-ca-file",
                                       "/ca.pem", "--generation-cache", "/tmp/g.sqlite"]
