"""lpcli.accumulate against a literal reference of NUMERICS' accumulator semantics, written
in exact rational arithmetic (fractions.Fraction): every product exact, every addition
exact and then rounded once, to nearest even, by the format's definition."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lpcli.accumulate import (
    AccumulationCounts,
    GemmFormats,
    GemmTally,
    _matmul_native,
    _matmul_torch,
    conv2d,
    linear,
    matmul,
    matmul_counts,
)
from lpcli.formats import FixedPoint, FloatFormat, parse_format
from lpcli.kernels import kernel_backend

FORMATS = {
    "fx12.6": FixedPoint(12, 6),
    "fx16.10": FixedPoint(16, 10),
    "fx8.2": FixedPoint(8, 2),
    "fp16": FloatFormat(5, 10),          # IEEE: overflow to inf
    "bf16": FloatFormat(8, 7),
    "e5m7": FloatFormat(5, 7),
    "e4m3fn": FloatFormat(4, 3, finite=True),  # saturating
}


def _round(x: Fraction, fmt) -> tuple[Fraction | float, bool]:
    """x rounded to nearest even on fmt's grid; (value, whether the range clipped it)."""
    if isinstance(fmt, FixedPoint):
        step = Fraction(2) ** -fmt.frac
    else:
        e = fmt.emin
        if x != 0:
            mag = abs(x)
            e = mag.numerator.bit_length() - mag.denominator.bit_length()
            while Fraction(2) ** e > mag:
                e -= 1
            while Fraction(2) ** (e + 1) <= mag:
                e += 1
            e = max(e, fmt.emin)
        step = Fraction(2) ** (e - fmt.man)
    y = x / step
    low = math.floor(y)
    rest = y - low
    r = low + 1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and low % 2) else low
    q = r * step
    top, bottom = Fraction(fmt.max_value), Fraction(fmt.min_value)
    if bottom <= q <= top:
        return q, False
    if isinstance(fmt, FloatFormat) and not fmt.finite:
        return (math.inf if q > 0 else -math.inf), True
    return (top if q > 0 else bottom), True


def _add(s, p, fmt, counts):
    counts["additions"] += 1
    if isinstance(s, float):  # an accumulator already at inf stays there
        q = s
    else:
        q, clipped = _round(s + p, fmt)
        counts["saturated"] += clipped
    counts["swamped"] += q == s and p != 0
    return q


def literal(a: torch.Tensor, b: torch.Tensor, fmt, chunk: int) -> tuple[list[list[float]], dict[str, int]]:
    counts = {"additions": 0, "swamped": 0, "saturated": 0}
    m, k = a.shape
    out = []
    for i in range(m):
        row = []
        for j in range(b.shape[1]):
            terms = [Fraction(float(a[i, t])) * Fraction(float(b[t, j])) for t in range(k)]
            sums = []
            for start in range(0, k, chunk):
                s = terms[start]
                for p in terms[start + 1:start + chunk]:
                    s = _add(s, p, fmt, counts)
                sums.append(s)
            total = sums[0]
            for s in sums[1:]:
                total = _add(total, s, fmt, counts)
            if k == 1:
                total = _round(total, fmt)[0]
            row.append(float(total))
        out.append(row)
    return out, counts


def _kernels(a, b, fmt, chunk):
    """Each kernel's (result, counts): the public function (C where it runs) and torch's."""
    out = {"matmul_counts": matmul_counts(a, b, fmt, chunk), "torch": _matmul_torch(a, b, fmt, chunk)}
    native = _matmul_native(a, b, fmt, chunk)
    if kernel_backend() == "native":
        assert native is not None
        out["native"] = native
    return out


def _check(a, b, fmt, chunk):
    expected, counts = literal(a, b, fmt, chunk)
    for name, (got, got_counts) in _kernels(a, b, fmt, chunk).items():
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.tensor(expected, dtype=torch.float32)), (name, got, expected)
        assert got_counts == AccumulationCounts(**counts), name
    return got_counts


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("chunk", [1, 4, 17])
@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])
def test_random_products_match_the_literal_sums(name, chunk, scale):
    g = torch.Generator().manual_seed(hash((name, chunk, scale)) % 2**31)
    a = (torch.randn(3, 17, generator=g) * scale).float()
    b = (torch.randn(17, 4, generator=g) * scale).float()
    _check(a, b, FORMATS[name], chunk)


