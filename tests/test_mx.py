"""MX block formats (OCP Microscaling v1.0) against a literal NumPy reference of the spec's
conversion, bit for bit, on both kernel backends.

The reference is written from ../shared/NUMERICS.md, not from lpcli: per block the largest
finite magnitude (float64), its exponent by frexp, the shared exponent
``floor(log2 amax) - emax_elem`` clamped to [-127, 127], the elements divided by the scale
in float64, clipped to the element's largest value and cast by ml_dtypes (int8: k * 2^-6
by NumPy's round-half-even, k in [-127, 127]), multiplied back. The emax values and
element types below are the spec's, typed in here.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from lpcli import kernels
from lpcli.formats import BlockFormat, FormatError, lsb, parse_format
from lpcli.kernels import quantize, quantize_count

# element -> (ml_dtypes type or None for int8, emax_elem from the spec)
ELEMENTS = {
    "fp8-e4m3": (ml_dtypes.float8_e4m3fn, 8),
    "fp8-e5m2": (ml_dtypes.float8_e5m2, 15),
    "fp6-e3m2": (ml_dtypes.float6_e3m2fn, 4),
    "fp6-e2m3": (ml_dtypes.float6_e2m3fn, 2),
    "fp4-e2m1": (ml_dtypes.float4_e2m1fn, 2),
    "int8": (None, 0),
}
NAMES = [f"mx{e}" for e in ELEMENTS]


pytestmark = pytest.mark.usefixtures("single_thread", "backend")  # every test on both kernel backends


def element_grid(element: str) -> np.ndarray:
    """The element format's non-negative finite values, sorted (all bit patterns enumerated)."""
    dtype, _ = ELEMENTS[element]
    if dtype is None:
        return np.arange(128) / 64.0
    bits = np.arange(1 << (8 * np.dtype(dtype).itemsize), dtype=np.uint8)
    values = bits.view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values) & (values >= 0)])


def element_max(element: str) -> float:
    return float(element_grid(element)[-1])


def reference(x: torch.Tensor, name: str, rounding: str = "nearest", axis: int = -1) -> torch.Tensor:
    fmt_element, _, block_text = name[2:].partition("/")
    block = int(block_text) if block_text else 32
    dtype, emax = ELEMENTS[fmt_element]
    top = element_max(fmt_element)
    grid = element_grid(fmt_element)
    a = np.moveaxis(x.numpy().astype(np.float64), axis, -1)
    out = np.empty_like(a)
    for start in range(0, a.shape[-1], block):
        b = a[..., start : start + block]
        amax = np.where(np.isfinite(b), np.abs(b), 0.0).max(axis=-1, keepdims=True)
        exponent = np.frexp(amax)[1] - 1  # floor(log2 amax) for amax > 0
        e = np.where(amax > 0, exponent - emax, -127).clip(-127, 127)
        scale = np.ldexp(1.0, e)
        v = np.clip(b / scale, -top, top)
        if rounding == "zero":
            index = np.searchsorted(grid, np.abs(np.nan_to_num(v)), side="right") - 1
            q = np.copysign(grid[index], v)
        elif dtype is None:
            q = np.round(v * 64) / 64
        else:
            q = v.astype(dtype).astype(np.float64)
        if dtype is None:
            q = q + 0.0  # two's complement: no -0
        q = np.where(np.isnan(b), np.nan, q)
        out[..., start : start + block] = q * scale
    return torch.from_numpy(np.moveaxis(out, -1, axis).astype(np.float32))


