"""The durable store: the cost ledger, the API keys' cloud spend and every run's trace.

Two backends behind one SQLAlchemy Core schema: SQLite, the embedded default (a file in the cache
folder on the head, no setup), and PostgreSQL for a cluster (``store.url``, e.g.
``postgresql+psycopg://hera:secret@db/hera``). The scheduler actor owns the store: it writes as
it routes and reads the totals back when it (re)starts.

Writes never run on the routing path. :meth:`Store.submit` queues rows for one writer thread,
which commits whatever has queued in one transaction (group commit) and resolves each row's
future once its transaction is durable: a caller that awaits that future holds an acknowledged
record. A failed commit is retried, with backoff, until it succeeds: routing goes on meanwhile and
no queued row is dropped. Every row has a caller-made primary key, so a retried write (or a Ray
task retried after the actor restarted) lands once.

The store carries its schema version (table ``hera_meta``). A store from an older hera-ray is
migrated on open (:data:`MIGRATIONS`); one from a newer hera-ray, a corrupt SQLite file, or a
server that cannot be reached is refused with a :class:`StoreError` that names the problem. A
store is never overwritten silently.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from hera_ray.errors import HeraError

log = logging.getLogger(__name__)

#: The schema this hera-ray writes. Bump it with an entry in :data:`MIGRATIONS`.
#: 1: ledger, key charges, runs. 2: promotions (hera learn).
SCHEMA_VERSION = 2


class StoreError(HeraError):
    """The store cannot be opened or used as it is: unreachable, corrupt, or from a newer hera-ray."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


def default_url() -> str:
    """SQLite in the cache folder (``$HERA_CACHE_DIR`` or ``~/.cache/hera-ray``) of the host that opens it."""
    from hera_ray.models import cache_dir

    return f"sqlite:///{cache_dir() / 'store.sqlite'}"


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


# -- schema --------------------------------------------------------------------------------------

