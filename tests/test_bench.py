"""The bench's arithmetic and bookkeeping as plain code: PGR/APGR, cost normalisation, the
common-items rule, resume and refusal of other settings, calibration's choice, the config file."""

from __future__ import annotations

import json

import pytest
import yaml

from hera_ray.errors import ConfigError, InvalidRequest
from hera_ray.eval.bench import RecordStore, calibrate_choice, pgr, run_names, summarise, write_config_value


def rec(policy, item, correct, edge=0, subtasks=2, cost=0.0, latency=10.0, decision=0.0, stages=None):
    return {"policy": policy, "item": item, "correct": correct, "em": float(correct), "f1": float(correct),
            "detail": "", "answer": "", "gold": "", "finished": True, "subtasks": subtasks, "edge_subtasks": edge,
            "cost": cost, "cloud_tokens": 0, "latency_s": latency, "wall_s": latency, "decision_s": decision,
            "model_s": latency * 0.9, "stages": stages or {"x": subtasks}}


def records(*rs):
    return {(r["policy"], r["item"]): r for r in rs}


def test_pgr_is_the_share_of_the_gap_recovered_and_undefined_without_a_gap():
    assert pgr(0.5, 0.2, 0.6) == pytest.approx(0.75)
    assert pgr(0.2, 0.2, 0.6) == 0.0 and pgr(0.6, 0.2, 0.6) == 1.0
    assert pgr(0.4, 0.3, 0.3) is None


def test_run_names_puts_baselines_first_then_sweeps_then_ablations_without_repeats():
    names = run_names(["hera", "random", "all-llm"], {"hera": (0.5, 0.8), "random": (0.25,)}, ablations=True)
    assert names == ["all-slm", "all-llm", "hera", "hera@0.5", "hera@0.8", "random", "random@0.25",
                     "hera-no-sd", "hera-no-urc", "hera-urc-only"]
    assert run_names(["hybridllm"], {}, ablations=False) == ["all-slm", "all-llm", "hybridllm"]


def test_summary_over_common_items_with_cost_pgr_apgr_and_overhead():
    rs = records(
        # all-slm: 1/4 right, everything on the edge, free
        *(rec("all-slm", str(i), i == 0, edge=2, latency=4.0) for i in range(4)),
        # all-llm: 3/4 right, cost 1 each
        *(rec("all-llm", str(i), i != 3, cost=1.0, latency=20.0) for i in range(4)),
        # hera: 3/4 right, half the subtasks on the edge, half the cost, 1 s of 10 deciding
        *(rec("hera", str(i), i != 3, edge=1, cost=0.5, latency=10.0, decision=1.0) for i in range(4)),
        # hera@0.9: 2/4 right at a tenth of all-llm's cost
        *(rec("hera@0.9", str(i), i in (0, 1), edge=1, cost=0.1, stages={"sse": 1, "llm": 1}) for i in range(4)),
        rec("hera", "extra", True),  # an item not every policy finished: left out
    )
    s = summarise(rs, ["all-slm", "all-llm", "hera", "hera@0.9"], {"hera": (0.9,)})
    p = s["policies"]
    assert s["n"] == 4 and p["hera"]["n"] == 4
    assert p["all-llm"]["cost"] == 1.0 and p["all-slm"]["cost"] == 0.0 and p["hera"]["cost"] == 0.5
    assert p["hera"]["accuracy"] == 0.75 and p["hera"]["slm_share"] == 0.5
    assert p["hera"]["pgr"] == pytest.approx(1.0) and p["hera@0.9"]["pgr"] == pytest.approx(0.5)
    # the area under (0, 0) (0.1, 0.5) (0.5, 1.0) (1, 1): 0.025 + 0.3 + 0.5 (the mean of the two PGRs would be 0.75)
    assert p["hera"]["apgr"] == pytest.approx(0.825) == p["hera@0.9"]["apgr"]
    assert p["hera"]["apgr_span"] == pytest.approx([0.1, 0.5]) and p["all-slm"]["apgr_span"] is None
    assert p["all-slm"]["apgr"] is None
    assert p["hera"]["overhead_share"] == pytest.approx(0.1)
    assert p["all-llm"]["latency_p50_s"] == 20.0
    # hera@0.9 lost item 2 (all-llm right, hera@0.9 wrong); its stages count as the culprits
    assert p["hera@0.9"]["lost_vs_llm"] == 1 and p["hera@0.9"]["gained_vs_llm"] == 0
    assert p["hera@0.9"]["lost_edge_stages"] == {"sse": 1}  # the cloud stage "llm" is not a culprit
    assert p["all-slm"]["lost_vs_llm"] == 2 and p["all-slm"]["gained_vs_llm"] == 0


def test_record_store_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "runs" / "gsm8k-test.jsonl"
    store = RecordStore(path, {"dataset": "gsm8k", "max_steps": 6})
    store.add(rec("hera", "1", True))
    again = RecordStore(path, {"dataset": "gsm8k", "max_steps": 6})
    assert again.done("hera", "1") and not again.done("hera", "2") and not again.done("all-llm", "1")
    with pytest.raises(ConfigError, match="max_steps: recorded 6, now 4"):
        RecordStore(path, {"dataset": "gsm8k", "max_steps": 4})


