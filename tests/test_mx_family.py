"""recommend's mx family (lpcli.mx_family): the block-profile prediction against the real MX
rounding, the rule's choice, the plan it makes, its widening under --verify, the CLI.

Oracles: the MX quantizer itself (bit-exact against a NumPy reference in test_mx.py) on
tensors of very different spreads, measured in each block's own units (the profile's);
single values quantized in a block to find where each element type flushes; the float
family's plan for every format the mx family leaves element by element.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from lpcli.accumulate import BLOCK_ROLES
from lpcli.formats import BlockFormat, Float32, FloatFormat, parse_format
from lpcli.kernels import quantize
from lpcli.mx_family import ELEMENTS, block_noise, choose_element, element_depth, widen_element
from lpcli.plan import plan_from_document
from lpcli.recommend import Rules, add_resolution, recommend
from lpcli.stats import BlockProfile
from lpcli.verify import Widening, add_range, widen

from conftest import RECIPES

pytestmark = pytest.mark.usefixtures("single_thread")


def spreads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (128, 1024)
    normal = torch.randn(*shape, generator=g)
    return {
        "gaussian": normal,
        "lognormal, sigma 2": torch.exp(2 * torch.randn(*shape, generator=g)) * normal.sign(),
        "lognormal, sigma 4": torch.exp(4 * torch.randn(*shape, generator=g)),
        "relu": torch.relu(normal),
        "uniform": torch.rand(*shape, generator=g),
        "rows scaled apart": normal * torch.exp(3 * torch.randn(shape[0], 1, generator=g)),
    }


def profile_of(x: torch.Tensor) -> dict:
    p = BlockProfile()
    p.add(x, -1)
    return p.result()


@pytest.mark.parametrize("name", list(spreads()))
def test_the_profile_predicts_the_real_rounding(name: str) -> None:
    x = spreads()[name]
    profile = profile_of(x)
    blocks = x.double().numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    unit = np.exp2(np.floor(np.log2(np.where(amax > 0, amax, 1.0))))  # each block's top binade edge
    nonzero = blocks != 0
    for element in ELEMENTS:
        fmt = BlockFormat(element)
        q = quantize(x, fmt).double().numpy().reshape(blocks.shape)
        noise = (((q - blocks) / unit) ** 2).sum() / ((blocks / unit) ** 2).sum()
        predicted = block_noise(profile, fmt)
        assert 0.75 <= predicted.nsr / noise <= 1.33, (element, predicted.nsr, noise)
        flushed = ((q == 0) & nonzero).sum() / nonzero.sum()
        assert predicted.flushed == pytest.approx(flushed, abs=1e-12), element


@pytest.mark.parametrize("element", ELEMENTS)
def test_depth_is_where_a_value_under_the_block_top_flushes(element: str) -> None:
    fmt = BlockFormat(element)
    kept = []
    for k in range(40):
        block = torch.zeros(1, 32)
        block[0, 0], block[0, 1] = 1.0, 1.5 * 2.0**-k  # the top at 1, one value in binade k under it
        kept.append(bool(quantize(block, fmt)[0, 1] != 0))
    depth = element_depth(fmt)
    assert all(kept[:depth]) and not any(kept[depth:]), (depth, kept)


def test_widening_keeps_what_it_has_and_gains_what_is_asked() -> None:
    ladder = {(e, kind): widen_element(BlockFormat(e), kind).element for e in ELEMENTS
              for kind in ("resolution", "range")}
    assert ladder[("fp4-e2m1", "resolution")] == "fp6-e2m3"
    assert ladder[("fp4-e2m1", "range")] == "fp6-e3m2"
    assert ladder[("fp6-e2m3", "resolution")] == "int8"
    assert ladder[("fp6-e2m3", "range")] == "fp8-e4m3"
    assert ladder[("fp6-e3m2", "resolution")] == "fp8-e4m3"
    assert ladder[("fp6-e3m2", "range")] == "fp8-e5m2"
    # nothing keeps e4m3's 3 mantissa bits deeper, nor more than int8's 6 fraction bits as deep
    for top in ("fp8-e4m3", "fp8-e5m2", "int8"):
        assert ladder[(top, "resolution")] == ladder[(top, "range")] == top
    assert widen_element(BlockFormat("fp4-e2m1", 16), "range") == BlockFormat("fp6-e3m2", 16)
    # verify's helpers widen MX formats the same way
    assert add_resolution(parse_format("mxfp6-e3m2"), 2) == parse_format("mxfp8-e4m3")
    assert add_range(parse_format("mxfp6-e3m2"), 1) == parse_format("mxfp8-e5m2")


def test_the_rule_takes_the_cheapest_element_that_qualifies() -> None:
    g = torch.Generator().manual_seed(1)
    gaussian = profile_of(torch.randn(64, 1024, generator=g))
    noise = {e: block_noise(gaussian, BlockFormat(e)) for e in ELEMENTS}
    # on Gaussian blocks fp4 reaches ~1.3 bits, the fp6 types 2.5 and 3.5, int8 5.5
    for b in (1.0, 2.0, 3.0, 4.0):
        chosen = choose_element(gaussian, "weight", b, None, None, 24).fmt
        qualifying = [e for e in ELEMENTS if noise[e].effective_bits >= b]
        cheapest = min(BlockFormat(e).storage_bits for e in qualifying)
        assert chosen.storage_bits == cheapest and noise[chosen.element].effective_bits >= b
        assert chosen.element == max((e for e in qualifying if BlockFormat(e).storage_bits == cheapest),
                                     key=lambda e: noise[e].effective_bits)
    # an error may flush at most the underflow share: wide blocks rule out the shallow elements
    spread = profile_of(torch.exp(2 * torch.randn(64, 1024, generator=g)))
    error = choose_element(spread, "error", 1.0, 0.01, None, 24)
    assert block_noise(spread, error.fmt).flushed <= 0.01 and error.fmt.element in ("fp8-e4m3", "fp8-e5m2")
    assert "cheaper element types fall short" in error.reason
    # the hardware's widths: only 8-bit elements
    assert choose_element(gaussian, "weight", 1.0, None, (8, 16), 24).fmt.width == 8
    none = choose_element(gaussian, "weight", 7.0, None, None, 24)
    assert none.fmt is None and "no MX element type gives effective resolution >= 7 bits" in none.reason
    assert choose_element(gaussian, "weight", 1.0, None, None, 3).fmt is None


@pytest.fixture(scope="module")
def cnn_stats():
    from lpcli.recipe import load_recipe
    from lpcli.stats import analyze

    return analyze(load_recipe(str(RECIPES / "digits-cnn.yaml")), steps=5)


def test_the_mx_plan_is_the_float_plan_with_block_formatted_operands(cnn_stats) -> None:
    floats = recommend(cnn_stats, Rules(family="float"))
    mx = recommend(cnn_stats, Rules(family="mx"))
    blocks = cnn_stats["blocks"]
    assert set(blocks) == {"1", "5", "9"}  # the convolutions and the linear layer; not the BatchNorm
    for name, fmts in mx.layers.items():
        for role, fmt in fmts.items():
            operand = role in BLOCK_ROLES and name in blocks and not (name == mx.output_layer and role == "error")
            if operand:
                expected = choose_element(blocks[name][role], role, Rules().mx_resolution_bits,
                                          0.01 if role == "error" else None, None, 24)
                assert fmt == (expected.fmt or floats.layers[name][role]), (name, role)
                assert mx.reasons[name][role].startswith(expected.reason)
            else:
                assert fmt == floats.layers[name][role], (name, role)
    assert isinstance(mx.layers["1"]["weight"], BlockFormat)
    assert "element by element: not an operand of a GEMM" in mx.reasons["2"]["weight"]  # the batch norm
    assert isinstance(mx.layers["1"]["compensation"], FloatFormat)
    assert "residue" in mx.reasons["1"]["compensation"]
    assert mx.softmax_error == floats.softmax_error and mx.layers["9"]["error"] == floats.softmax_error
    # the scale's 8 bits per block are in the stored bits
    weights = sum(cnn_stats["layers"][n]["parameters"] for n in mx.layers)
    stored = sum(cnn_stats["layers"][n]["parameters"] * (f["weight"].storage_bits if isinstance(
        f["weight"], BlockFormat) else f["weight"].width) for n, f in mx.layers.items())
    assert mx.summary["average_bits"]["weights"] == pytest.approx(stored / weights)
    plan_from_document(json.loads(json.dumps(mx.document())), "mx")


def test_more_resolution_asked_never_gives_a_cheaper_operand(cnn_stats) -> None:
    previous = None
    for b in (0.0, 1.0, 2.0, 3.0, 4.0, 7.0):
        plan = recommend(cnn_stats, Rules(family="mx", mx_resolution_bits=b))
        bits = {(n, r): (f[r].storage_bits if isinstance(f[r], BlockFormat) else math.inf)
                for n, f in plan.layers.items() for r in BLOCK_ROLES if n in cnn_stats["blocks"]}
        if previous is not None:
            assert all(bits[k] >= previous[k] for k in bits)
        previous = bits
    assert all(v == math.inf for v in previous.values())
    # --margin asks the same of MX operands as of every other format: that many more bits
    margin = recommend(cnn_stats, Rules(family="mx", margin=1))
    more = recommend(cnn_stats, Rules(family="mx", mx_resolution_bits=Rules().mx_resolution_bits + 1))
    assert all(margin.layers[n][r] == more.layers[n][r] for n in cnn_stats["blocks"] for r in BLOCK_ROLES
               if isinstance(more.layers[n][r], BlockFormat))  # 7 bits: no MX type gives it


def test_mixed_with_fixed_each_layer_takes_one_family(cnn_stats) -> None:
    mixed = recommend(cnn_stats, Rules(family="fixed,mx"))
    choice = mixed.summary["families"]["choice"]
    assert set(choice.values()) <= {"fixed", "mx"}
    mx = recommend(cnn_stats, Rules(family="mx"))
    for name, family in choice.items():
        if name in mixed.layers and family == "mx":
            assert {r: f for r, f in mixed.layers[name].items() if name != mixed.output_layer} == \
                {r: f for r, f in mx.layers[name].items() if name != mixed.output_layer}


def test_verify_widens_a_flushing_mx_error(cnn_stats) -> None:
    plan = recommend(cnn_stats, Rules(family="mx", mx_resolution_bits=2.0))
    old = plan.layers["5"]["error"]
    assert isinstance(old, BlockFormat)
    new, changes = widen(plan, [Widening("5", "error", "resolution", 2, "flushed")])
    assert new.layers["5"]["error"] == widen_element(old, "resolution") != old
    assert changes[0]["from"] == str(old) and changes[0]["to"] == str(new.layers["5"]["error"])
    # at the top of its ladder an MX format stays, and the change says why
    top = replace(plan, layers={**plan.layers, "5": {**plan.layers["5"], "error": parse_format("mxfp8-e4m3")}})
    same, changes = widen(top, [Widening("5", "error", "resolution", 2, "flushed")])
    assert same == top and "no MX element type above it" in changes[0]["why"]


def test_without_kahan_mx_weights_keep_no_compensation(cnn_stats) -> None:
    from lpcli.recipe import Precision

    plan = recommend(cnn_stats, Rules(family="mx"), Precision(kahan=False))
    assert not plan.kahan and isinstance(plan.layers["1"]["weight"], BlockFormat)
    assert plan.layers["1"]["compensation"] == Float32()
    assert "residue" not in plan.reasons["1"]["compensation"]


def test_cli_recommend_family_mx(cli, tmp_path, cnn_stats) -> None:
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(cnn_stats))
    out = tmp_path / "plan.yaml"
    result = cli("recommend", "--stats", stats, "--family", "mx", "--mx-resolution", "3", "-o", out)
    assert result.exit_code == 0, result.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["layers"]["1"]["weight"].startswith("mx")
    assert "effective resolution >= 3 bits" in doc["reasons"]["1"]["weight"]
    assert "mx" in result.stdout
    bad = cli("recommend", "--stats", stats, "--family", "mx", "--mx-resolution", "9")
    assert bad.exit_code == 2 and "--mx-resolution" in bad.stderr
    old = {k: v for k, v in cnn_stats.items() if k != "blocks"}
    stats.write_text(json.dumps(old))
    bad = cli("recommend", "--stats", stats, "--family", "mx")
    assert bad.exit_code == 2 and "blocks" in bad.stderr and "analyze again" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_train_check_runs_a_recommended_mx_plan_on_a_model_of_the_test(tmp_path, small_recipe, cli,
                                                                       monkeypatch) -> None:
    (tmp_path / "mx_model.py").write_text("from torch import nn\n\n\ndef build():\n"
                                          "    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    recipe = small_recipe(model={"import": "mx_model:build"})
    plan = tmp_path / "plan.yaml"
    result = cli("recommend", recipe, "--family", "mx", "-o", plan)
    assert result.exit_code == 0, result.stderr
    doc = yaml.safe_load(plan.read_text())
    assert doc["layers"]["0"]["input"].startswith("mx") and doc["layers"]["2"]["weight"].startswith("mx")
    assert not str(doc["layers"]["2"]["error"]).startswith("mx")  # the softmax's
    report = cli("train-check", recipe, "--plan", plan, "--json")
    assert report.exit_code in (0, 1, 3), report.stderr
    runs = report.json()
    assert runs["plan"]["layers"]["0"]["weight"] == doc["layers"]["0"]["weight"]
    assert runs["runs"]["kahan"]["test_accuracy"] > 0.5
    assert isinstance(parse_format(doc["layers"]["0"]["compensation"]), (FloatFormat, Float32))
