"""The cost ledger: tokens and spend per request, per node and in total, split edge / cloud."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

from hera_ray.policy.base import Placement


@dataclass
class Usage:
    edge_subtasks: int = 0
    cloud_subtasks: int = 0
    edge_tokens: int = 0
    cloud_tokens: int = 0
    edge_cost: float = 0.0
    cloud_cost: float = 0.0

    def add(self, placement: Placement, tokens: int, cost: float) -> None:
        if placement is Placement.EDGE:
            self.edge_subtasks += 1
            self.edge_tokens += tokens
            self.edge_cost += cost
        else:
            self.cloud_subtasks += 1
            self.cloud_tokens += tokens
            self.cloud_cost += cost

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
        return {**asdict(self), "subtasks": self.subtasks, "cost": self.cost, "slm_share": self.slm_share}


def token_cost(tokens: int, price_per_1k_tokens: float) -> float:
    return tokens * price_per_1k_tokens / 1000.0


class CostLedger:
    """Accumulates usage. Open requests are kept until closed (at most ``max_open``, oldest dropped)."""

    def __init__(self, max_open: int = 10_000):
        self.total = Usage()
        self.by_node: dict[str, Usage] = {}
        self._requests: OrderedDict[str, Usage] = OrderedDict()
        self._max_open = max_open

    def charge(self, request_id: str, placement: Placement, node_id: str, tokens: int, price_per_1k_tokens: float) -> float:
        cost = token_cost(tokens, price_per_1k_tokens)
        for usage in (self.total, self.request(request_id), self.by_node.setdefault(node_id, Usage())):
            usage.add(placement, tokens, cost)
        return cost

    def request(self, request_id: str) -> Usage:
        usage = self._requests.get(request_id)
        if usage is None:
            usage = self._requests[request_id] = Usage()
            while len(self._requests) > self._max_open:
                self._requests.popitem(last=False)
        return usage

    def close(self, request_id: str) -> Usage:
        return self._requests.pop(request_id, None) or Usage()
