"""Device placement: the CPU path always; the CUDA path against the CPU where a GPU exists."""

from __future__ import annotations

import json

import pytest
import torch

from lpcli import analyze, load_recipe, quantize, recommend, train_check
from lpcli.distributed import World, describe_device, resolve_device
from lpcli.errors import InputError
from lpcli.files import dumps

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")

NEAREST_FORMATS = ["fx8.4", "fx4.2", "fx16.8", "fx24.12", "fx8.-2", "dfx8", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2",
                   "e5m2", "e3m4", "fp6-e2m3", "fp6-e3m2", "fp4-e2m1", "e8m3", "e4m3"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError) as bad:
        resolve_device("tpu")
    assert bad.value.field == "--device" and "cpu, cuda, auto" in str(bad.value)


@no_cuda
def test_cuda_without_one_is_bad_input(small_recipe):
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(InputError) as bad:
            resolve_device(spec)
        assert str(bad.value).startswith("command line: --device: CUDA was asked for but")
        assert "--device cpu" in str(bad.value)
    with pytest.raises(InputError, match="--device"):
        train_check(small_recipe(), device="cuda")
    with pytest.raises(InputError, match="--device"):
        analyze("digits-mlp", steps=1, device="cuda")


def test_report_names_the_device_without_run_specific_detail(small_recipe):
    recipe = load_recipe(small_recipe(training={"lr": 0.05, "batch_size": 32, "steps": 30, "analyze_steps": 5}))
    plan = recommend(analyze(recipe))
    report = train_check(recipe, plan, device="cpu").document()
    assert report["device"] == {"type": "cpu", "processes": 1}
    assert describe_device(torch.device("cpu"), World(1, 2, "gloo")) == {"type": "cpu", "processes": 2,
                                                                           "backend": "gloo"}
    if not torch.cuda.is_available():  # "auto" is the CPU here: the same bytes
        auto = train_check(recipe, plan, device="auto").document()
        for doc in (report, auto):
            doc.pop("timing")
        assert dumps(auto, as_json=True) == dumps(report, as_json=True)


def test_analyze_records_the_device():
    stats = analyze("digits-mlp", steps=2, device="cpu")
    assert stats["source"]["device"] == "cpu"


def _edge_values() -> torch.Tensor:
    special = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38,
               0.5, 1.5, 2.5, -2.5, 448.0, 464.0, 57344.0, 65504.0, 65520.0, 6.0, 7.5, 240.0, 2**-9, 2**-10]
    torch.manual_seed(0)
    scaled = torch.randn(100_000) * torch.exp2(torch.randint(-30, 30, (100_000,)).float())
    return torch.cat([torch.tensor(special), scaled])


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.cpu(), b.cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    diff = (a.view(torch.int32) != b.view(torch.int32)) & ~nan_a
    assert not diff.any(), f"{what}: {int(diff.sum())} values differ, first at {a[diff][:3]} vs {b[diff][:3]}"


@needs_cuda
@pytest.mark.parametrize("fmt", NEAREST_FORMATS)
def test_cuda_quantize_nearest_is_bit_identical_to_cpu(fmt):
    x = _edge_values()
    assert_bit_identical(quantize(x.cuda(), fmt), quantize(x, fmt), fmt)
    assert_bit_identical(quantize(x.cuda(), fmt, "zero"), quantize(x, fmt, "zero"), f"{fmt} zero")


def check_stochastic(fmt: str, device: str, repeats: int = 1 << 15) -> None:
    """Each value, repeated, rounds to its two grid neighbours only (the one toward zero and
    the next away from it), and on average to itself (within 5 standard errors)."""
    values = torch.tensor([0.3, -0.3, 1.1, -2.7, 0.013, 2.9, 0.71, -0.0417])
    x = values[:, None].expand(-1, repeats).contiguous()
    generator = torch.Generator(device=device).manual_seed(1)
    q = quantize(x.to(device), fmt, "stochastic", generator).cpu().double()
    toward_zero = quantize(x, fmt, "zero")[:, 0].double()
    for row, value in enumerate(values.double().tolist()):
        seen = torch.unique(q[row])
        t = float(toward_zero[row])
        others = [float(v) for v in seen if float(v) != t]
        assert len(others) <= 1, f"{fmt} on {device}: {value} rounded to {seen.tolist()}"
        if t == value:
            assert not others, f"{fmt}: {value} is on the grid but moved"
            continue
        assert others, f"{fmt}: {value} never rounded away from zero"
        away = others[0]
        assert abs(away) > abs(value) and away * value > 0, f"{fmt}: {value} -> {away}"
        assert float(quantize(torch.tensor([away]), fmt, "zero")) == away  # on the grid
        p = (value - t) / (away - t)
        sigma = abs(away - t) * (p * (1 - p) / repeats) ** 0.5
        mean = float(q[row].mean())
        assert abs(mean - value) <= 5 * sigma + 1e-12, f"{fmt} on {device}: mean {mean} for {value}"


@pytest.mark.parametrize("fmt", ["fx8.4", "dfx8", "fp8-e4m3", "fp4-e2m1"])
def test_stochastic_rounding_properties_on_cpu(fmt):
    check_stochastic(fmt, "cpu", repeats=1 << 12)


@needs_cuda
@pytest.mark.parametrize("fmt", ["fx8.4", "fx16.12", "dfx8", "fp8-e4m3", "fp8-e5m2", "fp4-e2m1", "bf16", "e3m4"])
def test_cuda_stochastic_rounding_picks_a_neighbour_without_bias(fmt):
    check_stochastic(fmt, "cuda")


@needs_cuda
def test_cuda_train_check_matches_cpu_verdict(small_recipe):
    recipe = small_recipe()
    cpu = train_check(recipe, device="cpu").document()
    gpu = train_check(recipe, device="cuda").document()
    assert gpu["device"]["type"] == "cuda" and gpu["device"]["name"]
    assert gpu["verdict"]["passed"] == cpu["verdict"]["passed"]
    for run in cpu["runs"]:
        assert abs(gpu["runs"][run]["test_accuracy"] - cpu["runs"][run]["test_accuracy"]) <= 0.01, run
    again = train_check(recipe, device="cuda").document()
    for doc in (gpu, again):
        doc.pop("timing")
    assert json.dumps(gpu, sort_keys=True) == json.dumps(again, sort_keys=True)
