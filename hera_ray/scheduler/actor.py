"""SubtaskScheduler: the detached, named Ray actor that routes every subtask.

It owns the node table, runs the EdgeRegistry gRPC server that feeds it (in a thread of its
own, with its own event loop), wraps the pure :class:`~hera_ray.scheduler.router.Router`, and
exports Prometheus metrics through ``ray.util.metrics``. Ray restarts it if it dies
(``max_restarts=-1``); edge nodes then find the registry has forgotten them and register again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util import metrics

from hera_ray.config import HeraConfig, RegistryConfig, default_token_file
from hera_ray.errors import ConfigError, HeraError
from hera_ray.policy import Placement, build_policies
from hera_ray.scheduler.nodes import NodeSpec, NodeTable
from hera_ray.scheduler.registry import RegistryServer
from hera_ray.scheduler.router import RouteRequest, Router, SubtaskReport
from hera_ray.store import KeyCharge, LedgerRow, Store, run_row
from hera_ray.tls import check as check_tls

log = logging.getLogger(__name__)

SCHEDULER_NAME = "SubtaskScheduler"
#: How far back a (re)started scheduler reads the charges and open requests it may be asked about again.
RECENT_S = 3600.0
#: The store's note of the estimator set `hera learn --apply` swapped in.
SERVING_SET_KEY = "estimators_serving"

# Ray gives every head node this resource (Serve pins its controller with it too). The actor asks
# for a sliver of it, so it runs on the head, and so does every restart of it: edge boxes dial the
# registry it runs at one known address.
HEAD_NODE_RESOURCE = "node:__internal_head__"
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def advertised_host(bind_host: str, advertise_host: str | None, node_ip: Callable[[], str]) -> str:
    """The host edge boxes dial the registry at: the configured one, else the bind address unless it
    is a wildcard (0.0.0.0 is not dialable from another host), else this node's IP."""
    if advertise_host:
        return advertise_host
    return node_ip() if bind_host in _WILDCARD_HOSTS else bind_host


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _RegistryThread(threading.Thread):
    """Runs the grpc.aio EdgeRegistry on its own loop, so it answers while the actor is busy."""

    def __init__(self, config: RegistryConfig, table: NodeTable):
        super().__init__(name="edge-registry", daemon=True)
        self.config, self.table = config, table
        self.ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self.server = RegistryServer(self.config, table=self.table)
            self.port = loop.run_until_complete(self.server.start())
        except BaseException as e:  # noqa: BLE001 - reported to the actor's constructor
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        loop.run_forever()


def _verify_policy(cfg: HeraConfig) -> dict[str, Any]:
    """hera-verify, with its step classifier (``verify.classifier``, else the estimator folder's)."""
    if not cfg.verify.enabled:
        return {}
    from hera_ray.estimators.trained import estimators_path
    from hera_ray.policy.verify import VERIFIER_FILE, StepClassifier, VerifyConfig, VerifyPolicy

    v = cfg.verify
    if v.classifier:
        classifier = StepClassifier.load(v.classifier)
    else:
        try:
            path = estimators_path(cfg.hera.estimators) / VERIFIER_FILE
        except ConfigError:  # no estimator set there: the SLM's confidence alone
            path = None
        classifier = StepClassifier.load(path) if path is not None and path.exists() else None
    if cfg.cloud.backend == "openai":
        logging.getLogger(__name__).warning(
            "hera-verify: the OpenAI backend cannot score a step, so every step its confidence or classifier does not "
            "keep is rewritten by the LLM (trace: check_error); serve the cloud model with llama_cpp or vllm to check steps")
    config = VerifyConfig(keep=v.keep, confidence_keep=v.confidence_keep, llm_accept=v.llm_accept, reject_below=v.reject_below,
                          check_batch=v.check_batch, batch_above=v.batch_above, check_writes=v.check_writes)
    return {"verify": VerifyPolicy(config, classifier)}


def _hera_policies(cfg: HeraConfig) -> dict[str, Any]:
    """The hera / hybridllm policies' estimators: the estimator deployment, by name, when enabled."""
    if not cfg.hera.enabled:
        return _verify_policy(cfg)
    from hera_ray.policy.hera import HeraPolicyConfig
    from hera_ray.serve.estimators import ServeEstimatorSet

    h = cfg.hera
    hera = HeraPolicyConfig(threshold_base=h.threshold_base, kappa_step=h.kappa_step, tau_req=h.tau_req,
                            use_urc=h.use_urc, use_cd=h.use_cd, use_sd=h.use_sd, max_distance=h.max_distance)
    return {"estimators": ServeEstimatorSet(cfg.app_name), "hera": hera, "tau_hybrid": h.tau_hybrid,
            "routellm_threshold": h.routellm_threshold if _has_estimator(h.estimators, "routellm") else None,
            **_verify_policy(cfg)}


