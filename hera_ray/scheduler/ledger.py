"""The cost ledger: tokens and spend per request, per node and in total, split edge / cloud.

Tokens are kept by how they are billed (uncached prompt, cached prompt, completion) and costs in
USD, priced by :func:`hera_ray.pricing.cost`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

from hera_ray.policy.base import Placement
from hera_ray.pricing import PriceSheet, TokenCounts, cost as priced


@dataclass
class Usage:
    edge_subtasks: int = 0
    cloud_subtasks: int = 0
    edge_uncached_prompt_tokens: int = 0
    edge_cached_prompt_tokens: int = 0
    edge_completion_tokens: int = 0
    cloud_uncached_prompt_tokens: int = 0
    cloud_cached_prompt_tokens: int = 0
    cloud_completion_tokens: int = 0
    edge_cost: float = 0.0  # USD
    cloud_cost: float = 0.0  # USD

    def add(self, placement: Placement, tokens: TokenCounts, cost: float, subtask: bool = True) -> None:
        """Count a model call's tokens and cost; ``subtask`` False for a call that wrote no step
        (the LLM scoring an SLM step)."""
        if placement is Placement.EDGE:
            self.edge_subtasks += subtask
            self.edge_uncached_prompt_tokens += tokens.uncached_prompt
            self.edge_cached_prompt_tokens += tokens.cached_prompt
            self.edge_completion_tokens += tokens.completion
            self.edge_cost += cost
        else:
            self.cloud_subtasks += subtask
            self.cloud_uncached_prompt_tokens += tokens.uncached_prompt
            self.cloud_cached_prompt_tokens += tokens.cached_prompt
            self.cloud_completion_tokens += tokens.completion
            self.cloud_cost += cost

    @property
    def edge_tokens(self) -> int:
        """Every token the edge read or wrote."""
        return self.edge_uncached_prompt_tokens + self.edge_cached_prompt_tokens + self.edge_completion_tokens

    @property
    def cloud_tokens(self) -> int:
        """Every token the cloud read or wrote."""
        return self.cloud_uncached_prompt_tokens + self.cloud_cached_prompt_tokens + self.cloud_completion_tokens

    @property
    def subtasks(self) -> int:
        return self.edge_subtasks + self.cloud_subtasks

    @property
    def cost(self) -> float:
        return self.edge_cost + self.cloud_cost

    @property
    def slm_share(self) -> float:
        return self.edge_subtasks / self.subtasks if self.subtasks else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "edge_tokens": self.edge_tokens, "cloud_tokens": self.cloud_tokens,
                "subtasks": self.subtasks, "cost": self.cost, "slm_share": self.slm_share}


class CostLedger:
    """Accumulates usage. Open requests are kept until closed (at most ``max_open``, oldest dropped)."""

    def __init__(self, max_open: int = 10_000):
        self.total = Usage()
        self.by_node: dict[str, Usage] = {}
        self._requests: OrderedDict[str, Usage] = OrderedDict()
        self._max_open = max_open

    def charge(self, request_id: str, placement: Placement, node_id: str, tokens: TokenCounts,
               prices: PriceSheet, subtask: bool = True) -> float:
        """Record one finished subtask (or, ``subtask`` False, a check of one); returns what it cost, in USD."""
        cost = priced(tokens, prices)
        for usage in (self.total, self.request(request_id), self.by_node.setdefault(node_id, Usage())):
            usage.add(placement, tokens, cost, subtask)
        return cost

    def restore(self, rows: list[dict], requests: list[dict] = ()) -> None:
        """Start from the stored ledger (what a restarted scheduler does): ``rows`` summed by node and
        placement (:meth:`hera_ray.store.Store.ledger_usage`) go to the totals and per-node usage;
        ``requests``, the same summed by request (``node_id`` holding the request id), to the open
        requests, so a run in flight keeps what it spent against its cap."""
        for row in rows:
            _add_row(self.total, row)
            _add_row(self.by_node.setdefault(row["node_id"], Usage()), row)
        for row in requests:
            _add_row(self.request(row["node_id"]), row)

    def request(self, request_id: str) -> Usage:
        usage = self._requests.get(request_id)
        if usage is None:
            usage = self._requests[request_id] = Usage()
            while len(self._requests) > self._max_open:
                self._requests.popitem(last=False)
        return usage

    def close(self, request_id: str) -> Usage:
        return self._requests.pop(request_id, None) or Usage()


def _add_row(usage: Usage, row: dict) -> None:
    side = "edge" if row["placement"] == Placement.EDGE.value else "cloud"
    for field, value in (("subtasks", row["subtasks"]), ("uncached_prompt_tokens", row["uncached_prompt_tokens"]),
                         ("cached_prompt_tokens", row["cached_prompt_tokens"]), ("completion_tokens", row["completion_tokens"]),
                         ("cost", row["cost"])):
        name = f"{side}_{field}"
        setattr(usage, name, getattr(usage, name) + value)
