"""lpcli.formats and its quantizer (lpcli.kernels) against independent oracles, bit for bit.

Oracles: torch dtype casts (fp16, bf16, fp8), ml_dtypes (fp6, fp4, IEEE-style fp8 splits),
torch.fake_quantize_per_tensor_affine (fixed point), a float64 reference written here
(any E/M split, dynamic fixed point, directed rounding) and the enumerated grid of each
small format (stochastic rounding's neighbours). Each comparison covers 2^20 random values
plus edge values (ties, subnormals, max and beyond, +-0, +-inf, NaN); NaN is compared as
"both NaN", everything else through int32 bit views. Intended differences from an oracle
are listed in the module docstring of lpcli.kernels and tested one by one here.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import time

import ml_dtypes
import numpy as np
import pytest
import torch

from lpcli import formats, kernels
from lpcli.formats import (
    ACCEPTED_FORMS,
    ALIASES,
    MAX_FIXED_WIDTH,
    DynamicFixedPoint,
    FixedPoint,
    Float32,
    FloatFormat,
    FormatError,
    parse_format,
)
from lpcli.kernels import MaxHistory, quantize

N = 1 << 20
INF, NAN = math.inf, math.nan

TORCH_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8-e4m3": torch.float8_e4m3fn,
    "fp8-e5m2": torch.float8_e5m2,
}
# Our spelling -> ml_dtypes type (same E, M, bias, inf/NaN convention; checked in a test).
ML_DTYPES = {
    "fp6-e2m3": ml_dtypes.float6_e2m3fn,
    "fp6-e3m2": ml_dtypes.float6_e3m2fn,
    "fp4-e2m1": ml_dtypes.float4_e2m1fn,
    "e4m3": ml_dtypes.float8_e4m3,  # IEEE-style: inf, bias 7, max 240
    "e3m4": ml_dtypes.float8_e3m4,  # IEEE-style: inf, bias 3, max 15.5
    "fp8-e4m3": ml_dtypes.float8_e4m3fn,
    "fp8-e5m2": ml_dtypes.float8_e5m2,
}


# --- helpers -----------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("single_thread", "backend")  # every test on both kernel backends


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_bitexact(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor | None = None) -> None:
    """Same NaN positions, and identical float32 bit patterns everywhere else."""
    actual, expected = actual.float().reshape(-1), expected.float().reshape(-1)
    assert actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN mismatch at {torch.nonzero(nan_a != nan_e)[:5].tolist()}"
    a, e = actual[~nan_a].view(torch.int32), expected[~nan_e].view(torch.int32)
    bad = torch.nonzero(a != e).reshape(-1)
    if len(bad):
        i = bad[:5]
        inputs = x.float().reshape(-1)[~nan_a][i].tolist() if x is not None else "?"
        raise AssertionError(
            f"{len(bad)} of {len(a)} differ; inputs {inputs}: got {actual[~nan_a][i].tolist()}, "
            f"expected {expected[~nan_e][i].tolist()}"
        )


def random_bits(n: int, lo_exp: int, hi_exp: int, seed: int) -> torch.Tensor:
    """Random float32 values, both signs, exponents uniform in [lo_exp, hi_exp], random mantissas."""
    g = gen(seed)
    exp = torch.randint(lo_exp, hi_exp + 1, (n,), generator=g, dtype=torch.int32).clamp(-127, 128)
    mant = torch.randint(0, 1 << 23, (n,), generator=g, dtype=torch.int32)
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) << 31
    return (sign | ((exp + 127) << 23) | mant).view(torch.float32)  # exp -127: float32 subnormals


def grid_values(fmt: FloatFormat) -> np.ndarray:
    """Every non-negative finite value of a float format, sorted, in float64 (by construction)."""
    out = [0.0]
    top_exp = 2**fmt.exp - (1 if fmt.finite else 2)
    for field in range(0, top_exp + 1):
        for m in range(2**fmt.man):
            if field == 0:
                v = math.ldexp(m, fmt.emin - fmt.man)
            else:
                v = math.ldexp(2**fmt.man + m, field - fmt.bias - fmt.man)
            if 0 < v <= fmt.max_value:
                out.append(v)
    return np.unique(np.array(out))


def float_edges(fmt: FloatFormat) -> torch.Tensor:
    """Grid values, exact ties between neighbours and the float32 values next to them,
    subnormals, max, max + half a spacing and around it, far overflow, +-0, +-inf, NaN."""
    grid = grid_values(fmt) if fmt.width <= 16 else np.array([0.0, fmt.smallest_normal, fmt.max_value])
    mids = (grid[:-1] + grid[1:]) / 2
    top_gap = math.ldexp(1.0, fmt.emax - fmt.man)
    special = [
        fmt.max_value + top_gap / 2,
        fmt.max_value + top_gap,
        2 * fmt.max_value,
        fmt.step / 2,
        fmt.step / 4,
        fmt.step * 0.75,
        fmt.smallest_normal,
        fmt.smallest_normal - fmt.step / 2,
        float(torch.finfo(torch.float32).max),
        float(torch.finfo(torch.float32).tiny),
        2.0**-149,
        3 * 2.0**-149,
        INF,
    ]
    base = torch.from_numpy(np.concatenate([grid, mids, special])).float()
    base = base[base <= float(torch.finfo(torch.float32).max)]
    near = torch.cat([base, torch.nextafter(base, f32(INF)), torch.nextafter(base, f32(0.0))])
    near = torch.cat([near, f32([INF, NAN, 0.0])])
    return torch.cat([near, -near])


def fixed_edges(width: int, frac: int) -> torch.Tensor:
    step = 2.0**-frac
    k = torch.arange(-(2 ** (width - 1)) - 3, 2 ** (width - 1) + 3, dtype=torch.float64)
    if len(k) > 4096:
        k = torch.cat([k[:2048], k[-2048:], torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), (4096,)).double()])
    ties = ((k + 0.5) * step).float()
    grid = (k * step).float()
    base = torch.cat([grid, ties, torch.nextafter(ties, f32(INF)), torch.nextafter(ties, f32(-INF))])
    return torch.cat([base, f32([0.0, -0.0, step / 4, -step / 4, 2.0**-149, 1e30, -1e30])])


def random_for_float(fmt: FloatFormat, seed: int) -> torch.Tensor:
    return random_bits(N, fmt.emin - fmt.man - 3, fmt.emax + 2, seed)


def random_for_fixed(width: int, frac: int, seed: int) -> torch.Tensor:
    # values up to a little beyond the range, with fractions well below the step
    return random_bits(N, -frac - 4, width - frac, seed)


def ml_cast(x: torch.Tensor, dtype) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(dtype).astype(np.float32))


def general_path(x: torch.Tensor, fmt: FloatFormat, rounding: str = "nearest", g=None) -> torch.Tensor:
    return kernels._float(x, fmt, rounding, g)


# --- floats against torch casts and ml_dtypes ---------------------------------------------------


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_torch_cast_formats_bitexact(name: str) -> None:
    fmt = parse_format(name)
    x = torch.cat([random_for_float(fmt, 1), float_edges(fmt)])
    x_finite_range = x.clamp(-fmt.max_value, fmt.max_value) if fmt.finite else x
    expected = x_finite_range.to(TORCH_DTYPES[name]).float()
    uses_cast = kernels._cast_dtype(fmt) is not None
    assert uses_cast == (name in ("fp16", "bf16"))  # fp8 casts are slower than the general path
    assert_bitexact(quantize(x, name), expected, x)
    assert_bitexact(general_path(x, fmt), expected, x)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_quantize_without_native_cast_is_bitexact(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_cast_dtype", lambda fmt: None)
    x = torch.cat([random_for_float(parse_format(name), 2), float_edges(parse_format(name))])
    assert_bitexact(quantize(x, name), x.to(TORCH_DTYPES[name]).float(), x)


def test_fp8_e4m3_saturates_where_the_cast_may_give_nan() -> None:
    x = f32([448.0, 464.0, 464.01, 470.0, 480.0, 500.0, 1e9, INF, 3e38])
    x = torch.cat([x, -x])
    q = quantize(x, "fp8-e4m3")
    assert torch.equal(q, torch.copysign(torch.full_like(x, 448.0), x))
    assert torch.equal(general_path(x, parse_format("fp8-e4m3")), q)
    cast = x.to(torch.float8_e4m3fn).float()  # NaN in older torch, +-448 in 2.13 on the CPU
    assert bool((torch.isnan(cast) | (cast == q)).all())


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_ml_dtypes_formats_bitexact(name: str) -> None:
    fmt = parse_format(name)
    info = ml_dtypes.finfo(ML_DTYPES[name])
    assert (info.nexp, info.nmant, float(info.max)) == (fmt.exp, fmt.man, fmt.max_value)
    assert float(info.smallest_subnormal) == fmt.step
    x = torch.cat([random_for_float(fmt, 3), float_edges(fmt)])
    expected = ml_cast(x, ML_DTYPES[name])
    has_nan = bool(np.isnan(np.array(np.nan, dtype=np.float32).astype(ML_DTYPES[name]).astype(np.float32)))
    if not has_nan:  # no NaN code: ml_dtypes gives -0/+0, we keep NaN (intended difference)
        expected = torch.where(torch.isnan(x), x, expected)
    overflow_nan = torch.isnan(expected) & ~torch.isnan(x)
    if fmt.finite:  # float8_e4m3fn gives NaN from 464 up and for inf; we saturate (intended)
        assert bool((x[overflow_nan].abs() > fmt.max_value).all())
        expected = torch.where(overflow_nan, torch.copysign(torch.full_like(x, fmt.max_value), x), expected)
    else:
        assert not overflow_nan.any()
    assert_bitexact(quantize(x, name), expected, x)


@pytest.mark.parametrize("name", ["fp6-e2m3", "fp6-e3m2", "fp4-e2m1"])
def test_no_nan_formats_keep_nan_and_saturate_inf(name: str) -> None:
    fmt = parse_format(name)
    x = f32([NAN, -NAN, INF, -INF, 1e9, -1e9])
    oracle = ml_cast(x, ML_DTYPES[name])
    assert not torch.isnan(oracle).any()  # the oracle has no NaN
    for rounding in formats.ROUNDINGS:
        q = quantize(x, name, rounding, gen())
        assert torch.isnan(q[:2]).all()
        assert q[2:].tolist() == [fmt.max_value, -fmt.max_value] * 2
        assert torch.equal(q[2:], oracle[2:])


# --- any E/M split against a float64 reference ----------------------------------------------


def reference_float(x: torch.Tensor, fmt: FloatFormat, rounding: str) -> torch.Tensor:
    """Textbook float64 quantizer: spacing 2^(max(e, emin) - M), numpy rounding, then range."""
    v = x.double().numpy()
    with np.errstate(all="ignore"):
        _, e = np.frexp(v)
        spacing = np.ldexp(1.0, np.maximum(e - 1, fmt.emin) - fmt.man)
        scaled = v / spacing
        r = np.round(scaled) if rounding == "nearest" else np.trunc(scaled)
        q = r * spacing
        big = np.abs(q) > fmt.max_value
        if fmt.finite or rounding != "nearest":
            q = np.where(big, np.copysign(fmt.max_value, v), q)
        else:
            q = np.where(big, np.copysign(np.inf, v), q)
        q = np.where(np.isinf(v) & (not fmt.finite), v, q)
        q = np.copysign(q, v)
        q = np.where(np.isnan(v), np.nan, q)
    return torch.from_numpy(q).float()


SPLITS = ["e2m0fn", "e1m3fn", "e3m0", "e2m5fn", "e5m7", "e6m5", "e7m3", "e7m10fn", "e4m21", "e5m22", "e3m23"]
SPLITS += ["e8m0", "e8m3", "e8m16", "e8m22"]


@pytest.mark.parametrize("spec", SPLITS)
@pytest.mark.parametrize("rounding", ["nearest", "zero"])
def test_general_splits_match_float64_reference(spec: str, rounding: str) -> None:
    fmt = parse_format(spec)
    x = torch.cat([random_for_float(fmt, 4)[: N // 8], float_edges(fmt)])
    assert_bitexact(quantize(x, fmt, rounding), reference_float(x, fmt, rounding), x)


def test_e8m23_is_float32() -> None:
    x = torch.cat([random_bits(N // 8, -150, 128, 5), f32([INF, -INF, NAN, 0.0, -0.0])])
    for rounding in formats.ROUNDINGS:
        assert_bitexact(quantize(x, "e8m23", rounding, gen()), x, x)


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8-e5m2", "fp8-e4m3", "fp6-e3m2", "e3m4", "e8m3"])
def test_float_zero_rounding(name: str) -> None:
    fmt = parse_format(name)
    x = torch.cat([random_for_float(fmt, 6)[: N // 4], float_edges(fmt)])
    q = quantize(x, name, "zero")
    assert_bitexact(q, reference_float(x, fmt, "zero"), x)
    finite = torch.isfinite(x)
    assert bool((q[finite].abs() <= x[finite].abs()).all())
    assert bool(torch.isfinite(q[finite]).all())  # never inf from a finite value


@pytest.mark.parametrize("spec", ["bf16", "e8m3", "e8m0"])
def test_e8_stochastic_neighbours_and_special_values(spec: str) -> None:
    """The integer path for 8 exponent bits: one of the two neighbours (zero rounding's
    answer or the next value up in magnitude), NaN payloads stay NaN (a carry could reach
    the sign bit), inf stays inf, finite values beyond max saturate."""
    fmt = parse_format(spec)
    payloads = [0x7FFFFFFF, 0x7F800001, -1, 0x7FC00000]  # NaN patterns; -1 is 0xffffffff
    nans = torch.tensor(payloads, dtype=torch.int32).view(torch.float32)
    specials = torch.cat([nans, f32([INF, -INF, 3.4e38, -3.4e38, fmt.max_value, 0.0, -0.0, 2.0**-149])])
    x = torch.cat([random_bits(N // 4, -150, 127, 9), specials])
    q = quantize(x, spec, "stochastic", gen(3))
    lower = reference_float(x, fmt, "zero")  # toward zero: the neighbour of smaller magnitude
    upper = torch.copysign((lower.abs() + lsb_tensor(lower.abs(), fmt)).clamp(max=fmt.max_value), x)
    finite = torch.isfinite(x)
    assert bool(((q == lower) | (q == upper))[finite].all())
    assert bool(torch.isfinite(q[finite]).all())
    assert torch.isnan(q[-12:-8]).all() and q[-8:-4].tolist() == [INF, -INF, fmt.max_value, -fmt.max_value]


def lsb_tensor(a: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Spacing of the format at each non-negative float32 value of a (on the grid)."""
    e = torch.where(a > 0, torch.frexp(a.double())[1] - 1, fmt.emin)
    return torch.ldexp(torch.ones_like(a, dtype=torch.float64), torch.clamp(e, min=fmt.emin) - fmt.man).float()


