"""API keys of the HTTP ingress: who may call, how often, and how much cloud they may spend.

Pure Python (no Ray, no FastAPI), so it is tested with a fake clock. The ingress wires it in:
authenticate the bearer key, take a token from the key's rate bucket, then cap the run's cloud
spend at what is left of the key's budget (the spend itself is kept by the scheduler actor).

A keys file is a YAML list::

    - name: alice
      key: "sk-alice-0123456789"
      requests_per_minute: 30   # optional; no limit without it
      burst: 5                  # optional; default: one minute's worth
      cloud_budget: 0.50        # optional, in USD; no cap without it
    - name: batch
      key: "sk-batch-0123456789"
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator, model_validator

from hera_ray.errors import BudgetExceeded, ConfigError, RateLimited, Unauthenticated

#: The key read from the ingress's ``api_key_env`` (``HERA_API_KEY``) is named this.
ENV_KEY_NAME = "default"


class ApiKey(BaseModel):
    """One caller's key, with its optional rate limit and cloud budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@:-]+$",
                      description="Who the key belongs to; shown in errors, /v1/keys/me and the spend ledger.")
    key: str = Field(..., repr=False, description="The bearer secret the caller sends (Authorization: Bearer <key>).")
    requests_per_minute: float | None = Field(None, gt=0, description="Sustained request rate allowed; none: no limit.")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once after a quiet spell; default: one minute's worth.")
    cloud_budget: float | None = Field(None, ge=0, description="Total cloud cost the key may spend, in USD; none: no cap.")

    @field_validator("key")
    @classmethod
    def _usable_key(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the key is empty")
        if any(c.isspace() for c in v):
            raise ValueError("the key contains whitespace, which an Authorization header cannot carry")
        return v

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> "ApiKey":
        if self.burst is not None and self.requests_per_minute is None:
            raise ValueError("burst is set without requests_per_minute")
        return self

    @property
    def bucket_size(self) -> int | None:
        """Requests the key may make at once: its burst, else one minute's worth."""
        if self.requests_per_minute is None:
            return None
        return self.burst if self.burst is not None else max(1, math.ceil(self.requests_per_minute))

    def describe(self) -> dict[str, Any]:
        """The key's settings without its secret."""
        return {"name": self.name, "requests_per_minute": self.requests_per_minute, "burst": self.bucket_size,
                "cloud_budget": self.cloud_budget}


class _KeysFile(RootModel[list[ApiKey]]):
    @model_validator(mode="after")
    def _unique(self) -> "_KeysFile":
        names, secrets = set(), set()
        for k in self.root:
            if k.name in names:
                raise ValueError(f"the name {k.name!r} is used by more than one key")
            if k.key in secrets:
                raise ValueError(f"key {k.name!r} has the same secret as another key")
            names.add(k.name)
            secrets.add(k.key)
        return self


def parse_keys(data: Any, source: str = "keys file") -> list[ApiKey]:
    """Validate keys-file content (a list of mappings); :class:`ConfigError` says what is wrong where."""
    if not isinstance(data, list):
        raise ConfigError(f"{source} must hold a YAML list of keys ({{name, key, requests_per_minute, burst, cloud_budget}})")
    try:
        return _KeysFile.model_validate(data).root
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_problem(e, data)}") from None


