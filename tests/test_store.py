"""The durable store on both backends: real SQLite files and a real PostgreSQL server on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hera_ray import store as store_mod
from hera_ray.store import KeyCharge, LedgerRow, Store, StoreError, run_row
from pg_server import started_server


@pytest.fixture(scope="module")
def pg():
    server = started_server()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path: Path):
    """A fresh, empty store URL on each backend (PostgreSQL: a new database per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return request.getfixturevalue("pg").fresh_database()


def _run(run_id: str, policy: str = "hera-verify", cost: float = 0.002) -> dict:
    trace = [{"index": 0, "placement": "edge", "stage": "confidence", "scores": {"confidence": 0.99}, "cost": 0.0,
              "check_cost": 0.0, "output": "Step 1: 2 + 2 = 4"},
             {"index": 1, "placement": "cloud", "stage": "llm-rewrite", "scores": {"llm_score": 0.2}, "cost": cost,
              "check_cost": 0.0005, "output": "Answer: 4"}]
    return {"request_id": run_id, "policy": policy, "question": "What is 2 + 2?", "answer": "4", "trace": trace,
            "slm_share": 0.5, "cost": cost + 0.0005}


def test_records_survive_reopening(url):
    s = Store(url)
    futures = [s.ledger(LedgerRow(f"r1:{i}", "r1", "edge-a" if i % 2 else "cloud", "edge" if i % 2 else "cloud", True,
                                  100, 20, 10, 0.0 if i % 2 else 0.001, time.time())) for i in range(4)]
    futures.append(s.charge(KeyCharge("r1:0", "alice", 0.001, time.time())))
    futures.append(s.charge(KeyCharge("r1:2", "alice", 0.001, time.time())))
    futures.append(s.charge(KeyCharge("r2:0", "bob", 0.004, time.time())))
    futures.append(s.run(run_row(_run("r1"), "alice", "ok", 1000.0, 1005.0)))
    for f in futures:
        f.result(10)  # acknowledged: committed
    s.close()

    again = Store(url)
    try:
        assert again.key_spend() == pytest.approx({"alice": 0.002, "bob": 0.004})
        usage = {(u["node_id"], u["placement"]): u for u in again.ledger_usage()}
        assert usage[("cloud", "cloud")]["subtasks"] == 2 and usage[("cloud", "cloud")]["cost"] == pytest.approx(0.002)
        assert usage[("edge-a", "edge")]["uncached_prompt_tokens"] == 200 and usage[("edge-a", "edge")]["completion_tokens"] == 20
        run = again.get_run("r1")
        assert run["api_key"] == "alice" and run["status"] == "ok" and run["steps"] == 2
        assert run["cloud_cost"] == pytest.approx(0.0025)
        assert [t["stage"] for t in run["run"]["trace"]] == ["confidence", "llm-rewrite"]
        assert run["run"]["trace"][1]["scores"] == {"llm_score": 0.2}
    finally:
        again.close()


def test_a_retried_write_lands_once_and_a_reused_run_id_keeps_both_runs(url):
    s = Store(url)
    try:
        for _ in range(3):  # the same charge, as a Ray task retried after the actor restarted sends it
            s.charge(KeyCharge("run-1:3", "alice", 0.01, time.time()))
        s.run(run_row(_run("run-1", cost=0.001), "alice", "error", 1.0, 2.0, row_id="row-a"))
        s.run(run_row(_run("run-1", cost=0.003), "alice", "ok", 1.0, 3.0, row_id="row-a"))  # sent again: replaced
        s.flush(10)
        assert s.key_spend() == pytest.approx({"alice": 0.01})
        run = s.get_run("run-1")
        assert run["status"] == "ok" and run["finished_at"] == 3.0 and run["cost"] == pytest.approx(0.0035)
        # Another key's run with the same request id is its own row: neither hides the other.
        s.run(run_row(_run("run-1", cost=0.005), "mallory", "ok", 5.0, 6.0)).result(10)
        assert s.get_run("run-1", api_key="alice", any_key=False)["cost"] == pytest.approx(0.0035)
        assert s.get_run("run-1", api_key="mallory", any_key=False)["cost"] == pytest.approx(0.0055)
        assert s.get_run("run-1")["api_key"] == "mallory"  # by id alone: the newest
        assert s.count_runs() == 2
    finally:
        s.close()


def test_a_row_the_store_refuses_fails_alone_and_the_writer_goes_on(url):
    s = Store(url)
    try:
        good = s.charge(KeyCharge("ok-1", "alice", 0.5, 1.0))
        bad = s.submit("hera_key_charges", {"charge_id": "bad-1", "api_key": None, "cost": 1.0, "ts": 1.0})  # NOT NULL
        also_good = s.charge(KeyCharge("ok-2", "alice", 0.25, 1.0))
        with pytest.raises(StoreError, match="refused the row"):
            bad.result(10)
        good.result(10), also_good.result(10)
        assert s.refused == 1 and s.key_spend() == pytest.approx({"alice": 0.75})
        s.charge(KeyCharge("ok-3", "alice", 0.25, 1.0)).result(10)  # and it still writes
        # Text PostgreSQL cannot hold (NUL) is stored with the NUL replaced, not refused.
        s.run(run_row({**_run("nul"), "question": "a\x00b"}, "alice", "ok", 1.0, 2.0)).result(10)
        assert s.get_run("nul")["question"] == "a\ufffdb"
    finally:
        s.close()


def test_a_restarted_scheduler_reads_recent_charges_and_open_requests(url):
    s = Store(url)
    try:
        s.charge(KeyCharge("old", "alice", 1.0, 100.0))
        s.charge(KeyCharge("new", "alice", 1.0, 200.0))
        for i, (req, ts, cost) in enumerate([("done", 100.0, 0.1), ("open", 150.0, 0.2), ("open", 210.0, 0.3)]):
            s.ledger(LedgerRow(f"r{i}", req, "cloud", "cloud", True, 10, 0, 5, cost, ts))
        s.flush(10)
        assert s.recent_charge_ids(150.0) == ["new"]
        rows = s.recent_request_usage(200.0)  # every row of a request charged since then, older ones too
        assert [(r["node_id"], r["subtasks"], round(r["cost"], 6)) for r in rows] == [("open", 2, 0.5)]
        from hera_ray.scheduler.ledger import CostLedger

        ledger = CostLedger()
        ledger.restore(s.ledger_usage(), rows)
        assert ledger.total.cloud_cost == pytest.approx(0.6) and ledger.by_node["cloud"].cloud_subtasks == 3
        assert ledger.request("open").cloud_cost == pytest.approx(0.5) and ledger.request("done").cloud_cost == 0.0
    finally:
        s.close()


def test_runs_are_listed_newest_first_and_filtered(url):
    s = Store(url)
    try:
        for i, (key, policy) in enumerate([("alice", "hera"), ("bob", "hera"), ("alice", "all-llm"), (None, "hera")]):
            s.run(run_row(_run(f"run-{i}", policy), key, "ok", 100.0 + i, 101.0 + i))
        s.flush(10)
        assert [r["run_id"] for r in s.list_runs()] == ["run-3", "run-2", "run-1", "run-0"]
        assert "run" not in s.list_runs()[0]  # the list has the summary; the trace is read by id
        assert [r["run_id"] for r in s.list_runs(api_key="alice", any_key=False)] == ["run-2", "run-0"]
        assert [r["run_id"] for r in s.list_runs(api_key="alice", any_key=False, policy="hera")] == ["run-0"]
        assert [r["run_id"] for r in s.list_runs(since=102.0)] == ["run-3", "run-2"]
        assert [r["run_id"] for r in s.list_runs(limit=1)] == ["run-3"]
        assert [r["run_id"] for r in s.list_runs(api_key=None, any_key=False)] == ["run-3"]
        # a key sees only its own runs
        assert s.get_run("run-1", api_key="alice", any_key=False) is None
        assert s.get_run("run-0", api_key="alice", any_key=False)["policy"] == "hera"
        assert [r["run_id"] for r in s.iter_runs(batch=3)] == ["run-0", "run-1", "run-2", "run-3"]
    finally:
        s.close()


def test_a_store_from_a_newer_hera_ray_is_refused(url, monkeypatch):
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 7)
    monkeypatch.setitem(store_mod.MIGRATIONS, 2, lambda conn: None)
    for v in range(3, 7):
        monkeypatch.setitem(store_mod.MIGRATIONS, v, lambda conn: None)
    Store(url).close()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 2)
    with pytest.raises(StoreError, match=r"schema version 7, newer than this hera-ray's 2 \(hera-ray \d"):
        Store(url)


