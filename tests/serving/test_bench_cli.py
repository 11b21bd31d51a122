"""`hera bench` and `hera calibrate` against the real test cluster: the table, the JSON, the PNG,
resume, tuned policies (``hera@0.9``) over HTTP, and calibration writing the config `hera up` reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def hera(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "hera_ray", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_a_tuned_policy_runs_and_a_bad_knob_value_is_refused(client, cluster):
    run = client.run("What is 2 + 3?", policy="hera@0.95", max_steps=1)
    assert run["policy"] == "hera@0.95" and run["trace"][0]["scores"]["kappa"] == pytest.approx(0.95)
    headers = {"Authorization": f"Bearer {os.environ['HERA_API_KEY']}"}
    r = httpx.post(f"{cluster.ingress_url}/v1/agent/runs", json={"question": "hi", "policy": "hera@7"}, headers=headers)
    assert r.status_code == 404 and "threshold_base" in r.json()["error"]["message"]
    r = httpx.post(f"{cluster.ingress_url}/v1/agent/runs", json={"question": "hi", "policy": "all-llm@0.5"}, headers=headers)
    assert r.status_code == 404 and "no knob" in r.json()["error"]["message"]
    assert client.health()["status"] == "ok"  # and the service is still up


def test_bench_three_requests_gives_the_table_json_and_png_and_resumes(cluster, tmp_path):
    args = ("bench", "--dataset", "gsm8k", "--split", "test", "--n", "3",
            "--policies", "hera,hybridllm,random,cascade,all-slm,all-llm", "--hera-sweep", "0.9", "--hybrid-sweep", "",
            "--random-sweep", "", "--cascade-sweep", "", "--no-ablations", "--best", "hera", "--max-steps", "2",
            "--out", str(tmp_path), "--url", cluster.ingress_url)
    done = hera(*args)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "gsm8k/test: 3 request(s) finished by every policy" in done.stdout
    for col in ("acc", "SLM share", "cost", "PGR", "APGR", "p50 s", "p95 s", "decide"):
        assert col in done.stdout
    result = json.loads((tmp_path / "gsm8k.json").read_text())
    assert result["n"] == 3 and result["command"].startswith("hera bench --dataset gsm8k") and result["commit"]
    assert result["sandbox"][-1] == "python socket block"  # and the kernel layers this host has
    assert result["requested"] == 3 and result["coverage"] == {p: {"finished": 3, "errors": 0, "errors_this_run": 0}
                                                                for p in result["policies"]}
    # the settings a resumed run must match name the cluster's models and its estimators
    assert result["settings"]["cloud_model"] == "smollm2-as-cloud" and result["settings"]["edge_model"] == "smollm2-135m"
    assert result["settings"]["estimators"]
    # The policies' operating points, so that runs under other settings are told apart (and not resumed into).
    assert result["settings"]["policy_settings"]["hera-verify"]["keep"] == 0.95  # the calibrated default
    assert result["settings"]["policy_settings"]["hera-verify"]["check_batch"] == 3
    assert result["settings"]["policy_settings"]["hera"]["threshold_base"] == pytest.approx(0.6)
    assert set(result["policies"]) == {"all-slm", "all-llm", "hera", "hera@0.9", "hybridllm", "random", "cascade"}
    for name, m in result["policies"].items():
        assert {"accuracy", "slm_share", "cost", "pgr", "apgr", "latency_p50_s", "overhead_share", "ci"} <= set(m)
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["slm_share"] <= 1.0
        lo, hi = m["ci"]["accuracy"]  # the paired bootstrap 95% interval holds the figure
        assert lo <= m["accuracy"] <= hi and m["ci"]["cost"][0] <= m["cost"] <= m["ci"]["cost"][1]
    assert result["best"] == "hera" and result["bootstrap"]["n_boot"] > 0  # the policy under study, as asked
    assert set(result["differences"]) == set(result["policies"]) - {"hera"}
    # APGR intervals of hera's router minus the others' (none where the anchors' gap is not positive)
    assert set(result["apgr_differences"]) <= {"hybridllm", "random", "cascade"}
    for ci in [*result["apgr_differences"].values(), *(m["apgr_ci"] for m in result["policies"].values())]:
        assert ci is None or ci[0] <= ci[1]
    for p in ("hera", "hera@0.9", "random", "hybridllm", "cascade"):  # a router's points share its APGR interval
        ci = result["policies"][p]["apgr_ci"]
        assert ci is None or ci[0] - 1e-9 <= result["policies"][p]["apgr"] <= ci[1] + 1e-9
    assert result["policies"]["all-slm"]["apgr_ci"] is None  # an anchor is no router
    assert result["runs_wall_s"] > 0 and "cascade" in result["policies"] and "[" in done.stdout  # intervals in the table
    assert result["policies"]["all-slm"]["slm_share"] == 1.0 and result["policies"]["all-llm"]["slm_share"] == 0.0
    assert result["policies"]["all-llm"]["cost"] == pytest.approx(1.0) and result["policies"]["all-slm"]["cost"] == 0.0
    assert result["policies"]["hera"]["overhead_share"] > 0.0  # hera consults its estimators; all-slm does not
    png = tmp_path / "gsm8k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    lines = (tmp_path / "runs" / "gsm8k-test.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 7 and {json.loads(line)["policy"] for line in lines} == set(result["policies"])
    again = hera(*args)  # everything is recorded: nothing runs again
    assert again.returncode == 0 and "0 run(s) to do" in again.stdout
    assert len((tmp_path / "runs" / "gsm8k-test.jsonl").read_text().splitlines()) == 3 * 7
    other = hera(*args[:-6], "--max-steps", "3", "--out", str(tmp_path), "--url", cluster.ingress_url)
    assert other.returncode != 0 and "other settings" in other.stderr


def test_bench_refuses_bad_input_with_a_clear_message(cluster, tmp_path):
    done = hera("bench", "--dataset", "gsm9k", "--url", cluster.ingress_url, "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown data set" in done.stderr and "gsm8k" in done.stderr
    done = hera("bench", "--policies", "hera,nope", "--n", "1", "--url", cluster.ingress_url, "--out", str(tmp_path),
                "--no-ablations", "--hera-sweep", "")
    assert done.returncode == 2 and "unknown policy nope" in done.stderr and "hera-urc-only" in done.stderr
    done = hera("bench", "--policies", "hera,all-slm", "--best", "random", "--n", "1", "--url", cluster.ingress_url,
                "--out", str(tmp_path), "--no-ablations", "--hera-sweep", "")
    assert done.returncode == 2 and "--best 'random' is not one of the policies run: all-slm, all-llm, hera" in done.stderr


def test_calibrate_on_dev_writes_the_threshold_base_hera_up_reads(cluster, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"agent": {"max_steps": 4}}))
    refused = hera("calibrate", "--split", "test", "--target-cost", "0.5", "--config", str(config))
    assert refused.returncode == 2 and "never uses the test split" in refused.stderr
    done = hera("calibrate", "--dataset", "gsm8k", "--split", "dev", "--n", "2", "--target-cost", "1.0",
                "--sweep", "0.5,0.99", "--max-steps", "2", "--config", str(config), "--out", str(tmp_path),
                "--url", cluster.ingress_url)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    written = yaml.safe_load(config.read_text())
    assert written["agent"] == {"max_steps": 4} and written["hera"]["threshold_base"] in (0.5, 0.99)
    assert "hera.threshold_base" in done.stdout and (tmp_path / "gsm8k-dev.json").exists()
    from hera_ray.config import HeraConfig, load_settings

    assert load_settings(HeraConfig, config).hera.threshold_base == written["hera"]["threshold_base"]


def test_speculative_hera_keeps_or_discards_the_real_slm_step(client):
    run = client.run("A farmer has 12 cows and buys 7 more, then sells 4. How many cows does he have?",
                     policy="hera-spec", max_steps=3)
    assert run["trace"]
    for t in run["trace"]:
        assert t["stage"] in {"urc", "sse", "cd", "sd", "llm"}  # never left at "speculate"
        assert (t["placement"] == "edge") == (t["stage"] != "llm")
        # time spent on a discarded SLM step is reported only where the LLM took over
        assert t["speculative_s"] >= 0.0 and (t["speculative_s"] == 0.0 or t["placement"] == "cloud")