def load_keys_file(path: Path) -> list[ApiKey]:
    """The keys in a YAML keys file (see the module docstring for its format)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read API keys file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"API keys file {path} is not valid YAML: {e}") from e
    keys = parse_keys(data or [], f"API keys file {path}")
    if not keys:
        raise ConfigError(f"API keys file {path} holds no key")
    return keys


def _first_problem(e: ValidationError, data: list[Any]) -> str:
    err = e.errors()[0]
    loc = list(err.get("loc", ()))
    msg = err["msg"].removeprefix("Value error, ")
    if loc and isinstance(loc[0], int):
        index = loc.pop(0)
        entry = data[index] if index < len(data) else None
        who = f"key {entry['name']!r}" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else f"entry {index + 1}"
        return f"{who}: {'.'.join(map(str, loc)) + ': ' if loc else ''}{msg}"
    return msg


class KeyBook:
    """The keys an ingress accepts. Empty means the ingress is open (no key needed).

    >>> book = KeyBook([ApiKey(name="alice", key="sk-alice")])
    >>> book.authenticate("sk-alice").name
    'alice'
    """

    def __init__(self, keys: Iterable[ApiKey] = ()):
        self.keys = list(keys)
        parse_keys([k.model_dump() for k in self.keys], "API keys")  # the same uniqueness checks as a file
        # Compare fixed-length digests, so the comparison's time does not depend on the keys' lengths either.
        self._digests = [(k, hashlib.sha256(k.key.encode()).digest()) for k in self.keys]

    @classmethod
    def load(cls, keys_file: Path | None = None, env_key: str | None = None) -> "KeyBook":
        """The keys file's keys, plus ``env_key`` (the ``HERA_API_KEY`` value) named "default" with no limits."""
        keys = load_keys_file(keys_file) if keys_file is not None else []
        if env_key:
            keys.append(ApiKey(name=ENV_KEY_NAME, key=env_key.strip()))
        return cls(keys)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def authenticate(self, presented: str | None) -> ApiKey:
        """The key whose secret is ``presented``, else :class:`Unauthenticated`.

        Every key is compared, in constant time, whatever matches: the time taken says nothing
        about which key (or how much of one) was right.
        """
        digest = hashlib.sha256((presented or "").encode()).digest()
        found = None
        for key, key_digest in self._digests:
            match = hmac.compare_digest(digest, key_digest)
            if match:
                found = key
        if found is None or not presented:
            raise Unauthenticated("invalid or missing API key: send 'Authorization: Bearer <key>'")
        return found


class TokenBucket:
    """``size`` tokens, refilled at ``rate_per_s``; a request takes one."""

    def __init__(self, rate_per_s: float, size: int, now: float):
        self.rate_per_s, self.size = rate_per_s, size
        self.tokens, self.updated = float(size), now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be (none taken)."""
        self.tokens = min(self.size, self.tokens + max(0.0, now - self.updated) * self.rate_per_s)
        self.updated = max(self.updated, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """One token bucket per rate-limited key. ``clock`` is injectable (seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def wait_s(self, key: ApiKey) -> float:
        """Let one request of ``key`` through (0.0) or say how long until the next one may come."""
        if key.requests_per_minute is None:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = TokenBucket(key.requests_per_minute / 60.0, key.bucket_size, now)
        return bucket.take(now)

    def acquire(self, key: ApiKey) -> None:
        """Let one request through, or raise :class:`RateLimited` with how long to wait."""
        wait = self.wait_s(key)
        if wait > 0:
            raise RateLimited(f"API key {key.name!r} is limited to {key.requests_per_minute:g} requests per minute "
                              f"(burst {key.bucket_size}); retry in {wait:.1f} s", retry_after_s=wait)


def run_cloud_cap(key: ApiKey | None, spent: float, requested: float | None,
                  default_cap: float | None = None) -> float | None:
    """The cloud cap for one run of ``key``, which has spent ``spent`` so far.

    ``requested`` is the request's own cap (``max_cloud_cost``), ``default_cap`` the server's
    per-request default that applies without one. A key with a budget gets the smaller of that
    and what is left of its budget; a key that has spent its budget gets :class:`BudgetExceeded`.

    >>> run_cloud_cap(ApiKey(name="a", key="k", cloud_budget=1.0), spent=0.75, requested=None)
    0.25
    """
    if key is None or key.cloud_budget is None:
        return requested
    if spent >= key.cloud_budget:
        raise BudgetExceeded(f"API key {key.name!r} has spent {spent:.6f} of its cloud budget of "
                             f"{key.cloud_budget:g}; no more runs until the budget is raised")
    left = key.cloud_budget - spent
    cap = requested if requested is not None else default_cap
    return left if cap is None else min(cap, left)


def cloud_cost(trace: Iterable[Any]) -> float:
    """What a run's trace cost on the cloud (objects or dicts): the entries placed there, and every
    LLM check of an SLM step (hera-verify), wherever the step ended up."""
    total = 0.0
    for t in trace:
        get = t.get if isinstance(t, dict) else lambda k, d=0.0, t=t: getattr(t, k, d)
        if get("placement") == "cloud":
            total += get("cost")
        total += get("check_cost", 0.0)
    return total
