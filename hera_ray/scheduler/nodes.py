"""The node table: which edge nodes exist, what they serve, how loaded they are, and whether
they are alive. A plain class with an injectable clock, so it is tested without servers; the
EdgeRegistry (gRPC) and, later, the SubtaskScheduler actor wrap it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
import threading
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable

from hera_ray.errors import InvalidRequest, NodeIdConflict, PermissionDenied, UnknownNode
from hera_ray.pricing import FREE, PriceSheet, parse_prices


class NodeState(str, Enum):
    UP = "up"
    DRAINING = "draining"
    DOWN = "down"


MAX_ADDRESS_CHARS = 300
MAX_MODEL_CHARS = 256
MAX_VERSION_CHARS = 64


@dataclass(frozen=True)
class NodeSpec:
    """What a node advertises when it registers."""

    node_id: str
    address: str
    model: str
    n_ctx: int
    slots: int
    max_queue: int = 0
    #: What the node charges, for the cost ledger (an edge box's default: nothing).
    prices: PriceSheet = FREE
    version: str = ""

    def validate(self) -> None:
        if not self.node_id or len(self.node_id) > 128:
            raise InvalidRequest("node_id must be 1-128 characters")
        # Bounded so that ListNodes, which returns every spec in one message, stays far below the
        # message size limit whatever nodes register.
        if len(self.address) > MAX_ADDRESS_CHARS:
            raise InvalidRequest(f"address must be at most {MAX_ADDRESS_CHARS} characters, got {len(self.address)}")
        host, sep, port = self.address.rpartition(":")
        # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise InvalidRequest(f"address must be host:port, got {self.address!r}")
        if not self.model or len(self.model) > MAX_MODEL_CHARS:
            raise InvalidRequest(f"model must be 1-{MAX_MODEL_CHARS} characters, got {len(self.model)}")
        if len(self.version) > MAX_VERSION_CHARS:
            raise InvalidRequest(f"version must be at most {MAX_VERSION_CHARS} characters, got {len(self.version)}")
        if self.slots < 1:
            raise InvalidRequest(f"slots must be >= 1, got {self.slots}")
        if self.n_ctx < 1:
            raise InvalidRequest(f"n_ctx must be >= 1, got {self.n_ctx}")
        if not isinstance(self.prices, PriceSheet):
            raise InvalidRequest(f"prices must be a PriceSheet, got {type(self.prices).__name__}")
        parse_prices(self.prices)  # checked again: a sheet made with model_construct() skipped its checks


@dataclass(frozen=True)
class NodeLoad:
    in_flight: int = 0
    queued: int = 0
    tokens_per_s: float = 0.0
    completed: int = 0
    tokens_generated: int = 0

    def validate(self) -> None:
        if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s >= 0):
            raise InvalidRequest(f"load.tokens_per_s must be a finite number >= 0, got {self.tokens_per_s}")


@dataclass
class NodeRecord:
    spec: NodeSpec
    state: NodeState
    load: NodeLoad
    registered_at: float  # wall clock, for display
    last_heartbeat: float  # table clock (monotonic)
    token_digest: bytes = field(repr=False)

    @property
    def utilisation(self) -> float:
        """(in flight + queued) per slot: 0 is idle, 1 is every slot busy."""
        return (self.load.in_flight + self.load.queued) / max(1, self.spec.slots)


def _locked(method):
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class _LiveIndex:
    """Ids of the live nodes of one model: O(1) add, remove and uniform random choice."""

    def __init__(self):
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, node_id: str) -> None:
        if node_id not in self.pos:
            self.pos[node_id] = len(self.ids)
            self.ids.append(node_id)

    def remove(self, node_id: str) -> None:
        i = self.pos.pop(node_id, None)
        if i is None:
            return
        last = self.ids.pop()
        if last != node_id:  # move the last id into the hole
            self.ids[i] = last
            self.pos[last] = i


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class NodeTable:
    """Registered edge nodes, keyed by node id. A node id is bound to the token that registered it.

    Thread-safe: the registry's gRPC loop and the scheduler's loop may run in different threads.
    """

    def __init__(
        self,
        heartbeat_interval_s: float = 1.0,
        missed_heartbeats: int = 3,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.heartbeat_interval_s = heartbeat_interval_s
        self.missed_heartbeats = missed_heartbeats
        self._clock = clock
        self._wall = wall_clock
        self._nodes: dict[str, NodeRecord] = {}
        self._live: dict[str, _LiveIndex] = {}
        self._lock = threading.RLock()

    def _set_state(self, record: NodeRecord, state: NodeState) -> None:
        """Every state change goes through here, so the live index stays exact."""
        record.state = state
        index = self._live.setdefault(record.spec.model, _LiveIndex())
        if state is NodeState.UP:
            index.add(record.spec.node_id)
        else:
            index.remove(record.spec.node_id)

    @property
    def down_after_s(self) -> float:
        return self.heartbeat_interval_s * self.missed_heartbeats

    @_locked
    def register(self, spec: NodeSpec, token: str) -> NodeRecord:
        """Add or replace a node. A node id held by another token is refused (ALREADY_EXISTS)."""
        spec.validate()
        digest = _digest(token)
        old = self._nodes.get(spec.node_id)
        if old is not None and not hmac.compare_digest(old.token_digest, digest):
            raise NodeIdConflict(f"node id {spec.node_id!r} is already registered with another token")
        if old is not None:
            self._set_state(old, NodeState.DOWN)  # leaves the old model's index
        record = NodeRecord(
            spec=spec,
            state=NodeState.DOWN,
            load=NodeLoad(),
            registered_at=self._wall(),
            last_heartbeat=self._clock(),
            token_digest=digest,
        )
        self._nodes[spec.node_id] = record
        self._set_state(record, NodeState.UP)
        return record

    @_locked
    def heartbeat(self, node_id: str, load: NodeLoad, token: str, draining: bool = False) -> NodeRecord:
        record = self._owned(node_id, token)
        load.validate()
        record.load = load
        record.last_heartbeat = self._clock()
        self._set_state(record, NodeState.DRAINING if draining else NodeState.UP)
        return record

    @_locked
    def deregister(self, node_id: str, token: str) -> None:
        record = self._owned(node_id, token)
        self._set_state(record, NodeState.DOWN)
        del self._nodes[node_id]

    @_locked
    def expire(self) -> list[str]:
        """Mark nodes that missed too many heartbeats down; return the ids newly marked."""
        now = self._clock()
        newly_down = []
        for record in self._nodes.values():
            if record.state is not NodeState.DOWN and now - record.last_heartbeat > self.down_after_s:
                self._set_state(record, NodeState.DOWN)
                newly_down.append(record.spec.node_id)
        return newly_down

    def heartbeat_age(self, record: NodeRecord) -> float:
        return max(0.0, self._clock() - record.last_heartbeat)

    @_locked
    def get(self, node_id: str) -> NodeRecord:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise UnknownNode(f"node {node_id!r} is not registered") from None

    @_locked
    def nodes(self) -> list[NodeRecord]:
        """A snapshot of every node, sorted by id."""
        return [replace(r) for _, r in sorted(self._nodes.items())]

    @_locked
    def live(self, model: str | None = None) -> list[NodeRecord]:
        """Nodes that are up (not draining or down), optionally only those serving ``model``."""
        return [
            r for r in self.nodes() if r.state is NodeState.UP and (model is None or r.spec.model == model)
        ]

    @_locked
    def candidates(self, model: str, exclude: tuple[str, ...] = ()) -> list[NodeRecord]:
        """Live records serving ``model`` (not copies: for the router's hot path, read-only)."""
        return [r for r in self._nodes.values()
                if r.state is NodeState.UP and r.spec.model == model and r.spec.node_id not in exclude]

    @_locked
    def live_count(self, model: str) -> int:
        index = self._live.get(model)
        return len(index.ids) if index else 0

    @_locked
    def live_record(self, node_id: str, model: str) -> NodeRecord | None:
        """The node if it is up and serves ``model``, else None (not a copy)."""
        record = self._nodes.get(node_id)
        return record if record is not None and record.state is NodeState.UP and record.spec.model == model else None

    @_locked
    def sample_live(self, model: str, k: int, rng: random.Random, exclude: tuple[str, ...] = ()) -> list[NodeRecord]:
        """Up to ``k`` distinct live nodes of ``model``, drawn uniformly (not copies)."""
        index = self._live.get(model)
        if not index or not index.ids:
            return []
        ids = index.ids
        picked = rng.sample(ids, min(len(ids), k + len(exclude)))
        return [self._nodes[i] for i in picked if i not in exclude][:k]

    def __len__(self) -> int:
        return len(self._nodes)

    def _owned(self, node_id: str, token: str) -> NodeRecord:
        record = self.get(node_id)
        if not hmac.compare_digest(record.token_digest, _digest(token)):
            raise PermissionDenied(f"node id {node_id!r} belongs to another token")
        return record