def test_failed_runs_are_kept_across_invocations_and_a_cut_off_line_is_dropped(tmp_path):
    path = tmp_path / "runs" / "gsm8k-test.jsonl"
    store = RecordStore(path, {"dataset": "gsm8k"})
    store.add_error("hera", "7", "500 engine died", 500)
    with store.errors_path.open("a") as f:
        f.write('{"policy": "hera", "item": "8", "sta')  # the process was killed mid-write
    again = RecordStore(path, {"dataset": "gsm8k"})
    assert [(e["policy"], e["item"], e["status"]) for e in again.errors] == [("hera", "7", 500)]
    assert not again.done("hera", "7")  # a failed run is not a finished one: the next invocation runs it
    again.add_error("hera", "8", "timed out")
    assert [e["item"] for e in RecordStore(path, {"dataset": "gsm8k"}).errors] == ["7", "8"]


def test_a_record_cut_off_mid_write_is_dropped_and_the_run_resumes(tmp_path):
    path = tmp_path / "runs" / "gsm8k-test.jsonl"
    store = RecordStore(path, {"dataset": "gsm8k"})
    store.add(rec("hera", "1", True))
    store.add(rec("hera", "2", False))
    whole = path.read_text()
    path.write_text(whole[: len(whole) - 25])  # killed while writing item 2's line
    again = RecordStore(path, {"dataset": "gsm8k"})
    assert again.done("hera", "1") and not again.done("hera", "2")  # item 2 runs again
    again.add(rec("hera", "2", True))
    third = RecordStore(path, {"dataset": "gsm8k"})  # every line parses: the new record has a line of its own
    assert third.records[("hera", "2")]["correct"] is True and len(path.read_text().splitlines()) == 2


def summary_of(points):
    return {"policies": {name: {"accuracy": a, "cost": c, "pgr": g} for name, (a, c, g) in points.items()}}


SWEEP = summary_of({
    "all-slm": (0.1, 0.0, 0.0), "all-llm": (0.5, 1.0, 1.0),
    "hera@0.5": (0.2, 0.2, 0.25), "hera@0.7": (0.4, 0.3, 0.75), "hera@0.8": (0.5, 0.6, 1.0), "hera@0.9": (0.45, 0.8, 0.9),
})


def test_calibration_picks_the_most_accurate_threshold_within_a_cost_budget():
    assert calibrate_choice(SWEEP, "hera", 0.3, None)[0] == "hera@0.7"
    assert calibrate_choice(SWEEP, "hera", 1.0, None)[0] == "hera@0.8"
    chosen, why = calibrate_choice(SWEEP, "hera", 0.1, None)
    assert chosen is None and "hera@0.5" in why and "0.20" in why


def test_calibration_picks_the_cheapest_threshold_that_reaches_a_pgr():
    assert calibrate_choice(SWEEP, "hera", None, 0.9)[0] == "hera@0.8"
    assert calibrate_choice(SWEEP, "hera", None, 0.7)[0] == "hera@0.7"
    assert calibrate_choice(SWEEP, "hera", None, 1.5)[0] is None
    with pytest.raises(InvalidRequest, match="exactly one"):
        calibrate_choice(SWEEP, "hera", 0.3, 0.9)


def test_config_value_is_written_and_other_settings_are_kept(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"cloud": {"backend": "llama_cpp"}, "hera": {"use_sd": False}}))
    write_config_value(path, "hera", "threshold_base", 0.7)
    assert yaml.safe_load(path.read_text()) == {"cloud": {"backend": "llama_cpp"},
                                                "hera": {"use_sd": False, "threshold_base": 0.7}}
    from hera_ray.config import HeraConfig, load_settings

    assert load_settings(HeraConfig, path).hera.threshold_base == 0.7
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        write_config_value(path, "hera", "threshold_base", 0.7)


def test_a_program_written_after_final_answer_is_what_the_code_scorer_runs():
    from hera_ray.eval.bench import record_of
    from hera_ray.eval.datasets import Item

    item = Item("humaneval", "T/0", "write add", "", kind="code", prompt='def add(a, b):\n    """a + b"""\n', entry_point="add",
                tests="def check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n")
    run = {"answer": "```python", "final_text": "```python\ndef add(a, b):\n    return a + b\n```", "finished": True,
           "trace": [{"output": "We add the two numbers.", "placement": "cloud", "stage": "all-llm"}]}
    r = record_of(item, "all-llm", run, 1.0)
    assert r["correct"], r
    wrong = record_of(item, "all-llm", {**run, "final_text": "```python\ndef add(a, b):\n    return a - b\n```"}, 1.0)
    assert not wrong["correct"] and "AssertionError" in wrong["detail"]