def _make_v1_store(url: str) -> None:
    """A store as hera-ray wrote it at schema version 1 (before hera learn's promotions table)."""
    from sqlalchemy import create_engine, update

    s = Store(url)
    s.charge(KeyCharge("c1", "alice", 0.5, 1.0)).result(10)
    s.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        store_mod.PROMOTIONS.drop(conn)
        conn.execute(update(store_mod.META).where(store_mod.META.c.key == "schema_version").values(value="1"))
    engine.dispose()


def test_a_version_1_store_is_migrated_and_keeps_its_records(url):
    _make_v1_store(url)
    migrated = Store(url)
    try:
        assert migrated.migrated_from == 1 and migrated.schema_version() == 2
        assert migrated.key_spend() == {"alice": 0.5}
        migrated.promotion({"set": "/sets/learned-1", "estimators": {"sp_llm": {"before": 0.5, "after": 0.6}}}).result(10)
        (row,) = migrated.promotions()
        assert row["promoted"] and row["entry"]["estimators"]["sp_llm"]["after"] == 0.6
    finally:
        migrated.close()


def test_a_migration_that_fails_changes_nothing_and_says_so(url, monkeypatch):
    _make_v1_store(url)

    def broken(conn):
        store_mod.PROMOTIONS.create(conn)
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(store_mod.MIGRATIONS, 1, broken)
    with pytest.raises(StoreError, match="could not be set up .*disk on fire.*rolled back"):
        Store(url)
    monkeypatch.undo()
    again = Store(url)  # the store is still at version 1, and migrates now
    try:
        assert again.migrated_from == 1 and again.key_spend() == {"alice": 0.5}
    finally:
        again.close()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 3)  # and no migration from 2: refused, not guessed
    with pytest.raises(StoreError, match="no migration from version 2"):
        Store(url)


