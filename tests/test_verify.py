"""``recommend --verify``: the widening loop on a small recipe, the CLI's shape and exits."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from lpcli.data import Dataset
from lpcli.files import read_document
from lpcli.formats import FixedPoint
from lpcli.paired import PairedCounts
from lpcli.plan import TENSORS, plan_from_document
from lpcli.recipe import Training, load_recipe
from lpcli.recommend import recommend, summarize
from lpcli.results import CheckReport, DataSummary, RunSummary, Verdict
from lpcli.stats import analyze
from lpcli.verify import Widening, add_range, blame, validation_split, verify, widen

from conftest import run_cli


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_verify_widens_the_blamed_weights_of_a_failing_plan(small_recipe):
    recipe = load_recipe(small_recipe(training={"lr": 0.05, "batch_size": 32, "steps": 120, "seed": 0,
                                                "analyze_steps": 10}))
    stats = analyze(recipe)
    # 2-bit weights: most initial weights round to zero and Kahan trails fp32 by far more than a point
    start = recommend(stats).with_fraction_bits("weight", 2)
    plan, section = verify(recipe, start, stats, tolerance=1.0, rounds=2)
    first = section["rounds"][0]
    assert first["status"] == "failed" and first["loss_interval"][0] > 1.0
    assert any(c["tensor"] == "weight" and c["from"] != c["to"] for c in first["widened"])
    for c in first["widened"]:
        assert c["why"]
    for name in plan.layers:
        assert plan.layers[name]["weight"].width >= start.layers[name]["weight"].width
        assert plan.layers[name]["weight"].integer_bits >= start.layers[name]["weight"].integer_bits
    widened = {c["layer"] for c in first["widened"] if c["tensor"] == "weight" and c["from"] != c["to"]}
    assert widened and all("verify round 1" in plan.reasons[name]["weight"] for name in widened)
    assert plan.summary == summarize(plan, stats)
    gaps = [r["gap_points"] for r in section["rounds"]]
    assert gaps[-1] < gaps[0] - 5  # the widening helped, on the validation split
    assert section["final"]["status"] in ("passed", "inconclusive", "failed")
    assert section["validation"]["examples"] == round(0.2 * section["validation"]["of_training_examples"])


def test_validation_split_holds_out_training_examples_only():
    x = torch.arange(50, dtype=torch.float32).reshape(25, 2)
    data = Dataset(x, torch.arange(25) % 3, torch.full((4, 2), -1.0), torch.zeros(4, dtype=torch.int64), 3, "d")
    split = validation_split(data, 0.2, seed=7)
    assert len(split.y_test) == 5 and len(split.y_train) == 20
    rows = torch.cat([split.x_train, split.x_test])
    assert sorted(rows[:, 0].tolist()) == x[:, 0].tolist()  # every training row once, none of the test rows
    assert torch.equal(split.y_test, split.x_test[:, 0].long() // 2 % 3)  # labels stay with their rows
    assert not torch.equal(split.x_test, x[:5])  # a random draw, not the first rows
    assert torch.equal(validation_split(data, 0.2, seed=7).x_test, split.x_test)


def _scripted_check(statuses, calls):
    """A train_check stand-in that records the data each check saw and answers the given statuses."""
    def check(recipe, plan, *, data, **kwargs):
        calls.append((plan, data))
        status = statuses[min(len(calls), len(statuses)) - 1]
        verdict = Verdict(status, 1.0, status, PairedCounts(90, 5, 1, 4), (0.5, 9.5))
        return replace(kahan_report(plan, {}), verdict=verdict, runs={"fp32": RUN, "kahan": RUN},
                       seconds={"total": 0.0})
    return check


RUN = RunSummary(0.9, 0.9, 0.3, 0.3, [0.3], low_precision=True, gap_to_fp32=0.01)


@pytest.mark.parametrize("statuses,rounds", [(["inconclusive"], 1), (["failed", "passed"], 2),
                                             (["failed", "failed", "inconclusive"], 3)])
def test_verify_widens_only_on_failed_and_decides_on_validation(monkeypatch, statuses, rounds):
    """Widening rounds see the validation split, never the test set; a verdict that is not
    ``failed`` ends them; the final check is on the full training set and the test set."""
    import lpcli.verify as verify_module

    calls = []
    monkeypatch.setattr(verify_module, "train_check", _scripted_check(statuses + ["passed"], calls))
    stats = _tiny_stats()
    x = torch.randn(40, 3)
    data = Dataset(x, torch.arange(40) % 10, torch.randn(10, 3), torch.arange(10), 10, "d")
    plan, section = verify(load_recipe("digits-mlp"), recommend(stats), stats, rounds=4, data=data)
    assert len(section["rounds"]) == rounds and len(calls) == rounds + 1
    for _, seen in calls[:-1]:
        assert len(seen.y_test) == 8 and not any(torch.equal(row, t) for row in seen.x_test for t in data.x_test)
    assert calls[-1][1] is data
    assert [bool(r["widened"]) for r in section["rounds"]] == [s == "failed" for s in statuses]
    assert calls[-1][0] == plan and section["final"]["status"] == "passed"


def kahan_report(plan, diagnostics, softmax=None) -> CheckReport:
    """A report whose Kahan run trained, with the given diagnostics: what blame reads."""
    run = RunSummary(0.9, 0.9, 0.3, 0.3, [0.3], low_precision=True)
    return CheckReport("recipe", DataSummary("data", 10, 100, 20), Training(0.1, 0.0, 0.0, 32, 10, 0, 5), {},
                       plan, {"kahan": run}, diagnostics, softmax or {}, [], Verdict("failed", 1.0, "test"))


def test_blame_reads_the_kahan_diagnostics():
    plan = recommend(_tiny_stats())
    report = kahan_report(
        plan,
        diagnostics={"0": {"lost_mass": {"plain": 0.99, "kahan": 0.6}, "error_underflow": {"kahan": 0.2},
                           "activation_saturated": {"kahan": 0.02}},
                     "1": {"lost_mass": {"plain": 0.99, "kahan": 0.01}}},
        softmax={"kahan": {"logits_saturated": 0.1, "non_target_errors_flushed": 0.99}})
    found = {(w.layer, w.tensor, w.kind) for w in blame(report, plan)}
    assert found == {("0", "weight", "resolution"), ("0", "error", "resolution"), ("0", "activation", "range"),
                     ("softmax", "error", "resolution")}
    new, changes = widen(plan, blame(report, plan))
    assert new.layers["0"]["weight"].frac == plan.layers["0"]["weight"].frac + 2
    assert new.layers["0"]["activation"].integer_bits == plan.layers["0"]["activation"].integer_bits + 1
    assert new.layers["0"]["activation"].frac == plan.layers["0"]["activation"].frac
    assert new.softmax_error.frac == plan.softmax_error.frac + 1 and new.layers["1"]["error"] == new.softmax_error
    assert len(changes) == 4
    # nothing above a threshold: one resolution bit for every weight and (non-softmax) error
    quiet = kahan_report(plan, diagnostics={}, softmax={})
    assert {(w.layer, w.tensor) for w in blame(quiet, plan)} == {("0", "weight"), ("0", "error"), ("1", "weight")}
    # the bit limit is kept
    capped, changes = widen(plan, [Widening("0", "weight", "resolution", 30, "test")], max_bits=12)
    assert capped == plan and "not widened" in changes[0]["why"]
    assert add_range(FixedPoint(8, 4), 1) == FixedPoint(9, 4)


def _tiny_stats():
    def summary(scale: float) -> dict:
        return {"absmax": 4 * scale, "rms": scale, "p50": scale / 2, "p90": scale, "p99": 2 * scale,
                "p999": 3 * scale, "zero_share": 0.0, "log2_hist": {"lowest": -20, "counts": [1] * 20}}
    layer = {"module": "Linear", "parameters": 100, "activation_elements": 10,
             **{k: summary(s) for k, s in (("weight", 0.1), ("activation", 1.0), ("error", 1e-3),
                                           ("weight_grad", 1e-2), ("update", 1e-4))}}
    return {"classes": 10, "output_layer": "1", "training": {"lr": 0.05}, "layers": {"0": layer, "1": layer}}


def test_cli_verify_json_shape_and_output(small_recipe, tmp_path):
    recipe = small_recipe()
    out = tmp_path / "plan.yaml"
    result = run_cli("recommend", recipe, "--verify", "--max-bits", "4", "--rounds", "2", "--json", "-o", out)
    doc = result.json()
    assert {"layers", "softmax_input", "softmax_error", "summary", "reasons", "verify"} <= set(doc)
    section = doc["verify"]
    assert set(section) >= {"rounds", "final", "passed", "widenings", "tolerance_points", "validation"}
    for entry in section["rounds"]:
        assert set(entry) >= {"round", "status", "fp32_accuracy", "kahan_accuracy", "gap_points", "loss_interval",
                              "discordant", "overall_bits", "vs_16bit", "widened"}
    assert result.exit_code == {"passed": 0, "failed": 1, "inconclusive": 3}[section["final"]["status"]]
    formats = [entry[t] for entry in doc["layers"].values() for t in TENSORS]
    assert all(f == "fp32" or int(f.split(".")[0][2:]) <= 4 for f in formats)  # fp32: nothing seen to round
    written = read_document(out)
    assert written["verify"] == json.loads(json.dumps(section))
    assert plan_from_document(written, str(out)).document()["layers"] == doc["layers"]
    assert doc["summary"]["overall_bits"] <= 4 and 0 < doc["summary"]["vs_16bit"] <= 0.25


def test_cli_verify_text_reports_each_round(small_recipe):
    result = run_cli("recommend", small_recipe(), "--verify", "--rounds", "1")
    assert "round 0 (validation):" in result.stdout and "held out" in result.stdout
    status = {0: "PASSED", 1: "FAILED", 3: "INCONCLUSIVE"}[result.exit_code]
    assert f"{status} on the test set" in result.stdout
    assert "of uniform 16-bit" in result.stdout


def test_verify_needs_a_recipe(tmp_path):
    stats = tmp_path / "stats.yaml"
    stats.write_text("not read")
    result = run_cli("recommend", "--stats", stats, "--verify")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--verify" in result.stderr and "recipe" in result.stderr
    assert result.stdout == ""


def test_weights_at_the_range_limit_are_counted_and_blamed_on_the_range():
    from torch import nn

    from lpcli.formats import parse_format
    from lpcli.plan import TENSORS, Plan
    from lpcli.simulation import Simulation
    from lpcli.verify import blame

    layer = nn.Linear(2, 2)  # fx4.2: range [-2, 1.75]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.75, -2.0], [0.5, 0.25]]))
        layer.bias.copy_(torch.tensor([0.0, 1.75]))
    fmts = {t: parse_format("fx4.2") for t in TENSORS}
    plan = Plan(layers={"0": fmts}, softmax_input=parse_format("fp32"), softmax_error=parse_format("fp32"))
    shares = Simulation(nn.Sequential(layer), plan).weights_at_limit()
    assert shares == {"0": 3 / 6}
    report = kahan_report(plan, diagnostics={"0": {"weight_saturated": {"kahan": 0.5}, "lost_mass": {"kahan": 0.9}}})
    widenings = [w for w in blame(report, plan) if w.tensor == "weight"]
    assert [(w.layer, w.kind, w.bits) for w in widenings] == [("0", "range", 2)]


def test_widening_a_weight_moves_its_compensation_range_and_keeps_its_step():
    plan = recommend(_tiny_stats())
    before = plan.layers["0"]["compensation"]
    widened, _ = widen(plan, [Widening("0", "weight", "resolution", 2, "test")])
    weight, comp = widened.layers["0"]["weight"], widened.layers["0"]["compensation"]
    assert weight.frac == plan.layers["0"]["weight"].frac + 2 and comp.frac == before.frac
    assert comp.max_value < weight.step <= -comp.min_value and comp.width == before.width - 2


def test_a_layer_whose_weights_start_at_zero_is_blamed():
    plan = recommend(_tiny_stats())
    report = kahan_report(plan, diagnostics={"0": {"weight_flushed": {"kahan": 0.9}, "lost_mass": {"kahan": None}}})
    widenings = [w for w in blame(report, plan) if w.layer == "0"]
    assert [(w.tensor, w.kind) for w in widenings] == [("weight", "resolution")]
    assert "round to zero" in widenings[0].why


def test_a_compensation_that_drops_residues_is_widened():
    plan = recommend(_tiny_stats())
    report = kahan_report(plan, diagnostics={"0": {"compensation_dropped": {"kahan": 0.2}}})
    widenings = [w for w in blame(report, plan) if w.layer == "0"]
    assert [(w.tensor, w.kind) for w in widenings] == [("compensation", "resolution")]
    new, _ = widen(plan, widenings)
    old, comp = plan.layers["0"]["compensation"], new.layers["0"]["compensation"]
    assert comp.frac == old.frac + 2 and comp.integer_bits == old.integer_bits
