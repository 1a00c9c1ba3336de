"""Accumulators in plans and simulations: a planned layer's F.linear and F.conv2d on its
own weights sum in the plan's accumulators (lpcli.accumulate, tested there against literal
sums), what they did is counted per GEMM, and what stays float32 is listed."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lpcli.accumulate import GemmFormats, conv2d, linear
from lpcli.errors import InputError
from lpcli.formats import FixedPoint, Float32, FloatFormat
from lpcli.plan import plan_from_document
from lpcli.recommend import Rules, accumulator_format
from lpcli.simulation import Simulation
from lpcli.stats import StatsCollector

FP32_ROLES = {"weight": "fp32", "activation": "fp32", "error": "fp32", "weight_grad": "fp32"}
FORMATS = {"forward": "e5m3", "input_grad": "fx10.4", "weight_grad": "e4m2"}
GEMMS = GemmFormats(FloatFormat(5, 3), FixedPoint(10, 4), FloatFormat(4, 2))


def _plan(layers: dict, chunk: int | None = 3, **extra):
    doc = {"lpcli": {"kind": "plan", "version": 1}, "softmax_input": "fp32", "softmax_error": "fp32",
           "layers": layers, **extra}
    if chunk is not None:
        doc["accumulator_chunk"] = chunk
    return plan_from_document(doc, "plan.yaml")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))


def test_a_planned_layers_gemms_sum_in_its_accumulators():
    """Forward and gradients through the simulation are those of lpcli.accumulate's
    conv2d and linear called by hand with the plan's formats and chunk; nothing else rounds
    (every other role is fp32)."""
    model = _model()
    x = torch.randn(4, 2, 4, 4) * 2
    labels = torch.tensor([0, 1, 2, 3])
    plan = _plan({"0": {**FP32_ROLES, "accumulator": FORMATS}, "3": {**FP32_ROLES, "accumulator": FORMATS}})
    with Simulation(model, plan) as sim:
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        counts = sim.simulator.counts()["accumulators"]
    conv, fc = model[0], model[3]
    w = [p.detach().clone().requires_grad_() for p in (conv.weight, conv.bias, fc.weight, fc.bias)]
    hidden = conv2d(x, w[0], w[1], padding=1, formats=GEMMS, chunk=3).relu().flatten(1)
    expected = F.cross_entropy(linear(hidden, w[2], w[3], GEMMS, chunk=3), labels)
    expected.backward()
    assert torch.equal(loss, expected)
    for param, mine in zip((conv.weight, conv.bias, fc.weight, fc.bias), w, strict=True):
        assert torch.equal(param.grad, mine.grad)
    # The first layer's input needs no gradient: no input_grad GEMM there.
    assert set(counts["0"]) == {"forward", "weight_grad"} and set(counts["3"]) == set(FORMATS)
    assert counts["3"]["forward"]["additions"] == 4 * 5 * 48  # 49 terms with the bias: 48 additions
    assert counts["3"]["weight_grad"]["additions"] == 5 * 49 * 3  # over the batch of 4
    assert counts["0"]["forward"]["additions"] == 4 * 16 * 3 * 18  # 19 terms per output


def test_evaluation_is_not_counted_and_torchs_sums_return_when_detached():
    model = _model()
    plan = _plan({"0": FP32_ROLES, "3": {**FP32_ROLES, "accumulator": FORMATS}})
    x = torch.randn(4, 2, 4, 4)
    with Simulation(model, plan) as sim:
        sim.evaluate(x, torch.zeros(4, dtype=torch.long))
        assert sim.simulator.counts()["accumulators"] == {"3": {}}
        simulated = model(x)
        assert sim.diagnostics()["accumulators"]["3"]["forward"]["swamped"] is not None
    assert not torch.equal(simulated, model(x))  # e5m3 sums differ from float32's
    assert torch.equal(model(x), model(x))


class Borrower(nn.Module):
    """A layer with a weight of its own that also calls F.linear on its child's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Linear(6, 6, bias=False)
        self.weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.child.weight), self.weight)


def test_only_the_layers_own_weights_are_accumulated():
    model = Borrower()
    plan = _plan({"(root)": {**FP32_ROLES, "accumulator": FORMATS}, "child": FP32_ROLES})
    x = torch.randn(3, 6)
    with Simulation(model, plan) as sim:
        y = model(x)
        counts = sim.simulator.counts()["accumulators"]["(root)"]
    inner = x @ model.child.weight.detach().t()
    assert torch.equal(y, linear(inner, model.weight.detach(), None, GEMMS, chunk=3))
    assert counts["forward"]["additions"] == 3 * 4 * 5  # the root's GEMM alone, not the child's


