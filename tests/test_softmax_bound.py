"""The softmax bound: properties of the rules, and one small training against fp32.

The full experiment is ``benchmarks/softmax_sweep.py``; this checks the rules' shape and
that on a 10-class task the recommended softmax formats train like fp32 while a 2-bit
error or a range of -2 for the softmax input does not.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lpcli.data import batch_indices, load_data
from lpcli.formats import FixedPoint, Float32, FloatFormat, parse_format
from lpcli.kernels import quantize
from lpcli.recommend import (
    Rules,
    logit_gap,
    softmax_error_format,
    softmax_formats,
    softmax_input_format,
)
from lpcli.simulate import Simulator

CLASSES = [2, 3, 7, 8, 10, 16, 31, 64, 100, 128, 500, 1000, 1024, 5000, 65536]


@pytest.mark.parametrize("family", ["fixed", "float"])
def test_widths_are_monotone_in_the_class_count(family):
    formats = [softmax_formats(n, Rules(), family) for n in CLASSES]
    for (in_a, _, err_a, _), (in_b, _, err_b, _) in zip(formats, formats[1:], strict=False):
        assert in_a.width <= in_b.width
        assert err_a.width <= err_b.width
    assert formats[-1][2].width > formats[0][2].width


@pytest.mark.parametrize("family", ["fixed", "float"])
@pytest.mark.parametrize("classes", CLASSES)
def test_error_format_holds_one_over_n_and_minus_one(family, classes):
    _, _, err, why = softmax_formats(classes, Rules(), family)
    values = torch.tensor([1 / classes, -1 / classes, -1.0, 1 - 1 / classes])
    q = quantize(values, err)
    assert (q != 0).all(), (err, q)  # a non-target p ~ 1/N is not flushed (powers of two: no tie to 0)
    assert q[2] == -1.0  # the target's error at the start, p - 1 ~ -1, is not clipped
    assert f"{1 / classes:.3g}" in why


@pytest.mark.parametrize("family", ["fixed", "float"])
@pytest.mark.parametrize("confidence", [0.9, 0.99, 0.999])
def test_input_range_reaches_the_logit_gap(family, confidence):
    rules = Rules(confidence=confidence)
    for classes in CLASSES:
        inp, _, _, _ = softmax_formats(classes, rules, family)
        gap = logit_gap(classes, confidence)
        assert -inp.min_value >= gap
        assert quantize(torch.tensor([-gap]), inp).item() <= -gap / 2  # not saturated near 0
    assert math.isclose(logit_gap(10, 0.99), math.log(9 * 99))


def test_fixed_family_is_the_fixed_rules_and_the_range_is_the_fewest_bits():
    rules = Rules()
    for classes in CLASSES:
        inp, why_in, err, why_err = softmax_formats(classes, rules, "fixed")
        assert (inp, why_in) == softmax_input_format(classes, rules)
        assert (err, why_err) == softmax_error_format(classes, rules)
        assert isinstance(inp, FixedPoint) and isinstance(err, FixedPoint)
        assert err.integer_bits == 1 and err.frac == math.ceil(math.log2(classes))
        assert err.step <= 1 / classes < err.step * 2  # the fewest bits that keep p ~ 1/N
        assert 2 ** (inp.integer_bits - 2) < logit_gap(classes, rules.confidence)  # one bit fewer would not reach
        assert f"N={classes}," in why_in


@pytest.mark.parametrize("classes", CLASSES)
def test_float_family_formats_parse_and_round_trip(classes):
    inp, why_in, err, why_err = softmax_formats(classes, Rules(), "float")
    for fmt in (inp, err):
        assert isinstance(fmt, FloatFormat) and fmt.finite  # saturating "fn" floats
        assert parse_format(str(fmt)) == fmt
        assert parse_format(f"e{fmt.exp}m{fmt.man}fn") == fmt
        assert quantize(quantize(torch.linspace(-20, 1, 301), fmt), fmt).equal(quantize(torch.linspace(-20, 1, 301),
                                                                                        fmt))
    # the fewest exponent bits: one fewer misses the range
    if inp.exp > 1:
        assert FloatFormat(inp.exp - 1, inp.man, finite=True).max_value < logit_gap(classes, 0.99)
    if err.exp > 1:
        assert FloatFormat(err.exp - 1, err.man, finite=True).step > 1 / (2 * classes)
    assert "exponent bits" in why_in and "mantissa bits" in why_err


def test_bad_family_and_class_count():
    with pytest.raises(ValueError, match="family"):
        softmax_formats(10, Rules(), "posit")
    with pytest.raises(ValueError, match="2 classes"):
        softmax_formats(1, Rules())


def _train(data, softmax_input, softmax_error, steps=2000, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 10))
    simulator = Simulator(model, {}, softmax_input, softmax_error)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for index in batch_indices(len(data.y_train), 32, steps, seed):
        optimizer.zero_grad(set_to_none=True)
        simulator.loss(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(data.x_test).argmax(dim=1) == data.y_test).float().mean())


def test_recommended_softmax_trains_like_fp32_and_two_bits_do_not():
    """10 overlapping Gaussian classes (the sweep's N=10 task, seed 0): the wrong classes
    must be pushed down, so a 2-bit error (flushes p < 1/4, clips at 1/2; 62% here, and
    erratic: it is near fp32 at 1200 steps) loses, as does an input range of -2 (each
    wrong class keeps e^-2 of the target's weight: ~50-60%)."""
    torch.set_num_threads(1)
    data = load_data({"name": "synthetic", "classes": 10, "dim": 8, "samples": 4000, "noise": 0.6,
                      "test_fraction": 0.2, "seed": 1}, "synthetic-10")
    fp32 = _train(data, Float32(), Float32())
    assert fp32 >= 0.9
    for family in ("fixed", "float"):
        inp, _, err, _ = softmax_formats(10, Rules(), family)
        assert fp32 - _train(data, inp, err) <= 0.02, family
    assert fp32 - _train(data, Float32(), FixedPoint(2, 1)) >= 0.05
    assert fp32 - _train(data, FixedPoint(2, 0), Float32()) >= 0.1
