"""The simulation's fast paths (benchmarks/overhead.py) give the bits and counts of the plain
ones: the fused quantize-and-count kernel against :func:`quantize` and torch's own counting
operations, and whole simulated training runs on the C kernels (counts on the host, outputs
rounded in place, roundings skipped where they change nothing, errors rounded before the
non-finite watch looks) against the same runs on the torch kernels, where every rounding
is a ``quantize`` call counted with torch operations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpcli import formats, kernels
from lpcli.formats import parse_format, saturated
from lpcli.kernels import quantize, quantize_count
from lpcli.optim import KahanSGD
from lpcli.simulate import Counter, NonFiniteWatch, Simulator

pytestmark = pytest.mark.skipif(kernels._kernels is None, reason="the C kernels are not built")

FORMATS = ["fx8.4", "fx24.12", "fx4.-2", "fx6.9", "dfx8", "bf16", "fp16", "e8m3", "fp8-e4m3", "fp8-e5m2",
           "e3m4", "fp6-e2m3", "fp4-e2m1", "e5m22", "fp32"]


def special_values(n: int = 4099, seed: int = 0) -> torch.Tensor:
    """Random values over many binades, with ties, zeros of both signs, NaN, inf and huge ones."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 12, (n,), generator=gen).float())
    x[:12] = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e30, -1e30, 0.5, 1.5, -2.5, 1e-40, 3.0625])
    x[12:40] = torch.arange(28, dtype=torch.float32) * 0.03125 - 0.4375  # fixed-point ties
    return x


def torch_counts(x: torch.Tensor, q: torch.Tensor, fmt: str, extra: str | None = None) -> tuple[int, ...]:
    fmt = parse_format(fmt)
    sat = 0 if isinstance(fmt, (formats.Float32, formats.DynamicFixedPoint)) else int(saturated(x, fmt).sum())
    flag = {None: False, "nonfinite_x": not bool(torch.isfinite(x).all()),
            "nonfinite_q": not bool(torch.isfinite(q).all()),
            "changed": bool((x.view(torch.int32) != q.view(torch.int32)).any())}[extra]
    return int(torch.count_nonzero(x)), int(torch.count_nonzero(q)), sat, int(flag)