def _tables():
    from sqlalchemy import JSON, Boolean, Column, Float, Integer, MetaData, String, Table, Text

    md = MetaData()
    meta = Table("hera_meta", md, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
    # One row per model call the scheduler charged: a step, or a check of one (subtask False).
    ledger = Table(
        "hera_ledger", md,
        Column("report_id", String, primary_key=True),
        Column("request_id", String, nullable=False, index=True),
        Column("node_id", String, nullable=False, index=True),
        Column("placement", String(8), nullable=False),
        Column("subtask", Boolean, nullable=False),
        Column("uncached_prompt_tokens", Integer, nullable=False),
        Column("cached_prompt_tokens", Integer, nullable=False),
        Column("completion_tokens", Integer, nullable=False),
        Column("cost", Float, nullable=False),
        Column("ts", Float, nullable=False, index=True),
    )
    # One row per cloud charge against an API key (a step's cloud cost); the key's spend is their sum.
    key_charges = Table(
        "hera_key_charges", md,
        Column("charge_id", String, primary_key=True),
        Column("api_key", String, nullable=False, index=True),
        Column("cost", Float, nullable=False),
        Column("ts", Float, nullable=False, index=True),
    )
    # One row per finished agent run (or step-mode call): its summary columns and the whole run.
    # row_id is the server's; run_id is the caller's request id (two keys may use the same one, and
    # a key that reuses one keeps both runs: a lookup by id returns the newest).
    runs = Table(
        "hera_runs", md,
        Column("row_id", String, primary_key=True),
        Column("run_id", String, nullable=False, index=True),
        Column("api_key", String, index=True),
        Column("policy", String, nullable=False, index=True),
        Column("created_at", Float, nullable=False, index=True),
        Column("finished_at", Float, nullable=False),
        Column("status", String(16), nullable=False),
        Column("question", Text, nullable=False),
        Column("answer", Text, nullable=False),
        Column("steps", Integer, nullable=False),
        Column("slm_share", Float, nullable=False),
        Column("cost", Float, nullable=False),
        Column("cloud_cost", Float, nullable=False),
        Column("run", JSON, nullable=False),
    )
    # One row per `hera learn`: what it retrained, the figures before and after, and whether the new
    # set was promoted (schema version 2).
    promotions = Table(
        "hera_promotions", md,
        Column("promotion_id", String, primary_key=True),
        Column("at", Float, nullable=False, index=True),
        Column("promoted", Boolean, nullable=False),
        Column("set_path", Text),
        Column("entry", JSON, nullable=False),
    )
    return md, meta, ledger, key_charges, runs, promotions


METADATA, META, LEDGER, KEY_CHARGES, RUNS, PROMOTIONS = _tables()
_TABLES = {t.name: t for t in (LEDGER, KEY_CHARGES, RUNS, PROMOTIONS)}


def _add_promotions(conn) -> None:
    """1 -> 2: the promotions table of ``hera learn``."""
    PROMOTIONS.create(conn)


#: ``MIGRATIONS[v]`` takes a store at schema version ``v`` to ``v + 1``, inside the open
#: transaction (a SQLAlchemy ``Connection``).
MIGRATIONS: dict[int, Callable[[Any], None]] = {1: _add_promotions}


# -- records -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerRow:
    report_id: str
    request_id: str
    node_id: str
    placement: str  # "edge" or "cloud"
    subtask: bool
    uncached_prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost: float
    ts: float


@dataclass(frozen=True)
class KeyCharge:
    charge_id: str
    api_key: str
    cost: float
    ts: float


def run_row(run: dict[str, Any], api_key: str | None, status: str, created_at: float, finished_at: float,
            row_id: str | None = None) -> dict[str, Any]:
    """The ``hera_runs`` row of a run dict (:meth:`hera_ray.agent.loop.AgentRun.to_dict`); ``row_id``
    (default: a new one) names the row, so that sending it again replaces it."""
    import uuid

    from hera_ray.serve.keys import cloud_cost

    trace = run.get("trace") or []
    cloud = cloud_cost(trace)
    run = _no_nul(run)
    return {"row_id": row_id or uuid.uuid4().hex, "run_id": str(run["request_id"]), "api_key": api_key, "policy": str(run.get("policy", "")),
            "created_at": created_at, "finished_at": finished_at, "status": status,
            "question": str(run.get("question", "")), "answer": str(run.get("answer", "")), "steps": len(trace),
            "slm_share": float(run.get("slm_share", 0.0)), "cost": float(run.get("cost", 0.0)), "cloud_cost": cloud,
            "run": run}


def _no_nul(value: Any) -> Any:
    """``value`` with NUL characters replaced (PostgreSQL text cannot hold them)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nul(v) for v in value]
    return value


def _retryable(e: BaseException) -> bool:
    """A failure the store may get over (connection lost, server down, locked): retry the rows.
    Anything else (a row the store refuses) would fail the same way for ever."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(e, (OperationalError, InterfaceError))


# -- the store -----------------------------------------------------------------------------------

_STOP = object()


class Store:
    """A store at ``url`` (None: :func:`default_url`), opened, checked and migrated; one writer thread."""

    def __init__(self, url: str | None = None, *, connect_timeout_s: float = 10.0, batch_max: int = 512,
                 retry_max_s: float = 5.0):
        from sqlalchemy import create_engine, event

        self.url = url or default_url()
        self.batch_max = batch_max
        self.retry_max_s = retry_max_s
        self.kind = "sqlite" if self.url.startswith("sqlite") else self.url.split(":", 1)[0].split("+", 1)[0]
        if self.kind == "sqlite":
            path = self.url.split("///", 1)[1] if "///" in self.url else ""
            if path and path != ":memory:":
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                _check_sqlite_read_only(Path(path).expanduser(), redact(self.url))  # before anything writes to it
            self.engine = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer; FULL: a commit survives a crash
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.close()
                # pysqlite opens a transaction only before DML: take over, so DDL (a migration) is
                # transactional too and rolls back whole (SQLAlchemy's documented recipe).
                dbapi_conn.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _begin(conn):
                conn.exec_driver_sql("BEGIN")
        else:
            # libpq takes whole seconds, and 0 means for ever
            args = {"connect_timeout": max(1, math.ceil(connect_timeout_s))} if self.kind.startswith("postgres") else {}
            self.engine = create_engine(self.url, connect_args=args, pool_pre_ping=True)
        self.migrated_from: int | None = None
        self._open()
        self._queue: queue.Queue = queue.Queue()
        self.retries = 0  # failed commits retried so far
        self.refused = 0  # rows the store refused (logged and failed, not retried)
        self.committed = 0  # rows committed so far
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="hera-store-writer", daemon=True)
        self._thread.start()

    # -- open: reach, check, create or migrate ---------------------------------------------------

    def _open(self) -> None:
        from sqlalchemy import inspect
        from sqlalchemy.exc import DatabaseError, OperationalError

        where = redact(self.url)
        try:
            with self.engine.connect() as conn:
                if self.kind == "sqlite":
                    check = conn.exec_driver_sql("PRAGMA quick_check").scalar()
                    if check != "ok":
                        raise StoreError(f"the SQLite store {where} failed its integrity check ({check}); it was left as it "
                                         "is: restore it from a backup, or move it away to start an empty one")
                names = set(inspect(conn).get_table_names())
        except StoreError:
            raise
        except OperationalError as e:
            raise StoreError(f"cannot reach the store {where}: {_cause(e)}") from None
        except DatabaseError as e:  # SQLite: "file is not a database" and the like
            raise StoreError(f"the store {where} is not a readable database ({_cause(e)}); it was left as it is: "
                             "move it away to start an empty one, or set store.url to another store") from None
        try:
            self._create_or_migrate(names, where)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a migration or create that failed: say so, change nothing more
            raise StoreError(f"the store {where} could not be set up ({type(e).__name__}: {_cause(e)}); "
                             "the transaction was rolled back") from None

    def _create_or_migrate(self, names: set[str], where: str) -> None:
        from sqlalchemy import select

        with self.engine.begin() as conn:
            if META.name not in names:
                if names & set(_TABLES):
                    raise StoreError(f"the store {where} has hera tables but no schema version (table {META.name}); "
                                     "it was left as it is")
                METADATA.create_all(conn)
                conn.execute(META.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = _version(conn.execute(select(META.c.value).where(META.c.key == "schema_version")).scalar(), where)
            if version > SCHEMA_VERSION:
                from hera_ray import __version__

                raise StoreError(f"the store {where} has schema version {version}, newer than this hera-ray's "
                                 f"{SCHEMA_VERSION} (hera-ray {__version__}): upgrade hera-ray, or set store.url to another store")
            if version < SCHEMA_VERSION:
                for v in range(version, SCHEMA_VERSION):
                    if v not in MIGRATIONS:
                        raise StoreError(f"the store {where} has schema version {version}, and this hera-ray has no "
                                         f"migration from version {v}")
                    MIGRATIONS[v](conn)
                conn.execute(META.update().where(META.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))
                self.migrated_from = version
                log.warning("migrated the store %s from schema version %d to %d", where, version, SCHEMA_VERSION)
            METADATA.create_all(conn)  # tables a migration leaves to the current schema

    def schema_version(self) -> int:
        from sqlalchemy import select

        with self.engine.connect() as conn:
            return int(conn.execute(select(META.c.value).where(META.c.key == "schema_version")).scalar())

    # -- writes ----------------------------------------------------------------------------------

    def submit(self, table: str, row: dict[str, Any]) -> "Future[None]":
        """Queue ``row`` for ``table`` (``hera_ledger``, ``hera_key_charges``, ``hera_runs``); the
        future resolves once it is committed. A row whose key is stored already replaces it (runs)
        or is left out (ledger rows and charges: a retried write lands once)."""
        if table not in _TABLES:
            raise ValueError(f"unknown store table {table!r}")
        if self._closed:
            raise StoreError("the store is closed")
        fut: Future = Future()
        self._queue.put((table, row, fut))
        return fut

    def ledger(self, row: LedgerRow) -> "Future[None]":
        return self.submit(LEDGER.name, row.__dict__)

    def charge(self, charge: KeyCharge) -> "Future[None]":
        return self.submit(KEY_CHARGES.name, charge.__dict__)

    def run(self, row: dict[str, Any]) -> "Future[None]":
        return self.submit(RUNS.name, row)

    def promotion(self, entry: dict[str, Any]) -> "Future[None]":
        """Record a ``hera learn`` (its manifest history entry)."""
        import uuid

        return self.submit(PROMOTIONS.name, {"promotion_id": uuid.uuid4().hex, "at": time.time(),
                                             "promoted": entry.get("set") is not None, "set_path": entry.get("set"),
                                             "entry": _no_nul(entry)})

    def get_meta(self, key: str) -> str | None:
        """A value the runtime keeps beside the schema version (``hera_meta``), or None."""
        from sqlalchemy import select

        with self.engine.connect() as conn:
            return conn.execute(select(META.c.value).where(META.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        """Write ``key`` now (not through the writer queue): a setting, committed before this returns."""
        if key == "schema_version":
            raise ValueError("the schema version is the store's own")
        with self.engine.begin() as conn:
            self._upsert(conn, META, [{"key": key, "value": value}], replace=True)

    def promotions(self) -> list[dict[str, Any]]:
        """Every recorded ``hera learn``, oldest first."""
        from sqlalchemy import select

        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(PROMOTIONS).order_by(PROMOTIONS.c.at)).mappings()]

    @property
    def pending(self) -> int:
        """Rows queued and not committed yet (roughly: the one batch being written is not counted)."""
        return self._queue.qsize()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every row submitted before this call is committed."""
        fut: Future = Future()
        self._queue.put((None, None, fut))
        fut.result(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Commit what is queued, stop the writer and release the connections."""
        if self._closed:
            return
        self._closed = True
        self._queue.put((_STOP, None, None))
        self._thread.join(timeout)
        self.engine.dispose()

    def _writer(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(t is _STOP for t, _, _ in batch)
            rows = [(t, r, f) for t, r, f in batch if t is not None and t is not _STOP]
            try:
                self._commit(rows, closing=stop)
            except Exception:  # noqa: BLE001 - the writer must outlive any one batch
                log.exception("store writer: unexpected error")
            for _, _, f in batch:
                _resolve(f)

    def _commit(self, rows: list[tuple[str, dict[str, Any], Future]], closing: bool) -> None:
        """Commit ``rows``: retried while the store is unreachable (at close: a minute at most);
        if the store refuses the batch, row by row, so that one bad row fails alone."""
        delay, tries = 0.05, 0
        while rows:
            try:
                self._write(rows)
                self.committed += len(rows)
                return
            except Exception as e:  # noqa: BLE001
                if not _retryable(e):
                    if len(rows) > 1:
                        for one in rows:
                            self._commit([one], closing)
                        return
                    self.refused += 1
                    log.error("the store %s refused a %s row (dropped): %s", redact(self.url), rows[0][0], _cause(e))
                    _resolve(rows[0][2], StoreError(f"the store refused the row: {_cause(e)}"))
                    return
                self.retries += 1
                tries += 1
                log.warning("store write of %d row(s) to %s failed (retrying in %.2f s): %s",
                            len(rows), redact(self.url), delay, _cause(e))
                if closing and tries > 12:  # closing and the store is gone: give up, and say so
                    for _, _, f in rows:
                        _resolve(f, StoreError(f"store write to {redact(self.url)} failed at close: {_cause(e)}"))
                    return
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    def _write(self, rows: list[tuple[str, dict[str, Any], Future]]) -> None:
        by_table: dict[str, dict[str, dict[str, Any]]] = {}
        for table, row, _ in rows:  # the last write of a key wins within a batch
            pk = _TABLES[table].primary_key.columns.keys()[0]
            by_table.setdefault(table, {})[row[pk]] = row
        with self.engine.begin() as conn:
            for table, keyed in by_table.items():
                self._upsert(conn, _TABLES[table], list(keyed.values()), replace=table == RUNS.name)

    def _upsert(self, conn, table, rows: list[dict[str, Any]], replace: bool) -> None:
        if self.kind == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif self.kind.startswith("postgres"):
            from sqlalchemy.dialects.postgresql import insert
        else:  # another backend: plain inserts (a retried duplicate then fails the batch, and is retried)
            conn.execute(table.insert(), rows)
            return
        pk = table.primary_key.columns.keys()
        stmt = insert(table)
        if replace:
            stmt = stmt.on_conflict_do_update(index_elements=pk, set_={c.name: stmt.excluded[c.name]
                                                                       for c in table.columns if c.name not in pk})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=pk)
        conn.execute(stmt, rows)

    # -- reads -----------------------------------------------------------------------------------

    def key_spend(self) -> dict[str, float]:
        """Every API key's cloud spend: the sum of its charges."""
        from sqlalchemy import func, select

        with self.engine.connect() as conn:
            rows = conn.execute(select(KEY_CHARGES.c.api_key, func.sum(KEY_CHARGES.c.cost)).group_by(KEY_CHARGES.c.api_key))
            return {k: float(v or 0.0) for k, v in rows}

    def recent_charge_ids(self, since: float) -> list[str]:
        """Ids of the charges made at or after ``since`` (epoch s): a restarted scheduler knows them,
        so a charge Ray sends it again (its first try was committed) counts once."""
        from sqlalchemy import select

        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(KEY_CHARGES.c.charge_id).where(KEY_CHARGES.c.ts >= since))]

    def recent_request_usage(self, since: float) -> list[dict[str, Any]]:
        """The ledger of requests charged at or after ``since``, summed by request and placement
        (rows as :meth:`ledger_usage`'s, ``request_id`` for ``node_id``): a restarted scheduler
        knows what a run still in flight has spent against its cap."""
        from sqlalchemy import select

        L = LEDGER.c
        recent = select(L.request_id).where(L.ts >= since).distinct().subquery()
        return self._usage_by(L.request_id, L.request_id.in_(select(recent.c.request_id)))

    def ledger_usage(self) -> list[dict[str, Any]]:
        """The ledger summed by node and placement: ``node_id``, ``placement``, ``subtasks``, the
        three token counts and ``cost`` (the scheduler rebuilds its totals from them)."""
        return self._usage_by(LEDGER.c.node_id)

    def _usage_by(self, key: Any, where: Any = None) -> list[dict[str, Any]]:
        """The ledger (rows matching ``where``, if given) summed by ``key`` and placement; the key's
        value comes back as ``node_id``."""
        from sqlalchemy import Integer, cast, func, select

        L = LEDGER.c
        q = select(key, L.placement, func.sum(cast(L.subtask, Integer)), func.sum(L.uncached_prompt_tokens),
                   func.sum(L.cached_prompt_tokens), func.sum(L.completion_tokens), func.sum(L.cost))
        if where is not None:
            q = q.where(where)
        q = q.group_by(key, L.placement)
        with self.engine.connect() as conn:
            return [{"node_id": n, "placement": p, "subtasks": int(s or 0), "uncached_prompt_tokens": int(u or 0),
                     "cached_prompt_tokens": int(c or 0), "completion_tokens": int(o or 0), "cost": float(x or 0.0)}
                    for n, p, s, u, c, o, x in conn.execute(q)]

    def get_run(self, run_id: str, api_key: str | None = None, any_key: bool = True) -> dict[str, Any] | None:
        """The newest stored run ``run_id`` (its summary columns and ``run``), or None. Unless
        ``any_key``, only a run of ``api_key`` is returned."""
        from sqlalchemy import select

        q = select(RUNS).where(RUNS.c.run_id == run_id).order_by(RUNS.c.created_at.desc(), RUNS.c.row_id).limit(1)
        if not any_key:
            q = q.where(RUNS.c.api_key == api_key) if api_key is not None else q.where(RUNS.c.api_key.is_(None))
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        return dict(row) if row is not None else None

    def list_runs(self, api_key: str | None = None, any_key: bool = True, policy: str | None = None,
                  since: float | None = None, limit: int = 50, with_run: bool = False) -> list[dict[str, Any]]:
        """Runs, newest first: filtered by key (unless ``any_key``), policy and ``since`` (epoch s)."""
        from sqlalchemy import select

        cols = list(RUNS.c) if with_run else [c for c in RUNS.c if c.name != "run"]
        q = select(*cols).order_by(RUNS.c.created_at.desc(), RUNS.c.row_id).limit(limit)
        if not any_key:
            q = q.where(RUNS.c.api_key == api_key) if api_key is not None else q.where(RUNS.c.api_key.is_(None))
        if policy:
            q = q.where(RUNS.c.policy == policy)
        if since is not None:
            q = q.where(RUNS.c.created_at >= since)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def _filtered(self, q, api_key: str | None, policy: str | None, since: float | None):
        if api_key is not None:
            q = q.where(RUNS.c.api_key == api_key)
        if policy:
            q = q.where(RUNS.c.policy == policy)
        if since is not None:
            q = q.where(RUNS.c.created_at >= since)
        return q

    def count_runs(self, api_key: str | None = None, policy: str | None = None, since: float | None = None) -> int:
        from sqlalchemy import func, select

        with self.engine.connect() as conn:
            return int(conn.execute(self._filtered(select(func.count()).select_from(RUNS), api_key, policy, since)).scalar())

    def iter_runs(self, batch: int = 500, api_key: str | None = None, policy: str | None = None,
                  since: float | None = None) -> Iterable[dict[str, Any]]:
        """Stored runs with their traces, oldest first, read in pages (for export and learning)."""
        from sqlalchemy import and_, or_, select

        last: tuple[float, str] | None = None
        while True:
            q = self._filtered(select(RUNS), api_key, policy, since).order_by(RUNS.c.created_at, RUNS.c.row_id).limit(batch)
            if last is not None:
                q = q.where(or_(RUNS.c.created_at > last[0], and_(RUNS.c.created_at == last[0], RUNS.c.row_id > last[1])))
            with self.engine.connect() as conn:
                rows = [dict(r) for r in conn.execute(q).mappings()]
            if not rows:
                return
            yield from rows
            last = (rows[-1]["created_at"], rows[-1]["row_id"])


