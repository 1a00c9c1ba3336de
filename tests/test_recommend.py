"""Recommendation rules, checked against direct computation from the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lpcli.formats import FixedPoint, Float32, FloatFormat, parse_format
from lpcli.kernels import quantize
from lpcli.recipe import load_recipe
from lpcli.recommend import (
    Rules,
    fixed_tensor_format,
    logit_gap,
    noise_fraction_bits,
    plain_sgd_fraction_bits,
    range_bits,
    range_top,
    recommend,
    saturation_share,
    softmax_error_format,
    softmax_formats,
    softmax_input_format,
    underflow_fraction_bits,
    underflow_share,
)
from lpcli.stats import TensorSummary, analyze

from conftest import run_cli


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


def planned(fmts: dict) -> dict:
    """The roles a plan sizes from their own statistics (a role with nothing seen stays fp32;
    the compensation follows the weight format and the updates: tests/test_optim.py)."""
    return {t: f for t, f in fmts.items() if not isinstance(f, Float32) and t != "compensation"}


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
    assert all(f.width <= 8 for fmts in plan.layers.values() for f in planned(fmts).values())


def test_summary_weights_bits_by_element_counts(mlp_stats):
    _, stats = mlp_stats
    plan = recommend(stats)
    params = {n: stats["layers"][n]["parameters"] for n in plan.layers}
    expected = sum(plan.layers[n]["weight"].width * params[n] for n in params) / sum(params.values())
    assert plan.summary["average_bits"]["weights"] == pytest.approx(expected)
    assert np.isclose(plan.summary["weight_bytes_16bit"], 2 * sum(params.values()))


# --- range from a percentile, the float family, widths, margin ---------------------------------


def _summary(x: torch.Tensor):
    summary = TensorSummary(torch.Generator().manual_seed(0))
    summary.add(x)
    return summary.result()


def test_percentile_range_predicts_the_saturation_it_causes():
    torch.manual_seed(1)
    x = torch.randn(400_000) * torch.exp(torch.randn(400_000))  # heavy tails: the maximum is an outlier
    x[::7] = 0  # zeros count in the saturated share's denominator, as the simulator counts them
    stats = _summary(x)
    by_max, why_max = fixed_tensor_format("activation", stats, {}, Rules(range_from="absmax"))
    for headroom in (0, 1):
        fmt, why = fixed_tensor_format("activation", stats, {}, Rules(range_from="p999", headroom_bits=headroom))
        assert fmt.integer_bits < by_max.integer_bits  # the outliers no longer set the range
        assert fmt.integer_bits == range_bits(stats["p999"], headroom)
        actual = float((quantize(x, FixedPoint(24, 24 - fmt.integer_bits)) != x).logical_and(
            x.abs() > fmt.max_value).float().mean())
        direct = float((x.abs() >= 2.0 ** (fmt.integer_bits - 1)).float().mean())
        predicted = saturation_share(stats, 2.0 ** (fmt.integer_bits - 1))
        assert predicted == pytest.approx(direct, abs=1e-9)  # a power-of-two limit is a binade edge: exact
        assert predicted == pytest.approx(actual, abs=2e-4)
        assert 0 < predicted < 0.001 * 2 ** -headroom * 4
        assert f"~{predicted:.3%} saturated" in why and "p99.9" in why
    assert fmt.max_value < stats["absmax"] <= by_max.max_value
    assert "p99.9" not in why_max and float((x.abs() > by_max.max_value).sum()) == 0
    # weights keep the maximum whatever the option: a clipped weight loses its update every step
    weight, _ = fixed_tensor_format("weight", {**stats, "rms": 1.0}, {"p50": 1e-3}, Rules(range_from="p999"))
    assert weight.integer_bits == by_max.integer_bits


def test_float_family_formats_parse_and_hold_the_range(mlp_stats):
    _, stats = mlp_stats
    rules = Rules(family="float")
    plan = recommend(stats, rules)
    fixed = recommend(stats, Rules())
    for name, fmts in plan.layers.items():
        layer = stats["layers"][name]
        for tensor, fmt in planned(fmts).items():
            assert isinstance(fmt, FloatFormat) and parse_format(str(fmt)) == fmt
            if name == plan.output_layer and tensor in ("activation", "error"):
                continue  # the softmax formats (tests/test_softmax_bound.py)
            top = range_top(layer[tensor], rules.range_from, tensor)[0]  # what the range promises to hold
            held = torch.tensor([top, -top])
            assert quantize(held, fmt).abs().min() >= held[0] * (1 - 2.0 ** -fmt.man)  # not saturated
            assert fmt.man == rules.resolution_bits
            # nothing the fixed-point rule keeps underflows: smallest subnormal <= the fixed-point step
            assert fmt.step <= fixed.layers[name][tensor].step
            if tensor in ("error", "weight_grad"):  # half the subnormal step is a binade edge: exact share
                assert underflow_share(layer[tensor], fmt.man - fmt.emin) <= rules.underflow
            one_less = FloatFormat(fmt.exp - 1, fmt.man, finite=True) if fmt.exp > 1 else None
            assert one_less is None or one_less.max_value < held[0] * 2 or one_less.step > fixed.layers[name][
                tensor].step
            assert "exponent bits" in plan.reasons[name][tensor] and "mantissa bits" in plan.reasons[name][tensor]
    assert plan.softmax_input == softmax_formats(stats["classes"], rules, "float")[0]
    assert plan.softmax_error == softmax_formats(stats["classes"], rules, "float")[2]
    assert plan.summary["overall_bits"] > 0


@pytest.mark.parametrize("family", ["fixed", "float"])
def test_widths_round_up_keeping_the_range(mlp_stats, family):
    _, stats = mlp_stats
    free = recommend(stats, Rules(family=family))
    plan = recommend(stats, Rules(family=family, widths=(4, 8, 16)))
    for name, fmts in plan.layers.items():
        for tensor, fmt in planned(fmts).items():
            base = free.layers[name][tensor]
            assert fmt.width == min(w for w in (4, 8, 16) if w >= base.width)
            if family == "fixed":
                assert fmt.integer_bits == base.integer_bits and fmt.frac == base.frac + fmt.width - base.width
            else:
                assert fmt.exp == base.exp and fmt.man == base.man + fmt.width - base.width
            if fmt.width > base.width and not (name == plan.output_layer and tensor in ("activation", "error")):
                assert f"rounded up from {base.width} to {fmt.width} bits" in plan.reasons[name][tensor]
    # a width above the largest allowed is capped at it, with a note
    capped = recommend(stats, Rules(family=family, widths=(4, 8)))
    wide = [(n, t) for n, f in free.layers.items() for t, x in planned(f).items() if x.width > 8
            and not (n == free.output_layer and t in ("activation", "error"))]
    assert wide
    for name, tensor in wide:
        assert capped.layers[name][tensor].width == 8
        assert "capped" in capped.reasons[name][tensor]
    assert all(f.width in (4, 8) for fmts in capped.layers.values() for f in planned(fmts).values())
    with pytest.raises(ValueError, match="widths"):
        Rules(widths=(1, 8))


@pytest.mark.parametrize("family", ["fixed", "float"])
def test_margin_adds_resolution_bits_everywhere(mlp_stats, family):
    _, stats = mlp_stats
    base = recommend(stats, Rules(family=family))
    plan = recommend(stats, Rules(family=family, margin=2))
    for name, fmts in plan.layers.items():
        for tensor, fmt in planned(fmts).items():
            old = base.layers[name][tensor]
            if family == "fixed":
                assert (fmt.integer_bits, fmt.frac) == (old.integer_bits, old.frac + 2)
            else:
                assert (fmt.exp, fmt.man) == (old.exp, old.man + 2)
    assert plan.summary["overall_bits"] == pytest.approx(base.summary["overall_bits"] + 2)
    assert "+2 bit margin" in plan.reasons["0"]["weight"]


def test_recommend_float_from_stats_file_alone_equals_from_recipe(tmp_path):
    stats = tmp_path / "stats.yaml"
    assert run_cli("analyze", "digits-mlp", "-o", stats).exit_code == 0
    args = ("--family", "float", "--range", "p999", "--widths", "8,12", "--json")
    from_file = run_cli("recommend", "--stats", stats, *args).json()
    from_recipe = run_cli("recommend", "digits-mlp", *args).json()
    assert from_file["layers"] == from_recipe["layers"]
    assert from_file["summary"] == from_recipe["summary"]
    assert from_file["softmax_error"] == from_recipe["softmax_error"] == "fp8-e4m3"  # e4m2fn (7 bits) rounded up to 8


def test_storage_counts_the_compensation_and_compares_plain_sgd(mlp_stats):
    """Bits stored per parameter, by hand from the plan and the parameter counts: weight +
    compensation with Kahan; the plain-SGD point's weights are the same rules without Kahan."""
    _, stats = mlp_stats
    plan = recommend(stats)
    plain = recommend(stats, Rules(kahan=False))
    params = {n: stats["layers"][n]["parameters"] for n in plan.layers}
    total = sum(params.values())

    def average(p, tensor):
        return sum(p.layers[n][tensor].width * params[n] for n in params) / total
    storage = plan.summary["storage_bits_per_parameter"]
    assert storage["plan"]["weight"] == pytest.approx(average(plan, "weight"))
    assert storage["plan"]["compensation"] == pytest.approx(average(plan, "compensation"))
    assert storage["plan"]["total"] == pytest.approx(average(plan, "weight") + average(plan, "compensation"))
    assert storage["plain"]["total"] == pytest.approx(average(plain, "weight"))
    assert storage["plain"]["compensation"] == 0 and storage["uniform_16bit"]["total"] == 16
    assert plain.summary["storage_bits_per_parameter"]["plan"]["compensation"] == 0
    assert all(isinstance(f["compensation"], Float32) for f in plain.layers.values())