def test_rescore_uses_the_kept_answer_and_output_and_leaves_older_records(tmp_path):
    from hera_ray.eval.datasets import Item

    path = tmp_path / "r.jsonl"
    store = RecordStore(path, {"dataset": "arc_easy"})
    store.add({**rec("hera", "q1", True), "answer": "A, B", "output": "the answer is B"})  # scored before a fix
    store.add({**rec("hera", "q2", False), "answer": "B"})  # no output kept: left alone
    item = lambda i: Item("arc_easy", i, "?", "B", kind="choice", choices=("x", "y", "z", "w"))
    assert store.rescore({"q1": item("q1"), "q2": item("q2")}) == 1
    again = RecordStore(path, {"dataset": "arc_easy"})
    assert again.records[("hera", "q1")]["correct"] is False and again.records[("hera", "q1")]["detail"] == "several choices"
    assert again.records[("hera", "q2")]["correct"] is False


def test_report_only_writes_results_from_the_recorded_runs_without_a_cluster(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hera_ray.cli import app
    from hera_ray.eval.datasets import load

    ids = [it.id for it in load("gsm8k", "test", 4)]
    out = tmp_path / "res"
    meta = {"dataset": "gsm8k", "split": "test", "max_steps": 4, "cloud_model": "m"}
    store = RecordStore(out / "runs" / "gsm8k-test.jsonl", meta)
    for k, i in enumerate(ids):
        store.add(rec("all-slm", i, k == 0))
        store.add(rec("all-llm", i, k != 3, cost=1.0))
        store.add(rec("random", i, k in (0, 1), edge=1, cost=0.25))
    store.add_error("random", ids[1], "503 the scheduler was restarting", 503)  # an earlier invocation's failure
    (out / "gsm8k.json").write_text(json.dumps({"command": "hera bench --dataset gsm8k (the run)", "commit": "abc"}))
    monkeypatch.setenv("HERA_URL", "http://127.0.0.1:9")  # nothing listens: the report must not need it
    args = ["bench", "--dataset", "gsm8k", "--n", "4", "--out", str(out), "--policies", "random,all-slm,all-llm",
            "--random-sweep", "", "--report-only"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "gsm8k.json").read_text())
    # the run's command and commit stay; the report says who wrote it
    assert written["n"] == 4 and written["command"] == "hera bench --dataset gsm8k (the run)" and written["commit"] == "abc"
    assert written["reported_by"]["commit"] != "abc" and written["settings"]["cloud_model"] == "m"
    # random: PGR (2 - 1) / (3 - 1) = 0.5 at cost 0.25: (0, 0) (0.25, 0.5) (1, 1) = 0.0625 + 0.5625
    assert written["policies"]["random"]["pgr"] == pytest.approx(0.5)
    assert written["policies"]["random"]["apgr"] == pytest.approx(0.625)
    assert (out / "gsm8k.png").stat().st_size > 0
    # the errors of every invocation that recorded the runs, not only this one's (which ran none)
    assert written["coverage"]["random"] == {"finished": 4, "errors": 1, "errors_this_run": 0}
    assert written["coverage"]["all-llm"] == {"finished": 4, "errors": 0, "errors_this_run": 0}
    assert "1 failed run(s) recorded (0 in this run" in " ".join(result.output.split())
    # nothing recorded for another data set: a clear error, not a traceback
    result = CliRunner().invoke(app, [*args[:2], "mbpp", *args[3:]])
    assert result.exit_code != 0 and "no recorded runs of mbpp/test" in result.output
    # a policy that never ran is refused, and the results written before stay as they were
    result = CliRunner().invoke(app, [*args[:8], "random,all-slm,all-llm,hybridllm", *args[9:]])
    assert result.exit_code != 0 and "no recorded runs of hybridllm" in result.output
    assert json.loads((out / "gsm8k.json").read_text()) == written
    # --fresh would forget the records the report is written from
    result = CliRunner().invoke(app, [*args, "--fresh"])
    assert result.exit_code != 0 and "--fresh" in result.output and (out / "runs" / "gsm8k-test.jsonl").exists()


def test_a_code_run_records_the_sandbox_its_program_ran_under():
    from hera_ray.eval.bench import record_of
    from hera_ray.eval.datasets import Item
    from hera_ray.eval.sandbox import PYTHON_BLOCK, isolation

    prompt = 'def add(a, b):\n    """Add."""\n'
    item = Item("humaneval", "HumanEval/x", "Complete add", prompt + "    return a + b\n", kind="code", prompt=prompt,
                tests="def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n", entry_point="add")
    ran = record_of(item, "all-slm", {"chain": "```python\ndef add(a, b):\n    return a + b\n```", "answer": ""}, 1.0)
    assert ran["correct"] and ran["sandbox"] == list(isolation()) and ran["sandbox"][-1] == PYTHON_BLOCK
    assert record_of(item, "all-slm", {"chain": "no program", "answer": ""}, 1.0)["sandbox"] == []
    number = Item("gsm8k", "1", "2 + 3?", "5")
    assert "sandbox" not in record_of(number, "all-slm", {"chain": "5", "answer": "5"}, 1.0)
