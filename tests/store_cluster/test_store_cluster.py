"""What the store keeps, through the real ingress: an API key's cloud spend, the ledger and every
run's trace survive a killed scheduler actor and a `hera down` / `hera up`, on SQLite and on a real
PostgreSQL server; a key past its budget stays refused; a key sees only its own runs."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from local_ray import free_port

from .conftest import READER_KEY, SPENDER_BUDGET, SPENDER_KEY, cluster_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

#: The ledger totals a restart must keep as they were.
LEDGER_TOTALS = ("cloud_subtasks", "edge_subtasks", "cloud_cost", "cloud_uncached_prompt_tokens",
                 "cloud_cached_prompt_tokens", "cloud_completion_tokens")
QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"


def _quiet(_msg: str) -> None:
    pass


def _run(url: str, key: str, request_id: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/agent/runs", headers={"Authorization": f"Bearer {key}"},
                      json={"question": QUESTION, "policy": "all-llm", "max_steps": 3, "request_id": request_id, **body},
                      timeout=300)


def _get(url: str, path: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _spent(url: str) -> float:
    return _get(url, "/v1/keys/me", SPENDER_KEY).json()["cloud_spend"]


def _usage() -> dict:
    import ray

    from hera_ray.scheduler.actor import SCHEDULER_NAME

    return ray.get(ray.get_actor(SCHEDULER_NAME, namespace="hera").usage.remote(), timeout=60)["total"]


def _spend_until_refused(url: str, prefix: str) -> httpx.Response:
    for i in range(6):
        r = _run(url, SPENDER_KEY, f"{prefix}-{i}")
        if r.status_code != 200:
            return r
    raise AssertionError(f"the key was never refused; it has spent {_spent(url)} of {SPENDER_BUDGET}")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return request.getfixturevalue("pg").fresh_database()


def test_spend_ledger_and_runs_survive_down_and_up(ray_head, keys_file, store_url, ingress_port):
    from hera_ray.cluster import down, up

    config = cluster_config(keys_file, store_url, free_port(), ingress_port)
    state = up(config, local_edges=1, timeout_s=300, log=_quiet)
    try:
        url = state.ingress_url
        r = _run(url, SPENDER_KEY, "first")
        assert r.status_code == 200, r.text
        first = r.json()
        cloud = sum(t["cost"] for t in first["trace"] if t["placement"] == "cloud")
        assert cloud > 0 and _spent(url) == pytest.approx(cloud)
        usage_before = _usage()
        stored = _get(url, "/v1/agent/runs/first", SPENDER_KEY)
        assert stored.status_code == 200, stored.text
        # Another key does not see it: not by id, not in its list, and not by asking for the key.
        assert _get(url, "/v1/agent/runs/first", READER_KEY).status_code == 404
        assert _get(url, "/v1/agent/runs", READER_KEY).json()["data"] == []
        refused = _get(url, "/v1/agent/runs?key=spender", READER_KEY)
        assert refused.status_code == 403 and "'reader' may list its own runs only" in refused.json()["error"]["message"]
    finally:
        down(log=_quiet)

    state = up(config, local_edges=1, timeout_s=300, log=_quiet)
    try:
        url = state.ingress_url
        assert _spent(url) == pytest.approx(cloud)
        after = _usage()
        for k in LEDGER_TOTALS:
            assert after[k] == pytest.approx(usage_before[k]), k
        run = _get(url, "/v1/agent/runs/first", SPENDER_KEY).json()
        assert run["status"] == "ok" and run["policy"] == "all-llm" and run["key"] == "spender"
        assert run["cloud_cost"] == pytest.approx(cloud) and run["steps"] == len(first["trace"])
        assert [(t["placement"], t["stage"], t["cost"]) for t in run["run"]["trace"]] == \
               [(t["placement"], t["stage"], t["cost"]) for t in first["trace"]]
        listed = _get(url, "/v1/agent/runs?policy=all-llm&limit=5", SPENDER_KEY).json()["data"]
        assert [x["id"] for x in listed] == ["first"] and "run" not in listed[0]

        # The CLI prints the same runs (the caller's key from $HERA_API_KEY).
        from typer.testing import CliRunner

        from hera_ray.cli import app

        env = {"HERA_API_KEY": SPENDER_KEY, "HERA_URL": url, "COLUMNS": "200"}
        out = CliRunner().invoke(app, ["runs", "list"], env=env)
        assert out.exit_code == 0 and "first" in out.output and "all-llm" in out.output, out.output
        out = CliRunner().invoke(app, ["runs", "show", "first"], env=env)
        assert out.exit_code == 0 and "run first (all-llm, ok)" in out.output and "cloud" in out.output, out.output
        out = CliRunner().invoke(app, ["runs", "show", "nope"], env=env)
        assert out.exit_code == 1 and "no stored run 'nope'" in out.output, out.output

        refused = _spend_until_refused(url, "after-up")
        assert refused.status_code == 402 and "'spender'" in refused.json()["error"]["message"]
        spent = _spent(url)
        assert spent >= SPENDER_BUDGET
    finally:
        down(log=_quiet)
    state = up(config, local_edges=1, timeout_s=300, log=_quiet)  # and still refused after another restart
    try:
        assert _spent(state.ingress_url) == pytest.approx(spent)
        assert _run(state.ingress_url, SPENDER_KEY, "again").status_code == 402
    finally:
        down(log=_quiet)


def test_a_killed_scheduler_actor_keeps_the_spend_within_a_step(ray_head, keys_file, store_url, ingress_port):
    import ray

    from hera_ray.cluster import down, up
    from hera_ray.scheduler.actor import SCHEDULER_NAME

    config = cluster_config(keys_file, store_url, free_port(), ingress_port)
    state = up(config, local_edges=1, timeout_s=300, log=_quiet)
    try:
        url = state.ingress_url
        started_at = httpx.get(f"{url}/healthz", timeout=30).json()["scheduler_started_at"]
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(r=_run(url, SPENDER_KEY, "killed")))
        runner.start()
        deadline = time.monotonic() + 120
        while _spent(url) == 0 and time.monotonic() < deadline:  # the first cloud step is charged
            time.sleep(0.05)
        seen = _spent(url)
        assert seen > 0, "no step was charged in 120 s"
        ray.kill(ray.get_actor(SCHEDULER_NAME, namespace=config.namespace), no_restart=False)
        runner.join(300)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # Ray restarts it
            try:
                health = httpx.get(f"{url}/healthz", timeout=10).json()
                if health.get("scheduler_started_at", started_at) != started_at:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the scheduler actor was not restarted in 120 s")

        after = _spent(url)
        run = _get(url, "/v1/agent/runs/killed", SPENDER_KEY).json()  # what the ingress saw the run do
        steps = [t for t in run["run"]["trace"] if t["placement"] == "cloud"]
        biggest = max(t["cost"] for t in steps)
        assert after >= seen - 1e-12
        assert abs(after - run["cloud_cost"]) <= biggest + 1e-12, (after, run["cloud_cost"], outcome["r"].status_code)

        refused = _spend_until_refused(url, "after-kill")
        assert refused.status_code == 402
    finally:
        down(log=_quiet)


def test_hera_up_names_a_store_it_cannot_reach(ray_head, keys_file, ingress_port):
    from hera_ray.cluster import load_state, up
    from hera_ray.errors import HeraError

    port = free_port()  # nothing listens there
    config = cluster_config(keys_file, f"postgresql+psycopg://hera:secret@127.0.0.1:{port}/hera", free_port(), ingress_port)
    config = config.model_copy(update={"store": config.store.model_copy(update={"connect_timeout_s": 2})})
    with pytest.raises(HeraError, match=rf"scheduler actor could not start: cannot reach the store "
                                        rf"postgresql\+psycopg://hera:\*\*\*@127.0.0.1:{port}/hera"):
        up(config, local_edges=0, timeout_s=120, log=_quiet)
    assert load_state() is None  # what it started was stopped
