"""API keys without Ray: the keys file and its errors, constant-time authentication, the per-key
token bucket on a fake clock, the per-key budget arithmetic, and the ingress's admission gate."""

from __future__ import annotations

import hmac
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from hera_ray.config import IngressConfig
from hera_ray.errors import BudgetExceeded, ConfigError, RateLimited, Unauthenticated, error_from_dict, error_to_dict
from hera_ray.serve import keys as keys_module
from hera_ray.serve.admission import AdmissionGate
from hera_ray.serve.keys import ApiKey, KeyBook, RateLimiter, cloud_cost, load_keys_file, parse_keys, run_cloud_cap


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


# -- the keys file -------------------------------------------------------------------------------


def test_keys_file_is_read_with_its_limits(tmp_path):
    path = write(tmp_path, """
- name: alice
  key: sk-alice-0123
  requests_per_minute: 30
  burst: 5
  cloud_budget: 0.5
- name: bob
  key: sk-bob-0123
  requests_per_minute: 2.5
- name: batch
  key: sk-batch-0123
""")
    alice, bob, batch = load_keys_file(path)
    assert (alice.name, alice.key, alice.requests_per_minute, alice.bucket_size, alice.cloud_budget) == \
        ("alice", "sk-alice-0123", 30, 5, 0.5)
    assert bob.bucket_size == 3  # no burst: one minute's worth, rounded up
    assert batch.requests_per_minute is None and batch.bucket_size is None and batch.cloud_budget is None
    assert "sk-alice" not in repr(alice) and "sk-alice" not in str(alice.describe())  # the secret stays out of logs