@pytest.mark.parametrize("rounding", ["nearest", "zero", "stochastic"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_count_gives_quantize_and_torchs_counts(fmt: str, rounding: str) -> None:
    for extra in kernels.EXTRAS:
        for x in (special_values(), special_values()[40:].nan_to_num(posinf=1.0, neginf=-1.0),
                  quantize(special_values(), "fx6.3")):  # with and without NaN/inf; already on a grid
            gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            expected = quantize(x, fmt, rounding, gen_a)
            q, counts = quantize_count(x, fmt, rounding, gen_b, extra=extra)
            assert torch.equal(q.view(torch.int32), expected.view(torch.int32))
            assert counts == torch_counts(x, expected, fmt, extra), extra
            assert torch.equal(gen_a.get_state(), gen_b.get_state())  # the same draws
            if rounding == "stochastic":
                continue
            # Counted only: nothing written; in place: x becomes q.
            kept = x.clone()
            q, only = quantize_count(x, fmt, rounding, counts_only=True, extra=extra)
            assert q is x and only == counts and torch.equal(x.view(torch.int32), kept.view(torch.int32))
            q, inplace = quantize_count(x, fmt, rounding, inplace=True, extra=extra)
            assert inplace == counts
            assert torch.equal(x.view(torch.int32), expected.view(torch.int32)) and (q is x or fmt == "fp32")


def test_quantize_count_in_pieces_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_PIECE", 1 << 10)
    x = special_values(50_001, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for fmt in ("fx8.4", "bf16", "e4m3fn"):
            for rounding in ("nearest", "stochastic"):
                for extra in kernels.EXTRAS:
                    q, counts = quantize_count(x, fmt, rounding, torch.Generator().manual_seed(1), extra=extra)
                    expected = quantize(x, fmt, rounding, torch.Generator().manual_seed(1))
                    assert torch.equal(q.view(torch.int32), expected.view(torch.int32))
                    assert counts == torch_counts(x, expected, fmt, extra)
    finally:
        torch.set_num_threads(threads)


def test_quantize_count_leaves_what_it_cannot_do_to_the_torch_operations() -> None:
    x = special_values()
    assert quantize_count(x[::2], "fx8.4") is None  # not contiguous
    assert quantize_count(x.double(), "fx8.4") is None
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert quantize_count(x[::2], "fx8.4", "stochastic", gen) is None and torch.equal(gen.get_state(), state)


def test_counts_on_the_host_and_on_the_device_add_up_alike() -> None:
    x = special_values()
    q = quantize(x, "fx8.4")
    host, device = Counter(), Counter()
    for _ in range(3):
        nonzero, kept, sat, _ = torch_counts(x, q, "fx8.4")
        host.add(x.numel(), nonzero, kept, sat)
        device.record(x, q, parse_format("fx8.4"))
    assert host.as_dict() == device.as_dict()
    assert torch.equal(host.totals, device.totals)
    both = Counter()
    both.record(x, q, parse_format("fx8.4"))
    both.add(x.numel(), *torch_counts(x, q, "fx8.4")[:3])
    assert both.as_dict() == {k: 2 * v for k, v in Counter.as_dict(_one(x, q)).items()}
    both.totals = torch.zeros(4, dtype=torch.float64)  # what lpcli.check sets after summing over ranks
    assert both.as_dict() == dict.fromkeys(both.as_dict(), 0.0)


def _one(x: torch.Tensor, q: torch.Tensor) -> Counter:
    counter = Counter()
    counter.record(x, q, parse_format("fx8.4"))
    return counter


# --- whole runs: C kernels against torch kernels --------------------------------------------


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the identity (the residual sum hands one gradient tensor to
    both branches), then relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Block()
        self.squash = nn.Sequential(nn.Linear(64, 32), nn.Tanh())  # keeps its output for backward
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(self.block(torch.relu(self.stem(x.reshape(-1, 1, 8, 8)))), 2)
        return self.head(self.squash(y.flatten(1)))


LAYERS = ["stem", "block.conv1", "block.bn1", "block.conv2", "block.bn2", "squash", "squash.0", "head"]


def plan(kind: str) -> dict[str, dict]:
    if kind == "fixed":  # nested grids: bn takes its conv's output as it is; relu and pool keep grids
        roles = {"input": "fx9.5", "activation": "fx9.5", "error": "fx16.20", "weight_grad": "fx14.14"}
        out = {name: {r: parse_format(f) for r, f in roles.items()} for name in LAYERS}
        out["block.bn2"]["activation"] = parse_format("fx10.5")
        out["squash"]["input"] = parse_format("fx10.4")
        return out
    pick = ["fx10.6", "bf16", "dfx8", "e4m3fn", "fp32", "fp16", "e5m2", "fx12.13"]
    return {name: {role: parse_format(pick[(i + j) % len(pick)])
                   for j, role in enumerate(("input", "activation", "error", "weight_grad"))}
            for i, name in enumerate(LAYERS)}


def train(kind: str, rounding: str, steps: int = 12, poison: int | None = None):
    """``steps`` steps of Net through the Simulator and KahanSGD, with the non-finite watch;
    at step ``poison`` the stem's weights become huge and one of them NaN."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(64, 64), torch.randint(0, 5, (64,))
    layers = plan(kind)
    sim = Simulator(model, layers, parse_format("fx6.2"), parse_format("fx5.4"), output_layer="head",
                    rounding=rounding, generator=torch.Generator().manual_seed(1))
    groups = [{"params": list(model.get_submodule(n).parameters(recurse=False)), "name": n,
               "weight_format": "fx10.8"} for n in LAYERS if list(model.get_submodule(n).parameters(recurse=False))]
    opt = KahanSGD(groups, lr=0.05, momentum=0.9, seed=0)
    watch = NonFiniteWatch(model, LAYERS)
    found, losses = [], []
    for step in range(steps):
        if step == poison:
            with torch.no_grad():
                model.stem.weight.mul_(1e38)
                model.stem.weight[1, 0, 1, 1] = math.nan
        batch = torch.arange(step * 16, step * 16 + 16) % 64
        opt.zero_grad(set_to_none=True)
        loss = sim.loss(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        found.append(watch.end_step(loss))
        losses.append(loss.detach().clone())
    counts = sim.counts()
    watch.remove()
    sim.remove()
    return model.state_dict(), counts, opt.diagnostics(), found, torch.stack(losses)


def assert_same(a, b) -> None:
    state_a, counts_a, diag_a, found_a, loss_a = a
    state_b, counts_b, diag_b, found_b, loss_b = b
    for key in state_a:
        assert torch.equal(state_a[key].view(-1).view(torch.uint8), state_b[key].view(-1).view(torch.uint8)), key
    assert torch.equal(loss_a.view(torch.int32), loss_b.view(torch.int32))
    assert counts_a == counts_b
    assert repr(diag_a) == repr(diag_b)  # NaN-safe
    assert found_a == found_b


@pytest.mark.parametrize("kind", ["fixed", "mixed"])
def test_a_simulated_run_on_the_c_kernels_is_the_torch_kernels_run(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = train(kind, "nearest")
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "_kernels", None)
        slow = train(kind, "nearest")
    assert_same(fast, slow)


def test_the_fast_paths_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed-point run above goes through every fast path (so the comparison covers them)."""
    import lpcli.simulate as simulate

    taken = {"in place": 0, "on grid": 0, "unchanged": 0, "early": 0, "marked": 0}

    def spy(name: str, method: str, key: str) -> None:
        original = getattr(getattr(simulate, name), method)

        def wrapper(self, *args):
            result = original(self, *args)
            taken[key] += bool(result) if key != "early" else hasattr(args[0], "_lpcli_error")
            return result
        monkeypatch.setattr(getattr(simulate, name), method, wrapper)

    spy("_LayerPoint", "round_in_place", "in place")
    spy("_InputPoint", "already_rounded", "on grid")
    spy("_InputPoint", "unchanged", "unchanged")
    spy("_LayerPoint", "round_error_early", "early")
    original = simulate.all_finite
    monkeypatch.setattr(simulate, "all_finite", lambda t: taken.__setitem__(
        "marked", taken["marked"] + (getattr(t, "_lpcli_finite", None) == t._version)) or original(t))
    train("fixed", "nearest", steps=4)
    assert all(taken.values()), taken


def test_the_watch_finds_the_same_first_non_finite_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in ("fixed", "mixed"):
        fast = train(kind, "nearest", steps=6, poison=3)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "_kernels", None)
            slow = train(kind, "nearest", steps=6, poison=3)
        assert fast[3][:4] == [None, None, None, ("stem", "activation")]  # NaN stays NaN in every format
        assert fast[3] == slow[3]


@pytest.mark.parametrize("kind", ["fixed", "mixed"])
def test_the_watch_still_reads_an_error_that_is_not_finite(kind: str) -> None:
    """An inf arriving at a rounded output is not marked finite: the watch names it, as it
    does without the simulator (the fixed-point error format would saturate it)."""
    torch.manual_seed(0)
    model = Net()
    watch = NonFiniteWatch(model, LAYERS)
    (model(torch.randn(4, 64)).sum() * math.inf).backward()
    without = watch.end_step(torch.tensor(1.0))
    sim = Simulator(model, plan(kind))
    (model(torch.randn(4, 64)).sum() * math.inf).backward()
    assert watch.end_step(torch.tensor(1.0)) == without == ("head", "error")
    sim.remove()
    watch.remove()


def test_stochastic_rounding_keeps_the_generators_stream() -> None:
    """With stochastic rounding the simulator takes no shortcut that would skip or reorder a
    draw: the run equals the same run with every fast path switched off."""
    fast = train("mixed", "stochastic", steps=6)
    import lpcli.simulate as simulate

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulate._LayerPoint, "round_in_place", lambda self, t: False)
        patch.setattr(simulate._InputPoint, "already_rounded", lambda self, t: False)
        patch.setattr(simulate._InputPoint, "unchanged", lambda self, t: False)
        patch.setattr(simulate, "_EARLY_ERROR", 1 << 62)
        plain = train("mixed", "stochastic", steps=6)
    assert_same(fast, plain)


def test_an_output_rounded_in_place_is_an_output_its_node_does_not_keep() -> None:
    """Only outputs of matmul, convolution and batch norm nodes are rounded in place; a tanh
    keeps its output for its backward, so it gets a rounded copy."""
    import lpcli.simulate as simulate

    model = Net()
    sim = Simulator(model, plan("fixed"))
    seen = {}
    original = simulate._LayerPoint.round_in_place

    def spy(self, t):
        result = original(self, t)
        seen[type(t.grad_fn).__name__] = result
        return result
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulate._LayerPoint, "round_in_place", spy)
        model(torch.randn(4, 64)).sum().backward()
    sim.remove()
    assert seen == {"ConvolutionBackward0": True, "NativeBatchNormBackward0": True, "TanhBackward0": False,
                    "AddmmBackward0": True}


def test_the_path_is_chosen_again_when_a_setting_changes_even_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer compares numbers, strings and formats as they are and anything else (a
    list one could change in place) by its repr, as it compared everything before."""
    from lpcli.store import LowPrecisionOptimizer

    chosen = []
    original = LowPrecisionOptimizer._choose_backend
    monkeypatch.setattr(LowPrecisionOptimizer, "_choose_backend",
                        lambda self, group, device: chosen.append(1) or original(self, group, device))
    p = torch.nn.Parameter(torch.randn(10))
    opt = KahanSGD([{"params": [p], "tags": ["a"]}], lr=0.1, weight_format="fx8.6")
    for step in range(5):
        p.grad = torch.randn(10)
        if step == 1:
            opt.param_groups[0]["momentum"] = 0.0  # equal to the old value: the same path
        if step == 2:
            opt.param_groups[0]["tags"].append("b")  # changed in place
        if step == 3:
            opt.param_groups[0]["weight_format"] = parse_format("fx8.5")
        opt.step()
    assert len(chosen) == 3
