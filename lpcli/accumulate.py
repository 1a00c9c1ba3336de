"""Matrix products summed in a narrow accumulator: the paper's third obstacle.

For each output element of ``(M, K) @ (K, N)`` (NUMERICS, "Accumulators"):

* the products of the operands are exact (float32 operands: a product has at most 48
  significant bits, exact in float64);
* they are summed in order over ``k`` in chunks of ``chunk`` terms: a chunk's first term is
  taken as it is and each following addition is computed exactly and rounded once to the
  accumulator format;
* the chunk sums are then added in order the same way (the first as it is);
* the result is the accumulator's content: a sum of one term is rounded to the format too.

``chunk = K`` is one sequential sum; ``chunk = 1`` makes every term its own chunk, which
is the same sum. Rounding is to nearest, ties to even. Fixed point saturates at its range
(counted); a float format rounds to nearest even with IEEE overflow to inf, or saturates
at its largest value for the ``fn`` formats (counted as overflow either way). A swamped
addition is one whose result equals the running sum although the addend was not zero.

Exact addition in float64: ``hi + lo = s + p`` exactly (Knuth's TwoSum), and rounding
``hi`` to the format gives the correctly rounded ``s + p`` except where ``hi`` is exactly a
midpoint between two neighbours of the format and ``lo`` is not zero: then ``lo``'s sign
decides. (A midpoint of the format is a float64 number; ``hi`` is the float64 nearest to
the exact sum, so no midpoint lies strictly between the two.) Two kernels do exactly that,
with the same results: C on the CPU (``lpcli/_kernels.c``, float32 operands) and torch
elsewhere; ``tests/test_accumulate.py`` checks both bit for bit against a literal reference
in exact rational arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import formats
from .formats import FixedPoint, FloatFormat, Format


@dataclass(frozen=True)
class AccumulationCounts:
    """What one product's accumulations did: additions made, additions that changed
    nothing (swamped) and roundings that hit the format's range (saturated or overflowed)."""

    additions: int
    swamped: int
    saturated: int


def matmul(a: torch.Tensor, b: torch.Tensor, fmt: Format, chunk: int | None = None) -> torch.Tensor:
    """``a @ b`` with every sum accumulated in ``fmt`` (see the module docstring)."""
    return matmul_counts(a, b, fmt, chunk)[0]