@pytest.mark.parametrize("chunk", [1, 4, 9])
def test_ties_go_to_even(chunk):
    fmt = FixedPoint(8, 2)  # step 1/4
    a = torch.tensor([[1.0, 0.125] + [0.0] * 7, [1.25, 0.125] + [0.0] * 7])
    b = torch.ones(9, 1)
    got = _check(a, b, fmt, chunk)
    assert matmul(a, b, fmt, chunk).flatten().tolist() == [1.0, 1.5]  # 1.125 -> 1.0, 1.375 -> 1.5
    assert got.additions == 16


def test_a_midpoint_reached_only_by_float64_rounding_is_resolved_by_the_low_part():
    """1024 + 2^-13 + 2^-14 (1 - 2^-46): float64 rounds it to the midpoint 1024 + 3 * 2^-14
    of the fp32 grid, whose even neighbour is 1024 + 2^-12; the exact sum is below it."""
    fp32 = FloatFormat(8, 23)
    a = torch.tensor([[1024 + 2.0**-13, 2.0**-14 * (1 + 2.0**-23)]], dtype=torch.float32)
    b = torch.tensor([[1.0], [1 - 2.0**-23]], dtype=torch.float32)
    _check(a, b, fp32, 2)
    assert matmul(a, b, fp32).item() == 1024 + 2.0**-13


@pytest.mark.parametrize("name", ["fx8.2", "fp16", "e4m3fn"])
@pytest.mark.parametrize("chunk", [1, 4, 12])
def test_overflow_saturates_or_goes_to_inf(name, chunk):
    fmt = FORMATS[name]
    a = torch.full((2, 12), 1.0)
    a[1] = -1.0
    b = torch.full((12, 1), float(fmt.max_value) / 5)
    counts = _check(a, b, fmt, chunk)
    assert counts.saturated > 0
    result = matmul(a, b, fmt, chunk).flatten()
    if name == "fp16":
        assert result.tolist() == [math.inf, -math.inf]
    else:
        assert result.tolist() == [fmt.max_value, fmt.min_value]


@pytest.mark.parametrize("chunk", [1, 4, 32, 64])
def test_addends_far_below_the_running_sum_are_swamped(chunk):
    """bf16: from 256 on the step is 2, and adding 0.5 changes nothing; chunks of 32 keep
    the small terms together until they are large enough to count."""
    bf16 = FORMATS["bf16"]
    a = torch.tensor([[256.0] + [0.5] * 63])
    b = torch.ones(64, 1)
    counts = _check(a, b, bf16, chunk)
    value = matmul(a, b, bf16, chunk).item()
    if chunk in (1, 64):  # one sequential sum: every 0.5 swamped
        assert value == 256.0 and counts.swamped == 63
    else:
        assert value > 256.0 and counts.swamped < 63


def test_a_chunk_longer_than_the_sum_is_one_sequential_sum():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g)
    fmt = FORMATS["e5m7"]
    expected = matmul_counts(a, b, fmt, 5)
    # float32 operands: the C kernel where it runs; float64 ones: the torch kernel
    for got in (matmul_counts(a, b, fmt, 9), matmul_counts(a.double(), b.double(), fmt, 9)):
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_one_term_is_rounded_and_an_empty_sum_is_zero():
    fmt = parse_format("fx8.2")
    assert matmul(torch.tensor([[0.3]]), torch.tensor([[1.0]]), fmt).item() == 0.25
    assert _matmul_torch(torch.tensor([[0.3]]), torch.tensor([[1.0]]), fmt, 1)[0].item() == 0.25
    assert matmul(torch.zeros(2, 0), torch.zeros(0, 3), fmt).tolist() == [[0.0] * 3] * 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="chunk"):
        matmul(torch.ones(2, 3), torch.ones(3, 2), FixedPoint(8, 2), chunk=0)
    with pytest.raises(ValueError, match=r"\(M, K\) @ \(K, N\)"):
        matmul(torch.ones(2, 3), torch.ones(2, 2), FixedPoint(8, 2))
    with pytest.raises(ValueError, match="accumulator format"):
        matmul(torch.ones(2, 3), torch.ones(3, 2), parse_format("fp32"))


