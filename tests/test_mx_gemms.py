"""MX formats in training: a planned layer's GEMM operands quantized per use, blocks along
each GEMM's sums (NUMERICS, "MX block formats"), checked against the literal NumPy
reference of tests/test_mx.py and float64 products; MX weights in the optimizer; plans.

The operands are drawn so that every product and sum is exact in float32 (values in
[1, 2) with random signs quantize to multiples of 1/8; their products are multiples of
1/64 and the sums stay below 2^10), so the comparisons are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_mx import reference
from torch import nn

from lpcli import accumulate
from lpcli.accumulate import GemmFormats, OperandFormats
from lpcli.errors import InputError
from lpcli.formats import parse_format
from lpcli.kernels import quantize
from lpcli.plan import plan_from_document
from lpcli.simulation import Simulation

pytestmark = pytest.mark.usefixtures("single_thread", "backend")
MX = "mxfp8-e4m3"


def signed_ones_to_twos(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (sign * (1 + torch.rand(*shape, generator=g))).float()


def q(x: torch.Tensor, axis: int, name: str = MX) -> np.ndarray:
    return reference(x.contiguous(), name, axis=axis).numpy().astype(np.float64)


def formats(name: str = MX, **accumulators) -> GemmFormats:
    fmt = parse_format(name)
    return GemmFormats(**accumulators, operands=OperandFormats(input=fmt, weight=fmt, error=fmt))


@pytest.mark.parametrize("name", [MX, "mxint8", "mxfp4-e2m1/16"])
def test_linear_blocks_each_gemm_along_its_sums(name: str) -> None:
    x = signed_ones_to_twos(40, 70, seed=1).requires_grad_()
    w = signed_ones_to_twos(6, 70, seed=2).requires_grad_()
    b = (torch.arange(6) / 64).float().requires_grad_()
    dy = signed_ones_to_twos(40, 6, seed=3)
    y = accumulate.linear(x, w, b, formats(name))
    y.backward(dy)
    # forward: the input's rows and the weight's rows (W^T's columns) blocked over the fan-in
    expected = q(x.detach(), -1, name) @ q(w.detach().t(), 0, name) + b.detach().numpy()
    assert np.array_equal(y.detach().numpy().astype(np.float64), expected)
    # input gradient: the error's rows blocked over the fan-out, the weight again, over its columns
    assert np.array_equal(x.grad.numpy(), q(dy, -1, name) @ q(w.detach(), 0, name))
    # weight gradient: the error and the input, both blocked over the batch
    assert np.array_equal(w.grad.numpy(), q(dy.t(), -1, name) @ q(x.detach(), 0, name))
    assert np.array_equal(b.grad.numpy(), q(dy.t(), -1, name).sum(axis=1))
    # a tensor used by two GEMMs was quantized twice, differently: the blocks matter
    assert not np.array_equal(q(w.detach(), 0, name).T, q(w.detach(), -1, name))


def test_conv2d_blocks_the_unfolded_operands() -> None:
    x = signed_ones_to_twos(2, 5, 6, 6, seed=4).requires_grad_()
    w = signed_ones_to_twos(4, 5, 3, 3, seed=5).requires_grad_()
    b = (torch.arange(4) / 8).float()
    y = accumulate.conv2d(x, w, b, padding=1, formats=formats())
    dy = signed_ones_to_twos(*y.shape, seed=6)
    y.backward(dy)
    rows = F.unfold(x.detach(), 3, padding=1).transpose(1, 2).reshape(-1, 45)  # torch's own im2col
    out = q(rows, -1) @ q(w.detach().reshape(4, 45).t(), 0) + b.numpy()
    expected = out.reshape(2, 36, 4).transpose(0, 2, 1).reshape(y.shape)
    assert np.array_equal(y.detach().numpy().astype(np.float64), expected)
    errors = dy.reshape(2, 4, 36).transpose(0, 1).reshape(4, 72)  # per channel, example by example
    assert np.array_equal(w.grad.numpy().reshape(4, 45), q(errors, -1) @ q(rows, 0))


def test_operands_with_an_accumulator_too() -> None:
    x, w = signed_ones_to_twos(8, 64, seed=7), signed_ones_to_twos(3, 64, seed=8)
    plain = accumulate.linear(x, w, None, formats())
    summed = accumulate.linear(x, w, None, formats(forward=parse_format("fx20.6")))
    assert torch.equal(plain, summed)  # sums of multiples of 1/64 below 2^13: fx20.6 holds them


# --- in training ---------------------------------------------------------------------------


def mx_plan(plan_doc: dict, layer: str, roles=("input", "weight", "error")) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(plan_doc))
    for role in roles:
        doc["layers"][layer][role] = MX
    doc["layers"][layer]["compensation"] = "fp16"
    return doc


def test_a_simulated_layer_multiplies_its_operands_in_their_block_formats() -> None:
    """Forward and gradients through the simulation are those of lpcli.accumulate's conv2d
    and linear called by hand with the operands' formats; every other role is fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))
    x, labels = torch.randn(4, 2, 4, 4) * 2, torch.tensor([0, 1, 2, 3])
    roles = {"input": MX, "weight": MX, "error": MX, "activation": "fp32", "weight_grad": "fp32",
             "compensation": "fp32"}
    doc = {"lpcli": {"kind": "plan", "version": 1}, "softmax_input": "fp32", "softmax_error": "fp32",
           "layers": {"0": roles, "3": roles}}
    with Simulation(model, plan_from_document(doc, "plan.yaml")) as sim:
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        counts = sim.simulator.counts()
        assert counts["accumulators"] == {}  # no accumulators planned: none counted
        # the linear layer's input entered two GEMMs (forward, weight gradient), its error one
        # (weight gradient: the input gradient of layer 3 feeds the conv's error too: two)
        blocks = counts["block_operands"]["3"]
        assert blocks["input"]["elements"] == 2 * 4 * 48 and blocks["error"]["elements"] == 2 * 4 * 5
        assert blocks["weight"]["elements"] == 2 * 5 * 48 and blocks["input"]["exponents"][0] <= 0
    conv, fc = model[0], model[3]
    w = [p.detach().clone().requires_grad_() for p in (conv.weight, conv.bias, fc.weight, fc.bias)]
    hidden = accumulate.conv2d(x, w[0], w[1], padding=1, formats=formats()).relu().flatten(1)
    expected = F.cross_entropy(accumulate.linear(hidden, w[2], w[3], formats()), labels)
    expected.backward()
    assert torch.equal(loss, expected)
    for param, mine in zip((conv.weight, conv.bias, fc.weight, fc.bias), w, strict=True):
        assert torch.equal(param.grad, mine.grad)
    # and not what rounding the tensors once, along their last dimension, would give
    assert not torch.equal(loss, F.cross_entropy(model(quantize(x, MX)), labels))


