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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import kernels
from .formats import BlockFormat, FixedPoint, FloatFormat, Format, Rounding


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
    chunk = k if chunk is None else min(chunk, k)  # a chunk of K or more terms: one sequential sum
    native = _matmul_native(a, b, fmt, chunk)
    if native is not None:
        return native
    return _matmul_torch(a, b, fmt, chunk)


def _matmul_native(a: torch.Tensor, b: torch.Tensor, fmt: Format,
                   chunk: int) -> tuple[torch.Tensor, AccumulationCounts] | None:
    """The C kernel, for float32 CPU operands (None elsewhere, or without the C kernels)."""
    native = kernels._kernels
    if native is None or not (a.is_cpu and b.is_cpu and a.dtype == b.dtype == torch.float32):
        return None
    a, b = a.contiguous(), b.contiguous()
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty(m, n, dtype=torch.float32)
    is_float = isinstance(fmt, FloatFormat)
    swamped, saturated = native.accumulate(
        *kernels.addresses((a, m * k), (b, k * n), (out, m * n)), m, k, n, chunk, int(is_float),
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


# A planned layer's three GEMMs: the output (reducing over the fan-in), the error passed back
# to the input (over the fan-out) and the weight gradient (over the batch, and positions).
GEMMS = ("forward", "input_grad", "weight_grad")


# The roles whose tensors are GEMM operands, the ones a block (MX) format may take: it
# applies per use, in the GEMMs (OperandFormats).
BLOCK_ROLES = ("input", "weight", "error")
# The tensor roles each GEMM multiplies, (a, b) of a @ b: a's rows are summed over its last
# dimension, b's columns over its first.
OPERAND_ROLES = {"forward": ("input", "weight"), "input_grad": ("error", "weight"), "weight_grad": ("error", "input")}


@dataclass(frozen=True)
class OperandFormats:
    """Block (MX) formats of a layer's GEMM operands, applied per use (NUMERICS, "MX block
    formats"): each GEMM quantizes its operands as it consumes them, the blocks along its
    reduction dimension (a's rows, b's columns), so a tensor that feeds two GEMMs (the
    weight: forward and input gradient; the input: forward and weight gradient; the error:
    both backward GEMMs) is quantized once for each, along that GEMM's sums. A bias (the
    forward sums' first term) enters as it is. None: the operand enters as it is."""

    input: BlockFormat | None = None
    weight: BlockFormat | None = None
    error: BlockFormat | None = None

    def __bool__(self) -> bool:
        return any(f is not None for f in (self.input, self.weight, self.error))


@dataclass(frozen=True)
class GemmFormats:
    """The accumulator of each of a layer's three GEMMs (:data:`GEMMS`; None: that GEMM
    sums in float32, torch's) and the block formats of their operands."""

    forward: Format | None = None
    input_grad: Format | None = None
    weight_grad: Format | None = None
    operands: OperandFormats = OperandFormats()
    rounding: str = Rounding.NEAREST  # of the operands


class GemmTally:
    """What a layer's accumulators did, per GEMM kind: the counts, and the moments of the
    sums and of the exact sums (float64) over the finite results, for the variance
    retention ratio (Sakr et al., ICLR 2019): how much of the exact sums' variance the
    accumulated sums keep."""

    def __init__(self) -> None:
        self.additions = dict.fromkeys(GEMMS, 0)
        self.swamped = dict.fromkeys(GEMMS, 0)
        self.saturated = dict.fromkeys(GEMMS, 0)
        self.results = dict.fromkeys(GEMMS, 0)
        self.moments = {kind: [0.0] * 5 for kind in GEMMS}  # n, sum q, sum q^2, sum e, sum e^2

    def add(self, kind: str, counts: AccumulationCounts, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        self.additions[kind] += counts.additions
        self.swamped[kind] += counts.swamped
        self.saturated[kind] += counts.saturated
        self.results[kind] += q.numel()
        q64 = q.double()
        if len(a) > b.shape[1]:  # the same sums, transposed: BLAS is faster with the longer side last
            q64, exact = q64.t(), b.t().double() @ a.t().double()
        else:
            exact = a.double() @ b.double()
        finite = torch.isfinite(q64)
        if not bool(finite.all()):
            q64, exact = q64[finite], exact[finite]
        q64, exact = q64.flatten(), exact.flatten()
        values = (q64.numel(), q64.sum(), torch.dot(q64, q64), exact.sum(), torch.dot(exact, exact))
        self.moments[kind] = [m + float(v) for m, v in zip(self.moments[kind], values, strict=True)]

    def packed(self) -> torch.Tensor:
        """Every count and moment in one float64 tensor (to sum over ranks; :meth:`unpack`)."""
        return torch.tensor([[self.additions[k], self.swamped[k], self.saturated[k], self.results[k],
                              *self.moments[k]] for k in GEMMS], dtype=torch.float64)

    def unpack(self, packed: torch.Tensor) -> None:
        for kind, row in zip(GEMMS, packed.tolist(), strict=True):
            self.additions[kind], self.swamped[kind], self.saturated[kind], self.results[kind] = map(int, row[:4])
            self.moments[kind] = row[4:]

    def retention(self, kind: str) -> float | None:
        """Variance of the accumulated sums over that of the exact sums (None before any)."""
        n, sq, sq2, se, se2 = self.moments[kind]
        exact = se2 - se * se / n if n > 1 else 0.0
        return (sq2 - sq * sq / n) / exact if exact > 0 else None

    def as_dict(self) -> dict[str, dict[str, float | int | None]]:
        return {kind: {"additions": self.additions[kind], "swamped": self.swamped[kind],
                       "saturated": self.saturated[kind], "results": self.results[kind],
                       "retention": self.retention(kind)}
                for kind in GEMMS if self.additions[kind] or self.results[kind]}


@dataclass(frozen=True)
class _Gemms:
    """What a layer's autograd functions need to accumulate: formats, chunk and tally."""

    formats: GemmFormats
    chunk: int | None
    tally: GemmTally | None
    generator: torch.Generator | None = None  # stochastic rounding of the operands
    record: Callable[[str, kernels.BlockStats], None] | None = None  # what each operand's quantization did

    def product(self, kind: str, a: torch.Tensor, b: torch.Tensor, bias_first: bool = False) -> torch.Tensor:
        """``a @ b`` with the operands in their block formats summed in the GEMM's
        accumulator. ``bias_first``: the bias's terms come first and stay as they are (the
        forward's: a's first column of ones and b's first row, the bias; the weight
        gradient's: b's first column of ones)."""
        operands = self.formats.operands
        if operands:
            (left_role, right_role) = OPERAND_ROLES[kind]
            left, right = getattr(operands, left_role), getattr(operands, right_role)
            forward_bias, gradient_bias = bias_first and kind == "forward", bias_first and kind == "weight_grad"
            if left is not None:
                blocked = self._blocked(left_role, a[:, 1:] if forward_bias else a, left, -1)
                a = torch.cat([a[:, :1], blocked], dim=1) if forward_bias else blocked
            if right is not None:
                if forward_bias:
                    b = torch.cat([b[:1], self._blocked(right_role, b[1:], right, 0)], dim=0)
                elif gradient_bias:
                    b = torch.cat([b[:, :1], self._blocked(right_role, b[:, 1:], right, 0)], dim=1)
                else:
                    b = self._blocked(right_role, b, right, 0)
        fmt = getattr(self.formats, kind)
        if fmt is None:
            return a @ b
        a, b = a.detach(), b.detach()
        q, counts = matmul_counts(a, b, fmt, self.chunk)
        if self.tally is not None:
            self.tally.add(kind, counts, q, a, b)
        return q

    def _blocked(self, role: str, t: torch.Tensor, fmt: BlockFormat, axis: int) -> torch.Tensor:
        if self.record is None:
            return kernels.quantize(t.detach(), fmt, self.formats.rounding, self.generator, axis=axis)
        q, stats = kernels.quantize_blocks(t.detach(), fmt, self.formats.rounding, self.generator, axis=axis)
        self.record(role, stats)
        return q


class _Linear(torch.autograd.Function):
    """``F.linear`` with each GEMM summed in its accumulator. The bias is the first term of
    each output's sum (an accumulator preloaded with it), so its gradient is the first term
    of the weight-gradient GEMM's: the error summed over the batch in that accumulator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemms: _Gemms) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.gemms, ctx.has_bias = gemms, bias is not None
        y = gemms.product("forward", *linear_operands("forward", x, weight, bias), bias_first=bias is not None)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gemms = ctx.gemms
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = gemms.product("input_grad", *linear_operands("input_grad", x, weight, None, grad)).reshape(x.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            bias = weight.new_empty(0) if ctx.has_bias else None  # only whether there is one matters here
            both = gemms.product("weight_grad", *linear_operands("weight_grad", x, weight, bias, grad),
                                 bias_first=ctx.has_bias)
            dw, db = (both[:, 1:], both[:, 0]) if ctx.has_bias else (both, None)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, formats: GemmFormats,
           chunk: int | None = None, tally: GemmTally | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its three GEMMs accumulated in ``formats``
    (what they did added to ``tally``)."""
    return _Linear.apply(x, weight, bias, _Gemms(formats, chunk, tally))


def _pairs(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"conv2d: {name} must be an int or a pair, got {value!r}")
    return int(pair[0]), int(pair[1])


def _conv_padding(padding: str | int | tuple[int, ...], kernel: tuple[int, int],
                  dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), with torch's meaning of "valid" and "same" (the extra
    row or column of an even kernel at the end)."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2
    if isinstance(padding, str):
        raise ValueError(f"conv2d: padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    ph, pw = _pairs(padding, "padding")
    return ph, ph, pw, pw


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's shape: stride, padding (top, bottom, left, right), dilation, groups."""

    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int

    def patches(self, x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
        """``x`` padded, as a view (batch, output row, output column, channel, kh, kw)."""
        p = self.pads
        return _patches(F.pad(x, (p[2], p[3], p[0], p[1])), kernel, self.dilation, self.stride)

    def output_size(self, size: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
        p, d, s = self.pads, self.dilation, self.stride
        return ((size[0] + p[0] + p[1] - d[0] * (kernel[0] - 1) - 1) // s[0] + 1,
                (size[1] + p[2] + p[3] - d[1] * (kernel[1] - 1) - 1) // s[1] + 1)


Operands = tuple[torch.Tensor, torch.Tensor]


def conv2d_operands(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    geometry: ConvGeometry, grad: torch.Tensor | None = None) -> list[Operands]:
    """The ``(a, b)`` of a convolution's GEMM ``kind``, one pair per group, whose product
    :class:`_Conv2d` sums (``grad``: the error at the output, for the backward GEMMs):

    * forward: per output position, over the fan-in in ``unfold``'s order (input channel,
      kernel row, kernel column), the bias first;
    * weight gradient: per weight, over the batch and the output positions (example by
      example, positions in row-major order), the bias's gradient as the first column;
    * input gradient: a transposed convolution, one sum per input element over the
      group's output channels and every kernel tap, the taps from the last to the first
      (the error's positions in order). A tap that falls on the padding or between the
      strided output positions contributes a zero product, as in hardware that computes
      the input gradient as a convolution of the zero-inserted, zero-padded error.
    """
    out_channels, group_in, kh, kw = weight.shape
    groups = geometry.groups
    group_out, fan_in = out_channels // groups, group_in * kh * kw
    outs = [slice(g * group_out, (g + 1) * group_out) for g in range(groups)]
    if kind == "input_grad":
        assert grad is not None
        return [_input_grad_operands(grad[:, o], weight[o], (x.shape[2], x.shape[3]), geometry) for o in outs]
    patches = geometry.patches(x, (kh, kw))
    pairs = []
    for g, o in enumerate(outs):
        rows = patches[:, :, :, g * group_in:(g + 1) * group_in].reshape(-1, fan_in)
        if kind == "forward":
            pairs.append(_with_bias(rows, weight[o].reshape(group_out, fan_in).t(), None if bias is None else bias[o]))
        else:
            assert grad is not None
            pairs.append((_errors_by_channel(grad[:, o], group_out, 1)[0], rows if bias is None else _ones_first(rows)))
    return pairs


def _errors_by_channel(grad: torch.Tensor, out_channels: int, groups: int) -> list[torch.Tensor]:
    """Per group, the error at the output as (group's channels, batch x positions): the
    weight gradient's a, its sums example by example, positions in row-major order."""
    by_channel = grad.reshape(len(grad), out_channels, -1).transpose(0, 1).reshape(out_channels, -1)
    return [part.contiguous() for part in by_channel.chunk(groups)]


def _patches(x: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int],
             stride: tuple[int, int]) -> torch.Tensor:
    """Every kernel window of ``x`` (batch, channels, height, width) as a strided view
    (batch, output row, output column, channel, kh, kw): reshaped to rows of ``unfold``'s
    order (channel, kernel row, kernel column) in one copy, without unfold's transpose."""
    x = x.contiguous()
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    batch, channels, height, width = x.shape
    rows, cols = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    sb, sc, sy, sx = x.stride()
    return x.as_strided((batch, rows, cols, channels, kh, kw), (sb, sy * sh, sx * sw, sc, sy * dh, sx * dw))


def _input_grad_operands(grad: torch.Tensor, weight: torch.Tensor, size: tuple[int, int],
                         geometry: ConvGeometry) -> Operands:
    """One group's input-gradient GEMM: the error zero-inserted between its strided
    positions and zero-padded, unfolded with the flipped kernel."""
    batch, group_out, out_h, out_w = grad.shape
    group_out, group_in, kh, kw = weight.shape
    (sh, sw), pads, dilation = geometry.stride, geometry.pads, geometry.dilation
    reach_h, reach_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
    spread = grad.new_zeros(batch, group_out, (out_h - 1) * sh + 1, (out_w - 1) * sw + 1)
    spread[:, :, ::sh, ::sw] = grad
    # The padded input's row r takes the error rows r - reach .. r (in steps of the dilation);
    # only the rows of the unpadded input are wanted: pads[0] .. pads[0] + height - 1.
    height, width = size
    top, left = reach_h - pads[0], reach_w - pads[2]
    bottom = height + reach_h - top - spread.shape[2]
    right = width + reach_w - left - spread.shape[3]
    spread = F.pad(spread, (left, right, top, bottom))  # negative pads crop
    rows = _patches(spread, (kh, kw), dilation, (1, 1)).reshape(-1, group_out * kh * kw)
    return rows, weight.flip(2, 3).permute(0, 2, 3, 1).reshape(group_out * kh * kw, group_in)


def linear_operands(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    grad: torch.Tensor | None = None) -> Operands:
    """The ``(a, b)`` of a linear layer's GEMM ``kind`` (see :class:`_Linear`)."""
    rows = x.reshape(-1, x.shape[-1])
    if kind == "forward":
        return _with_bias(rows, weight.t(), bias)
    assert grad is not None
    dy = grad.reshape(-1, weight.shape[0])
    if kind == "input_grad":
        return dy, weight
    return dy.t().contiguous(), rows if bias is None else _ones_first(rows)


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` as GEMMs (:func:`conv2d_operands`), each summed in its accumulator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry,
                gemms: _Gemms) -> torch.Tensor:
        batch, channels = x.shape[:2]
        out_channels, group_in, kh, kw = weight.shape
        if channels != group_in * geometry.groups or out_channels % geometry.groups:
            raise ValueError(f"conv2d: weight {tuple(weight.shape)} does not fit input {tuple(x.shape)} with "
                             f"groups={geometry.groups}")
        out_h, out_w = geometry.output_size((x.shape[2], x.shape[3]), (kh, kw))
        pairs = conv2d_operands("forward", x, weight, bias, geometry)
        outputs = [gemms.product("forward", a, b, bias_first=bias is not None).reshape(batch, out_h * out_w, -1)
                   for a, b in pairs]
        # The forward's columns (a column of ones first, with a bias) are the weight gradient's b:
        # kept only where a weight or bias gradient will be wanted (a frozen layer keeps none).
        wanted = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(x, weight, *(a for a, _ in pairs if wanted))
        ctx.geometry, ctx.gemms, ctx.has_bias = geometry, gemms, bias is not None
        y = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        return y.transpose(1, 2).reshape(batch, out_channels, out_h, out_w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, *columns = ctx.saved_tensors
        geometry, gemms = ctx.geometry, ctx.gemms
        batch, _, height, width = x.shape
        group_in, kh, kw = weight.shape[1:]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            parts = [gemms.product("input_grad", a, b).reshape(batch, height, width, group_in).permute(0, 3, 1, 2)
                     for a, b in conv2d_operands("input_grad", x, weight, None, geometry, grad)]
            dx = torch.cat(parts, dim=1)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            errors = _errors_by_channel(grad, weight.shape[0], geometry.groups)
            both = [gemms.product("weight_grad", dy, b, bias_first=ctx.has_bias)
                    for dy, b in zip(errors, columns, strict=True)]
            if ctx.has_bias:
                db = torch.cat([t[:, 0] for t in both])
                both = [t[:, 1:] for t in both]
            dw = torch.cat(both).reshape(weight.shape)
        return dx, dw, db, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: int | tuple[int, int] = 1, padding: str | int | tuple[int, int] = 0,
           dilation: int | tuple[int, int] = 1, groups: int = 1, formats: GemmFormats = GemmFormats(),
           chunk: int | None = None, tally: GemmTally | None = None) -> torch.Tensor:
    """``F.conv2d`` on a 4-d input with its three GEMMs accumulated in ``formats`` (see
    :func:`conv2d_operands` for each sum's order; what they did added to ``tally``)."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d: need a (N, C, H, W) input and a 4-d weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    kernel = (weight.shape[2], weight.shape[3])
    dilation = _pairs(dilation, "dilation")
    geometry = ConvGeometry(_pairs(stride, "stride"), _conv_padding(padding, kernel, dilation), dilation, groups)
    return _Conv2d.apply(x, weight, bias, geometry, _Gemms(formats, chunk, tally))


def _with_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``a @ b + bias`` as one product whose sums start with the bias: a column of ones
    before ``a``'s columns, the bias as ``b``'s first row."""
    if bias is None:
        return a, b
    return _ones_first(a), torch.cat([bias.reshape(1, -1).to(b.dtype), b], dim=0)


def _ones_first(a: torch.Tensor) -> torch.Tensor:
    """``a`` with a column of ones before its columns: the bias's factor."""
    return torch.cat([torch.ones(len(a), 1, dtype=a.dtype, device=a.device), a], dim=1)


@dataclass(frozen=True)
class GemmCall:
    """One ``F.linear`` or ``F.conv2d`` call of a layer, its arguments normalized."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    geometry: ConvGeometry | None  # None: linear

    def operands(self, kind: str, grad: torch.Tensor | None = None) -> list[Operands]:
        """The GEMM ``kind``'s ``(a, b)``, one pair per group (``grad``: the error at the output)."""
        if self.geometry is None:
            return [linear_operands(kind, self.x, self.weight, self.bias, grad)]
        unbatched = self.x.dim() == 3
        x = self.x.unsqueeze(0) if unbatched else self.x
        if grad is not None and unbatched:
            grad = grad.unsqueeze(0)
        return conv2d_operands(kind, x, self.weight, self.bias, self.geometry, grad)

    def run(self, formats: GemmFormats, chunk: int | None, tally: GemmTally | None,
            generator: torch.Generator | None = None,
            record: Callable[[str, kernels.BlockStats], None] | None = None) -> torch.Tensor:
        """The call with its GEMMs summed in ``formats`` (``generator``: the operands'
        stochastic rounding; ``record(role, stats)``: what quantizing each operand did)."""
        gemms = _Gemms(formats, chunk, tally, generator, record)
        if self.geometry is None:
            return _Linear.apply(self.x, self.weight, self.bias, gemms)
        unbatched = self.x.dim() == 3
        y = _Conv2d.apply(self.x.unsqueeze(0) if unbatched else self.x, self.weight, self.bias, self.geometry,
                          gemms)
        return y.squeeze(0) if unbatched else y


def gemm_call(func: Any, args: tuple, kwargs: dict, weights: set[int]) -> GemmCall | None:
    """``func(*args, **kwargs)`` as a :class:`GemmCall` when it is ``F.linear`` or a 2-d
    ``F.conv2d`` whose weight is one of ``weights`` (ids); None otherwise."""
    if func is F.linear:
        call = dict(zip(("input", "weight", "bias"), args, strict=False), **kwargs)
        if id(call.get("weight")) in weights:
            return GemmCall(call["input"], call["weight"], call.get("bias"), None)
    elif func is F.conv2d:
        call = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, strict=False),
                    **kwargs)
        weight = call.get("weight")
        if id(weight) in weights and call["input"].dim() in (3, 4):
            kernel = (weight.shape[2], weight.shape[3])
            dilation = _pairs(call.get("dilation", 1), "dilation")
            geometry = ConvGeometry(_pairs(call.get("stride", 1), "stride"),
                                    _conv_padding(call.get("padding", 0), kernel, dilation), dilation,
                                    call.get("groups", 1))
            return GemmCall(call["input"], weight, call.get("bias"), geometry)
    return None


class AccumulatorMode(TorchFunctionMode):
    """While active, ``F.linear`` and ``F.conv2d`` calls whose weight is one of ``weights``
    (a planned layer's own parameters: not a child's, not a weight the layer borrows) take
    their operands in ``formats.operands`` and sum their GEMMs in ``formats``;
    ``tally_for()`` says where their counts go (None: not counted, as in an evaluation
    pass). Everything else runs as it is."""

    def __init__(self, weights: Iterable[torch.Tensor], formats: GemmFormats, chunk: int | None,
                 tally_for: Callable[[], GemmTally | None], generator: torch.Generator | None = None,
                 record: Callable[[str, kernels.BlockStats], None] | None = None) -> None:
        super().__init__()
        self.weights = {id(w) for w in weights}
        self.formats, self.chunk, self.tally_for, self.generator = formats, chunk, tally_for, generator
        self.record = record

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        call = gemm_call(func, args, kwargs, self.weights)
        if call is not None:
            return call.run(self.formats, self.chunk, self.tally_for(), self.generator, self.record)
        return func(*args, **kwargs)
