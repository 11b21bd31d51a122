"""schemathesis against the ingress's own OpenAPI schema: every operation, valid and invalid
data, every check (`--checks all`): not one 5xx, and the schema tells the truth. Valid data is
accepted and invalid data refused, each status the server answers is declared with the body it
sends, and a method a path does not take is a 405 that says which it does (Allow).

It runs schemathesis' CLI in a subprocess (its engine keeps global state that a pytest process
need not share) with an NDJSON report, and counts the cases and the statuses from that report.
What JSON Schema cannot state about a conversation is kept in the generated data by
``schemathesis_hooks.py``; the refusals of what breaks it are tested in ``test_serving.py``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from serving_settings import API_KEY

pytestmark = pytest.mark.timeout(1200)

MIN_CASES = 500


def _text(value) -> str:
    """A body from the report: bytes come base64-encoded."""
    if isinstance(value, dict) and "$base64" in value:
        return base64.b64decode(value["$base64"]).decode(errors="replace")
    return repr(value)


def _report(path: Path) -> tuple[int, Counter, list[str]]:
    """(cases, statuses by (operation, code), problems) from schemathesis' NDJSON event stream."""
    cases, statuses, problems = 0, Counter(), []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" in event:
            recorder = event["ScenarioFinished"]["recorder"]
            cases += len(recorder.get("cases", {}))  # a skipped scenario has none
            for case_id, interaction in recorder.get("interactions", {}).items():
                response = interaction.get("response")
                if response is None:
                    problems.append(f"{recorder['label']}: no response for case {case_id}")
                    continue
                statuses[recorder["label"], response["status_code"]] += 1
                if response["status_code"] >= 500:
                    body, answer = _text(interaction["request"].get("body")), _text(response.get("content"))
                    problems.append(f"{recorder['label']} -> {response['status_code']}: {body:.300} answer {answer:.300}")
        elif "NonFatalError" in event or "FatalError" in event:
            # Whole, with its traceback: a cut one once hid what a flaky failure was.
            problems.append(f"schemathesis error: {json.dumps(event)[:6000]}")
    return cases, statuses, problems


def test_every_operation_keeps_the_contract_and_none_answers_5xx(cluster, tmp_path):
    import httpx

    report = tmp_path / "events.ndjson"
    schemathesis = Path(sys.executable).with_name("schemathesis")
    command = [
        str(schemathesis), "run", f"{cluster.ingress_url}/openapi.json",
        "--checks", "all",
        "--mode", "all",  # valid and invalid data
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "200",
        "--seed", "7",
        # One worker: schemathesis' learning state (captured response values, error feedback) and
        # Hypothesis are shared by its worker threads, and a draw that another thread changes under it
        # replays differently ("FlakyFailure: Inconsistent results", seen once in CI).
        "--workers", "1",
        "--suppress-health-check", "all",
        # Every check is on; max_response_time's limit (10 s unless given) is set for CPU models on a shared
        # box: a conversation of the schema's 1000 messages takes the edge a minute to read.
        "--max-response-time", "240",
        "--request-timeout", "300",
        "-H", f"Authorization: Bearer {API_KEY}",
        "--report", "ndjson", "--report-ndjson-path", str(report),
    ]
    # What the schema states only in words (a tool message answers an issued call, ...) is kept in
    # the data schemathesis generates by a hook, so that "valid data is accepted" tests the rest.
    hooks = Path(__file__).with_name("schemathesis_hooks.py")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(hooks)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1000, cwd=tmp_path, env=env)
    cases, by_operation, problems = _report(report)
    statuses = Counter()
    for (_operation, code), n in by_operation.items():
        statuses[code] += n
    summary = f"{cases} cases, statuses {dict(sorted(statuses.items()))}"
    print("\n".join(f"  {operation} {code}: {n}" for (operation, code), n in sorted(by_operation.items())))
    print(f"\nschemathesis: {summary}")
    assert not problems, "\n".join([summary, *problems[:20]])
    # A failed check (a status the schema does not declare, valid data refused, ...) fails the run.
    assert done.returncode == 0, f"{summary}\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert cases >= MIN_CASES, summary
    paths = httpx.get(f"{cluster.ingress_url}/openapi.json", timeout=30).json()["paths"]
    operations = {f"{method.upper()} {path}" for path, item in paths.items() for method in item}
    answered = {operation for operation, _code in by_operation}
    assert operations <= answered, f"operations schemathesis never reached: {sorted(operations - answered)}"
    assert not [code for code in statuses if code >= 500], summary
    assert any(200 <= code < 300 for code in statuses) and any(400 <= code < 500 for code in statuses), summary


def test_limits_found_by_fuzzing_are_400_naming_the_problem(cluster):
    """What the fuzzing above turned up, as plain requests: each is a 400 that says why."""
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    cases = [
        ('{"question": "hi", "max_steps": 4}', "agent.max_steps_limit"),  # the test cluster's limit is 3
        ('{"question": "hi", "max_cloud_cost": Infinity}', "finite number"),  # Python's JSON parser takes it
        ('{"question": "hi", "max_cloud_cost": NaN}', "finite number"),
    ]
    for body, words in cases:
        r = httpx.post(f"{cluster.ingress_url}/v1/agent/runs", content=body, headers=headers, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