def test_the_kernels_agree_on_larger_products_with_infinities_and_nan():
    """The C and torch kernels on a product too large for the literal reference, with
    operands that make some sums inf or NaN on the way (IEEE and saturating formats)."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(9, 300, generator=g) * 30
    b = torch.randn(300, 7, generator=g) * 30
    a[2, 5], a[4, 0], b[7, 3] = math.inf, -math.inf, math.nan
    for fmt in (FORMATS["fp16"], FORMATS["e4m3fn"], FORMATS["bf16"], FixedPoint(24, 4)):
        for chunk in (1, 32, 300):
            results = list(_kernels(a, b, fmt, chunk).values())
            for got, counts in results[1:]:
                assert torch.equal(got.nan_to_num(7.0), results[0][0].nan_to_num(7.0))
                assert torch.equal(got.isnan(), results[0][0].isnan()) and counts == results[0][1]


@pytest.mark.parametrize("chunk", [3, 32])
def test_midpoints_in_the_middle_of_a_sum_are_resolved_by_the_low_part(chunk):
    """The third and later terms of a chunk (the C kernel's bulk) against the literal sums:
    a bf16 sum 2^-60 meets 1 + 2^-8, just above the midpoint 1 + 2^-8 by float64 rounding
    (up to 1 + 2^-7); 1 + 2^-7 meets 2^-8 (1 - 2^-46), just below a midpoint (stays); and
    an fx8.2 chunk starting -1/8 + 2^-60, rounded to +0 (by acc_add and by the torch kernel)."""
    tail = 1 - 2.0**-23
    a = torch.zeros(9, 40)
    a[0, :3] = torch.tensor([2.0**-60, 0.0, 1 + 2.0**-8])
    a[5, :3] = torch.tensor([1.0, 2.0**-7, 2.0**-8 * (1 + 2.0**-23)])
    a[8, :3] = torch.tensor([-1 / 8, 2.0**-60, -0.0])
    a[8, 3:] = -0.0  # products -0 keep a -0 sum -0, and +0 a +0
    b = torch.ones(40, 3)
    b[2, 1] = tail
    for fmt in (FORMATS["bf16"], FORMATS["fx8.2"]):
        _check(a, b, fmt, chunk)
        results = list(_kernels(a, b, fmt, chunk).values())
        for got, counts in results[1:]:
            assert torch.equal(got.view(torch.int32), results[0][0].view(torch.int32)) and counts == results[0][1]
    assert matmul(a, b, FORMATS["bf16"], chunk)[[0, 5], [0, 1]].tolist() == [1 + 2.0**-7, 1 + 2.0**-7]


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("chunk", [1, 3, 32])
def test_the_kernels_agree_bit_for_bit_on_signed_zeros_and_ties(name, chunk):
    """The C and torch kernels, bit for bit (a zero's sign included) and in their counts, on
    products with signed zero terms and few-bit values (many ties), sized for the C kernel's
    tiles: rows in eights and then one by one, columns in fours with a remainder."""
    g = torch.Generator().manual_seed(hash((name, chunk)) % 2**31)
    fmt = FORMATS[name]
    scale = float(fmt.max_value) / 64
    a = torch.randint(-8, 9, (19, 40), generator=g).float() / 8
    b = torch.randint(-8, 9, (40, 11), generator=g).float() * (scale / 8)
    a[torch.rand(a.shape, generator=g) < 0.3] = -0.0
    b[torch.rand(b.shape, generator=g) < 0.3] = 0.0
    a[3] = a[18] = 0.0
    b[:, 3] = -b[:, 3].abs()  # with rows 3 and 18: products -0 only, sums that stay -0
    results = list(_kernels(a, b, fmt, chunk).values())
    for got, counts in results[1:]:
        assert torch.equal(got.view(torch.int32), results[0][0].view(torch.int32)) and counts == results[0][1]


def _dyadic(shape, g, scale=16):
    """Small multiples of 1/16: every product and sum below is exact in float32 and in fx24.8."""
    return torch.randint(-scale, scale + 1, shape, generator=g).float() / 16


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_exact_accumulators_is_torchs_linear(bias):
    """Where no sum needs rounding, the three GEMMs give torch's forward and gradients."""
    g = torch.Generator().manual_seed(5)
    x = _dyadic((2, 3, 6), g).requires_grad_()
    w = _dyadic((4, 6), g).requires_grad_()
    b = _dyadic((4,), g).requires_grad_() if bias else None
    grad = _dyadic((2, 3, 4), g)
    wide = FixedPoint(24, 8)
    y = linear(x, w, b, GemmFormats(wide, wide, wide), chunk=4)
    got = torch.autograd.grad(y, [x, w] + ([b] if bias else []), grad)
    y0 = torch.nn.functional.linear(x, w, b)
    expected = torch.autograd.grad(y0, [x, w] + ([b] if bias else []), grad)
    assert torch.equal(y, y0)
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e)


def test_linear_reduces_each_gemm_over_its_own_dimension():
    """A narrow accumulator per GEMM, against the literal sums: forward over the fan-in
    (bias first), input gradient over the fan-out, weight gradient over the batch."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 6, generator=g) * 3).requires_grad_()
    w = (torch.randn(4, 6, generator=g) * 3).requires_grad_()
    b = (torch.randn(4, generator=g) * 3).requires_grad_()
    grad = torch.randn(5, 4, generator=g) * 3
    fmts = GemmFormats(FloatFormat(4, 3), FixedPoint(10, 4), FloatFormat(5, 2))
    y = linear(x, w, b, fmts, chunk=2)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], grad)
    ones = torch.ones(5, 1)
    assert torch.equal(y, torch.tensor(literal(torch.cat([ones, x.detach()], 1),
                                               torch.cat([b.detach()[None], w.detach().t()]), fmts.forward, 2)[0]))
    assert torch.equal(dx, torch.tensor(literal(grad, w.detach(), fmts.input_grad, 2)[0]))
    both = torch.tensor(literal(grad.t(), torch.cat([ones, x.detach()], 1), fmts.weight_grad, 2)[0])
    assert torch.equal(db, both[:, 0]) and torch.equal(dw, both[:, 1:])
    # Without an accumulator for a GEMM it is torch's.
    y2 = linear(x, w, b, GemmFormats(forward=fmts.forward), chunk=2)
    dx2 = torch.autograd.grad(y2, x, grad)[0]
    assert torch.equal(dx2, grad @ w.detach())


GEOMETRIES = [  # stride, padding, dilation, groups, input (H, W), kernel
    (1, 0, 1, 1, (6, 7), (3, 3)),
    (2, 1, 1, 1, (7, 8), (3, 3)),
    (2, (2, 1), 2, 2, (9, 8), (3, 2)),
    (1, "same", 2, 1, (6, 6), (3, 3)),
    (1, "same", 1, 1, (5, 6), (4, 2)),
    (1, "valid", 1, 1, (5, 5), (2, 2)),
    (3, 3, 1, 1, (5, 6), (2, 2)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_with_exact_accumulators_is_torchs_conv2d(geometry, bias):
    """Where no sum needs rounding, forward, input, weight and bias gradients are torch's
    for strides, paddings (the asymmetric "same" of an even kernel too), dilation, groups."""
    stride, padding, dilation, groups, size, kernel = geometry
    g = torch.Generator().manual_seed(7)
    x = _dyadic((2, 4, *size), g).requires_grad_()
    w = _dyadic((6, 4 // groups, *kernel), g).requires_grad_()
    b = _dyadic((6,), g).requires_grad_() if bias else None
    wide = FixedPoint(24, 8)
    y = conv2d(x, w, b, stride, padding, dilation, groups, GemmFormats(wide, wide, wide), chunk=5)
    y0 = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
    grad = _dyadic(y0.shape, g)
    wanted = [x, w] + ([b] if bias else [])
    assert torch.equal(y, y0)
    for got, expected in zip(torch.autograd.grad(y, wanted, grad), torch.autograd.grad(y0, wanted, grad),
                             strict=True):
        assert torch.equal(got, expected)


def _padded(x, top, left, r, c):
    """x's element at (r, c) of its zero-padded plane, padded by top and left."""
    r, c = r - top, c - left
    return float(x[r, c]) if 0 <= r < x.shape[0] and 0 <= c < x.shape[1] else 0.0


def test_conv2d_sums_each_gemm_in_the_documented_order():
    """A narrow accumulator per GEMM against literal sums whose terms are listed by loops
    from the definitions: forward over (channel, kernel row, kernel column) after the bias;
    weight gradient over (example, output row, output column), the bias's as a first column;
    input gradient over (output channel, kernel taps from last to first), a tap off the
    error's strided positions a zero product."""
    g = torch.Generator().manual_seed(8)
    stride, pad, dil = 2, 1, 1
    x = (torch.randn(2, 2, 5, 5, generator=g) * 3).requires_grad_()
    w = (torch.randn(3, 2, 3, 3, generator=g) * 3).requires_grad_()
    b = (torch.randn(3, generator=g) * 3).requires_grad_()
    fmts = GemmFormats(FloatFormat(4, 3), FixedPoint(10, 3), FloatFormat(5, 2))
    chunk = 4
    y = conv2d(x, w, b, stride, pad, dil, 1, fmts, chunk)
    grad = torch.randn(y.shape, generator=g) * 3
    dx, dw, db = torch.autograd.grad(y, [x, w, b], grad)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    out_h, out_w = y.shape[2:]
    # forward: rows (example, output row, output column), columns (1, channel, kernel row, kernel column)
    a_rows = [[1.0] + [_padded(xd[n, c], pad, pad, i * stride + ki, j * stride + kj)
                       for c in range(2) for ki in range(3) for kj in range(3)]
              for n in range(2) for i in range(out_h) for j in range(out_w)]
    b_cols = [[float(bd[o])] + [float(wd[o, c, ki, kj]) for c in range(2) for ki in range(3) for kj in range(3)]
              for o in range(3)]
    forward = literal(torch.tensor(a_rows), torch.tensor(b_cols).t(), fmts.forward, chunk)[0]
    assert torch.equal(y.permute(0, 2, 3, 1).reshape(-1, 3), torch.tensor(forward))
    # weight gradient: one row per output channel, the same columns as the forward's rows
    dy_rows = [[float(grad[n, o, i, j]) for n in range(2) for i in range(out_h) for j in range(out_w)]
               for o in range(3)]
    both = torch.tensor(literal(torch.tensor(dy_rows), torch.tensor(a_rows), fmts.weight_grad, chunk)[0])
    assert torch.equal(db, both[:, 0]) and torch.equal(dw, both[:, 1:].reshape(3, 2, 3, 3))
    # input gradient: input element (n, c, r, s) sums over o, then kernel taps ki, kj from the last
    def error_at(n, o, r, s, ki, kj):
        top, left = r + pad - ki * dil, s + pad - kj * dil
        if top % stride or left % stride:
            return 0.0
        return _padded(grad[n, o], 0, 0, top // stride, left // stride)
    e_rows = [[error_at(n, o, r, s, ki, kj) for o in range(3) for ki in reversed(range(3)) for kj in reversed(range(3))]
              for n in range(2) for r in range(5) for s in range(5)]
    w_cols = [[float(wd[o, c, ki, kj]) for o in range(3) for ki in reversed(range(3)) for kj in reversed(range(3))]
              for c in range(2)]
    expected = literal(torch.tensor(e_rows), torch.tensor(w_cols).t(), fmts.input_grad, chunk)[0]
    assert torch.equal(dx.permute(0, 2, 3, 1).reshape(-1, 2), torch.tensor(expected))


def test_conv2d_of_a_frozen_layer_keeps_no_columns_and_still_passes_the_error_back():
    """Without a weight or bias gradient the forward's columns are not kept (they are the
    weight gradient's operand alone); the input gradient is torch's all the same."""
    g = torch.Generator().manual_seed(4)
    x = _dyadic((2, 3, 6, 6), g).requires_grad_()
    w, b = _dyadic((4, 3, 3, 3), g), _dyadic((4,), g)
    wide = FixedPoint(24, 8)
    y = conv2d(x, w, b, 1, 1, formats=GemmFormats(wide, wide, wide), chunk=4)
    assert len(y.grad_fn.saved_tensors) == 2  # x and the weight
    grad = _dyadic(y.shape, g)
    y.backward(grad)
    x0 = x.detach().clone().requires_grad_()
    torch.nn.functional.conv2d(x0, w, b, 1, 1).backward(grad)
    assert torch.equal(x.grad, x0.grad)
    trained = conv2d(x, w.clone().requires_grad_(), b, 1, 1, formats=GemmFormats(wide, wide, wide), chunk=4)
    assert len(trained.grad_fn.saved_tensors) == 3  # and the columns


def test_conv2d_refuses_what_it_cannot_compute():
    x, w = torch.zeros(1, 4, 5, 5), torch.zeros(2, 3, 3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(x, w, formats=GemmFormats(FixedPoint(16, 8)))
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, torch.zeros(2, 4, 3, 3), padding="full")
    with pytest.raises(ValueError, match="4-d"):
        conv2d(x[0], torch.zeros(2, 4, 3, 3))


def test_the_tally_counts_every_gemm_and_the_variance_each_kept():
    """The tally's counts are the kernels' per GEMM, and its retention is the variance of
    the accumulated sums over that of the exact ones (computed here from the products)."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(40, 64, generator=g)).requires_grad_()
    w = (torch.randn(8, 64, generator=g)).requires_grad_()
    fmts = GemmFormats(FloatFormat(5, 3), None, FixedPoint(8, 3))
    tally = GemmTally()
    y = linear(x, w, None, fmts, chunk=64, tally=tally)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    forward, counts = matmul_counts(x.detach(), w.detach().t(), fmts.forward, 64)
    exact = x.detach().double() @ w.detach().double().t()
    doc = tally.as_dict()
    assert set(doc) == {"forward", "weight_grad"}  # no accumulator: no tally
    assert doc["forward"]["additions"] == 40 * 8 * 63 == counts.additions
    assert (doc["forward"]["swamped"], doc["forward"]["saturated"]) == (counts.swamped, counts.saturated)
    assert counts.swamped > 0
    assert doc["forward"]["retention"] == pytest.approx(float(forward.double().var() / exact.var()), rel=1e-9)
    assert doc["forward"]["retention"] != 1.0
    dw, grad_counts = matmul_counts(grad.t().contiguous(), x.detach(), fmts.weight_grad, 64)
    assert doc["weight_grad"]["saturated"] == grad_counts.saturated > 0
    exact_dw = grad.double().t() @ x.detach().double()
    assert doc["weight_grad"]["retention"] == pytest.approx(float(dw.double().var() / exact_dw.var()), rel=1e-9)


def test_the_tally_leaves_sums_that_overflowed_to_inf_out_of_the_retention():
    """An IEEE-style accumulator overflows to inf: those sums (and their exact twins) are
    left out of both variances; the others count."""
    a = torch.tensor([[1.0, 1.0], [200.0, 200.0], [3.0, -1.0], [-2.0, 0.5]])
    b = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, 0.25]])
    fmt = FloatFormat(4, 3)  # largest finite 240: 200 + 200 overflows
    q, counts = matmul_counts(a, b, fmt, None)
    finite = torch.isfinite(q)
    assert not bool(finite.all()) and counts.saturated > 0
    tally = GemmTally()
    tally.add("forward", counts, q, a, b)
    exact = (a.double() @ b.double())[finite]
    assert tally.retention("forward") == pytest.approx(float(q.double()[finite].var() / exact.var()), rel=1e-12)
