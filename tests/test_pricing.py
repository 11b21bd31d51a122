"""Prices as data and cost as one function: the price sheet, its checks, the configs that hold
one (with the deprecated flat price as an alias) and how a sheet crosses the wire."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from hera_ray.config import CloudLLMConfig, EdgeNodeConfig, HeraConfig, load_settings
from hera_ray.errors import InvalidRequest
from hera_ray.pricing import DEFAULT_CLOUD_PRICES, FREE, PriceSheet, TokenCounts, cost, parse_prices
from hera_ray.scheduler.nodes import NodeTable
from hera_ray.scheduler.registry import spec_from_pb, status_to_pb
from hera_ray.wire import edge_pb2, prices_from_pb, prices_to_pb_fields, registry_pb2


def sheet(input_: float, cached: float, output: float) -> PriceSheet:
    return PriceSheet(input_per_mtok=input_, cached_input_per_mtok=cached, output_per_mtok=output)


# -- the cost function ---------------------------------------------------------------------------


def test_a_cached_prompt_is_billed_at_the_cached_price():
    # gpt-4o-mini: 1,000 × $0.15 + 9,000 × $0.075 + 500 × $0.60 per million tokens
    tokens = TokenCounts(uncached_prompt=1_000, cached_prompt=9_000, completion=500)
    assert cost(tokens, DEFAULT_CLOUD_PRICES) == pytest.approx(0.00015 + 0.000675 + 0.0003)
    assert cost(tokens, DEFAULT_CLOUD_PRICES) == pytest.approx(0.001125)
    # the same step with nothing cached: 10,000 × $0.15 + 500 × $0.60
    assert cost(TokenCounts(10_000, 0, 500), DEFAULT_CLOUD_PRICES) == pytest.approx(0.0018)


def test_output_and_input_are_priced_apart():
    prices = sheet(3.0, 1.5, 15.0)  # a larger model's shape: output five times input
    assert cost(TokenCounts(completion=1_000_000), prices) == pytest.approx(15.0)
    assert cost(TokenCounts(uncached_prompt=1_000_000), prices) == pytest.approx(3.0)
    assert cost(TokenCounts(cached_prompt=2_000_000), prices) == pytest.approx(3.0)
    assert cost(TokenCounts(), prices) == 0.0
    assert cost(TokenCounts(5_000, 5_000, 5_000), FREE) == 0.0


def test_the_default_cloud_sheet_is_gpt_4o_minis_list_price():
    assert DEFAULT_CLOUD_PRICES.model_dump() == {"input_per_mtok": 0.15, "cached_input_per_mtok": 0.075, "output_per_mtok": 0.60}
    assert FREE.is_free and not DEFAULT_CLOUD_PRICES.is_free


def test_the_flat_price_is_every_kind_at_a_thousand_times_it():
    flat = PriceSheet.flat(0.002)
    assert flat == sheet(2.0, 2.0, 2.0)
    # the old formula, (prompt + completion) × price / 1000, whatever part of the prompt was cached
    for tokens in (TokenCounts(400, 0, 100), TokenCounts(100, 300, 100), TokenCounts(0, 0, 500)):
        assert cost(tokens, flat) == pytest.approx(500 * 0.002 / 1000)


def test_token_counts_add_up_and_refuse_what_cannot_be():
    t = TokenCounts.from_prompt(prompt=1_200, cached_prompt=1_000, completion=30)
    assert (t.uncached_prompt, t.cached_prompt, t.completion, t.prompt, t.total) == (200, 1_000, 30, 1_200, 1_230)
    with pytest.raises(InvalidRequest, match=r"cached prompt tokens \(50\) exceed the prompt's \(40\)"):
        TokenCounts.from_prompt(prompt=40, cached_prompt=50)
    with pytest.raises(InvalidRequest, match="completion tokens must be an integer >= 0"):
        TokenCounts(completion=-1)
    with pytest.raises(InvalidRequest, match="uncached_prompt"):
        TokenCounts(uncached_prompt=1.5)  # type: ignore[arg-type]


# -- the sheet's checks ----------------------------------------------------------------------------


def test_cached_input_may_not_cost_more_than_input():
    with pytest.raises(ValidationError, match=r"cached_input_per_mtok \(0.2\) may not exceed input_per_mtok \(0.1\)"):
        sheet(0.1, 0.2, 0.4)
    assert sheet(0.1, 0.1, 0.4).cached_input_per_mtok == 0.1  # no discount is allowed


@pytest.mark.parametrize("bad", [-0.01, math.nan, math.inf])
@pytest.mark.parametrize("field", ["input_per_mtok", "cached_input_per_mtok", "output_per_mtok"])
def test_negative_and_non_finite_prices_are_refused(field, bad):
    values = {"input_per_mtok": 1.0, "cached_input_per_mtok": 0.5, "output_per_mtok": 2.0, field: bad}
    with pytest.raises(ValidationError, match=field):
        PriceSheet(**values)
    with pytest.raises(InvalidRequest, match=f"invalid prices: {field}"):
        parse_prices(values)


def test_a_sheet_is_frozen_and_complete():
    with pytest.raises(ValidationError):
        DEFAULT_CLOUD_PRICES.input_per_mtok = 0.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="output_per_mtok"):
        PriceSheet(input_per_mtok=1.0, cached_input_per_mtok=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="extra"):
        PriceSheet(input_per_mtok=1.0, cached_input_per_mtok=0.5, output_per_mtok=2.0, price_per_1k_tokens=1.0)  # type: ignore[call-arg]


def test_parse_prices_reads_missing_as_free_and_rechecks_an_unchecked_sheet():
    assert parse_prices(None) == FREE
    assert parse_prices(DEFAULT_CLOUD_PRICES.model_dump()) == DEFAULT_CLOUD_PRICES
    unchecked = PriceSheet.model_construct(input_per_mtok=0.1, cached_input_per_mtok=0.3, output_per_mtok=0.0)
    with pytest.raises(InvalidRequest, match="may not exceed"):
        parse_prices(unchecked)


# -- configs ----------------------------------------------------------------------------------------


def test_the_cloud_defaults_to_gpt_4o_mini_and_takes_a_sheet():
    assert CloudLLMConfig().prices == DEFAULT_CLOUD_PRICES
    cfg = HeraConfig.model_validate({"cloud": {"prices": {"input_per_mtok": 2.5, "cached_input_per_mtok": 1.25, "output_per_mtok": 10}}})
    assert cfg.cloud.prices == sheet(2.5, 1.25, 10.0)
    # the scheduler actor gets the config as JSON and validates it again
    assert HeraConfig.model_validate(cfg.model_dump(mode="json")).cloud.prices == sheet(2.5, 1.25, 10.0)


def test_the_cloud_flat_price_is_an_alias_for_a_flat_sheet():
    cfg = HeraConfig.model_validate({"cloud": {"price_per_1k_tokens": 0.002}})
    assert cfg.cloud.prices == PriceSheet.flat(0.002)
    again = HeraConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.cloud.prices == PriceSheet.flat(0.002)
    agreeing = CloudLLMConfig(price_per_1k_tokens=0.002, prices={"input_per_mtok": 2, "cached_input_per_mtok": 2, "output_per_mtok": 2})
    assert agreeing.prices == PriceSheet.flat(0.002)


def test_the_cloud_flat_price_and_a_different_sheet_are_refused_naming_both():
    with pytest.raises(ValidationError) as info:
        CloudLLMConfig(price_per_1k_tokens=0.002, prices=DEFAULT_CLOUD_PRICES)
    message = str(info.value)
    assert "price_per_1k_tokens (0.002" in message and "disagrees with prices (0.15, 0.075, 0.6)" in message


def test_the_cloud_sheet_is_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("HERA_CLOUD__PRICES__INPUT_PER_MTOK", "1.0")
    monkeypatch.setenv("HERA_CLOUD__PRICES__CACHED_INPUT_PER_MTOK", "0.25")
    monkeypatch.setenv("HERA_CLOUD__PRICES__OUTPUT_PER_MTOK", "4.0")
    assert HeraConfig().cloud.prices == sheet(1.0, 0.25, 4.0)


def test_an_edge_is_free_by_default_and_priced_by_flags_env_or_file(tmp_path, monkeypatch):
    assert EdgeNodeConfig().prices == FREE
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("input_price_per_mtok: 0.02\ncached_input_price_per_mtok: 0.01\noutput_price_per_mtok: 0.5\n")
    monkeypatch.setenv("HERA_EDGE_OUTPUT_PRICE_PER_MTOK", "0.08")
    c = load_settings(EdgeNodeConfig, cfg, input_price_per_mtok=0.04)
    assert c.prices == sheet(0.04, 0.01, 0.08)  # flag > env > file


def test_the_edge_flat_price_is_an_alias_and_may_not_disagree(tmp_path, monkeypatch):
    monkeypatch.setenv("HERA_EDGE_PRICE_PER_1K_TOKENS", "0.5")
    assert load_settings(EdgeNodeConfig).prices == PriceSheet.flat(0.5)
    with pytest.raises(ValidationError) as info:
        load_settings(EdgeNodeConfig, input_price_per_mtok=0.1)
    message = str(info.value)
    assert "price_per_1k_tokens (0.5" in message and "input_price_per_mtok, cached_input_price_per_mtok and output_price_per_mtok" in message


def test_an_edge_cached_price_above_its_input_price_is_refused():
    with pytest.raises(ValidationError, match=r"cached_input_price_per_mtok \(1\) may not exceed input_price_per_mtok \(0.5\)"):
        EdgeNodeConfig(input_price_per_mtok=0.5, cached_input_price_per_mtok=1.0)
    with pytest.raises(ValidationError, match="output_price_per_mtok"):
        EdgeNodeConfig(output_price_per_mtok=math.nan)


# -- the wire ----------------------------------------------------------------------------------------


def test_a_node_spec_carries_its_sheet_through_the_registry_messages():
    prices = sheet(0.02, 0.01, 0.05)
    m = registry_pb2.NodeSpec(node_id="n1", address="127.0.0.1:1", model="slm", n_ctx=2048, slots=1,
                              **prices_to_pb_fields(prices))
    assert m.price_per_1k_tokens == 0.0  # the deprecated alias is sent as 0 beside the sheet
    spec = spec_from_pb(m)
    assert spec.prices == prices
    table = NodeTable()
    listed = status_to_pb(table, table.register(spec, "t")).spec
    assert (listed.input_per_mtok, listed.cached_input_per_mtok, listed.output_per_mtok, listed.price_per_1k_tokens) == (0.02, 0.01, 0.05, 0.0)
    info = edge_pb2.InfoResponse(node_id="n1", **prices_to_pb_fields(prices))
    assert prices_from_pb(info) == prices


def test_a_node_that_sends_only_the_flat_price_is_read_as_a_flat_sheet():
    m = registry_pb2.NodeSpec(node_id="old", address="127.0.0.1:1", model="slm", n_ctx=2048, slots=1, price_per_1k_tokens=0.01)
    assert spec_from_pb(m).prices == PriceSheet.flat(0.01)
    assert spec_from_pb(registry_pb2.NodeSpec(node_id="free")).prices == FREE


@pytest.mark.parametrize("fields, words", [
    (dict(price_per_1k_tokens=0.01, input_per_mtok=1.0), "send it as 0 alongside them"),
    (dict(price_per_1k_tokens=-1.0), "price_per_1k_tokens must be a finite number >= 0"),
    (dict(price_per_1k_tokens=math.nan), "price_per_1k_tokens must be a finite number >= 0"),
    (dict(price_per_1k_tokens=1e306), "price_per_1k_tokens must be a finite number >= 0"),  # × 1000 overflows
    (dict(input_per_mtok=math.inf), "input_per_mtok"),
    (dict(output_per_mtok=-0.5), "output_per_mtok"),
    (dict(input_per_mtok=0.1, cached_input_per_mtok=0.2), "may not exceed"),
])
def test_bad_prices_on_the_wire_are_invalid_requests(fields, words):
    with pytest.raises(InvalidRequest, match=words):
        spec_from_pb(registry_pb2.NodeSpec(node_id="n", address="127.0.0.1:1", model="slm", n_ctx=1, slots=1, **fields))