def test_what_stays_float32_is_listed():
    model = _model()
    partial = {"forward": "e5m3", "input_grad": "fp32"}
    plan = _plan({"0": FP32_ROLES, "3": {**FP32_ROLES, "accumulator": partial}})
    with Simulation(model, plan) as sim:
        model(torch.randn(2, 2, 4, 4)).sum().backward()
        kept = sim.kept_fp32()
    assert "accumulators of 0: every GEMM" in kept
    assert "accumulators of 3: input_grad, weight_grad" in kept
    rnn = nn.Sequential(nn.RNN(4, 4, batch_first=True))
    plan = _plan({"0": {**FP32_ROLES, "accumulator": FORMATS}})
    with Simulation(rnn, plan) as sim:
        rnn(torch.randn(2, 3, 4))
        kept = sim.kept_fp32()
    assert "accumulators of 0: planned, but no F.linear or F.conv2d on its weights ran" in kept


def test_the_plan_keeps_its_accumulators():
    plan = _plan({"0": {**FP32_ROLES, "accumulator": FORMATS}}, chunk=32)
    doc = plan.document()
    assert doc["layers"]["0"]["accumulator"] == {"forward": "e5m3", "input_grad": "fx10.4", "weight_grad": "e4m2"}
    assert doc["accumulator_chunk"] == 32
    again = plan_from_document(doc, "again.yaml")
    assert again.accumulators == plan.accumulators and again.gemm_formats() == {"0": GEMMS}
    sequential = _plan({"0": {**FP32_ROLES, "accumulator": FORMATS}}, chunk=None)
    assert sequential.accumulator_chunk is None and sequential.document()["accumulator_chunk"] is None


@pytest.mark.parametrize(("accumulator", "chunk", "field", "message"), [
    ({"forward": "dfx8"}, 4, "layers.0.accumulator.forward", "fixed point"),
    ({"forwards": "e5m3"}, 4, "layers.0.accumulator", "forwards"),
    ({"forward": "e5m99"}, 4, "layers.0.accumulator.forward", ""),
    ({"forward": "e5m3"}, 0, "accumulator_chunk", ">= 1"),
])
def test_bad_accumulators_name_the_field(accumulator, chunk, field, message):
    with pytest.raises(InputError) as info:
        _plan({"0": {**FP32_ROLES, "accumulator": accumulator}}, chunk=chunk)
    assert field in str(info.value) and message in str(info.value)


def test_analyze_records_how_each_gemms_sums_grow():
    """The stats' growth of a linear layer's three GEMMs against the sums written out here
    (every output sampled: the layer is small), in the accumulator's order: bias first."""
    torch.manual_seed(3)
    layer = nn.Linear(5, 3)
    model = nn.Sequential(nn.Linear(4, 5), layer)
    collector = StatsCollector(model, lr=0.1)
    x = torch.randn(6, 4)
    hidden = model[0](x).detach()
    out = model(x)
    grad = torch.randn(6, 3)
    out.backward(grad)
    collector.step()
    gemms = collector.document(classes=3)["gemms"]["1"]
    collector.remove()
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    h, g = hidden.double(), grad.double()
    terms = {  # per output element, its products in order
        "forward": [[b[n]] + [h[m, k] * w[n, k] for k in range(5)] for m in range(6) for n in range(3)],
        "input_grad": [[g[m, n] * w[n, k] for n in range(3)] for m in range(6) for k in range(5)],
        "weight_grad": [[g[m, n] for m in range(6)] if k < 0 else [g[m, n] * h[m, k] for m in range(6)]
                        for n in range(3) for k in range(-1, 5)],
    }
    for kind, sums in terms.items():
        products = torch.tensor([[float(p) for p in row] for row in sums], dtype=torch.float64)
        partial = products.cumsum(dim=1)
        growth = gemms[kind]
        assert growth["terms"] == products.shape[1]
        assert growth["lengths"] == {6: [1, 2, 4, 6], 3: [1, 2, 3]}[products.shape[1]]
        nonzero = products[products != 0]
        assert growth["addend_rms"] == pytest.approx(float(nonzero.pow(2).mean().sqrt()), rel=1e-12)
        for i, length in enumerate(growth["lengths"]):
            at = partial[:, length - 1]
            assert growth["sum_rms"][i] == pytest.approx(float(at.pow(2).mean().sqrt()), rel=1e-12)
            assert growth["partial_max"][i] == pytest.approx(float(partial[:, :length].abs().max()), rel=1e-12)
    assert "0" in collector.document(classes=3)["gemms"]  # the first layer's forward and weight gradient
    assert "input_grad" not in collector.document(classes=3)["gemms"]["0"]  # x needs no gradient


def _growth(terms=256, addend=2.0 ** -6, peak=4.0):
    lengths = [1 << j for j in range(9)]
    return {"terms": terms, "addend_rms": addend, "lengths": lengths,
            "sum_rms": [addend * n ** 0.5 for n in lengths], "partial_max": [peak * addend * n ** 0.5 for n in lengths]}