def _has_estimator(folder, name: str) -> bool:
    """Does the estimator set hold ``name``? (A set trained before it existed does not: its policy is not offered.)"""
    from hera_ray.estimators.trained import load_manifest

    try:
        return name in load_manifest(folder)["estimators"]
    except Exception:  # noqa: BLE001 - an unreadable set fails where it is loaded, with its own message
        return True


class SubtaskScheduler:
    """Routes subtasks (``route``), records their cost (``report``), and lists nodes and usage."""

    def __init__(self, config: dict[str, Any]):
        self.started_at = time.time()  # a restarted actor (Ray restarts it) reports a new one
        cfg = HeraConfig.model_validate(config)
        s = cfg.scheduler
        # The store first: if it cannot be opened, the actor fails before it binds anything, with
        # the store's own error (hera up prints it).
        st = cfg.store
        self.store = Store(st.url, connect_timeout_s=st.connect_timeout_s, batch_max=st.batch_max, retry_max_s=st.retry_max_s)
        self.table = NodeTable(s.heartbeat_interval_s, s.missed_heartbeats)
        self.router = Router(
            self.table,
            build_policies(s.random_slm_share, s.seed, cascade_threshold=s.cascade_threshold, **_hera_policies(cfg)),
            edge_model=s.edge_model,
            cloud_model=cfg.cloud.model_id or cfg.cloud.model,
            cloud_prices=cfg.cloud.prices,
            max_cloud_cost_per_request=s.max_cloud_cost_per_request,
        )
        registry = RegistryConfig(host=s.registry_host, port=s.registry_port,
                                  token_file=s.token_file or default_token_file(),
                                  heartbeat_interval_s=s.heartbeat_interval_s, missed_heartbeats=s.missed_heartbeats,
                                  tls_cert_file=s.tls.cert_file, tls_key_file=s.tls.key_file, tls_ca_file=s.tls.ca_file,
                                  tls_client_auth=s.tls.client_auth)
        check_tls(s.tls, "scheduler.tls.")  # here, so the error names the setting the user wrote
        self._registry = _RegistryThread(registry, self.table)
        self._registry.start()
        self._registry.ready.wait(30)
        if self._registry.error is not None:
            raise ConfigError(f"the edge registry could not start on {s.registry_host}:{s.registry_port}: {self._registry.error}")
        self.registry_address = host_port(advertised_host(s.registry_host, s.registry_advertise_host, ray.util.get_node_ip_address),
                                          self._registry.port)
        # What was spent and charged before this actor started (a restart, or `hera down` / `hera up`):
        # the totals, what runs still in flight have spent, and the keys' spend.
        recent = time.time() - RECENT_S
        self.router.ledger.restore(self.store.ledger_usage(), self.store.recent_request_usage(recent))
        self._key_spend: dict[str, float] = self.store.key_spend()  # API key name -> cloud cost charged to it
        # Recent charge ids: a charge sent again (Ray retries a call the old actor did not answer) counts once.
        self._charged: OrderedDict[str, None] = OrderedDict.fromkeys(self.store.recent_charge_ids(recent))
        self._ack_timeout_s = st.ack_timeout_s
        self._fixed_classifier = cfg.verify.classifier is not None
        serving = self.store.get_meta(SERVING_SET_KEY)  # a set `hera learn --apply` swapped in before a restart
        if serving and cfg.hera.enabled and Path(serving).exists():
            self._use_verifier(serving)
        self._m_subtasks = metrics.Counter("hera_subtasks", "Subtasks routed, by placement and policy.", ("placement", "policy"))
        self._m_tokens = metrics.Counter("hera_tokens", "Tokens processed, by placement and kind (input: uncached prompt, "
                                         "cached_input, output).", ("placement", "kind"))
        self._m_cost = metrics.Counter("hera_cost", "Cost charged in USD, by placement (configured price sheets).", ("placement",))
        self._m_decision = metrics.Histogram("hera_decision_latency_s", "Time to make one routing decision.",
                                             boundaries=[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.2, 1.0])
        self._m_load = metrics.Gauge("hera_node_load", "Edge node utilisation: (in flight + queued) / slots.", ("node",))

    # -- routing -------------------------------------------------------------------------------

    async def route(self, request: dict[str, Any], max_cloud_cost: float | None = None) -> dict[str, Any]:
        req = RouteRequest.from_dict(request)
        route = await self.router.route(req, max_cloud_cost)
        self._m_decision.observe(route.decision_s)
        if req.chain_logprobs is not None:  # a review (a cascade's): it runs nothing, so it is no subtask
            return route.to_dict()
        self._m_subtasks.inc(1, {"placement": route.placement.value, "policy": req.policy})
        if route.placement is Placement.EDGE:
            record = self.table.get(route.node_id)
            self._m_load.set(self.router.load_of(record)[0], {"node": route.node_id})
        return route.to_dict()

    async def report(self, report: dict[str, Any]) -> float:
        """Record a subtask the agent ran (see :meth:`SubtaskReport.from_dict` for the dict); returns its cost in USD."""
        rep = SubtaskReport.from_dict(report)
        cost = self.router.report(rep)
        if rep.ok and not rep.release_only:  # acknowledged once committed (a step's report, not a routing decision)
            tokens = rep.tokens
            written = self.store.ledger(LedgerRow(
                report_id=str(report.get("report_id") or uuid.uuid4().hex), request_id=rep.request_id,
                node_id=rep.node_id, placement=rep.placement.value, subtask=not rep.check,
                uncached_prompt_tokens=tokens.uncached_prompt, cached_prompt_tokens=tokens.cached_prompt,
                completion_tokens=tokens.completion, cost=cost, ts=time.time()))
            await self._ack(written)
        if rep.ok:
            placement = rep.placement.value
            tokens = rep.tokens
            for kind, count in (("input", tokens.uncached_prompt), ("cached_input", tokens.cached_prompt),
                                ("output", tokens.completion)):
                if count:  # ray.util.metrics counters refuse 0 (a speculative step kept: nothing new ran)
                    self._m_tokens.inc(count, {"placement": placement, "kind": kind})
            if cost:
                self._m_cost.inc(cost, {"placement": placement})
        return cost

    async def finish(self, request_id: str) -> dict[str, Any]:
        return self.router.finish(request_id).to_dict()

    async def request_usage(self, request_id: str) -> dict[str, Any]:
        return self.router.ledger.request(request_id).to_dict()

    # -- API keys' cloud spend (here, not in the ingress, so a key's budget holds across its replicas)

    async def key_spend(self, name: str) -> float:
        """What the API key ``name`` has spent on the cloud so far (0.0 for a key not seen yet)."""
        return self._key_spend.get(name, 0.0)

    async def charge_key(self, name: str, cost: float, charge_id: str | None = None) -> float:
        """Add ``cost`` (a step's cloud cost) to API key ``name``; returns its new total once the
        charge is durable. ``charge_id`` names the charge (e.g. ``<run>:<step>``): a charge sent
        again with the same id (a retried call) counts once."""
        if cost < 0:
            raise ValueError(f"cannot charge a negative cost ({cost}) to API key {name!r}")
        if charge_id is None:
            charge_id = uuid.uuid4().hex
        elif charge_id in self._charged:
            return self._key_spend.get(name, 0.0)
        self._charged[charge_id] = None
        while len(self._charged) > 200_000:
            self._charged.popitem(last=False)
        # Counted at once, so a budget check made meanwhile sees it; acknowledged once committed.
        self._key_spend[name] = self._key_spend.get(name, 0.0) + cost
        await self._ack(self.store.charge(KeyCharge(charge_id, name, cost, time.time())))
        return self._key_spend[name]

    async def _ack(self, written) -> bool:
        """Wait until ``written`` (a store future) is committed, at most ``store.ack_timeout_s``: an
        unreachable store does not hold up the agent, and the row stays queued and is retried."""
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(written)), self._ack_timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        except HeraError as e:  # the store refused the row: it was logged, and is not retried
            log.error("store write refused: %s", e.message)
            return False

    # -- runs: every finished run's trace, kept in the store -------------------------------------

    async def record_run(self, run: dict[str, Any], api_key: str | None, status: str, created_at: float,
                         finished_at: float | None = None, row_id: str | None = None) -> bool:
        """Store a finished run (``AgentRun.to_dict()``, or what a failed run had) as row ``row_id``
        (sent again: replaced); True once durable (False: still queued, see :meth:`_ack`)."""
        row = run_row(run, api_key, status, created_at, finished_at or time.time(), row_id)
        return await self._ack(self.store.run(row))

    async def get_run(self, run_id: str, api_key: str | None = None, any_key: bool = True) -> dict[str, Any] | None:
        """A stored run (summary columns and ``run``); with ``any_key`` False, only one of ``api_key``."""
        return await asyncio.to_thread(self.store.get_run, run_id, api_key, any_key)

    async def list_runs(self, api_key: str | None = None, any_key: bool = True, policy: str | None = None,
                        since: float | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Stored runs' summaries, newest first (see :meth:`hera_ray.store.Store.list_runs`)."""
        return await asyncio.to_thread(self.store.list_runs, api_key, any_key, policy, since, limit)

    async def store_status(self) -> dict[str, Any]:
        """The store's URL (no password), backend, rows queued, committed, retried and refused."""
        from hera_ray.store import redact

        return {"url": redact(self.store.url), "kind": self.store.kind, "pending": self.store.pending,
                "committed": self.store.committed, "retries": self.store.retries, "refused": self.store.refused}

    async def reload_verifier(self, path: str) -> bool:
        """Give hera-verify (and its ``@`` variants) the step classifier in set ``path`` (``hera learn
        --apply``), and remember the set in the store, so a restarted actor takes it again; False if
        the set has none (or ``verify.classifier`` names one: it wins)."""
        used = self._use_verifier(path)
        await asyncio.to_thread(self.store.set_meta, SERVING_SET_KEY, str(path))
        return used

    def _use_verifier(self, path: str) -> bool:
        from hera_ray.policy.verify import VERIFIER_FILE, StepClassifier, VerifyPolicy

        file = Path(path) / VERIFIER_FILE
        if not file.exists() or self._fixed_classifier:
            return False
        classifier = StepClassifier.load(file)
        for policy in [*self.router.policies.values(), *self.router._tuned.values()]:
            if isinstance(policy, VerifyPolicy):
                policy.classifier = classifier
        return True

    async def learn_record(self, entry: dict[str, Any]) -> bool:
        """Record a ``hera learn`` (promoted or refused) in the store; True once durable."""
        return await self._ack(self.store.promotion(entry))

    async def flush_store(self, timeout_s: float = 30.0) -> int:
        """Commit every queued write (``hera down`` calls it before it stops the actor); returns the rows committed so far."""
        await asyncio.to_thread(self.store.flush, timeout_s)
        return self.store.committed

    def __ray_shutdown__(self) -> None:
        """A graceful end (``ray.kill(no_restart=...)`` is not one): commit what is queued."""
        self.store.close()

    # -- inspection ------------------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        nodes = self.table.nodes()
        for r in nodes:  # health checks come often: keep the per-node load gauges fresh
            self._m_load.set(r.utilisation, {"node": r.spec.node_id})
        return {"registry": self.registry_address, "node_ip": ray.util.get_node_ip_address(), "nodes": len(nodes),
                "nodes_up": sum(1 for r in nodes if r.state.value == "up"), "policies": sorted(self.router.policies),
                "cloud_model": self.router.cloud_model, "edge_model": self.router.edge_model,
                "scheduler_started_at": self.started_at}

    async def nodes(self) -> list[dict[str, Any]]:
        out = []
        for r in self.table.nodes():
            self._m_load.set(r.utilisation, {"node": r.spec.node_id})
            out.append({**r.spec.__dict__, "prices": r.spec.prices.model_dump(), "state": r.state.value, "load": r.load.__dict__,
                        "last_heartbeat_age_s": self.table.heartbeat_age(r)})
        return out

    async def policies(self) -> list[dict[str, str]]:
        return [{"name": p.name, "description": p.description, "knob": p.knob} for p in self.router.policies.values()]

    async def check_policy(self, name: str) -> str | None:
        """None if ``name`` is a policy this scheduler runs (``hera@0.7`` included), else why not."""
        try:
            self.router.policy(name)
        except HeraError as e:
            return e.message
        return None

    async def usage(self) -> dict[str, Any]:
        led = self.router.ledger
        return {"total": led.total.to_dict(), "by_node": {k: v.to_dict() for k, v in led.by_node.items()}}

    async def add_stub_nodes(self, count: int, model: str, slots: int = 1) -> int:
        """Register ``count`` stub nodes that serve nothing (control-plane benchmarks only)."""
        for i in range(count):
            self.table.register(NodeSpec(node_id=f"stub-{i:05d}", address=f"127.0.0.1:{20000 + i % 40000}",
                                         model=model, n_ctx=2048, slots=slots), "stub-token")
        return len(self.table)


def get_or_create_scheduler(config: HeraConfig):
    """The named, detached scheduler actor: created on first call, found afterwards."""
    actor_cls = ray.remote(SubtaskScheduler)
    return actor_cls.options(
        name=SCHEDULER_NAME,
        namespace=config.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=3,
        num_cpus=0,
        resources={HEAD_NODE_RESOURCE: 0.001},
        max_concurrency=1000,
    ).remote(config.model_dump(mode="json"))


def scheduler_handle(namespace: str = "hera"):
    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=namespace)
    except ValueError:
        raise HeraError(f"no {SCHEDULER_NAME} actor in namespace {namespace!r}: run `hera up` first") from None
