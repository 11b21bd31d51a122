"""The routing decision for one subtask: policy first, then budget, then which edge node.

Plain code over the node table, the cost ledger and the policies; the SubtaskScheduler actor
wraps it. Edge node choice: the least-loaded live node serving the model, but a request stays on
the node that ran its previous subtask while that node is up (its KV cache holds the context).
With many nodes the least-loaded one is found by "power of two choices" (the choice Ray Serve's
own request router makes): the less loaded of two random live nodes, O(1) per decision instead
of a scan, and with a maximum load exponentially closer to the ideal than one random choice.
"""

from __future__ import annotations

from collections import OrderedDict

import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hera_ray.errors import BudgetExceeded, InvalidRequest, UnknownPolicy
from hera_ray.policy.base import PastStep, Placement, Policy, SubtaskContext
from hera_ray.pricing import FREE, PriceSheet, TokenCounts, parse_prices
from hera_ray.scheduler.ledger import CostLedger, Usage
from hera_ray.scheduler.nodes import NodeRecord, NodeTable


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    policy: str
    index: int
    question: str = ""
    history: tuple[PastStep, ...] = ()
    #: Edge nodes that just failed this subtask: do not pick them again.
    exclude_nodes: tuple[str, ...] = ()
    #: The SLM's real subtask for this position, after a ``speculate`` decision.
    slm_candidate: str | None = None
    #: The SLM's token log-probabilities of ``slm_candidate``; after a ``verify`` decision, the
    #: LLM's of the same tokens and of its own top choices (see SubtaskContext).
    slm_logprobs: tuple[float, ...] | None = None
    llm_logprobs: tuple[float, ...] | None = None
    llm_top_logprobs: tuple[float, ...] | None = None
    #: A review of the finished chain: every generated token's log-probability (see SubtaskContext).
    chain_logprobs: tuple[float, ...] | None = None
    #: Step mode: the agent session this call belongs to. The policy sees it as the request (URC's
    #: once-per-request decision) and node affinity follows it; the ledger bills ``request_id``.
    session: str | None = None
    #: The prompt does not fit the edge nodes' context: place it on the cloud (fallback "context").
    cloud_only: bool = False
    #: A review escalated this request (see SubtaskContext.escalated).
    escalated: bool = False

    @classmethod
    def from_dict(cls, request: dict[str, Any]) -> "RouteRequest":
        """From the agent's request dict (it crosses Ray as a dict)."""
        def floats(values) -> tuple[float, ...] | None:
            return None if values is None else tuple(float(v) for v in values)

        return cls(
            request_id=request["request_id"],
            policy=request["policy"],
            index=int(request["index"]),
            question=request.get("question", ""),
            history=tuple(PastStep(h["subtask"], h["output"], Placement(h["placement"])) for h in request.get("history", ())),
            exclude_nodes=tuple(request.get("exclude_nodes", ())),
            slm_candidate=request.get("slm_candidate"),
            slm_logprobs=floats(request.get("slm_logprobs")),
            llm_logprobs=floats(request.get("llm_logprobs")),
            llm_top_logprobs=floats(request.get("llm_top_logprobs")),
            chain_logprobs=floats(request.get("chain_logprobs")),
            session=request.get("session"),
            cloud_only=bool(request.get("cloud_only", False)),
            escalated=bool(request.get("escalated", False)),
        )


@dataclass(frozen=True)
class Route:
    placement: Placement
    stage: str
    scores: dict[str, float] = field(default_factory=dict)
    node_id: str = ""
    address: str = ""
    model: str = ""
    #: What the chosen side charges: ``PriceSheet.model_dump()``, a plain dict, since routes cross
    #: Ray as dicts. The agent sends it back in its report.
    prices: dict[str, float] = field(default_factory=FREE.model_dump)
    #: Why the policy's choice was overridden: "budget" (cloud cap reached) or "no-edge".
    fallback: str = ""
    decision_s: float = 0.0
    #: The policy wants the step's token log-probabilities (Decision.logprobs).
    logprobs: bool = False
    #: The policy wants to review the finished chain (Decision.review).
    review: bool = False
    #: A ``verify`` decision: borderline steps the agent may score in one LLM prefill (Decision.check_batch).
    check_batch: int = 1
    #: A ``verify`` decision: the check may write in place of a step under this bar (Decision.rewrite_below).
    rewrite_below: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["placement"] = self.placement.value
        return d