def test_the_accumulator_rule_follows_the_documented_formula():
    """256 terms, products of rms 2^-6 whose sums spread as 2^-6 sqrt(L) and reach 4 x
    2^-6 x sqrt(L): the largest running sum is 1. Fixed point: range 1 with 1 + 2 bits of
    headroom (5 integer bits), step 2^-6 / 2^1 (7 fraction bits). Float, one sequential
    sum: the spread grows 2^4 from the products, +2 guard bits: 6 mantissa bits; e3 holds
    1 x 2^3 (e2 does not) and steps of 2^-8. In chunks of 16 both stages grow 2^2: 4
    mantissa bits, and then e3's smallest step (2^-6) is too coarse: e4. The input
    gradient's float accumulator has no guard bits: 4 mantissa bits, e4 again."""
    growth = _growth()
    assert str(accumulator_format(growth, None, Rules())[0]) == "fx12.7"
    assert str(accumulator_format(growth, 16, Rules())[0]) == "fx12.7"  # fixed point: any length
    assert str(accumulator_format(growth, None, Rules(family="float"))[0]) == "e3m6fn"
    assert str(accumulator_format(growth, 1, Rules(family="float"))[0]) == "e3m6fn"  # chunks of 1: sequential
    fmt, why = accumulator_format(growth, 16, Rules(family="float"))
    assert str(fmt) == "e4m4fn" and "chunks of 16" in why and "Sakr" in why
    # The input gradient's float sums take no guard bits; the exponent still resolves 2^-8.
    fmt, why = accumulator_format(growth, None, Rules(family="float"), kind="input_grad")
    assert str(fmt) == "e4m4fn" and "+0 guard" in why and "errors passed back" in why
    assert str(accumulator_format(growth, None, Rules(), kind="input_grad")[0]) == "fx12.7"  # fixed: unchanged
    # A sum the layer's stats saw larger than the sample's widens the range, not the step.
    assert str(accumulator_format(growth, None, Rules(), result_max=8.0)[0]) == "fx15.7"
    assert accumulator_format(_growth(addend=0.0), None, Rules())[0] == Float32()


def test_analyze_recommend_train_check_with_accumulators_through_the_cli(tmp_path, cli, monkeypatch):
    """A model written here (an import path): its stats carry each layer's GEMMs, the plan
    an accumulator per GEMM with reasons, and the report the accumulators' diagnostics."""
    (tmp_path / "acc_model.py").write_text(MODEL_FILE)
    recipe = tmp_path / "acc.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"import": "acc_model:make"}, "data": {"name": "digits"},
        "training": {"lr": 0.05, "batch_size": 32, "steps": 40, "analyze_steps": 10, "seed": 0}}))
    monkeypatch.setattr(sys, "path", list(sys.path))
    stats, plan = tmp_path / "stats.yaml", tmp_path / "plan.yaml"
    assert cli("analyze", recipe, "-o", stats).exit_code == 0
    assert set(yaml.safe_load(stats.read_text())["gemms"]) == {"conv", "head"}
    result = cli("recommend", recipe, "--stats", stats, "--accumulators", "--accumulator-chunk", "0", "-o", plan)
    assert result.exit_code == 0, result.stderr
    doc = yaml.safe_load(plan.read_text())
    assert doc["accumulator_chunk"] is None
    assert set(doc["layers"]["head"]["accumulator"]) == {"forward", "input_grad", "weight_grad"}
    assert "one sequential sum" in doc["reasons"]["head"]["accumulator"]["forward"]
    result = cli("train-check", recipe, "--plan", plan, "--json", "--quiet")
    assert result.exit_code in (0, 1, 3), result.stderr
    report = result.json()
    head = report["accumulators"]["head"]
    assert set(head) == {"forward", "input_grad", "weight_grad"}
    for values in head.values():
        assert set(values) == {"swamped", "overflow", "retention"}
        assert 0.0 <= values["swamped"]["kahan"] <= 1.0 and values["retention"]["kahan"] > 0
    text = cli("train-check", recipe, "--accumulators", "--steps", "5", "--quiet")
    assert text.exit_code in (0, 1, 3) and "Accumulators per layer and GEMM" in text.stdout


def test_accumulators_need_gemm_statistics_and_a_plan_of_their_own(tmp_path, cli):
    stats = tmp_path / "stats.yaml"
    assert cli("analyze", "digits-mlp", "--steps", "2", "-o", stats).exit_code == 0
    doc = yaml.safe_load(stats.read_text())
    del doc["gemms"]
    stats.write_text(yaml.safe_dump(doc))
    result = cli("recommend", "--stats", stats, "--accumulators")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "gemms" in result.stderr
    result = cli("train-check", "digits-mlp", "--plan", stats, "--accumulators")
    assert result.exit_code == 2 and "--accumulators" in result.stderr
    doc["gemms"] = {"0": {"forward": {"terms": 4, "addend_rms": 0.1, "lengths": [1, 2, 3], "sum_rms": [1, 1, 1],
                                      "partial_max": [1, 1, 1]}}}
    stats.write_text(yaml.safe_dump(doc))
    result = cli("recommend", "--stats", stats, "--accumulators")
    assert result.exit_code == 2 and "gemms.0.forward.lengths" in result.stderr


MODEL_FILE = textwrap.dedent('''
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Linear(4 * 16, 10)

        def forward(self, x):
            x = x.reshape(-1, 1, 8, 8)
            x = nn.functional.max_pool2d(self.conv(x).relu(), 2)
            return self.head(x.flatten(1))


    def make():
        return Net()
''')
