"""Recommendation rules, checked against direct computation from the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lpcli.formats import FixedPoint, quantize
from lpcli.recipe import load_recipe
from lpcli.recommend import (
    Rules,
    logit_gap,
    noise_fraction_bits,
    plain_sgd_fraction_bits,
    range_bits,
    recommend,
    softmax_error_format,
    softmax_input_format,
    underflow_fraction_bits,
    underflow_share,
)
from lpcli.stats import TensorSummary, analyze


@given(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), st.integers(0, 3))
def test_range_bits_hold_the_maximum_with_headroom(absmax, headroom):
    integer = range_bits(absmax, headroom)
    fmt = FixedPoint(24, 24 - integer)
    assert fmt.max_value >= absmax * 2**headroom * (1 - 2**-20)
    assert FixedPoint(24, 24 - integer + 1).max_value < absmax * 2**headroom  # one bit fewer would not


@given(st.floats(min_value=1e-8, max_value=1e4), st.integers(0, 8))
def test_noise_rule_gives_the_widest_step_below_rms_over_2_to_the_r(rms, r):
    frac = noise_fraction_bits(rms, r)
    assert 2.0**-frac <= rms / 2**r
    assert 2.0 ** -(frac - 1) > rms / 2**r


def test_underflow_rule_against_the_data():
    torch.manual_seed(0)
    x = torch.randn(200_000) * torch.exp(torch.randn(200_000) * 2) * 1e-3
    summary = TensorSummary(torch.Generator().manual_seed(0))
    summary.add(x)
    stats = summary.result()
    frac = underflow_fraction_bits(stats, 0.01)
    flushed = lambda f: float(((quantize(x, FixedPoint(24, f)) == 0) & (x != 0)).sum()) / x.numel()  # noqa: E731
    # Half a step is a power of two, a binade edge: the histogram's share is the exact one.
    for f in range(frac - 3, frac + 4):
        assert underflow_share(stats, f) == pytest.approx(flushed(f), abs=1e-9)
    assert flushed(frac) <= 0.01 < flushed(frac - 1)


def test_plain_sgd_bits_put_the_median_update_at_half_an_lsb():
    for u in (1e-5, 3e-4, 0.01):
        frac = plain_sgd_fraction_bits(u)
        assert 2.0**-frac / 2 <= u < 2.0 ** -(frac - 1) / 2


def test_softmax_bounds_grow_with_the_class_count():
    rules = Rules()
    widths = {n: softmax_input_format(n, rules)[0] for n in (10, 100, 1000)}
    assert widths[10].width < widths[100].width <= widths[1000].width
    for n, fmt in widths.items():
        assert -fmt.min_value >= logit_gap(n, rules.confidence)
    for n in (10, 100, 1000):
        err, _ = softmax_error_format(n, rules)
        assert err.integer_bits == 1 and err.min_value == -1.0
        assert err.step / 2 < 1 / n  # a non-target p ~ 1/N survives rounding
    assert math.isclose(logit_gap(10, 0.99), math.log(9 * 99))


@pytest.fixture(scope="module")
def mlp_stats():
    recipe = load_recipe("digits-mlp")
    return recipe, analyze(recipe, steps=10)


def test_plan_covers_every_layer_with_a_reason(mlp_stats):
    recipe, stats = mlp_stats
    plan = recommend(stats)
    assert list(plan.layers) == ["0", "2"]
    assert plan.output_layer == "2"
    for name in plan.layers:
        for tensor in ("weight", "activation", "error", "weight_grad"):
            assert plan.reasons[name][tensor]
    assert plan.layers["2"]["activation"] == plan.softmax_input
    assert plan.layers["2"]["error"] == plan.softmax_error
    # the weights' range holds the largest weight seen
    for name in plan.layers:
        assert plan.layers[name]["weight"].max_value >= stats["layers"][name]["weight"]["absmax"]


def test_kahan_plans_narrower_weights_than_plain(mlp_stats):
    _, stats = mlp_stats
    with_kahan = recommend(stats, Rules(kahan=True))
    plain = recommend(stats, Rules(kahan=False))
    assert any(plain.layers[n]["weight"].width > with_kahan.layers[n]["weight"].width for n in plain.layers)
    for name in plain.layers:
        median = stats["layers"][name]["update"]["p50"]
        assert plain.layers[name]["weight"].step / 2 <= median


def test_precision_section_is_kept(small_recipe):
    path = small_recipe(precision={"weight": "fx6.5", "softmax_input": "fx12.6",
                                   "layers": {"0": {"activation": "fx9.3"}}})
    recipe = load_recipe(path)
    plan = recommend(analyze(recipe, steps=3), precision=recipe.precision)
    assert str(plan.layers["0"]["weight"]) == "fx6.5" and str(plan.layers["2"]["weight"]) == "fx6.5"
    assert str(plan.layers["0"]["activation"]) == "fx9.3"
    assert str(plan.softmax_input) == "fx12.6" and str(plan.layers["2"]["activation"]) == "fx12.6"
    assert "recipe" in plan.reasons["softmax_input"]


def test_max_bits_caps_widths(mlp_stats):
    _, stats = mlp_stats
    plan = recommend(stats, Rules(max_bits=8))
    assert all(f.width <= 8 for fmts in plan.layers.values() for f in fmts.values())


def test_summary_weights_bits_by_element_counts(mlp_stats):
    _, stats = mlp_stats
    plan = recommend(stats)
    params = {n: stats["layers"][n]["parameters"] for n in plan.layers}
    expected = sum(plan.layers[n]["weight"].width * params[n] for n in params) / sum(params.values())
    assert plan.summary["average_bits"]["weights"] == pytest.approx(expected)
    assert np.isclose(plan.summary["weight_bytes_16bit"], 2 * sum(params.values()))