def matmul_counts(a: torch.Tensor, b: torch.Tensor, fmt: Format,
                  chunk: int | None = None) -> tuple[torch.Tensor, AccumulationCounts]:
    """:func:`matmul` and its :class:`AccumulationCounts`. ``a`` is ``(M, K)``, ``b`` is
    ``(K, N)``, both float32 (or narrower: they are read as float64); ``chunk`` defaults to
    ``K`` (one sequential sum). The result is float32 (every value of a fixed-point format up
    to 24 bits or of a float format with at most 8 exponent and 23 mantissa bits is one)."""
    if not isinstance(fmt, (FixedPoint, FloatFormat)):
        raise ValueError(f"accumulator format must be fixed point or a float format, got {fmt}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"need (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[1]
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if k == 0:
        return torch.zeros(m, n, dtype=torch.float32, device=a.device), AccumulationCounts(0, 0, 0)
    chunk = k if chunk is None else chunk
    native = _matmul_native(a, b, fmt, chunk)
    if native is not None:
        return native
    return _matmul_torch(a, b, fmt, chunk)


def _matmul_native(a: torch.Tensor, b: torch.Tensor, fmt: Format,
                   chunk: int) -> tuple[torch.Tensor, AccumulationCounts] | None:
    """The C kernel, for float32 CPU operands (None elsewhere, or without the C kernels)."""
    kernels = formats._kernels
    if kernels is None or not (a.is_cpu and b.is_cpu and a.dtype == b.dtype == torch.float32):
        return None
    a, b = a.contiguous(), b.contiguous()
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty(m, n, dtype=torch.float32)
    is_float = isinstance(fmt, FloatFormat)
    swamped, saturated = kernels.accumulate(
        a.data_ptr(), b.data_ptr(), out.data_ptr(), m, k, n, chunk, int(is_float),
        0 if is_float else fmt.frac, fmt.man if is_float else 0, fmt.emin if is_float else 0,
        float(fmt.min_value), float(fmt.max_value), int(is_float and not fmt.finite))
    return out, AccumulationCounts(m * n * (k - 1), swamped, saturated)


def _matmul_torch(a: torch.Tensor, b: torch.Tensor, fmt: Format,
                  chunk: int) -> tuple[torch.Tensor, AccumulationCounts]:
    (m, k), n = a.shape, b.shape[1]
    a64, b64 = a.double(), b.double()
    counter = _Counter()
    chunks = math.ceil(k / chunk)
    sums = torch.empty(m, n, chunks, dtype=torch.float64, device=a.device)
    for t in range(chunk):  # the t-th term of every chunk at once
        ks = torch.arange(t, k, chunk, device=a.device)[: chunks]
        live = len(ks)
        products = a64[:, ks].unsqueeze(1) * b64[ks, :].t().unsqueeze(0)  # (M, N, live), exact
        if t == 0:
            sums[:, :, :live] = products
        else:
            sums[:, :, :live] = _add(sums[:, :, :live], products, fmt, counter)
    total = sums[:, :, 0]
    for j in range(1, chunks):
        total = _add(total, sums[:, :, j], fmt, counter)
    if k == 1:
        total = _add(torch.zeros_like(total), total, fmt, _Counter())
    return total.float(), AccumulationCounts(counter.additions, counter.swamped, counter.saturated)


class _Counter:
    def __init__(self) -> None:
        self.additions = self.swamped = self.saturated = 0


def _add(s: torch.Tensor, p: torch.Tensor, fmt: Format, counter: _Counter) -> torch.Tensor:
    """``s + p`` computed exactly and rounded once to ``fmt`` (both float64 tensors)."""
    hi = s + p
    virtual = hi - s
    lo = (s - (hi - virtual)) + (p - virtual)  # TwoSum: hi + lo == s + p exactly
    q, clipped = _round(hi, lo, fmt)
    counter.additions += p.numel()
    counter.swamped += int(((q == s) & (p != 0)).sum())
    counter.saturated += int(clipped.sum())
    return q


def _round(hi: torch.Tensor, lo: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``hi + lo`` rounded to nearest even on ``fmt``'s grid, and where the range clipped it."""
    if isinstance(fmt, FixedPoint):
        step = torch.full_like(hi, math.ldexp(1.0, -fmt.frac))
    else:
        exponent = torch.frexp(hi).exponent.to(torch.float64) - 1  # |hi| in [2^e, 2^(e+1))
        exponent = exponent.clamp(min=fmt.emin)
        step = torch.exp2(exponent - fmt.man)
    y = hi / step  # exact: a power-of-two scaling
    low = torch.floor(y)
    r = torch.round(y)  # ties to even
    tie = (y - low) == 0.5
    r = torch.where(tie & (lo > 0), low + 1, torch.where(tie & (lo < 0), low, r))
    q = r * step
    over = ((q > fmt.max_value) | (q < fmt.min_value)) & torch.isfinite(hi)  # inf + p: no rounding
    if isinstance(fmt, FloatFormat) and not fmt.finite:
        q = torch.where(over, torch.copysign(torch.full_like(q, math.inf), q), q)
    else:
        q = q.clamp(fmt.min_value, fmt.max_value)
    return q, over


@dataclass(frozen=True)
class GemmFormats:
    """The accumulator of each of a layer's three GEMMs: ``forward`` (the output, reducing
    over the fan-in), ``input_grad`` (the error passed back, reducing over the fan-out) and
    ``weight_grad`` (reducing over the batch). None: that GEMM sums in float32 (torch's)."""

    forward: Format | None = None
    input_grad: Format | None = None
    weight_grad: Format | None = None


class _Linear(torch.autograd.Function):
    """``F.linear`` with each GEMM summed in its accumulator. The bias is the first term of
    each output's sum (an accumulator preloaded with it), so its gradient is the first term
    of the weight-gradient GEMM's: the error summed over the batch in that accumulator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, formats: GemmFormats,
                chunk: int | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.formats, ctx.chunk, ctx.has_bias = formats, chunk, bias is not None
        rows = x.reshape(-1, x.shape[-1])
        a, b = _with_bias(rows, weight.t(), bias)
        y = _gemm(a, b, formats.forward, chunk)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        formats, chunk = ctx.formats, ctx.chunk
        dy = grad.reshape(-1, weight.shape[0])
        rows = x.reshape(-1, x.shape[-1])
        dx = _gemm(dy, weight, formats.input_grad, chunk).reshape(x.shape)
        if ctx.has_bias:
            rows = _ones_first(rows)
        dw = _gemm(dy.t().contiguous(), rows, formats.weight_grad, chunk)
        db = dw[:, 0] if ctx.has_bias else None
        return dx, dw[:, 1:] if ctx.has_bias else dw, db, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, formats: GemmFormats,
           chunk: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its three GEMMs accumulated in ``formats``."""
    return _Linear.apply(x, weight, bias, formats, chunk)


def _with_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``a @ b + bias`` as one product whose sums start with the bias: a column of ones
    before ``a``'s columns, the bias as ``b``'s first row."""
    if bias is None:
        return a, b
    return _ones_first(a), torch.cat([bias.reshape(1, -1).to(b.dtype), b], dim=0)


def _ones_first(a: torch.Tensor) -> torch.Tensor:
    """``a`` with a column of ones before its columns: the bias's factor."""
    return torch.cat([torch.ones(len(a), 1, dtype=a.dtype, device=a.device), a], dim=1)


def _gemm(a: torch.Tensor, b: torch.Tensor, fmt: Format | None, chunk: int | None) -> torch.Tensor:
    if fmt is None:
        return a @ b
    return matmul(a.detach(), b.detach(), fmt, chunk)