@dataclass(frozen=True)
class SubtaskReport:
    """A finished (or failed) subtask, as the agent reports it."""

    request_id: str
    placement: Placement
    node_id: str
    #: The whole prompt, cached part included.
    prompt_tokens: int = 0
    #: The part of the prompt the model found in its prompt cache.
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    prices: PriceSheet = FREE
    ok: bool = True
    #: Only give back the node pick of a route that ran nothing new (a speculative step the policy
    #: kept: it already ran, and was charged, under the first pick).
    release_only: bool = False
    #: The call scored a step another model wrote (hera-verify's LLM check): its tokens and cost
    #: count, but it is not a subtask of its own.
    check: bool = False

    def __post_init__(self) -> None:
        self.tokens  # noqa: B018 - refuse bad counts when the report is made, not when it is charged

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts.from_prompt(self.prompt_tokens, self.cached_prompt_tokens, self.completion_tokens)

    @classmethod
    def from_dict(cls, report: dict[str, Any]) -> "SubtaskReport":
        """The report dict the agent sends: ``request_id``, ``placement``, ``node_id``, ``prices``
        (the route's; missing or empty: free), ``ok``, ``prompt_tokens``, ``cached_prompt_tokens`` (missing:
        0) and ``completion_tokens``."""
        try:
            placement = Placement(report["placement"])
            counts = {k: int(report.get(k, 0)) for k in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens")}
            return cls(request_id=str(report["request_id"]), placement=placement, node_id=str(report["node_id"]),
                       prices=parse_prices(report.get("prices") or None), ok=bool(report.get("ok", True)),
                       release_only=bool(report.get("release_only", False)), check=bool(report.get("check", False)),
                       **counts)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequest(f"malformed subtask report: {type(e).__name__}: {e}") from None


class Router:
    def __init__(
        self,
        table: NodeTable,
        policies: dict[str, Policy],
        edge_model: str,
        cloud_model: str,
        cloud_prices: PriceSheet,
        max_cloud_cost_per_request: float | None = None,
        ledger: CostLedger | None = None,
    ):
        self.table = table
        self.policies = policies
        self._tuned: dict[str, Policy] = {}
        self.edge_model = edge_model
        self.cloud_model = cloud_model
        self.cloud_prices = cloud_prices
        self.max_cloud_cost = max_cloud_cost_per_request
        self.ledger = ledger or CostLedger()
        self.outstanding: dict[str, int] = defaultdict(int)
        self._affinity: OrderedDict[str, str] = OrderedDict()  # request or session -> its node (bounded)
        #: Nodes a call just failed on (node id -> when), avoided until the registry decides about
        #: them: a dead or frozen node stays "up" in the table until it misses its heartbeats.
        self._suspects: dict[str, float] = {}
        self._rng = random.Random(0)

    #: Tuned variants (``hera@0.7``) kept at most; a sweep uses a handful.
    MAX_TUNED = 256

    def policy(self, name: str) -> Policy:
        """The policy called ``name``; ``<policy>@<value>`` is that policy at another value of its
        knob (``hera@0.7``: threshold base 0.7; ``hybridllm@0.5``: τ; ``random@0.3``: SLM share)."""
        found = self.policies.get(name) or self._tuned.get(name)
        if found is not None:
            return found
        base, at, value = name.partition("@")
        if not at or base not in self.policies:
            raise UnknownPolicy(f"unknown policy {name!r}: choose one of {', '.join(sorted(self.policies))}"
                                f" (or <policy>@<value> for a policy with a knob)")
        policy = self.policies[base]
        if not policy.knob:
            raise UnknownPolicy(f"policy {base!r} has no knob to set with '@' (in {name!r})")
        try:
            tuned = policy.tuned(float(value))
        except ValueError as e:
            raise UnknownPolicy(f"bad policy {name!r}: {policy.knob} must be a number in range ({e})") from None
        if len(self._tuned) >= self.MAX_TUNED:
            self._tuned.pop(next(iter(self._tuned)))
        self._tuned[name] = tuned
        return tuned

    def over_budget(self, request_id: str, max_cloud_cost: float | None = None) -> bool:
        cap = self.max_cloud_cost if max_cloud_cost is None else max_cloud_cost
        return cap is not None and self.ledger.request(request_id).cloud_cost >= cap

    async def route(self, req: RouteRequest, max_cloud_cost: float | None = None) -> Route:
        t0 = time.perf_counter()
        owner = req.session or req.request_id  # whose decisions and node affinity these are
        decision = await self.policy(req.policy).decide(
            SubtaskContext(owner, req.question, req.index, req.history, req.slm_candidate,
                           req.slm_logprobs, req.llm_logprobs, req.llm_top_logprobs, req.chain_logprobs,
                           req.escalated))
        placement, fallback = decision.placement, ""
        if req.chain_logprobs is not None:
            # A review runs nothing: no node is picked. An escalation past the request's cloud cap keeps
            # the answer (fallback "budget").
            if placement is Placement.CLOUD and self.over_budget(req.request_id, max_cloud_cost):
                placement, fallback = Placement.EDGE, "budget"
            return Route(placement, decision.stage, decision.scores, fallback=fallback,
                         decision_s=time.perf_counter() - t0)
        if placement is Placement.EDGE and req.cloud_only:
            placement, fallback = Placement.CLOUD, "context"
        if placement is Placement.CLOUD and self.over_budget(req.request_id, max_cloud_cost):
            placement, fallback = Placement.EDGE, "budget"
        edge_model = decision.edge_model or self.edge_model
        node = self.pick_node(owner, edge_model, req.exclude_nodes) if placement is Placement.EDGE else None
        if placement is Placement.EDGE and node is None:
            if fallback == "budget":
                spent = self.ledger.request(req.request_id).cloud_cost
                raise BudgetExceeded(
                    f"request {req.request_id} spent {spent:.6f} on the cloud, its cap is "
                    f"{self.max_cloud_cost if max_cloud_cost is None else max_cloud_cost}, and no edge node "
                    f"serving {edge_model!r} is up to take its subtasks"
                )
            placement, fallback = Placement.CLOUD, "no-edge"
        if node is not None:
            self.outstanding[node.spec.node_id] += 1
            self._affinity[owner] = node.spec.node_id
            self._affinity.move_to_end(owner)
            while len(self._affinity) > self.MAX_AFFINITY:
                self._affinity.popitem(last=False)
            route = Route(placement, decision.stage, decision.scores, node.spec.node_id, node.spec.address,
                          node.spec.model, node.spec.prices.model_dump(), fallback)
        else:
            route = Route(placement, decision.stage, decision.scores, "cloud", "", self.cloud_model,
                          self.cloud_prices.model_dump(), fallback)
        return replace(route, decision_s=time.perf_counter() - t0, logprobs=decision.logprobs, review=decision.review,
                       check_batch=decision.check_batch, rewrite_below=decision.rewrite_below)

    #: Requests or sessions whose node is remembered at most (the oldest are forgotten).
    MAX_AFFINITY = 10_000
    #: Up to this many live nodes, scan them all; above, sample two.
    SCAN_LIMIT = 16

    def pick_node(self, request_id: str, model: str, exclude: tuple[str, ...] = ()) -> NodeRecord | None:
        if self._suspects:
            now = time.monotonic()
            for node_id, since in list(self._suspects.items()):
                if now - since > self.table.down_after_s:
                    del self._suspects[node_id]
            exclude = (*exclude, *self._suspects)
        sticky = self._affinity.get(request_id)
        if sticky is not None and sticky not in exclude:
            record = self.table.live_record(sticky, model)
            if record is not None:
                return record
        if self.table.live_count(model) <= self.SCAN_LIMIT:
            candidates = self.table.candidates(model, exclude)
        else:
            candidates = self.table.sample_live(model, 2, self._rng, exclude) or self.table.candidates(model, exclude)
        return min(candidates, key=self.load_of) if candidates else None

    def load_of(self, r: NodeRecord) -> tuple[float, str]:
        """(busy per slot, node id): the node-choice key. The heartbeat lags by up to a second;
        what this scheduler sent since is fresher, so the larger of the two counts."""
        busy = max(self.outstanding.get(r.spec.node_id, 0), r.load.in_flight + r.load.queued)
        return busy / max(1, r.spec.slots), r.spec.node_id

    def report(self, rep: SubtaskReport) -> float:
        """Record a finished (or failed) subtask; returns its cost in USD (:func:`hera_ray.pricing.cost`)."""
        if rep.placement is Placement.EDGE and self.outstanding.get(rep.node_id, 0) > 0:
            self.outstanding[rep.node_id] -= 1
        if not rep.ok:
            if self._affinity.get(rep.request_id) == rep.node_id:
                del self._affinity[rep.request_id]
            if rep.placement is Placement.EDGE:
                self._suspects[rep.node_id] = time.monotonic()
            return 0.0
        if rep.release_only:
            return 0.0
        return self.ledger.charge(rep.request_id, rep.placement, rep.node_id, rep.tokens, rep.prices, subtask=not rep.check)

    def finish(self, request_id: str) -> Usage:
        """The request is done: forget its node affinity and return its usage."""
        self._affinity.pop(request_id, None)
        return self.ledger.close(request_id)
