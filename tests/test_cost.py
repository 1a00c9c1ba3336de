"""lpcli.cost (energy and memory per training step) and recommend's families and objectives.

Oracles: Horowitz's ISSCC 2014 figures typed in here (the anchors must come back exactly),
the scaling laws written out by hand on a one-layer model, and plans checked against the
rules of their own family.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from lpcli.cost import CostTable, load_cost_table, multiply_energy, step_cost
from lpcli.errors import InputError
from lpcli.formats import FixedPoint, Float32, FloatFormat, parse_format
from lpcli.plan import Plan, plan_from_document
from lpcli.recommend import Rules, recommend

from conftest import RECIPES


def test_the_published_figures_come_back_at_their_widths():
    table = CostTable()
    f = parse_format
    assert multiply_energy(f("fp16"), f("fp16"), table) == pytest.approx(1.1, rel=1e-12)
    assert multiply_energy(Float32(), Float32(), table) == pytest.approx(3.7, rel=1e-12)
    assert multiply_energy(f("fx8.4"), f("fx8.0"), table) == pytest.approx(0.2, rel=1e-12)
    # the laws' predictions at the other measured widths, within the figures' own spread
    assert multiply_energy(f("fx24.0"), f("fx24.0"), table) * (32 / 24) ** 2 == pytest.approx(3.1, rel=0.05)
    # integers multiply as an array: 8 x 16 costs twice 8 x 8
    assert multiply_energy(f("fx8.4"), f("fx16.8"), table) == pytest.approx(0.4, rel=1e-12)
    # a block format adds one 8-bit exponent addition per pair of blocks
    e4m3 = multiply_energy(f("fp8-e4m3"), f("fp8-e4m3"), table)
    assert multiply_energy(f("mxfp8-e4m3"), f("mxfp8-e4m3"), table) == pytest.approx(e4m3 + 0.1 * 8 / 32 / 32)


def one_linear(batch: int = 4, inputs: int = 10, outputs: int = 3) -> tuple[dict, Plan]:
    stats = {"classes": outputs, "output_layer": "0",
             "training": {"batch_size": batch, "optimizer": "sgd", "momentum": 0.9},
             "layers": {"0": {"parameters": inputs * outputs + outputs, "activation_elements": outputs,
                              "parameter_names": ["0.weight", "0.bias"]}},
             "gemms": {"0": {"forward": {"terms": inputs + 1}, "weight_grad": {"terms": batch}}}}
    fmts = {"input": parse_format("fx8.4"), "weight": parse_format("fx6.4"), "activation": parse_format("fx10.4"),
            "error": parse_format("e4m3fn"), "weight_grad": parse_format("fx12.10"), "momentum": parse_format("fp16"),
            "variance": Float32(), "compensation": parse_format("fx8.10")}
    plan = Plan(layers={"0": fmts}, softmax_input=fmts["activation"], softmax_error=fmts["error"], kahan=True,
                classes=outputs, output_layer="0",
                accumulators={"0": {"forward": parse_format("fx20.8"), "input_grad": Float32(),
                                    "weight_grad": parse_format("e5m10")}})
    return stats, plan


def test_a_step_of_one_linear_layer_counted_by_hand():
    batch, inputs, outputs = 4, 10, 3
    stats, plan = one_linear(batch, inputs, outputs)
    cost = step_cost(plan, stats)
    macs = batch * outputs * inputs  # per GEMM; the bias is an addition, not a product
    k_sig = (3.7 * 5 - 1.1 * 8) / (576 * 5 - 121 * 8)
    k_exp = (3.7 - 576 * k_sig) / 8
    forward_mul = 0.2 * 6 * 8 / 64  # fx6 weights x fx8 inputs
    grad_mul = k_sig * 4 * 8 + k_exp * 4  # e4m3 errors (4 significand bits) x fx8 inputs (8, no exponent)
    multiply = macs * (forward_mul + grad_mul)  # no input_grad GEMM in the stats (a first layer)
    add = macs * (0.1 * 20 / 32 + 0.9 * 16 / 32)  # fx20 forward, e5m10 weight gradient
    params = inputs * outputs + outputs
    bits = (params * (3 * 6 + 2 * 12 + 2 * 16 + 2 * 8)  # weights, weight grads, momentum, compensation
            + batch * outputs * 2 * (10 + 8))  # activations and errors, written and read
    memory = bits * 1300 / 64
    got = cost["plan"]
    assert cost["multiply_adds"] == 2 * macs and cost["batch"] == batch and cost["not_counted"] == []
    assert got["multiply_uj"] == pytest.approx(multiply * 1e-6)
    assert got["add_uj"] == pytest.approx(add * 1e-6)
    assert got["memory_mb"] == pytest.approx(bits / 8e6)
    assert got["total_uj"] == pytest.approx((multiply + add + memory) * 1e-6)
    fp32 = cost["fp32"]
    assert fp32["multiply_uj"] == pytest.approx(2 * macs * 3.7e-6)
    assert fp32["memory_mb"] == pytest.approx((params * 32 * (3 + 2 + 2) + batch * outputs * 2 * 64) / 8e6)


def test_a_cost_file_overrides_figures(tmp_path):
    stats, plan = one_linear()
    path = tmp_path / "cost.yaml"
    path.write_text(yaml.safe_dump({"source": "my 7 nm", "memory_per_bit": 2 * 1300 / 64, "int_multiply_8bit": 0.1}))
    table = load_cost_table(path)
    base, mine = step_cost(plan, stats), step_cost(plan, stats, table)
    assert mine["table"] == "my 7 nm"
    assert mine["plan"]["memory_uj"] == pytest.approx(2 * base["plan"]["memory_uj"])
    assert mine["plan"]["add_uj"] == pytest.approx(base["plan"]["add_uj"])
    for bad, field in (({"memory_per_bit": -1}, "memory_per_bit"), ({"int_add_32bit": "cheap"}, "int_add_32bit"),
                       ({"dram": 1.0}, "dram"), ({"float_multiply_32bit": 1.0}, "float_multiply_32bit")):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(InputError) as info:
            load_cost_table(path)
        assert info.value.field == field and info.value.source == str(path)


@pytest.fixture(scope="module")
def cnn_stats(tmp_path_factory):
    from lpcli.recipe import load_recipe
    from lpcli.stats import analyze

    return analyze(load_recipe(str(RECIPES / "digits-cnn.yaml")), steps=5)


def test_mixed_families_take_each_layer_from_one_family_and_keep_the_rules(cnn_stats):
    fixed, floats = recommend(cnn_stats, Rules(family="fixed")), recommend(cnn_stats, Rules(family="float"))
    mixed = recommend(cnn_stats, Rules(family="fixed,float"))
    choice = mixed.summary["families"]["choice"]
    for name, fmts in mixed.layers.items():
        source = fixed if choice[name] == "fixed" else floats
        softmax = fixed if choice["softmax"] == "fixed" else floats
        for role, fmt in fmts.items():
            expected = source.layers[name][role]
            if name == mixed.output_layer and role in ("activation", "error"):
                expected = softmax.layers[name][role]
            assert fmt == expected, (name, role)
    # the plan is a valid plan file, and each unit took the family with fewer stored bits
    plan_from_document(json.loads(json.dumps(mixed.document())), "mixed")
    families = {name: {type(f) for f in fmts.values()} - {Float32} for name, fmts in mixed.layers.items()
                if name != mixed.output_layer}
    assert all(len(kinds) <= 1 for kinds in families.values())
    assert {k for kinds in families.values() for k in kinds} <= {FixedPoint, FloatFormat}


def test_the_energy_objective_never_costs_more_than_the_bits_one(cnn_stats):
    plans = {objective: recommend(cnn_stats, Rules(family="fixed,float", objective=objective))
             for objective in ("bits", "energy", "memory")}
    energy = {o: p.summary["cost_per_step"]["plan"]["total_uj"] for o, p in plans.items()}
    memory = {o: p.summary["cost_per_step"]["plan"]["memory_mb"] for o, p in plans.items()}
    assert energy["energy"] <= energy["bits"] * (1 + 1e-12)
    assert memory["memory"] <= memory["bits"] * (1 + 1e-12)
    # and a single family leaves nothing to choose
    one = [recommend(cnn_stats, Rules(family="float", objective=o)).layers for o in ("bits", "energy")]
    assert one[0] == one[1]


@pytest.mark.parametrize("family,objective,message", [("fixed,mxfp8", "bits", "family must be one of"),
                                                      ("fixed,fp8", "bits", "family must be one of"),
                                                      ("fixed,fixed", "bits", "family must be one of"),
                                                      ("fixed", "area", "objective must be one of")])
def test_bad_families_and_objectives(family, objective, message):
    with pytest.raises(ValueError, match=message):
        Rules(family=family, objective=objective)


def test_cli_recommend_with_families_objective_and_cost(cli, tmp_path, cnn_stats):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(cnn_stats))
    table = tmp_path / "cost.yaml"
    table.write_text("source: a test process\nmemory_per_bit: 1.0\n")
    out = tmp_path / "plan.yaml"
    result = cli("recommend", "--stats", stats, "--family", "fixed,float", "--objective", "energy", "--cost", table,
                 "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "a test process" in result.stdout and "families by energy" in result.stdout
    doc = yaml.safe_load(out.read_text())
    assert doc["summary"]["cost_per_step"]["table"] == "a test process"
    assert doc["summary"]["families"]["objective"] == "energy"
    bad = cli("recommend", "--stats", stats, "--objective", "area")
    assert bad.exit_code == 2 and "--objective" in bad.stderr
    table.write_text("memory_per_bit: 0\n")
    bad = cli("recommend", "--stats", stats, "--cost", table)
    assert bad.exit_code == 2 and "memory_per_bit" in bad.stderr and "Traceback" not in bad.stderr
    assert math.isfinite(doc["summary"]["cost_per_step"]["plan"]["total_uj"])