def assert_bitexact(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    a, e = actual.reshape(-1), expected.reshape(-1)
    assert torch.equal(torch.isnan(a), torch.isnan(e))
    keep = ~torch.isnan(a)
    bad = torch.nonzero(a[keep].view(torch.int32) != e[keep].view(torch.int32)).reshape(-1)[:5]
    assert len(bad) == 0, (f"inputs {x.reshape(-1)[keep][bad].tolist()}: got {a[keep][bad].tolist()}, "
                           f"expected {e[keep][bad].tolist()}")


def random_blocks(rows: int, length: int, seed: int) -> torch.Tensor:
    """Rows whose blocks span many magnitudes: random bits with per-row exponents from
    float32's subnormals to its top binade, and within a row a spread of 2^-30..1."""
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(-140, 128, (rows, 1), generator=g)
    spread = torch.randint(0, 31, (rows, length), generator=g)
    exponent = (top - spread).clamp(-149, 127).double()
    mantissa = 1 + torch.rand(rows, length, generator=g, dtype=torch.float64)
    sign = torch.randint(0, 2, (rows, length), generator=g) * 2 - 1
    return (sign * mantissa * torch.pow(2.0, exponent)).float()


def edge_blocks(element: str) -> torch.Tensor:
    """Rows of 32: all zeros (with -0), one huge element among small ones, float32
    subnormals, an amax just below a power of two, ties of the element grid at scale 1,
    max-and-beyond (the FLOOR scale's saturation), NaN and inf."""
    _, emax = ELEMENTS[element]
    grid = element_grid(element)
    top = grid[-1]
    rows = [np.zeros(32), np.r_[-0.0, np.zeros(31)]]
    rows.append(np.r_[3e38, np.linspace(-1e3, 1e3, 31)])
    rows.append(np.r_[1e-45, -1e-45, 3e-44, np.linspace(-1e-39, 1e-39, 29)])
    rows.append(np.r_[np.nextafter(np.float32(2.0**emax), np.float32(0)), np.linspace(-3, 3, 31)])
    mids = (grid[1:] + grid[:-1]) / 2  # ties once the scale is 2^0 (amax = 2^emax sets it)
    for chunk in range(0, len(mids), 31):
        part = mids[chunk : chunk + 31]
        signs = np.where(np.arange(len(part)) % 2, -1.0, 1.0)
        rows.append(np.r_[2.0**emax, part * signs, np.zeros(31 - len(part))])
    rows.append(np.r_[2.0 ** (emax + 1) * 0.99, top, top * 1.01, -top * 1.2, np.linspace(-top, top, 28)])
    rows.append(np.r_[np.nan, 1.0, -2.0, np.linspace(0, 1, 29)])
    rows.append(np.r_[np.inf, -np.inf, 5.0, 0.25, np.linspace(-1, 1, 28)])
    return torch.tensor(np.stack(rows), dtype=torch.float32)


# --- the conversion, bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_random_tensors_match_the_reference(name: str) -> None:
    x = random_blocks(256, 96, seed=1)
    assert_bitexact(quantize(x, name), reference(x, name), x)


@pytest.mark.parametrize("name", NAMES)
def test_edge_blocks_match_the_reference(name: str) -> None:
    x = edge_blocks(name[2:])
    assert_bitexact(quantize(x, name), reference(x, name), x)


@pytest.mark.parametrize("name", ["mxfp8-e4m3", "mxfp6-e2m3", "mxint8", "mxfp4-e2m1"])
def test_zero_rounding_matches_the_grid_reference(name: str) -> None:
    x = torch.cat([random_blocks(64, 64, seed=2), edge_blocks(name[2:])[:, :32].repeat(1, 2)])
    assert_bitexact(quantize(x, name, "zero"), reference(x, name, "zero"), x)


@pytest.mark.parametrize("name", ["mxfp8-e5m2/16", "mxfp4-e2m1/1", "mxint8/7", "mxfp6-e3m2/64"])
def test_other_block_sizes_and_a_shorter_last_block(name: str) -> None:
    x = random_blocks(40, 70, seed=3)  # 70 = 2 * 32 + 6, = 10 * 7, 4 * 16 + 6
    assert_bitexact(quantize(x, name), reference(x, name), x)


def test_blocks_run_along_the_axis_asked_for() -> None:
    x = random_blocks(64, 48, seed=4).reshape(4, 16, 48)
    for axis in (0, 1, 2, -1, -2):
        assert_bitexact(quantize(x, "mxfp8-e4m3", axis=axis), reference(x, "mxfp8-e4m3", axis=axis), x)
    assert not torch.equal(quantize(x, "mxfp8-e4m3", axis=1), quantize(x, "mxfp8-e4m3"))
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        quantize(x, "mxfp8-e4m3", axis=3)


def test_shapes_dtypes_and_out() -> None:
    x = random_blocks(8, 40, seed=5)
    expected = reference(x, "mxfp6-e2m3")
    assert quantize(torch.empty(0, 5), "mxfp6-e2m3").shape == (0, 5)
    assert quantize(torch.tensor(3.3), "mxfp6-e2m3").item() == reference(torch.tensor([3.3]), "mxfp6-e2m3").item()
    half = quantize(x.to(torch.bfloat16), "mxfp6-e2m3")
    assert half.dtype == torch.bfloat16
    out = torch.empty_like(x)
    assert quantize(x, "mxfp6-e2m3", out=out) is out
    assert_bitexact(out, expected, x)
    assert_bitexact(quantize(x.t().contiguous().t(), "mxfp6-e2m3"), expected, x)  # non-contiguous input


def test_large_tensors_split_over_threads_at_rows() -> None:
    """Rows of 300 (a shorter last block: pieces split at rows) and one flat row of 2^20
    (whole blocks: pieces split between blocks), with 2 threads, as with one."""
    for x in (random_blocks(1 << 11, 300, seed=6), random_blocks(1 << 15, 32, seed=7).reshape(-1)):
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            both = quantize(x, "mxfp8-e4m3")
            drawn = quantize(x, "mxint8", "stochastic", torch.Generator().manual_seed(3))
        finally:
            torch.set_num_threads(threads)
        assert_bitexact(both, reference(x, "mxfp8-e4m3"), x)
        assert torch.equal(drawn, quantize(x, "mxint8", "stochastic", torch.Generator().manual_seed(3)))


# --- stochastic rounding -----------------------------------------------------------------


def neighbours(x: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The two grid values around each element (in x's units): zero rounding and the next one up."""
    down = reference(x, name, "zero").numpy().astype(np.float64)
    element = name[2:]
    grid = element_grid(element)
    _, emax = ELEMENTS[element]
    a = x.numpy().astype(np.float64)
    amax = np.abs(a).max(axis=-1, keepdims=True)
    scale = np.ldexp(1.0, (np.frexp(amax)[1] - 1 - emax).clip(-127, 127))
    index = np.searchsorted(grid, np.abs(down) / scale)
    up = np.copysign(grid[np.minimum(index + 1, len(grid) - 1)], a) * scale
    return down, np.where(np.abs(down) / scale == np.abs(a) / scale, down, up)


@pytest.mark.parametrize("name", ["mxfp8-e4m3", "mxfp8-e5m2", "mxfp4-e2m1", "mxint8"])
def test_stochastic_gives_a_neighbour_and_is_unbiased(name: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(32, 32, generator=g) * torch.logspace(-3, 1, 32).reshape(32, 1)).float()
    down, up = neighbours(x, name)
    draws = torch.stack([quantize(x, name, "stochastic", torch.Generator().manual_seed(s)) for s in range(400)])
    d = draws.numpy().astype(np.float64)
    assert np.all((d == down) | (d == up))
    # between two grid values, each element's mean over 400 draws lies within 5 standard errors
    # of x (p(1-p) <= 1/4); beyond the element's range (the FLOOR scale) it saturates
    between = up != down
    spacing = np.abs(up - down)[between]
    assert between.mean() > 0.9
    assert np.all(np.abs(d.mean(0)[between] - x.numpy()[between]) <= 5 * spacing * 0.5 / math.sqrt(400))


def test_stochastic_is_reproducible_and_seed_dependent() -> None:
    x = random_blocks(16, 64, seed=8)
    first = quantize(x, "mxfp6-e3m2", "stochastic", torch.Generator().manual_seed(1))
    again = quantize(x, "mxfp6-e3m2", "stochastic", torch.Generator().manual_seed(1))
    other = quantize(x, "mxfp6-e3m2", "stochastic", torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)


# --- the format object -------------------------------------------------------------------


def test_spellings_storage_and_errors() -> None:
    fmt = parse_format("mxfp4-e2m1/16")
    assert fmt == BlockFormat("fp4-e2m1", 16) and str(fmt) == "mxfp4-e2m1/16"
    assert str(parse_format("MXFP8-E4M3")) == "mxfp8-e4m3"
    assert parse_format("mxint8").storage_bits == 8.25 and fmt.storage_bits == 4.5
    for name in NAMES:
        element = name[2:]
        f = parse_format(name)
        assert (f.emax, f.element_max) == (ELEMENTS[element][1], element_max(element))
        assert f.width == (8 if "8" in element else 6 if "6" in element else 4)
    with pytest.raises(FormatError, match="unknown MX element 'fp5'"):
        parse_format("mxfp5")
    with pytest.raises(FormatError, match="block size must be 1..65536, got 0"):
        parse_format("mxint8/0")


def test_lsb_is_the_spacing_at_a_block_maximum() -> None:
    for name in NAMES:
        grid = element_grid(name[2:])
        emax = ELEMENTS[name[2:]][1]
        scale = 2.0 ** (1 - emax)  # a block whose largest magnitude is 3.0 = 1.5 * 2^1
        index = int(np.searchsorted(grid, 3.0 / scale))
        assert grid[index] == 3.0 / scale
        assert lsb(parse_format(name), 3.0) == (grid[index] - grid[index - 1]) * scale
        assert lsb(parse_format(name), -3.0) == lsb(parse_format(name), 3.0)


def test_quantize_count_leaves_block_formats_to_torch() -> None:
    assert quantize_count(torch.ones(64), "mxfp8-e4m3") is None


def test_the_c_interface_names_what_a_spec_lacks() -> None:
    if kernels._kernels is None:
        pytest.skip("torch backend: no C interface")
    spec = kernels.native_block_spec(parse_format("mxint8"), "nearest", None, 32)
    x, y = torch.ones(32), torch.empty(32)
    bad = dict(spec, element={k: v for k, v in spec["element"].items() if k != "scale"})
    with pytest.raises(ValueError, match="'fixed' has 7 fields, expected 8"):
        kernels._kernels.quantize(x.data_ptr(), y.data_ptr(), 32, bad, 0)
    bad["element"]["bogus"] = 1.0
    with pytest.raises(ValueError, match="'fixed' lacks 'scale'"):
        kernels._kernels.quantize(x.data_ptr(), y.data_ptr(), 32, bad, 0)
    with pytest.raises(ValueError, match="quantize only"):
        kernels._kernels.quantize_count(x.data_ptr(), y.data_ptr(), 32, spec, 0, 0.0, 0.0, 0)


def test_every_c_call_checks_its_operands_first() -> None:
    from lpcli.kernels import addresses

    x = torch.zeros(4, 8)
    assert addresses((x, 32), (None, 32)) == [x.data_ptr(), 0]
    for bad, count in ((x.t(), 32), (x.double(), 32), (x, 33), (x.to(torch.float16), 1)):
        with pytest.raises(ValueError, match="a C kernel needs a contiguous float32 CPU tensor"):
            addresses((bad, count))


@pytest.mark.parametrize("name", ["mxfp8-e4m3", "mxint8", "mxfp4-e2m1/16"])
def test_block_stats_count_what_the_reference_rounding_did(name: str) -> None:
    from lpcli.kernels import quantize_blocks

    element, _, block_text = name[2:].partition("/")
    block = int(block_text) if block_text else 32
    _, emax = ELEMENTS[element]
    grid = element_grid(element)
    reach = grid[-1] + (grid[-1] - grid[-2]) / 2
    x = torch.cat([random_blocks(64, 96, seed=9), edge_blocks(element)[:, :32].repeat(1, 3)])
    q, stats = quantize_blocks(x, name)
    assert torch.equal(q.isnan(), quantize(x, name).isnan())
    a = x.numpy().astype(np.float64)
    expected_q = reference(x, name).numpy()
    exponents, beyond = [], 0
    for start in range(0, a.shape[1], block):
        b = a[:, start : start + block]
        amax = np.where(np.isfinite(b), np.abs(b), 0.0).max(axis=1, keepdims=True)
        e = np.where(amax > 0, np.frexp(amax)[1] - 1 - emax, -127).clip(-127, 127)
        beyond += int(np.sum(np.abs(b) / np.ldexp(1.0, e) > reach))
        exponents += list(e[amax[:, 0] > 0, 0])
    assert stats.elements == x.numel()
    assert stats.nonzero == int(np.count_nonzero(a))  # NaN counts as non-zero, as torch does
    assert stats.nonzero_rounded == int(np.count_nonzero(expected_q))
    assert stats.beyond == beyond
    assert (stats.emin, stats.emax) == (min(exponents), max(exponents))
    empty = quantize_blocks(torch.zeros(3, 40), name)[1]
    assert (empty.nonzero, empty.beyond, empty.emin, empty.emax) == (0, 0, None, None)


@pytest.mark.parametrize("axis", [-1, 0])
def test_block_profiles_count_where_values_sit_in_their_blocks(axis: int) -> None:
    """lpcli.stats.BlockProfile against NumPy: r = |x| / 2^floor(log2 blockmax) per block of
    32 along the axis (frexp for the exponents), binned per binade under the top."""
    from lpcli.stats import BELOW, TOPS, BlockProfile

    x = random_blocks(50, 70, seed=10)
    x[3, 5], x[7, 9], x[11, 13] = 0.0, math.inf, math.nan
    profile = BlockProfile()
    profile.add(x, axis)
    a = np.moveaxis(x.numpy().astype(np.float64), axis, -1)
    below, top, values = np.zeros(BELOW + 1, dtype=int), np.zeros(len(TOPS), dtype=int), 0
    for start in range(0, a.shape[1], 32):
        b = np.abs(a[:, start : start + 32])
        live = (b > 0) & np.isfinite(b)
        blockmax = np.where(live, b, 0.0).max(axis=1, keepdims=True)
        scale = np.ldexp(1.0, np.maximum(np.frexp(blockmax)[1] - 1, -127))
        r = (b / scale)[live]
        values += r.size
        np.add.at(below, np.minimum(-np.floor(np.log2(r)), BELOW).astype(int), 1)
        top += np.array([(r >= t).sum() for t in TOPS])
    result = profile.result()
    assert result["values"] == values and result["below"] == below.tolist()
    assert list(result["top"].values()) == top.tolist() and result["block"] == 32


def test_stats_files_check_their_block_profiles() -> None:
    from lpcli.errors import InputError
    from lpcli.recipe import load_recipe
    from lpcli.stats import analyze, validate_stats

    doc = analyze(load_recipe("digits-cnn"), steps=1)
    assert set(doc["blocks"]["5"]) == {"input", "weight", "error"}
    validate_stats(doc, "stats.yaml")
    doc["blocks"]["5"]["input"]["below"][0] += 1
    with pytest.raises(InputError) as info:
        validate_stats(doc, "stats.yaml")
    assert info.value.field == "blocks.5.input.below"