@pytest.mark.parametrize("spec", ["bf16", "e8m3", "e8m0", "e8m16"])
def test_e8_checked_and_unchecked_paths_agree(spec: str) -> None:
    """On an accelerator the integer path runs every fix-up pass; on the CPU only where a
    chunk needs them. Both must give the same bits (the random stream is the same)."""
    fmt = parse_format(spec)
    x = torch.cat([random_bits(N // 8, -150, 128, 10), float_edges(fmt)])
    for rounding in formats.ROUNDINGS:
        results = []
        for device_type in ("cpu", "cuda"):
            y = torch.empty_like(x)
            kernels._apply(kernels._float_kernel(fmt, rounding, gen(4), device_type), x, y)
            results.append(y)
        assert_bitexact(results[0], results[1], x)


# --- fixed point against fake_quantize ------------------------------------------------------


def fake_quant(x: torch.Tensor, width: int, frac: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, 2.0**-frac, 0, -(2 ** (width - 1)), 2 ** (width - 1) - 1)


@pytest.mark.parametrize("width", range(2, MAX_FIXED_WIDTH + 1))
def test_fixed_point_matches_fake_quantize(width: int) -> None:
    for i, frac in enumerate([-3, 0, width // 2, width + 5]):
        x = torch.cat([random_for_fixed(width, frac, 100 * width + i), fixed_edges(width, frac)])
        assert_bitexact(quantize(x, f"fx{width}.{frac}"), fake_quant(x, width, frac), x)


def test_fixed_point_single_zero_nan_and_inf() -> None:
    fmt = FixedPoint(8, 4)
    x = f32([-0.0, -0.01, 0.01, NAN, INF, -INF])
    for rounding in formats.ROUNDINGS:
        q = quantize(x, fmt, rounding, gen())
        assert q[:2].view(torch.int32).tolist() == [0, 0]  # +0.0 only
        assert torch.isnan(q[3])  # fake_quantize gives an arbitrary code for NaN
        assert q[4:].tolist() == [fmt.max_value, fmt.min_value]


@pytest.mark.parametrize("width,frac", [(4, 2), (8, -3), (16, 20), (24, 12), (23, 0)])
def test_fixed_zero_rounding_against_float64(width: int, frac: int) -> None:
    x = torch.cat([random_for_fixed(width, frac, 7)[: N // 4], fixed_edges(width, frac)])
    fmt = FixedPoint(width, frac)
    ref = (torch.trunc(x.double() * 2.0**frac) * 2.0**-frac).clamp(fmt.min_value, fmt.max_value) + 0.0
    assert_bitexact(quantize(x, fmt, "zero"), ref.float(), x)


# --- dynamic fixed point ----------------------------------------------------------------------


def expected_frac(absmax: float, width: int) -> int:
    qmax = 2 ** (width - 1) - 1
    if absmax == 0:
        return 0
    frac = 100
    while frac > -64 and math.ldexp(absmax, frac) > qmax:  # exact in float64
        frac -= 1
    return frac


@pytest.mark.parametrize("width", [2, 3, 8, 24])
def test_scalar_and_tensor_frac_agree_everywhere(width: int) -> None:
    """frac_of (CPU, Python floats) and frac_for (tensors, any device) on every binade of
    float32 and at its specials, including maxima where F hits its limits."""
    fmt = DynamicFixedPoint(width)
    values = [math.ldexp(m, e) for e in range(-149, 128) for m in (0.5, 0.75, math.nextafter(1.0, 0.0))]
    values = [float(v) for v in f32(values + [0.0, INF, NAN, 3.4028234663852886e38, 1e-45])]
    tensor = fmt.frac_for(f32(values))
    assert [fmt.frac_of(v) for v in values] == [int(f) for f in tensor]


@pytest.mark.parametrize("width", [2, 3, 8, 12, 16, 24])
def test_dynamic_fixed_point_picks_the_largest_frac_that_holds_absmax(width: int) -> None:
    qmax = 2 ** (width - 1) - 1
    g = gen(width)
    cases = [torch.randn(N // 4, generator=g) * 10.0 ** float(torch.randint(-6, 7, (), generator=g))]
    for k in (-20, -1, 0, 3, 30):  # absmax exactly at the top of a range, and just above it
        top = math.ldexp(qmax, -k)
        cases += [f32([top, -0.5 * top]), f32([-top]), f32([math.nextafter(top, INF), 0.0])]
    cases += [torch.zeros(5), f32([1e-40]), f32([3e38, -1.0])]
    for x in cases:
        absmax = float(x.abs().max())
        frac = expected_frac(absmax, width)
        assert int(DynamicFixedPoint(width).frac_for(torch.tensor(absmax))) == frac
        assert DynamicFixedPoint(width).frac_of(absmax) == frac
        q = quantize(x, f"dfx{width}")
        assert_bitexact(q, quantize(x, FixedPoint(width, frac)), x)
        assert_bitexact(q, fake_quant(x, width, frac), x)
        assert float(q.abs().max()) <= qmax * 2.0**-frac  # nothing saturates


def test_dynamic_fixed_point_with_a_history_of_maxima() -> None:
    history = MaxHistory(length=2)
    assert history.absmax is None
    history.update(f32([100.0]))
    history.update(f32([1.0]))
    x = f32([0.3, 200.0])
    q = quantize(x, "dfx8", absmax=history.absmax)  # scaled for 100: F = 0, 200 saturates
    assert q.tolist() == [0.0, 127.0]
    history.update(f32([0.5]))  # 100 leaves the window
    assert float(history.absmax) == 1.0
    assert quantize(x, "dfx8", absmax=1.0).tolist() == [0.296875, 127 / 64]


# --- stochastic rounding -------------------------------------------------------------------------


def neighbours(x: torch.Tensor, grid: np.ndarray | FixedPoint) -> tuple[np.ndarray, np.ndarray]:
    """Largest grid value <= x and smallest >= x (grid: sorted float64, both signs, clamped at ends)."""
    v = x.double().numpy()
    if isinstance(grid, FixedPoint):
        step = grid.step
        lo, hi = np.floor(v / step) * step, np.ceil(v / step) * step
        return np.clip(lo, grid.min_value, grid.max_value), np.clip(hi, grid.min_value, grid.max_value)
    hi_idx = np.clip(np.searchsorted(grid, v, side="left"), 0, len(grid) - 1)
    lo_idx = np.clip(np.searchsorted(grid, v, side="right") - 1, 0, len(grid) - 1)
    return grid[lo_idx], grid[hi_idx]


STOCHASTIC_FORMATS = ["fx8.4", "fx16.10", "fx24.3", "fp8-e4m3", "fp8-e5m2", "fp6-e2m3", "fp4-e2m1", "e3m4", "fp16"]


def full_grid(fmt: FixedPoint | FloatFormat) -> np.ndarray | FixedPoint:
    if isinstance(fmt, FixedPoint):
        return fmt  # neighbours() computes them
    pos = grid_values(fmt)
    return np.concatenate([-pos[::-1], pos[1:]])


@pytest.mark.parametrize("name", STOCHASTIC_FORMATS)
def test_stochastic_returns_one_of_the_two_neighbours(name: str) -> None:
    fmt = parse_format(name)
    grid = full_grid(fmt)
    if isinstance(fmt, FixedPoint):
        x = random_for_fixed(fmt.width, fmt.frac, 8)
    else:
        x = random_for_float(fmt, 8)
    x = x[torch.isfinite(x)]
    q = quantize(x, name, "stochastic", gen(1)).double().numpy()
    lo, hi = neighbours(x, grid)
    assert np.all((q == lo) | (q == hi))
    top = grid.max_value if isinstance(grid, FixedPoint) else grid[-1]
    inside = (lo != hi) & (np.abs(x.double().numpy()) < top)
    assert (q[inside] == lo[inside]).mean() > 0.2 and (q[inside] == hi[inside]).mean() > 0.2


@pytest.mark.parametrize(
    "name,value",
    [
        ("fx8.4", 1 / 3),
        ("fx8.4", -2.71828),
        ("fx16.10", 0.0001),
        ("fp8-e4m3", 3.3),
        ("fp8-e4m3", -1e-3),  # subnormal range
        ("fp16", 1e-6),  # subnormal range
        ("fp4-e2m1", 2.6),
        ("bf16", -1.00390625 + 2**-12),
        ("e3m4", 0.1),
    ],
)
def test_stochastic_is_unbiased(name: str, value: float) -> None:
    x = torch.full((1_000_000,), value)
    q = quantize(x, name, "stochastic", gen(2)).double()
    err = q - float(x[0])
    assert len(err.unique()) == 2
    standard_error = float(err.std()) / math.sqrt(len(err))
    assert abs(float(err.mean())) <= 4 * standard_error


@pytest.mark.parametrize("name", ["fx12.6", "fp8-e5m2", "fp6-e2m3"])
def test_stochastic_is_unbiased_over_random_values(name: str) -> None:
    fmt = parse_format(name)
    x = (torch.randn(1_000_000, generator=gen(3)) * 2).clamp(-7, 7)
    q = quantize(x, name, "stochastic", gen(4)).double().numpy()
    v = x.double().numpy()
    lo, hi = neighbours(x, full_grid(fmt))
    variance = (v - lo) * (hi - v)  # p (1 - p) spacing^2 for p = (v - lo) / spacing
    assert abs((q - v).sum()) <= 4 * math.sqrt(variance.sum())


@pytest.mark.parametrize("name", ["fx8.4", "dfx8", "fp8-e4m3", "bf16", "fp16", "fp4-e2m1"])
def test_stochastic_is_reproducible_and_seed_dependent(name: str) -> None:
    x = torch.randn(100_003, generator=gen(5))
    a = quantize(x, name, "stochastic", gen(7))
    b = quantize(x, name, "stochastic", gen(7))
    c = quantize(x, name, "stochastic", gen(8))
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert not torch.equal(a, c)
    out = torch.empty_like(x)
    assert quantize(x, name, "stochastic", gen(7), out=out) is out
    assert torch.equal(out, a)


# --- parse_format --------------------------------------------------------------------------------

SPELLINGS = ["fp32", *ALIASES, "fx8.7", "fx2.0", "fx24.-5", "fx16.30", "dfx8", "dfx24"]
SPELLINGS += ["e4m3", "e4m3fn", "e2m1fn", "e8m0", "e1m0fn"]


@pytest.mark.parametrize("spec", SPELLINGS)
def test_every_spelling_round_trips(spec: str) -> None:
    fmt = parse_format(spec)
    assert parse_format(str(fmt)) == fmt
    assert parse_format(f"  {spec.upper()} ") == fmt
    assert parse_format(fmt) is fmt


def test_aliases_name_their_splits() -> None:
    assert str(FloatFormat(5, 10)) == "fp16" and str(FloatFormat(4, 3, finite=True)) == "fp8-e4m3"
    assert str(FloatFormat(4, 3)) == "e4m3"
    assert isinstance(parse_format("fp32"), Float32)


@pytest.mark.parametrize("spec", ["", "fp8", "fx8", "fx8.", "e4", "int8", "fp33", "e4m3fnuz", "dfx", "fx8.7.1", 8])
def test_bad_spellings_list_the_accepted_forms(spec) -> None:
    with pytest.raises(FormatError) as info:
        parse_format(spec)
    assert ACCEPTED_FORMS in str(info.value)


@pytest.mark.parametrize(
    "spec", ["fx1.0", "fx25.3", "fx8.101", "fx8.-65", "dfx1", "dfx25", "e0m3fn", "e9m2", "e4m24", "e1m2", "e8m3fn"]
)
def test_out_of_range_parameters_are_rejected(spec: str) -> None:
    with pytest.raises(FormatError, match=spec):
        parse_format(spec)


def test_bad_rounding_is_rejected() -> None:
    with pytest.raises(FormatError, match="nearest"):
        quantize(torch.ones(2), "fx8.4", "up")


# --- shape, dtype, device, out= --------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["fx8.4", "dfx6", "fp16", "bf16", "fp8-e5m2", "fp4-e2m1", "e8m3", "fp32"])
def test_quantize_keeps_shape_dtype_and_device(name: str, dtype: torch.dtype, device: str) -> None:
    x = (torch.randn(3, 4, 5, generator=gen(9)) * 3).to(dtype=dtype, device=device)
    for rounding in formats.ROUNDINGS:
        g = torch.Generator(device=device).manual_seed(0)
        q = quantize(x, name, rounding, g)
        assert (q.shape, q.dtype, q.device) == (x.shape, x.dtype, x.device)
        if name == "fp32":
            assert q is x
        else:
            assert q is not x
            expected = quantize(x.float().cpu(), name, rounding, torch.Generator().manual_seed(0)).to(dtype)
            if rounding != "stochastic" or device == "cpu":
                assert torch.equal(q.cpu(), expected)


def test_non_contiguous_input_and_out_variants() -> None:
    x = torch.randn(64, 33, generator=gen(10)).t()  # non-contiguous
    for name in ("fx8.4", "fp8-e4m3", "fp16", "e8m3"):
        expected = quantize(x.contiguous(), name)
        assert torch.equal(quantize(x, name), expected)
        out = torch.empty(33, 64)
        assert quantize(x, name, out=out) is out and torch.equal(out, expected)
        out16 = torch.empty(33, 64, dtype=torch.float64)
        assert torch.equal(quantize(x, name, out=out16), expected.double())
        y = x.clone()
        assert quantize(y, name, out=y) is y and torch.equal(y, expected)  # in place
        with pytest.raises(ValueError):
            quantize(x, name, out=torch.empty(3))


def test_chunked_and_whole_tensor_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.cat([random_bits(5000, -20, 10, 11), f32([NAN, INF, -0.0])])
    for name in ("fx8.4", "fx24.6", "fp8-e5m2", "bf16", "e8m3"):
        for rounding in formats.ROUNDINGS:
            whole = quantize(x, name, rounding, gen(1))
            monkeypatch.setattr(kernels, "_CHUNK", 333)
            chunked = quantize(x, name, rounding, gen(1))
            monkeypatch.undo()
            assert_bitexact(chunked, whole)


def test_empty_and_scalar_tensors() -> None:
    for name in ("fx8.4", "dfx8", "fp8-e4m3", "bf16"):
        assert quantize(torch.empty(0, 3), name).shape == (0, 3)
        assert quantize(torch.tensor(0.3), name).shape == ()


def test_saturated_and_lsb() -> None:
    fmt = parse_format("fx8.4")
    assert formats.saturated(f32([7.9, 8.0, -8.0, -8.1]), fmt).tolist() == [False, True, False, True]
    assert formats.lsb(fmt) == 2.0**-4
    assert formats.lsb(parse_format("fp16"), 1.0) == 2.0**-10
    assert formats.lsb(parse_format("fp16"), 0.0) == 2.0**-24
    assert formats.lsb(parse_format("dfx8"), 1.0) == 2.0**-6


def test_inputs_that_require_grad() -> None:
    x = torch.randn(100, requires_grad=True)
    for name in ("fx8.4", "dfx8", "fp8-e4m3", "fp16"):
        q = quantize(x, name)
        assert not q.requires_grad and torch.equal(q, quantize(x.detach(), name))


@pytest.mark.parametrize("rounding", formats.ROUNDINGS)
def test_fixed_kernel_with_a_tensor_frac_as_on_an_accelerator(rounding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Off the CPU, dynamic fixed point keeps F as a 0-d tensor to avoid a device sync.
    monkeypatch.setattr(kernels, "_kernels", None)  # the torch kernels' random stream
    x = torch.cat([random_bits(10_000, -8, 6, 12), f32([NAN, INF, -INF, -0.0])])
    for width, frac in [(8, 4), (24, -3), (6, 9)]:
        expected = quantize(x, FixedPoint(width, frac), rounding, gen(3))
        y = torch.empty_like(x)
        kernel = kernels._fixed_kernel(width, torch.tensor(float(frac)), rounding, gen(3))
        kernels._apply(kernel, x, y)
        assert_bitexact(y, expected, x)


# --- the C kernels against the torch kernels -------------------------------------------------


NATIVE_CHECKED = [
    "fx2.0", "fx8.4", "fx16.8", "fx23.3", "fx24.12", "fx24.-64", "fx12.100", "fx4.-3", "dfx8", "dfx24",
    "fp16", "bf16", "fp8-e4m3", "fp8-e5m2", "fp6-e2m3", "fp6-e3m2", "fp4-e2m1", "e3m4", "e8m3", "e8m0",
    "e8m22", "e5m22", "e4m23", "e7m22fn", "e2m0fn", "e1m0fn", "e1m2fn", "e7m21", "e3m21fn", "e6m0",
]  # fmt: skip


@pytest.mark.parametrize("rounding", ["nearest", "zero"])
def test_c_kernels_agree_with_torch_kernels_bit_for_bit(rounding: str, backend: str) -> None:
    if backend == "torch":
        pytest.skip("compares the two backends")
    bits = torch.randint(-(2**31), 2**31 - 1, (N // 4,), dtype=torch.int32, generator=gen(20))
    x = torch.cat([bits.view(torch.float32), random_bits(N // 4, -30, 30, 21),
                   f32([0.0, -0.0, INF, -INF, NAN, 1e38, -1e38, 3e-45, -3e-45, 0.5, 1.5, 2.5, -2.5])])
    for name in NATIVE_CHECKED:
        native = quantize(x, name, rounding)
        native_kernels, kernels._kernels = kernels._kernels, None
        try:
            reference = quantize(x, name, rounding)
        finally:
            kernels._kernels = native_kernels
        assert_bitexact(native, reference, x)


def test_c_kernels_give_the_same_bits_in_pieces_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.cat([random_bits(10_000, -20, 10, 22), f32([NAN, INF, -0.0])])
    for name in ("fx8.4", "fx24.6", "fp8-e5m2", "bf16", "e8m3", "e5m22"):
        for rounding in formats.ROUNDINGS:
            whole = quantize(x, name, rounding, gen(1))
            monkeypatch.setattr(kernels, "_PIECE", 1000)
            torch.set_num_threads(3)
            try:
                pieces = quantize(x, name, rounding, gen(1))
            finally:
                torch.set_num_threads(1)
                monkeypatch.undo()
            assert_bitexact(pieces, whole, x)


def test_c_kernels_are_built_where_a_compiler_is() -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the torch kernels run")
    assert importlib.util.find_spec("lpcli._kernels") is not None, "build them: pip install -e ."


def test_c_kernels_on_a_large_output_at_an_odd_offset(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Over 2^20 elements into an output 4 bytes past an alignment boundary: the same bits as
    the torch kernels, and the same random stream as smaller calls in pieces."""
    if backend == "torch":
        pytest.skip("compares the two backends")
    x = torch.cat([random_bits((1 << 20) + 77, -20, 10, 23), f32([NAN, INF, -0.0, 1e38])])
    buffer = torch.empty(x.numel() + 1)
    out = buffer[1:]  # 4 bytes past a 64-byte boundary
    for name in ("fx8.4", "dfx8", "fp8-e4m3", "bf16", "e5m22"):
        for rounding in ("nearest", "zero"):
            quantize(x, name, rounding, out=out)
            monkeypatch.setattr(kernels, "_kernels", None)
            reference = quantize(x, name, rounding)
            monkeypatch.undo()
            assert_bitexact(out, reference, x)
        quantize(x, name, "stochastic", gen(3), out=out)
        monkeypatch.setattr(kernels, "_PIECE", 1000)
        torch.set_num_threads(4)  # pieces of about 2^18 elements, below the streaming size
        try:
            pieces = quantize(x, name, "stochastic", gen(3))
        finally:
            torch.set_num_threads(1)
            monkeypatch.undo()
        assert_bitexact(out, pieces, x)


@pytest.mark.parametrize("threads", [1, 3])
def test_absmax_matches_torch_with_nan_inf_and_signed_zero(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_PIECE", 1000)
    torch.set_num_threads(threads)
    try:
        x = random_bits(10_001, -30, 30, 24)
        assert kernels.absmax_value(x) == x.abs().max().item()
        assert kernels.absmax_value(f32([-0.0, 0.0])) == 0.0
        assert kernels.absmax_value(f32([])) == 0.0
        for position in (0, 5_000, 10_000):
            special = x.clone()
            special[position] = -INF
            assert kernels.absmax_value(special) == INF
            special[position] = NAN
            assert math.isnan(kernels.absmax_value(special))
    finally:
        torch.set_num_threads(1)


def test_out_overlapping_x_at_a_shift_gets_the_right_values() -> None:
    buffer = random_bits(100_001, -10, 10, 25)
    x, out = buffer[:-1], buffer[1:]  # the same storage, one element apart
    expected = quantize(x.clone(), "fx8.4")
    quantize(x, "fx8.4", out=out)
    assert_bitexact(out, expected, x)


def test_pieces_all_finish_before_an_interrupt_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while pieces run must not return before every piece is done: they write into
    memory the caller frees as soon as it sees the exception."""
    finished = []

    def job(start: int, count: int) -> None:
        if start == 0:
            raise KeyboardInterrupt
        time.sleep(0.2)
        finished.append(start)

    monkeypatch.setattr(kernels, "_PIECE", 1000)
    torch.set_num_threads(3)
    try:
        with pytest.raises(KeyboardInterrupt):
            kernels.in_pieces(job, 3000)
    finally:
        torch.set_num_threads(1)
    assert sorted(finished) == [1024, 2048]