def test_a_corrupt_sqlite_file_is_refused_and_left_as_it_is(tmp_path: Path):
    path = tmp_path / "store.sqlite"
    junk = b"this is not a database\n" * 200
    path.write_bytes(junk)
    with pytest.raises(StoreError, match=r"store\.sqlite is not a readable database .*left as it is"):
        Store(f"sqlite:///{path}")
    assert path.read_bytes() == junk and sorted(p.name for p in tmp_path.iterdir()) == ["store.sqlite"]


def test_a_newer_sqlite_store_is_refused_without_a_byte_changed(tmp_path: Path, monkeypatch):
    path = tmp_path / "store.sqlite"
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 9)
    for v in range(2, 9):
        monkeypatch.setitem(store_mod.MIGRATIONS, v, lambda conn: None)
    Store(f"sqlite:///{path}").close()
    before = path.read_bytes()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 2)
    with pytest.raises(StoreError, match="schema version 9, newer than this hera-ray's 2"):
        Store(f"sqlite:///{path}")
    assert path.read_bytes() == before  # (reading a WAL-mode file makes SQLite's -shm/-wal side files)


def test_an_unreachable_server_is_named():
    from pg_server import _free_port

    port = _free_port()  # nothing listens there
    with pytest.raises(StoreError, match=rf"cannot reach the store postgresql\+psycopg://hera:\*\*\*@127.0.0.1:{port}/hera"):
        Store(f"postgresql+psycopg://hera:secret@127.0.0.1:{port}/hera", connect_timeout_s=3)


def test_writes_wait_out_an_outage_and_none_is_lost(pg):
    """The server goes down under the writer: a write is retried, not dropped, and lands when the
    server is back; the caller's future resolves only then."""
    url = pg.url
    s = Store(url, retry_max_s=0.5)
    try:
        s.charge(KeyCharge("before", "outage", 1.0, 1.0)).result(10)
        pg.stop()
        during = [s.charge(KeyCharge(f"during-{i}", "outage", 1.0, 2.0)) for i in range(5)]
        time.sleep(1.5)
        assert not any(f.done() for f in during) and s.retries >= 1
        pg.start()
        for f in during:
            f.result(30)
        assert s.key_spend()["outage"] == pytest.approx(6.0)
    finally:
        s.close()


def test_traces_export_to_parquet_one_row_per_step(url, tmp_path: Path):
    import pyarrow.parquet as pq

    s = Store(url)
    try:
        s.run(run_row(_run("a", "hera-verify"), "alice", "ok", 10.0, 11.0))
        s.run(run_row(_run("b", "hera"), "bob", "ok", 20.0, 21.0))
        s.flush(10)
        from hera_ray.store import export_parquet

        seen = []
        assert export_parquet(s, tmp_path / "all.parquet", on_run=lambda: seen.append(1)) == (2, 4) and len(seen) == 2
        table = pq.read_table(tmp_path / "all.parquet").to_pylist()
        assert [(r["run_id"], r["index"], r["placement"], r["stage"]) for r in table] == \
               [("a", 0, "edge", "confidence"), ("a", 1, "cloud", "llm-rewrite"), ("b", 0, "edge", "confidence"),
                ("b", 1, "cloud", "llm-rewrite")]
        assert table[1]["scores"] == '{"llm_score": 0.2}' and table[1]["check_cost"] == 0.0005
        assert table[0]["api_key"] == "alice" and table[0]["run_cloud_cost"] == pytest.approx(0.0025)
        assert export_parquet(s, tmp_path / "bob.parquet", api_key="bob") == (1, 2)
        assert {r["run_id"] for r in pq.read_table(tmp_path / "bob.parquet").to_pylist()} == {"b"}
    finally:
        s.close()


def test_hera_runs_export_writes_parquet_and_names_a_bad_store(tmp_path: Path):
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from hera_ray.cli import app

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    s = Store(url)
    s.run(run_row(_run("a"), None, "ok", 10.0, 11.0)).result(10)
    s.close()
    out = CliRunner().invoke(app, ["runs", "export", "--parquet", str(tmp_path / "x.parquet"), "--store", url])
    assert out.exit_code == 0, out.output
    assert "wrote 2 step(s) of 1 run(s)" in out.output and pq.read_table(tmp_path / "x.parquet").num_rows == 2
    (tmp_path / "junk.sqlite").write_bytes(b"junk" * 1000)
    out = CliRunner().invoke(app, ["runs", "export", "--parquet", str(tmp_path / "y.parquet"),
                                   "--store", f"sqlite:///{tmp_path / 'junk.sqlite'}"])
    assert out.exit_code == 1 and "is not a readable database" in out.output