@pytest.mark.parametrize("text, words", [
    ("- {name: a, key: k1}\n- {name: a, key: k2}\n", "name 'a' is used by more than one key"),
    ("- {name: a, key: same}\n- {name: b, key: same}\n", "key 'b' has the same secret as another key"),
    ("- {name: a, key: ''}\n", "key 'a': key: the key is empty"),
    ("- {name: a, key: '   '}\n", "key 'a': key: the key is empty"),
    ("- {name: a, key: 'two words'}\n", "whitespace"),
    ("- {name: a}\n", "key 'a': key: Field required"),
    ("- {key: k}\n", "entry 1: name: Field required"),
    ("- {name: a, key: k1}\n- {name: 'has space', key: k2}\n", "key 'has space': name: String should match"),
    ("- {name: a, key: k, requests_per_minute: 0}\n", "requests_per_minute: Input should be greater than 0"),
    ("- {name: a, key: k, requests_per_minute: lots}\n", "requests_per_minute"),
    ("- {name: a, key: k, requests_per_minute: 10, burst: 0}\n", "burst: Input should be greater than or equal to 1"),
    ("- {name: a, key: k, burst: 3}\n", "burst is set without requests_per_minute"),
    ("- {name: a, key: k, cloud_budget: -1}\n", "cloud_budget: Input should be greater than or equal to 0"),
    ("- {name: a, key: k, budget: 1}\n", "budget: Extra inputs are not permitted"),
    ("- {name: a, key: 12345}\n", "key: Input should be a valid string"),  # quote numeric keys
    ("name: a\nkey: k\n", "must hold a YAML list"),
    ("", "holds no key"),
    ("- [a, b\n", "not valid YAML"),
])
def test_bad_keys_files_are_refused_with_what_and_where(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_keys_file(path)
    assert words in info.value.message and str(path) in info.value.message


def test_missing_keys_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read API keys file"):
        load_keys_file(tmp_path / "nope.yaml")


def test_env_key_joins_the_file_as_default_without_limits(tmp_path):
    path = write(tmp_path, "- {name: alice, key: sk-alice, requests_per_minute: 1}\n")
    book = KeyBook.load(path, "sk-env")
    assert [k.name for k in book.keys] == ["alice", "default"]
    default = book.authenticate("sk-env")
    assert default.name == "default" and default.requests_per_minute is None and default.cloud_budget is None
    assert KeyBook.load(None, "sk-env").authenticate("sk-env").name == "default"
    with pytest.raises(ConfigError, match="same secret"):
        KeyBook.load(write(tmp_path, "- {name: a, key: sk-env}\n"), "sk-env")
    with pytest.raises(ConfigError, match="'default' is used by more than one key"):
        KeyBook.load(write(tmp_path, "- {name: default, key: other}\n"), "sk-env")


def test_no_keys_means_no_key_is_required():
    assert not KeyBook.load(None, None).required
    assert not KeyBook.load(None, "").required
    assert KeyBook.load(None, "sk").required


def test_ingress_config_takes_a_keys_file_and_keeps_room_beside_runs(tmp_path):
    c = IngressConfig(api_keys_file=tmp_path / "keys.yaml")
    assert c.api_keys_file == tmp_path / "keys.yaml" and c.api_key_env == "HERA_API_KEY"
    assert c.max_ongoing_requests > c.max_concurrent_runs == 8
    with pytest.raises(ValidationError, match="must exceed ingress.max_concurrent_runs"):
        IngressConfig(max_concurrent_runs=64, max_ongoing_requests=64)


# -- authentication ------------------------------------------------------------------------------


@pytest.fixture
def book() -> KeyBook:
    return KeyBook([ApiKey(name=f"k{i}", key=f"secret-{i}-{'x' * i}") for i in range(5)])


def test_authenticate_finds_each_key(book):
    for i in range(5):
        assert book.authenticate(f"secret-{i}-{'x' * i}").name == f"k{i}"


@pytest.mark.parametrize("presented", ["", None, "secret-1", "secret-1-x ", "SECRET-1-X", "secret-1-xx", "nope"])
def test_authenticate_refuses_wrong_and_missing_keys(book, presented):
    with pytest.raises(Unauthenticated, match="invalid or missing API key"):
        book.authenticate(presented)


def test_authenticate_compares_every_key_whichever_matches(book, monkeypatch):
    # No early exit: the first key, the last, and none all cost the same number of comparisons.
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(keys_module.hmac, "compare_digest", lambda a, b: calls.append(len(a)) or real(a, b))
    for presented in ("secret-0-", "secret-4-xxxx", "wrong", "a-much-longer-wrong-key-" * 10):
        calls.clear()
        try:
            book.authenticate(presented)
        except Unauthenticated:
            pass
        assert calls == [32] * 5  # every key, and always fixed-length digests


# -- rate limits ---------------------------------------------------------------------------------


def test_token_bucket_lets_a_burst_through_then_says_when(book):
    clock = FakeClock()
    limiter = RateLimiter(clock)
    key = ApiKey(name="limited", key="k", requests_per_minute=2, burst=2)
    assert limiter.wait_s(key) == 0.0 and limiter.wait_s(key) == 0.0
    assert limiter.wait_s(key) == pytest.approx(30.0)  # one token every 30 s
    clock.t += 29.0
    assert limiter.wait_s(key) == pytest.approx(1.0)  # refusals take nothing from the bucket
    clock.t += 1.0
    assert limiter.wait_s(key) == 0.0
    assert limiter.wait_s(key) == pytest.approx(30.0)
    clock.t += 3600  # a long quiet spell refills to the burst, no further
    waits = [limiter.wait_s(key) for _ in range(3)]
    assert waits[:2] == [0.0, 0.0] and waits[2] == pytest.approx(30.0)


def test_rate_limited_error_carries_retry_after():
    clock = FakeClock()
    limiter = RateLimiter(clock)
    key = ApiKey(name="slow", key="k", requests_per_minute=6)  # burst: 6
    for _ in range(6):
        limiter.acquire(key)
    with pytest.raises(RateLimited) as info:
        limiter.acquire(key)
    assert info.value.retry_after_s == pytest.approx(10.0)
    assert "'slow'" in info.value.message and "6 requests per minute" in info.value.message
    assert info.value.http_status == 429 and info.value.grpc_code == "RESOURCE_EXHAUSTED"


def test_keys_have_their_own_buckets_and_unlimited_keys_never_wait():
    limiter = RateLimiter(FakeClock())
    a = ApiKey(name="a", key="ka", requests_per_minute=1, burst=1)
    b = ApiKey(name="b", key="kb", requests_per_minute=1, burst=1)
    free = ApiKey(name="free", key="kf")
    assert limiter.wait_s(a) == 0.0 and limiter.wait_s(a) > 0
    assert limiter.wait_s(b) == 0.0
    assert all(limiter.wait_s(free) == 0.0 for _ in range(1000))


# -- cloud budgets -------------------------------------------------------------------------------


def test_run_cap_is_what_is_left_of_the_budget():
    key = ApiKey(name="team", key="k", cloud_budget=1.0)
    assert run_cloud_cap(key, spent=0.0, requested=None) == 1.0
    assert run_cloud_cap(key, spent=0.75, requested=None) == pytest.approx(0.25)
    assert run_cloud_cap(key, spent=0.75, requested=0.1) == 0.1  # the request's own cap, when smaller
    assert run_cloud_cap(key, spent=0.75, requested=5.0) == pytest.approx(0.25)
    assert run_cloud_cap(key, spent=0.0, requested=None, default_cap=0.3) == 0.3  # the server's per-request cap
    assert run_cloud_cap(key, spent=0.9, requested=None, default_cap=0.3) == pytest.approx(0.1)


def test_keys_without_a_budget_keep_the_requests_cap():
    assert run_cloud_cap(None, 0.0, None) is None
    assert run_cloud_cap(ApiKey(name="a", key="k"), 123.0, 0.5) == 0.5
    assert run_cloud_cap(ApiKey(name="a", key="k"), 123.0, None, default_cap=0.3) is None  # the router applies it


@pytest.mark.parametrize("budget, spent", [(1.0, 1.0), (1.0, 1.2), (0.0, 0.0)])
def test_a_spent_budget_is_refused_naming_key_spend_and_budget(budget, spent):
    with pytest.raises(BudgetExceeded) as info:
        run_cloud_cap(ApiKey(name="team", key="k", cloud_budget=budget), spent, None)
    assert info.value.http_status == 402
    assert "'team'" in info.value.message and f"{spent:.6f}" in info.value.message and f"budget of {budget:g}" in info.value.message


def test_cloud_cost_counts_only_cloud_steps():
    trace = [{"placement": "cloud", "cost": 0.25}, {"placement": "edge", "cost": 0.5},
             SimpleNamespace(placement="cloud", cost=0.125)]
    assert cloud_cost(trace) == 0.375
    assert cloud_cost([]) == 0.0
    # hera-verify: the LLM's check of an SLM step is cloud spend whether the step was kept or rewritten.
    checked = [{"placement": "edge", "cost": 0.5, "check_cost": 0.0625},
               SimpleNamespace(placement="cloud", cost=0.125, check_cost=0.0625)]
    assert cloud_cost(checked) == 0.25


# -- errors and admission ------------------------------------------------------------------------


def test_rate_limited_crosses_a_process_boundary():
    e = error_from_dict(error_to_dict(RateLimited("slow down", retry_after_s=3)))
    assert isinstance(e, RateLimited) and e.message == "slow down" and e.http_status == 429


def test_admission_gate_refuses_past_its_limit_at_once():
    gate = AdmissionGate(2)
    gate.enter()
    gate.enter()
    with pytest.raises(RateLimited) as info:
        gate.enter()
    assert info.value.retry_after_s > 0 and "max_concurrent_runs" in info.value.message
    assert gate.in_flight == 2  # the refused run took no slot
    gate.leave()
    gate.enter()  # a finished run's slot is free again
    assert gate.in_flight == 2
    gate.leave()
    gate.leave()
    with pytest.raises(RuntimeError):
        gate.leave()
    with pytest.raises(ValueError):
        AdmissionGate(0)


def test_parse_keys_checks_data_without_a_file():
    assert [k.name for k in parse_keys([{"name": "a", "key": "k"}])] == ["a"]
    with pytest.raises(ConfigError, match="API keys: key 'a'"):
        parse_keys([{"name": "a", "key": ""}], "API keys")
