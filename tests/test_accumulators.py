"""Accumulators in plans and simulations: a planned layer's F.linear and F.conv2d on its
own weights sum in the plan's accumulators (lpcli.accumulate, tested there against literal
sums), what they did is counted per GEMM, and what stays float32 is listed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpcli.accumulate import GemmFormats, conv2d, linear
from lpcli.errors import InputError
from lpcli.formats import FixedPoint, FloatFormat
from lpcli.plan import plan_from_document
from lpcli.simulation import Simulation

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
