"""The simulator's hooks against the same computation written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpcli.formats import parse_format
from lpcli.kernels import quantize
from lpcli.simulate import Simulator


def make_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def formats(act: str, err: str, grad: str) -> dict:
    return {"activation": parse_format(act), "error": parse_format(err), "weight_grad": parse_format(grad),
            "weight": parse_format("fp32")}


def test_forward_backward_match_explicit_quantization():
    model = make_model()
    plan = {"0": formats("fx8.4", "fx10.9", "fx12.10"), "2": formats("fx8.3", "fx6.5", "fx12.9")}
    sin, serr = parse_format("fx8.3"), parse_format("fx6.5")
    x = torch.randn(8, 6)
    y = torch.randint(0, 4, (8,))

    sim = Simulator(model, plan, sin, serr, output_layer="2")
    loss = sim.loss(model(x), y)
    loss.backward()

    # The same steps by hand, on a copy.
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    w2, b2 = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    h = quantize(x @ w0.T + b0, "fx8.4")
    a = torch.relu(h)
    z = a @ w2.T + b2
    s = quantize(z - z.max(dim=1, keepdim=True).values, sin)
    p = torch.softmax(s, dim=1)
    expected_loss = F.cross_entropy(s, y)
    e = quantize(p - F.one_hot(y, 4).float(), serr)
    target = F.one_hot(y, 4).bool()
    e[target] = -(e * ~target).sum(dim=1)  # the target's error: minus the rounded others
    e = e / len(y)
    grad_w2 = quantize(e.T @ a, "fx12.9")
    grad_a = e @ w2
    grad_h = quantize(grad_a * (h > 0), "fx10.9")
    grad_w0 = quantize(grad_h.T @ x, "fx12.10")

    assert torch.allclose(loss, expected_loss)
    assert torch.equal(model[2].weight.grad, grad_w2)
    assert torch.allclose(model[0].weight.grad, grad_w0, atol=2**-10)
    # The gradients sit on their formats' grids.
    assert torch.equal(model[0].weight.grad, quantize(model[0].weight.grad, "fx12.10"))


def test_counts_saturation_and_underflow():
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    sim = Simulator(model, {"0": formats("fx4.2", "fp32", "fp32")})
    x = torch.tensor([[0.1], [5.0], [-3.0], [1.0], [0.0]])  # range [-2, 1.75], step 0.25
    model(x)
    counts = sim.counts()["layers"]["0"]["activation"]
    assert counts == {"elements": 5.0, "nonzero": 4.0, "saturated": 2.0, "underflow": 1.0}


def test_non_target_errors_flushed():
    z = torch.tensor([[4.0, 0.0, 0.0, -4.0]], requires_grad=True)
    y = torch.tensor([0])
    sim = Simulator(nn.Sequential(), {}, parse_format("fp32"), parse_format("fx4.3"))
    sim.loss(z, y).backward()
    p = torch.softmax(z.detach(), dim=1)[0]
    # fx4.3 flushes |p - y| < 1/16: the non-target p are 0.018, 0.018 and 0.0003.
    assert (p[1:] < 1 / 16).all()
    assert sim.counts()["non_target_flushed"] == 1.0
    assert torch.equal(z.grad[0, 1:], torch.zeros(3))


def test_remove_detaches_hooks():
    model = make_model()
    sim = Simulator(model, {"0": formats("fx4.1", "fp32", "fp32")})
    x = torch.randn(3, 6)
    quantized = model(x)
    sim.remove()
    assert not torch.equal(model(x), quantized)


def test_stats_collector_finds_the_output_layer():
    from lpcli.stats import StatsCollector

    model = make_model()
    collector = StatsCollector(model, lr=0.1)
    model(torch.randn(2, 6)).sum().backward()
    assert collector.output_layer == "2"
    flattened = nn.Sequential(nn.Linear(6, 4), nn.Unflatten(1, (2, 2)), nn.Flatten())
    collector = StatsCollector(flattened, lr=0.1)
    flattened(torch.randn(2, 6))
    assert collector.output_layer is None


def test_watch_names_the_first_non_finite_tensor():
    from lpcli.simulate import NonFiniteWatch

    model = make_model()
    watch = NonFiniteWatch(model, ["0", "2"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    found = []
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")  # poisons layer 2's output from now on
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        found.append(watch.end_step(loss))
    assert found[:2] == [None, None]
    assert found[2] == ("2", "activation")


def test_watch_sees_a_gradient_blow_up_in_the_backward_pass():
    from lpcli.simulate import NonFiniteWatch

    model = make_model()
    watch = NonFiniteWatch(model, ["0", "2"])
    out = model(torch.randn(4, 6))
    (out.sum() * float("inf")).backward()
    assert watch.end_step(torch.tensor(1.0)) == ("2", "error")


def test_non_target_flush_share_matches_a_direct_count():
    torch.manual_seed(1)
    z = (torch.randn(64, 10) * 3).requires_grad_()
    y = torch.randint(0, 10, (64,))
    sim = Simulator(nn.Sequential(), {}, parse_format("fp32"), parse_format("fx6.5"))
    sim.loss(z, y).backward()
    error = torch.softmax(z.detach(), dim=1) - F.one_hot(y, 10).float()
    q = quantize(error, "fx6.5")
    non_target = ~F.one_hot(y, 10).bool()
    expected = float(((q == 0) & (error != 0) & non_target).sum()) / float(((error != 0) & non_target).sum())
    assert 0 < expected < 1
    assert sim.counts()["non_target_flushed"] == expected


@pytest.mark.parametrize("fmt", ["fx6.5", "fx4.3", "e4m2fn"])
def test_rounded_error_rows_sum_to_zero_with_the_target_from_the_others(fmt):
    """The gradient at the logits: rounded non-target errors, and the target's error as minus
    their sum (rounded), so every row sums to zero; checked against a float64 computation."""
    torch.manual_seed(2)
    z = (torch.randn(32, 10) * 3).requires_grad_()
    y = torch.randint(0, 10, (32,))
    sim = Simulator(nn.Sequential(), {}, parse_format("fp32"), parse_format(fmt))
    sim.loss(z, y).backward()
    rows = torch.arange(32)
    p = torch.softmax(z.detach().double(), dim=1).float()
    error = p - F.one_hot(y, 10).float()
    q = quantize(error, fmt).double()
    q[rows, y] = 0.0
    q[rows, y] = -q.sum(dim=1)  # exact in float64: at most 10 values on one grid
    assert torch.equal(z.grad.double() * 32, q)
    assert torch.all(q.sum(dim=1) == 0)
    naive = Simulator(nn.Sequential(), {}, parse_format("fp32"), parse_format(fmt), zero_sum_error=False)
    z.grad = None
    naive.loss(z, y).backward()
    assert torch.equal(z.grad * 32, quantize(error, fmt))