def test_mx_weights_are_stored_along_the_fan_in() -> None:
    from lpcli import KahanSGD

    conv = nn.Conv2d(5, 4, 3)
    opt = KahanSGD(conv.parameters(), lr=0.1, weight_format=MX)
    assert opt.param_groups[0]["comp_format"] == parse_format(MX)  # carried in the weights' format
    conv.weight.grad, conv.bias.grad = torch.randn_like(conv.weight), torch.randn_like(conv.bias)
    opt.step()
    flat = conv.weight.detach().reshape(4, 45)
    assert np.array_equal(flat.numpy(), reference(flat, MX).numpy())
    assert np.array_equal(conv.bias.detach().numpy(), reference(conv.bias.detach(), MX).numpy())
    with pytest.raises(ValueError, match="block \\(MX\\) format"):
        KahanSGD(conv.parameters(), lr=0.1, momentum=0.9, momentum_format=MX)


def test_a_layer_without_a_gemm_cannot_take_block_formats() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    doc = {"lpcli": {"kind": "plan", "version": 1}, "softmax_input": "fp32", "softmax_error": "fp32",
           "layers": {"1": {"input": MX, "weight": "fp32", "activation": "fp32", "error": "fp32",
                            "weight_grad": "fp32"}}, "keep_fp32": ["0.weight", "0.bias"]}
    with pytest.raises(ValueError, match="no 2-d or 4-d weight of its own \\(a BatchNorm1d\\)"):
        Simulation(model, plan_from_document(doc, "plan.yaml")).attach()


def test_block_formats_only_where_a_gemm_takes_them(tmp_path, small_recipe, cli) -> None:
    recipe = small_recipe()
    plan_path = tmp_path / "plan.yaml"
    assert cli("recommend", recipe, "-o", plan_path).exit_code == 0
    doc = yaml.safe_load(plan_path.read_text())
    for role in ("activation", "weight_grad", "momentum"):
        bad = mx_plan(doc, "0", roles=(role,))
        with pytest.raises(InputError, match="block \\(MX\\) format") as info:
            plan_from_document(bad, "plan.yaml")
        assert info.value.field == f"layers.0.{role}"
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(mx_plan(doc, "0", roles=("activation",))))
    result = cli("train-check", recipe, "--plan", bad_path)
    assert result.exit_code == 2 and "layers.0.activation" in result.stderr and "Traceback" not in result.stderr


def test_train_check_runs_an_mx_plan(tmp_path, small_recipe, cli) -> None:
    recipe = small_recipe()
    plan_path = tmp_path / "plan.yaml"
    assert cli("recommend", recipe, "-o", plan_path).exit_code == 0
    doc = mx_plan(yaml.safe_load(plan_path.read_text()), "0")
    mx_path = tmp_path / "mx.yaml"
    mx_path.write_text(yaml.safe_dump(doc))
    result = cli("train-check", recipe, "--plan", mx_path, "--json")
    assert result.exit_code in (0, 1, 3), result.stderr
    report = result.json()
    assert report["plan"]["layers"]["0"]["weight"] == MX
    assert report["runs"]["kahan"]["test_accuracy"] > 0.5


def test_mx_formats_a_layer_never_applies_are_reported() -> None:
    """An embedding has a 2-d weight but multiplies nothing: its MX formats never apply,
    and the report says so instead of claiming them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 32), nn.Flatten(), nn.Linear(64, 3))
    roles = {"input": "fp32", "weight": MX, "activation": "fp32", "error": MX, "weight_grad": "fp32",
             "compensation": "fp32"}
    doc = {"lpcli": {"kind": "plan", "version": 1}, "softmax_input": "fp32", "softmax_error": "fp32",
           "layers": {"0": roles, "2": {**roles, "input": MX, "error": "fp32"}}}
    with Simulation(model, plan_from_document(doc, "plan.yaml")) as sim:
        F.cross_entropy(model(torch.randint(0, 10, (4, 2))), torch.tensor([0, 1, 2, 0])).backward()
        kept = sim.kept_fp32()
    assert any(line.startswith("layer 0: weight, error never quantized per use") for line in kept), kept
    assert not any(line.startswith("layer 2:") and "per use" in line for line in kept)