#: The step columns of an export, beside the run's (``run_`` prefixed where the names clash).
STEP_COLUMNS = ("index", "placement", "node", "model", "stage", "fallback", "prompt_tokens", "cached_prompt_tokens",
                "uncached_prompt_tokens", "completion_tokens", "cost", "speculative_cost", "check_cost",
                "check_prompt_tokens", "latency_s", "decision_s", "generation_s", "discarded", "subtask", "rejected_output")


def export_parquet(store: Store, path: Path, api_key: str | None = None, policy: str | None = None,
                   since: float | None = None, on_run: Callable[[], None] | None = None) -> tuple[int, int]:
    """Write the stored traces to ``path`` as Parquet, one row per step with its run's columns
    (``scores`` as a JSON object in text); returns (runs, steps)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("run_id", pa.string()), ("api_key", pa.string()), ("policy", pa.string()),
                        ("created_at", pa.float64()), ("status", pa.string()), ("question", pa.string()),
                        ("answer", pa.string()), ("run_cost", pa.float64()), ("run_cloud_cost", pa.float64()),
                        ("run_slm_share", pa.float64()),
                        ("index", pa.int64()), ("placement", pa.string()), ("node", pa.string()), ("model", pa.string()),
                        ("stage", pa.string()), ("fallback", pa.string()), ("scores", pa.string()),
                        ("prompt_tokens", pa.int64()), ("cached_prompt_tokens", pa.int64()),
                        ("uncached_prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("cost", pa.float64()),
                        ("speculative_cost", pa.float64()), ("check_cost", pa.float64()), ("check_prompt_tokens", pa.int64()),
                        ("latency_s", pa.float64()), ("decision_s", pa.float64()), ("generation_s", pa.float64()),
                        ("discarded", pa.bool_()), ("subtask", pa.string()), ("rejected_output", pa.string())])
    defaults = {f.name: (0 if pa.types.is_integer(f.type) else 0.0 if pa.types.is_floating(f.type)
                         else False if pa.types.is_boolean(f.type) else "") for f in schema}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = steps = 0
    buffer: list[dict[str, Any]] = []
    with pq.ParquetWriter(str(path), schema) as writer:
        def spill() -> None:
            if buffer:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer.clear()

        for row in store.iter_runs(api_key=api_key, policy=policy, since=since):
            runs += 1
            base = {"run_id": row["run_id"], "api_key": row["api_key"], "policy": row["policy"],
                    "created_at": row["created_at"], "status": row["status"], "question": row["question"],
                    "answer": row["answer"], "run_cost": row["cost"], "run_cloud_cost": row["cloud_cost"],
                    "run_slm_share": row["slm_share"]}
            for t in (row["run"] or {}).get("trace") or []:
                step = {c: t.get(c, defaults[c]) for c in STEP_COLUMNS}
                step = {k: (defaults[k] if v is None else v) for k, v in step.items()}
                buffer.append({**base, **step, "scores": json.dumps(t.get("scores") or {}, sort_keys=True)})
                steps += 1
            if len(buffer) >= 5000:
                spill()
            if on_run is not None:
                on_run()
        spill()
    return runs, steps


def _resolve(fut: Future | None, error: BaseException | None = None) -> None:
    """Resolve ``fut`` unless it is done already (a waiter that gave up may have cancelled it)."""
    if fut is None or fut.done():
        return
    try:
        fut.set_result(None) if error is None else fut.set_exception(error)
    except Exception:  # noqa: BLE001 - InvalidStateError: cancelled meanwhile
        pass


def _version(value: Any, where: str) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        raise StoreError(f"the store {where} has a schema version that is not a number ({value!r}); it was left as it is") from None


def _check_sqlite_read_only(path: Path, where: str) -> None:
    """Refuse a corrupt SQLite file, or one from a newer hera-ray, reading it only (the engine's
    connect hook writes: it turns on WAL)."""
    import sqlite3

    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the SQLite store {where}: {e}") from None
    try:
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"the SQLite store {where} failed its integrity check ({check}); it was left as it is: "
                             "restore it from a backup, or move it away to start an empty one")
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if META.name in names:
            row = conn.execute(f"SELECT value FROM {META.name} WHERE key = 'schema_version'").fetchone()
            version = _version(row[0] if row else None, where)
            if version > SCHEMA_VERSION:
                from hera_ray import __version__

                raise StoreError(f"the store {where} has schema version {version}, newer than this hera-ray's "
                                 f"{SCHEMA_VERSION} (hera-ray {__version__}): upgrade hera-ray, or set store.url to another store")
    except sqlite3.DatabaseError as e:  # "file is not a database" and the like
        raise StoreError(f"the store {where} is not a readable database ({e}); it was left as it is: "
                         "move it away to start an empty one, or set store.url to another store") from None
    finally:
        conn.close()


def _cause(e: BaseException) -> str:
    """The driver's message of a SQLAlchemy error, on one line."""
    orig = getattr(e, "orig", None) or e
    return " ".join(str(orig).split())[:400]
