"""The quantizer: rounds float32 tensors onto the formats of :mod:`lpcli.formats`, and the
kernels behind it (chains of torch operations, and the C kernels' interface).

Rounding: ``nearest`` (ties to even), ``stochastic`` (up with probability equal to the
distance from the lower neighbour over the spacing, resolved to 2^-24; seeded by a
torch.Generator), ``zero`` (toward zero). Directed and stochastic rounding never turn a
finite value into inf: beyond the range they saturate in every format. Fixed point has
a single zero (-0.0 comes out as +0.0); floats keep the sign of a value rounded to zero.
NaN stays NaN in every format (formats without a NaN code have no defined answer;
keeping NaN lets divergence be detected). Inputs of other float dtypes are rounded to
float32 first (exact for float16/bfloat16; a float64 input can thus be rounded twice)
and the result is returned in the input's dtype.

Oracles and where we differ from them on purpose (tests/test_formats.py checks both
the agreement, bit for bit, and each difference):

* ``float8_e4m3fn`` (ml_dtypes, and torch casts before 2.13; 2.13 on the CPU saturates)
  turns values from 464 up and inf into NaN; ``fp8-e4m3`` saturates them to +-448.
  fp16, bf16 and fp8-e5m2 casts and ml_dtypes' IEEE-style ``float8_e4m3``/``float8_e3m4``
  agree everywhere, overflow to inf included.
* ml_dtypes' ``float6_e2m3fn``, ``float6_e3m2fn`` and ``float4_e2m1fn`` have no NaN and
  turn NaN into -0.0 / +0.0; we keep NaN. They saturate overflow and inf as we do.
* ``torch.fake_quantize_per_tensor_affine`` (scale 2^-F, zero point 0) turns NaN and inf
  into arbitrary codes (float-to-int conversion of NaN/inf); we keep NaN and saturate +-inf.

Kernels: on the CPU, fused C kernels (lpcli/_kernels.c, built at install) do each
rounding in one vectorized pass; elsewhere, or without them, chains of in-place torch
operations (below) do the same IEEE operations in the same order, so both give the same
bits. Stochastic rounding is the exception: the C kernels draw from a counter-based hash
keyed by one draw from the generator, a different (equally seeded) stream.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import torch

from .formats import (
    ROUNDINGS,
    BlockFormat,
    DynamicFixedPoint,
    FixedPoint,
    Float32,
    FloatFormat,
    Format,
    FormatError,
    Rounding,
    parse_format,
    pow2,
)


def quantize(
    x: torch.Tensor,
    fmt: Format | str,
    rounding: str = Rounding.NEAREST,
    generator: torch.Generator | None = None,
    *,
    out: torch.Tensor | None = None,
    absmax: torch.Tensor | float | None = None,
    axis: int = -1,
) -> torch.Tensor:
    """Round ``x`` onto ``fmt``; returns a new tensor of x's shape, dtype and device.

    Values beyond the range saturate (fixed point, ``fn`` floats) or become inf
    (IEEE-style floats, nearest rounding). ``fp32`` returns ``x`` itself. The result does
    not track gradients: wrap it in an autograd.Function (e.g. straight-through) for that.

    ``out``: write the result there instead (same shape as ``x``, any float dtype; ``x``
    itself works, through a temporary) and return it. ``absmax``: for dynamic fixed
    point, choose the fraction bits from this absolute maximum instead of x's own (e.g. a
    :class:`MaxHistory` of earlier steps, as hardware would); values beyond the range it
    implies then saturate. ``axis``: for block (MX) formats, the dimension the blocks run
    along (the reduction dimension of the product that consumes x).
    """
    fmt = parse_format(fmt)
    if rounding not in ROUNDINGS:
        raise FormatError(f"unknown rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}")
    if out is not None and out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    if isinstance(fmt, Float32):
        return x if out is None else out.copy_(x)
    if isinstance(fmt, BlockFormat):
        y, _ = _quantize_blocks(x.detach().float(), fmt, rounding, generator, axis, out)
        if out is not None:
            return y if y is out else out.copy_(y)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    xf = x.detach().float().contiguous()  # no copy for a contiguous float32 x

    fixed = _fixed_params(fmt, xf, absmax)

    native = native_spec(fmt, rounding, generator, fixed) if xf.device.type == "cpu" else None
    kernel = None
    if native is None:
        if fixed is not None:
            kernel = _fixed_kernel(fixed[0], fixed[1], rounding, generator, fixed[2])
        elif rounding == Rounding.NEAREST and (dtype := _cast_dtype(fmt)) is not None:
            kernel = _cast_kernel(dtype)
        else:
            kernel = _float_kernel(fmt, rounding, generator, xf.device.type)
    direct = (
        out is not None
        and out.dtype == torch.float32
        and out.is_contiguous()
        # the torch kernels read x after writing parts of y; the native ones read each element
        # before writing it, which allows y = x exactly (not a shifted overlap)
        and (
            out.untyped_storage().data_ptr() != xf.untyped_storage().data_ptr()
            or (native is not None and out.data_ptr() == xf.data_ptr())
        )
    )
    y = out if direct else torch.empty_like(xf)
    with torch.no_grad():
        if native is not None:
            _run_native(native, xf, y)
        else:
            _apply(kernel, xf, y)
    if direct:
        return y
    if out is not None:
        return out.copy_(y)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _fixed_params(fmt: Format, xf: torch.Tensor,
                  absmax: torch.Tensor | float | None) -> tuple[int, int | torch.Tensor, bool] | None:
    """``(width, fraction bits, saturate)`` of rounding ``xf`` onto a fixed-point ``fmt``
    (dynamic: from ``absmax`` or xf's own maximum), None for floats."""
    if isinstance(fmt, FixedPoint):
        return (fmt.width, fmt.frac, True)
    if not isinstance(fmt, DynamicFixedPoint):
        return None
    own = absmax is None
    if xf.device.type == "cpu":  # python scalars: cheaper, and no device to wait for
        value = absmax_value(xf) if own else float(absmax)
        frac: int | torch.Tensor = fmt.frac_of(value)
        # The range picked from x's own maximum holds every value unless F hit its limit
        # or x has NaN/inf: then the clamp can be skipped.
        saturate = not (own and value <= (2 ** (fmt.width - 1) - 1) * 2.0**-frac)
    else:
        if own:
            low, high = torch.aminmax(xf) if xf.numel() else (xf.new_zeros(()), xf.new_zeros(()))
            absmax = torch.maximum(-low, high)  # one pass, no |x| temporary
        frac = fmt.frac_for(torch.as_tensor(absmax, dtype=torch.float32, device=xf.device))
        saturate = True
    return (fmt.width, frac, saturate)


class BlockStats(NamedTuple):
    """What an MX rounding did: elements, non-zero inputs, non-zero results (the difference:
    values flushed to zero within their block), inputs beyond the element's largest value
    (plus half its spacing there) at their block's scale, and the smallest and largest
    shared exponent of the blocks holding a non-zero finite value (None without one)."""

    elements: int
    nonzero: int
    nonzero_rounded: int
    beyond: int
    emin: int | None
    emax: int | None


def quantize_blocks(x: torch.Tensor, fmt: BlockFormat | str, rounding: str = Rounding.NEAREST,
                    generator: torch.Generator | None = None, axis: int = -1) -> tuple[torch.Tensor, BlockStats]:
    """:func:`quantize` onto a block (MX) format and its :class:`BlockStats`, counted in
    the same pass by the C kernels (by torch operations elsewhere)."""
    fmt = parse_format(fmt)
    if not isinstance(fmt, BlockFormat):
        raise FormatError(f"quantize_blocks needs a block (MX) format, got {fmt}")
    if rounding not in ROUNDINGS:
        raise FormatError(f"unknown rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}")
    y, stats = _quantize_blocks(x.detach().float(), fmt, rounding, generator, axis, count=True)
    assert stats is not None
    return (y if x.dtype == torch.float32 else y.to(x.dtype)), stats


def _reach(fmt: BlockFormat) -> float:
    """The element's largest value plus half its spacing there: beyond it, saturated."""
    element = fmt.element_format
    top = fmt.element_max
    spacing = element.step if isinstance(element, FixedPoint) else math.ldexp(1.0, math.frexp(top)[1] - 1 - element.man)
    return top + spacing / 2


def _quantize_blocks(x: torch.Tensor, fmt: BlockFormat, rounding: str, generator: torch.Generator | None,
                     axis: int, out: torch.Tensor | None = None,
                     count: bool = False) -> tuple[torch.Tensor, BlockStats | None]:
    """MX quantization of float32 ``x`` with blocks along ``axis``: into ``out`` where it can
    take the rows as they are (contiguous float32, blocks along its last dimension, not a
    shifted overlap of x), else into a new contiguous tensor; with ``count``, its stats."""
    if x.dim() == 0:
        y, stats = _quantize_blocks(x.reshape(1), fmt, rounding, generator, -1, count=count)
        return y.reshape(()), stats
    try:
        dim = range(x.dim())[axis]
    except IndexError:
        raise ValueError(f"axis {axis} is out of range for a tensor of {x.dim()} dimensions") from None
    rows = x.movedim(dim, -1).contiguous()
    direct = (
        out is not None
        and dim == x.dim() - 1
        and out.dtype == torch.float32
        and out.is_contiguous()
        and (out.untyped_storage().data_ptr() != rows.untyped_storage().data_ptr() or out.data_ptr() == rows.data_ptr())
    )
    y = out if direct else torch.empty_like(rows)
    stats = BlockStats(rows.numel(), 0, 0, 0, None, None) if count else None
    if rows.numel():
        length = rows.shape[-1]
        # rows made of whole blocks are one run of blocks, which threads may split anywhere
        # between blocks (at whole cache lines)
        row, align = (fmt.block, math.lcm(fmt.block, 64)) if length % fmt.block == 0 else (length, length)
        native = native_block_spec(fmt, rounding, generator, row, count) if rows.is_cpu else None
        with torch.no_grad():
            if native is not None:
                parts = _run_native(native, rows, y, align=align)
                if count:
                    stats = _merged(rows.numel(), parts)
            else:
                if count:
                    stats = _torch_block_stats(rows.view(-1, length), fmt)
                _torch_blocks(rows.view(-1, length), y.view(-1, length), fmt, rounding, generator)
                if count:
                    stats = stats._replace(nonzero_rounded=int(torch.count_nonzero(y)))
    return (y if direct else y.movedim(-1, dim).contiguous()), stats


def _merged(elements: int, parts: list[tuple[int, int, int, int, int]]) -> BlockStats:
    lows = [p[3] for p in parts if p[3] <= p[4]]
    highs = [p[4] for p in parts if p[3] <= p[4]]
    return BlockStats(elements, sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts),
                      min(lows) if lows else None, max(highs) if highs else None)


def _torch_block_stats(rows: torch.Tensor, fmt: BlockFormat) -> BlockStats:
    """:class:`BlockStats` of rows before rounding (nonzero_rounded left 0), by torch operations."""
    padded, e = block_exponents(rows, fmt)
    magnitude = padded.abs()
    beyond = int(torch.count_nonzero(magnitude * _pow2_e8m0(-e) > _reach(fmt)))
    live = ((magnitude > 0) & (magnitude < math.inf)).any(-1, keepdim=True)
    exponents = e[live]
    return BlockStats(rows.numel(), int(torch.count_nonzero(rows)), 0, beyond,
                      int(exponents.min()) if exponents.numel() else None,
                      int(exponents.max()) if exponents.numel() else None)


def _pow2_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Exact ``2^exponent`` (float32) for int32 exponents in [-127, 127]; 2^-127 is subnormal."""
    return torch.where(exponent > -127, (exponent + 127) << 23, 1 << 22).view(torch.float32)


def block_exponents(rows: torch.Tensor, fmt: BlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of float32 ``rows`` (2-d, blocks along each row; a row's last block is
    zero-padded) as a ``(rows, blocks, B)`` tensor, and each block's shared exponent e
    (int32, ``(rows, blocks, 1)``): the largest finite magnitude's exponent field less
    emax, clamped at -127 (all-zero blocks get -127)."""
    length = rows.shape[1]
    blocks = -(-length // fmt.block)
    padded = torch.nn.functional.pad(rows, (0, blocks * fmt.block - length)).view(rows.shape[0], blocks, fmt.block)
    bits = padded.view(torch.int32) & 0x7FFFFFFF
    finite = torch.where(bits < 0x7F800000, bits, 0)
    return padded, ((finite.amax(-1, keepdim=True) >> 23) - 127 - fmt.emax).clamp_(min=-127)


def _torch_blocks(x: torch.Tensor, y: torch.Tensor, fmt: BlockFormat, rounding: str,
                  generator: torch.Generator | None) -> None:
    """MX quantization of the rows of ``x`` into ``y`` with torch operations: per block, the
    largest finite magnitude's exponent field gives e; the elements are scaled by 2^-e
    (exact: the scaled values that underflow lie far below the element's smallest step),
    clamped to the element's range and rounded onto it, and scaled back by 2^e (exact)."""
    length = x.shape[1]
    padded, e = block_exponents(x, fmt)
    v = padded * _pow2_e8m0(-e)
    v.clamp_(-fmt.element_max, fmt.element_max)
    q = quantize(v, fmt.element_format, rounding, generator)
    q.mul_(_pow2_e8m0(e))
    y.copy_(q.view(x.shape[0], -1)[:, :length])


Counts = tuple[int, int, int, int]  # what quantize_count counts (see there)
EXTRAS = {None: 0, "nonfinite_x": 1, "nonfinite_q": 2, "changed": 3}  # quantize_count's extra (as the C kernel's)


def quantize_count(x: torch.Tensor, fmt: Format | str, rounding: str = Rounding.NEAREST,
                   generator: torch.Generator | None = None, *, inplace: bool = False, counts_only: bool = False,
                   extra: str | None = None) -> tuple[torch.Tensor, Counts] | None:
    """:func:`quantize` and the counts the simulator keeps of it, in one pass of the C kernels:
    ``(q, (nonzero x, nonzero q, x beyond the format's range, flag))``, the range as
    :func:`saturated` has it (none for float32 and dynamic fixed point), and the flag 1 or 0
    as ``extra`` asks: ``"nonfinite_x"`` / ``"nonfinite_q"`` (x / q holds NaN or inf),
    ``"changed"`` (the rounding changed the bits of an element), None (always 0; cheapest).
    ``q`` is the same bits :func:`quantize` gives (x itself for float32, as there; x
    overwritten with ``inplace``), drawn from ``generator`` the same way; with
    ``counts_only`` nothing is written and x comes back in q's place. None, with nothing
    drawn or written, where the C kernels do not apply (not built, not a contiguous float32
    CPU tensor, a block format): count with torch operations then."""
    key = (fmt, rounding)
    plan = _count_plans.get(key)
    if plan is None:
        plan = _count_plans[key] = count_plan(fmt, rounding)
    return quantize_count_planned(x, plan, generator, inplace=inplace, counts_only=counts_only, extra=extra)


class CountPlan(NamedTuple):
    """What :func:`quantize_count_planned` needs of a format and a rounding, worked out once."""

    format: Format
    rounding: str
    spec: dict | None  # the C kernels' spec; None where each call draws (stochastic) or
    # reads the data (dynamic fixed point) for its own
    low: float  # the range beyond which a value counts as saturated
    high: float


_count_plans: dict[tuple[Format | str, str], CountPlan] = {}


def count_plan(fmt: Format | str, rounding: str = Rounding.NEAREST) -> CountPlan:
    """The format's plan for :func:`quantize_count_planned` (checked and parsed once)."""
    fmt = parse_format(fmt)
    if rounding not in ROUNDINGS:
        raise FormatError(f"unknown rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}")
    if isinstance(fmt, Float32):
        spec: dict | None = {"kind": "fp32", "mode": 0, "key": 0}
    elif rounding == Rounding.STOCHASTIC or isinstance(fmt, (DynamicFixedPoint, BlockFormat)):
        spec = None
    else:
        spec = native_spec(fmt, rounding) if _kernels is not None else None
    if isinstance(fmt, (Float32, DynamicFixedPoint, BlockFormat)):
        return CountPlan(fmt, rounding, spec, -math.inf, math.inf)
    return CountPlan(fmt, rounding, spec, fmt.min_value, fmt.max_value)


def quantize_count_planned(x: torch.Tensor, plan: CountPlan, generator: torch.Generator | None = None, *,
                           inplace: bool = False, counts_only: bool = False,
                           extra: str | None = None) -> tuple[torch.Tensor, Counts] | None:
    """:func:`quantize_count` with the format's plan (:func:`count_plan`) at hand: the
    simulator calls it for every rounding of a step, so it does no more than it must."""
    if (_kernels is None or not x.is_cpu or x.dtype != torch.float32 or not x.is_contiguous()
            or isinstance(plan.format, BlockFormat)):
        return None
    fmt, rounding, spec, lo, hi = plan
    flag = EXTRAS[extra]
    xf = x.detach()
    if spec is None:
        spec = native_spec(fmt, rounding, generator, _fixed_params(fmt, xf, None))
    n = xf.numel()
    if counts_only or isinstance(fmt, Float32):
        q = x  # count only (float32: nothing to round)
        src, dst = addresses((xf, n), (None, n))
    else:
        q = x if inplace else torch.empty_like(xf)
        src, dst = addresses((xf, n), (q, n))
    if n < 2 * _PIECE:
        return q, _kernels.quantize_count(src, dst, n, spec, 0, lo, hi, flag)
    parts = in_pieces(lambda start, count: _kernels.quantize_count(
        src + 4 * start, dst + 4 * start if dst else 0, count, spec, start, lo, hi, flag), n)
    return q, (*(sum(part[i] for part in parts) for i in range(3)), max(part[3] for part in parts))


class MaxHistory:
    """Running absolute maximum over the last ``length`` tensors, for dynamic fixed point.

    ``quantize(x, "dfx8", absmax=history.absmax)`` scales by earlier steps' maxima;
    call ``history.update(x)`` afterwards. Before any update ``absmax`` is None (use x's own).
    """

    def __init__(self, length: int = 16) -> None:
        if length < 1:
            raise ValueError(f"history length must be at least 1, got {length}")
        self.length = length
        self.maxima: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        value = x.detach().abs().amax().float() if x.numel() else x.new_zeros((), dtype=torch.float32)
        self.maxima = [*self.maxima, value][-self.length :]

    @property
    def absmax(self) -> torch.Tensor | None:
        return torch.stack(self.maxima).amax() if self.maxima else None


# --- kernels -----------------------------------------------------------------------------
#
# A kernel rounds a contiguous float32 1-D source into a destination of the same size using
# a few in-place torch operations. On the CPU, ``_apply`` feeds it chunks of ``_CHUNK``
# elements so that its passes after the first find the data in cache: a chain of k
# element-wise passes over a large tensor costs about k full memory round trips otherwise.


_CHUNK = 1 << 20  # elements (4 MiB of float32): measured best on a 2-core EPYC (32 MiB L3); smaller
# chunks pay more per-call overhead than they gain in cache hits


@dataclass(frozen=True)
class _Kernel:
    run: Callable[..., None]  # run(src, dst, *scratch)
    scratch: tuple[torch.dtype, ...] = ()  # dtypes of the chunk-sized scratch buffers it needs


def _apply(kernel: _Kernel, x: torch.Tensor, y: torch.Tensor) -> None:
    src, dst = x.view(-1), y.view(-1)
    n = src.numel()
    if n == 0:
        return
    size = min(n, _CHUNK) if src.device.type == "cpu" else n
    scratch = [_scratch(i, dtype, src.device, size) for i, dtype in enumerate(kernel.scratch)]
    for start in range(0, n, size):
        stop = min(n, start + size)
        kernel.run(src[start:stop], dst[start:stop], *(buf[: stop - start] for buf in scratch))


_cached = threading.local()


def _scratch(index: int, dtype: torch.dtype, device: torch.device, size: int) -> torch.Tensor:
    """A scratch buffer, kept between calls on the CPU (per thread, at most a few chunks).

    Fresh multi-MiB buffers come from mmap and pay a page fault per 4 KiB on first touch,
    which cost more than the kernels themselves.
    """
    if device.type != "cpu":
        return torch.empty(size, dtype=dtype, device=device)  # the caching allocator reuses memory
    buffers = _cached.__dict__.setdefault("buffers", {})
    buf = buffers.get((index, dtype))
    if buf is None or buf.numel() < size:
        buf = buffers[(index, dtype)] = torch.empty(size, dtype=dtype)
    return buf[:size]


def _round_to_integer(
    v: torch.Tensor,
    rounding: str,
    floor: torch.Tensor,
    random: torch.Tensor,
    generator: torch.Generator | None,
) -> None:
    """Round ``v`` in place to integers (``floor``, ``random``: scratch for stochastic)."""
    if rounding == Rounding.NEAREST:
        v.round_()  # ties to even
    elif rounding == Rounding.ZERO:
        # copysign(floor(|v|), v): torch's trunc is not vectorized on the CPU.
        torch.abs(v, out=floor)
        floor.floor_()
        torch.copysign(floor, v, out=v)
    else:
        # Up with probability frac(v): u < frac for u uniform on multiples of 2^-24 in [0, 1).
        # v - floor(v) is exact for every v that has a fraction (|v| < 2^23).
        torch.floor(v, out=floor)
        v.sub_(floor)
        random.uniform_(generator=generator)
        torch.lt(random, v, out=v)
        v.add_(floor)


def _fixed_kernel(
    width: int,
    frac: int | torch.Tensor,
    rounding: str,
    generator: torch.Generator | None,
    saturate: bool = True,
) -> _Kernel:
    """Fixed point: clamp to the range (on the grid, so rounding stays inside), then round.

    ``saturate=False`` skips the clamp, for inputs known to lie inside the range.
    """
    step = 2.0**-frac if isinstance(frac, int) else pow2(-frac)
    hi = (2 ** (width - 1) - 1) * step
    lo = -(2 ** (width - 1)) * step

    if rounding == Rounding.NEAREST and width <= 23:
        # |v| <= 2^22 steps, so v + 1.5 * 2^23 steps lies in one binade whose spacing is one
        # step: the float addition itself rounds to the grid, ties to even, and the
        # subtraction is exact. Three passes, and -0 comes out as +0 (one zero in fixed point).
        magic = 1.5 * 2.0**23 * step

        def nearest(x: torch.Tensor, y: torch.Tensor) -> None:
            if saturate:
                torch.clamp(x, lo, hi, out=y)
                y.add_(magic)
            else:
                torch.add(x, magic, out=y)
            y.sub_(magic)

        return _Kernel(nearest)

    scale = 2.0**frac if isinstance(frac, int) else pow2(frac)

    def scaled(x: torch.Tensor, y: torch.Tensor, floor: torch.Tensor, random: torch.Tensor) -> None:
        if saturate:
            torch.clamp(x, lo, hi, out=y)
            y.mul_(scale)  # exact: integers up to 2^23 plus fraction bits
        else:
            torch.mul(x, scale, out=y)
        _round_to_integer(y, rounding, floor, random, generator)
        y.mul_(step).add_(0.0)  # "+ 0.0" turns -0.0 into +0.0

    return _Kernel(scaled, (torch.float32, torch.float32))


def _cast_kernel(native: torch.dtype) -> _Kernel:
    """Round through a torch dtype (the cast rounds to nearest, ties to even)."""

    def cast(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor) -> None:
        buf.copy_(x)
        y.copy_(buf)

    return _Kernel(cast, (native,))


def _float(
    x: torch.Tensor,
    fmt: FloatFormat,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The float quantizer (any E/M split, no torch cast) on a float32 tensor; returns a new tensor."""
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _apply(_float_kernel(fmt, rounding, generator, x.device.type), x.contiguous(), y)
    return y


_EXP = 0xFF << 23  # exponent field of a float32 pattern viewed as int32 (0x7f800000, +inf)


def _float_kernel(
    fmt: FloatFormat,
    rounding: str,
    generator: torch.Generator | None,
    device_type: str = "cpu",
) -> _Kernel:
    """Pick the float kernel. ``device_type == "cpu"``: a kernel may look at each chunk (a
    reduction read back as a Python number) to skip the passes that only special values
    (NaN, inf, values beyond the range) need; elsewhere it runs every pass, with no host
    synchronization."""
    check = device_type == "cpu"
    if fmt.exp == 8:
        return _e8_kernel(fmt, rounding, generator, check)
    if fmt.man <= 21 and rounding == Rounding.NEAREST:
        return _nearest_kernel(fmt)
    return _general_kernel(fmt, rounding, generator)


def _limits(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a CPU chunk as Python floats, in one read pass; both NaN if x has NaN."""
    low, high = torch.aminmax(x)
    return float(low), float(high)


def _e8_kernel(fmt: FloatFormat, rounding: str, generator: torch.Generator | None, check: bool) -> _Kernel:
    """Floats with 8 exponent bits (bf16, e8m<M>), by integer arithmetic on the bit pattern.

    With float32's own exponent range, the format's values, subnormals included, are
    exactly the float32 values whose low ``D = 23 - M`` pattern bits are zero (float32
    subnormals step by 2^-149, the format's by 2^(-126-M), a multiple). Within a binade
    the pattern is linear in the value, and a carry out of the mantissa moves to the next
    binade's first value, which is the right neighbour there. The sign bit stays out of
    the way: adding a non-negative amount smaller than 2^D to a pattern grows its magnitude.

    * zero:       clear the low D bits.
    * nearest:    add ``2^(D-1) - 1`` plus the significand's lowest bit (ties go to the
      even neighbour), then clear. That bit is pattern bit D, or for M = 0 the implicit
      bit (1 unless the exponent field is 0). A carry past the largest finite value gives
      inf, as IEEE rounding does.
    * stochastic: add a uniform random integer in [0, 2^D) (``random_``, one per element
      whatever the chunking), then clear: the carry happens with probability
      (low bits) / 2^D, the distance to the lower neighbour over the spacing, exactly.

    Special values: inf has zero low bits and stays inf (less than 2^D is added). A NaN's
    payload may be cleared (inf) or carry into the sign bit, so chunks with NaN take x's
    NaN back with ``where``. Stochastic rounding must not carry finite values beyond max
    into inf: such chunks are clamped to +-max first (max is on the grid and stays), and
    inf is taken back from x. On the CPU these fixes run only for chunks that need them
    (one ``aminmax`` read tells); elsewhere they always run.
    """
    drop = 23 - fmt.man
    clear = -(1 << drop)  # int32 mask that keeps the high 32 - D bits
    max_value = fmt.max_value
    stochastic = rounding == Rounding.STOCHASTIC

    def run(x: torch.Tensor, y: torch.Tensor, *scratch: torch.Tensor) -> None:
        if drop == 0:  # e8m23 is float32
            y.copy_(x)
            return
        bits, out = x.view(torch.int32), y.view(torch.int32)
        if check:
            low, high = _limits(x)
            has_nan = low != low
            nonfinite = not (math.isfinite(low) and math.isfinite(high))
            beyond = not -max_value <= low <= high <= max_value  # NaN, inf or > max
        else:
            has_nan = nonfinite = beyond = True
        if rounding == Rounding.NEAREST:
            if drop == 23:
                # e8m0: the significand is the implicit bit alone, odd for normal numbers
                torch.bitwise_and(bits, _EXP, out=out).clamp_(max=1)
            else:
                torch.bitwise_right_shift(bits, drop, out=out).bitwise_and_(1)
            out.add_(bits).add_((1 << (drop - 1)) - 1).bitwise_and_(clear)
        elif rounding == Rounding.ZERO:
            torch.bitwise_and(bits, clear, out=out)
        else:
            (random,) = scratch
            random.random_(0, 1 << drop, generator=generator)
            if beyond:
                torch.clamp(x, -max_value, max_value, out=y)  # NaN stays NaN, inf -> max
                out.add_(random)
            else:
                torch.add(bits, random, out=out)
            out.bitwise_and_(clear)
        if stochastic and nonfinite:
            torch.where(torch.isfinite(x), y, x, out=y)  # inf and NaN back from x
        elif has_nan:
            torch.where(torch.isnan(x), x, y, out=y)

    return _Kernel(run, (torch.int32,) if stochastic else ())


def _nearest_params(fmt: FloatFormat) -> tuple[float, int, int, float]:
    """``(K, lowest field, highest field, overflow scale)`` of the nearest kernel below."""
    return 1.5 * 2.0 ** (23 - fmt.man), (fmt.emin + 127) << 23, (fmt.emax + 1 + 127) << 23, 2.0 ** (127 - fmt.emax)


def _nearest_kernel(fmt: FloatFormat) -> _Kernel:
    """Nearest rounding for E <= 7, M <= 21 (fp8, fp6, fp4, e3m4, ...) in float32.

    The grid spacing of a value with exponent e is ``s = 2^(max(e, emin) - M)``. The
    exponent field of x, masked out of its bits and clamped to [emin, emax + 1], is the
    float ``g = 2^max(e, emin)`` (capped); ``C = K * g`` with ``K = 1.5 * 2^(23 - M)`` is
    ``1.5 * 2^23 * s``, so ``x + C`` lies in a binade whose spacing is s: the addition
    rounds x to the grid, ties to even, and subtracting C is exact. ``torch.add(..,
    alpha=K)`` forms ``K * g`` exactly (a power of two times 1.5) inside the same pass.
    ``copysign`` restores the sign of values that became zero (``x + C - C`` gives +0).

    Range: fn formats clamp x to +-max first (max is on the grid and stays). IEEE formats
    need no clamp: the field clamp keeps C finite for any x, rounding is monotone, so x
    from max + half a spacing on (and inf) comes out at least ``2^(emax + 1)``, and
    multiplying by ``2^(127 - emax)`` and back turns exactly those values into inf.
    """
    scale, low_field, high_field, overflow_scale = _nearest_params(fmt)
    max_value = fmt.max_value

    def run(x: torch.Tensor, y: torch.Tensor, field: torch.Tensor) -> None:
        src = x
        if fmt.finite:
            src = torch.clamp(x, -max_value, max_value, out=y)
        torch.bitwise_and(src.view(torch.int32), _EXP, out=field)
        field.clamp_(low_field, high_field)
        grid = field.view(torch.float32)
        torch.add(src, grid, alpha=scale, out=y)
        y.sub_(grid, alpha=scale)
        y.copysign_(x)
        if not fmt.finite:
            y.mul_(overflow_scale).mul_(1.0 / overflow_scale)

    return _Kernel(run, (torch.int32,))


@dataclass(frozen=True)
class _GeneralParams:
    exp_mask: int
    limit: float
    low_field: int
    high_field: int
    offset: int
    to_inf: bool
    keep_inf: bool
    overflow_scale: float
    inf_scales: tuple[float, float]


def _general_params(fmt: FloatFormat, rounding: str) -> _GeneralParams:
    """The constants of the general kernel below (float32 work for M <= 21, float64 above)."""
    mant, bias, exp_bits = (23, 127, 8) if fmt.man <= 21 else (52, 1023, 11)
    nearest = rounding == Rounding.NEAREST
    # Before rounding, clamp to the range. Nearest rounding in an IEEE format sends values
    # from max + half a spacing on (and inf) to inf: clamp to 2^(emax+1), which the rounding
    # keeps and the scaling below turns into inf. Otherwise clamp to the largest finite
    # value (fn formats saturate; directed and stochastic rounding stop at max).
    to_inf = nearest and not fmt.finite
    if nearest:
        offset = ((mant - fmt.man) << mant) | (1 << (mant - 1))  # exponent field -> C
    else:
        offset = -(fmt.man << mant)  # exponent field -> s
    return _GeneralParams(
        exp_mask=((1 << exp_bits) - 1) << mant,
        limit=math.ldexp(1.0, fmt.emax + 1) if to_inf else fmt.max_value,
        low_field=(fmt.emin + bias) << mant,
        high_field=(fmt.emax + 1 + bias) << mant,
        offset=offset,
        to_inf=to_inf,
        # Directed and stochastic rounding saturate finite values at max in IEEE formats too,
        # but inf stays inf: see the end of the kernel.
        keep_inf=not fmt.finite and not nearest,
        overflow_scale=2.0 ** (bias - fmt.emax),  # 2^(emax+1) * 2^(bias-emax) = 2^(bias+1) overflows to inf
        inf_scales=(2.0**-100, 2.0 ** (fmt.emax - mant - 29)),
    )


def _general_kernel(fmt: FloatFormat, rounding: str, generator: torch.Generator | None) -> _Kernel:
    """The general float quantizer (E <= 7), by exponent arithmetic on the bit pattern.

    Each value's grid spacing is ``s = 2^(max(e, emin) - M)`` with e its exponent: the
    exponent field is masked out of the bits and clamped from below at the format's
    smallest normal exponent (which also covers subnormals, zero and float32 subnormals)
    and from above (inf, NaN). Nearest rounding then adds and subtracts
    ``C = 1.5 * 2^23 * s``: ``x + C`` lies in a binade whose spacing is s, so the
    addition rounds x to the grid, ties to even, and the subtraction is exact. The other
    roundings scale by 1/s and round to integers. ``copysign`` restores the sign of
    values that became zero.

    The arithmetic runs in float32 when ``C`` and ``s`` stay normal float32 numbers
    (M <= 21: every 4-, 6- and 8-bit format and fp16) and in float64 otherwise (M >= 22),
    where the same steps are exact for every float32 input. Used for zero and stochastic
    rounding, and for nearest rounding with M >= 22.
    """
    fast = fmt.man <= 21
    work, ints = (torch.float32, torch.int32) if fast else (torch.float64, torch.int64)
    nearest = rounding == Rounding.NEAREST
    p = _general_params(fmt, rounding)
    exp_mask, limit, low_field, high_field, offset = p.exp_mask, p.limit, p.low_field, p.high_field, p.offset
    to_inf, keep_inf, overflow_scale = p.to_inf, p.keep_inf, p.overflow_scale
    names = ["field"] + ([] if fast else ["wide", "result"])
    names += [] if nearest else ["floor", "random"]
    names += ["clamped"] if keep_inf else []
    dtypes = {"field": ints, "random": torch.float32}

    def run(x: torch.Tensor, y: torch.Tensor, *bufs: torch.Tensor) -> None:
        buf = dict(zip(names, bufs, strict=True))
        field = buf["field"]
        if fast:
            src, w = x, y
        else:
            src, w = buf["wide"], buf["result"]
            src.copy_(x)  # exact
        clamped = buf.get("clamped", w)
        torch.clamp(src, -limit, limit, out=clamped)
        torch.bitwise_and(clamped.view(ints), exp_mask, out=field)
        field.clamp_(low_field, high_field).add_(offset)
        grid = field.view(work)
        if nearest:
            w.add_(grid)
            w.sub_(grid)
        else:
            torch.div(clamped, grid, out=w)  # exact: a power of two
            _round_to_integer(w, rounding, buf["floor"], buf["random"], generator)
            w.mul_(grid)
        torch.copysign(w, src, out=w)
        if to_inf:
            w.mul_(overflow_scale).mul_(1.0 / overflow_scale)
        if keep_inf:
            # h = (clamp(x) - x) * 2^(emax - mant - 129) is 0 where x is in range, -+inf where
            # x is +-inf (NaN for NaN), and otherwise (finite x beyond max, where w = +-max;
            # |x| < 2^128) below half a spacing of the working float at max, so w - h puts
            # inf back and leaves the rest alone. Cheaper than isinf + where; the factor is
            # applied in two steps so that each one is a normal float.
            clamped.sub_(src).mul_(p.inf_scales[0]).mul_(p.inf_scales[1])
            w.sub_(clamped)
        if not fast:
            y.copy_(w)  # exact: w is on the format's grid, inside float32's range

    return _Kernel(run, tuple(dtypes.get(name, work) for name in names))


def _cast_dtype(fmt: FloatFormat) -> torch.dtype | None:
    """A torch dtype whose cast is the format's nearest rounding and faster than ``_float``.

    torch's float8 casts are bit-exact too but slower than the general path on the CPU
    (and float8_e4m3fn overflows to NaN), so only fp16 and bf16 use a cast.
    """
    natives = {
        FloatFormat(5, 10): torch.float16,
        FloatFormat(8, 7): torch.bfloat16,
    }
    return natives.get(fmt)


# --- native kernels ----------------------------------------------------------------------
#
# lpcli/_kernels.c fuses each kernel above into one pass over memory on the CPU. It is
# compiled when the package is installed; where that failed (no C compiler) or
# LPCLI_KERNELS=torch is set, the torch kernels above run instead, with the same results
# (stochastic rounding aside: the native kernels draw their own random numbers, keyed by
# one draw from the generator).

try:
    from lpcli import _kernels
except ImportError:  # built without a C compiler
    _kernels = None
if os.environ.get("LPCLI_KERNELS", "").strip().lower() == "torch":  # Backend.TORCH (defined below)
    _kernels = None

_MODES = {Rounding.NEAREST: 0, Rounding.ZERO: 1, Rounding.STOCHASTIC: 2}  # as lpcli/_kernels.c numbers them
_PIECE = 1 << 18  # elements per thread and call, when torch runs with several threads
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)


class Backend(StrEnum):
    """Which kernels round on the CPU."""

    NATIVE = "native"  # the fused C kernels
    TORCH = "torch"  # chains of torch operations (no C compiler at install, or LPCLI_KERNELS=torch)


def kernel_backend() -> Backend:
    """:attr:`Backend.NATIVE` when the fused C kernels run on the CPU, :attr:`Backend.TORCH` otherwise."""
    return Backend.NATIVE if _kernels is not None else Backend.TORCH


def native_spec(
    fmt: Format,
    rounding: str = Rounding.NEAREST,
    generator: torch.Generator | None = None,
    fixed: tuple[int, int | torch.Tensor, bool] | None = None,
) -> dict | None:
    """The C kernels' description of rounding onto ``fmt``: a dict of ``kind``, ``mode``,
    ``key`` (stochastic rounding's) and the kind's fields by name (lpcli/_kernels.c lists
    them, ``parse_quantizer``), or None where the torch kernels must run (no C kernels;
    dynamic fixed point without its ``fixed`` = (width, fraction bits, saturate) resolved;
    block formats: :func:`native_block_spec`)."""
    if _kernels is None:
        return None
    mode = _MODES[rounding]
    key = int(torch.empty((), dtype=torch.int64).random_(generator=generator)) if mode == 2 else 0
    spec: dict = {"mode": mode, "key": key}
    if isinstance(fmt, FixedPoint) and fixed is None:
        fixed = (fmt.width, fmt.frac, True)
    if fixed is not None:
        width, frac, saturate = fixed
        if not isinstance(frac, int):
            return None
        step = 2.0**-frac
        return spec | {"kind": "fixed", "lo": -(2 ** (width - 1)) * step, "hi": (2 ** (width - 1) - 1) * step,
                       "step": step, "scale": 2.0**frac, "saturate": int(saturate)}
    if isinstance(fmt, Float32) or fmt == FloatFormat(8, 23):
        return spec | {"kind": "fp32"}
    if not isinstance(fmt, FloatFormat):
        return None
    if fmt.exp == 8:
        return spec | {"kind": "e8", "drop": 23 - fmt.man, "max_value": fmt.max_value}
    if fmt.man <= 21 and rounding == Rounding.NEAREST:
        scale, low_field, high_field, overflow_scale = _nearest_params(fmt)
        # fp16 has its own kind: the C kernels use the CPU's conversion where it has one
        return spec | {"kind": "fp16" if fmt == FloatFormat(5, 10) else "nearest", "scale": scale,
                       "max_value": fmt.max_value, "overflow_scale": overflow_scale,
                       "overflow_unscale": 1.0 / overflow_scale, "low_field": low_field,
                       "high_field": high_field, "finite": int(fmt.finite)}
    p = _general_params(fmt, rounding)
    return spec | {"kind": "general64" if fmt.man > 21 else "general", "limit": p.limit, "low_field": p.low_field,
                   "high_field": p.high_field, "offset_field": p.offset, "overflow_scale": p.overflow_scale,
                   "overflow_unscale": 1.0 / p.overflow_scale, "inf_scale1": p.inf_scales[0],
                   "inf_scale2": p.inf_scales[1], "to_inf": int(p.to_inf), "keep_inf": int(p.keep_inf)}


def native_block_spec(fmt: BlockFormat, rounding: str, generator: torch.Generator | None, row: int,
                      count: bool = False) -> dict | None:
    """The C kernels' description of MX rounding of rows of ``row`` elements (blocks run
    along each row, the last one shorter where row is not a multiple of the block size),
    or None without the C kernels. Its element quantizer saturates: IEEE
    elements (E5M2) take their own grid with the ``fn`` formats' clamp."""
    element = fmt.element_format
    spec = native_spec(element, rounding, generator)
    if spec is None:
        return None
    if isinstance(element, FixedPoint):
        spec |= {"lo": -fmt.element_max, "hi": fmt.element_max}  # symmetric: k in [-127, 127]
    elif spec["kind"] == "nearest":  # (no MX element is fp16)
        spec["finite"] = 1
    else:
        spec |= {"limit": fmt.element_max, "to_inf": 0, "keep_inf": 0}
    return {"kind": "mx", "mode": spec["mode"], "key": spec["key"], "row": row, "block": fmt.block,
            "emax": fmt.emax, "count": int(count), "reach": _reach(fmt), "element": spec}


def addresses(*operands: tuple[torch.Tensor | None, int]) -> list[int]:
    """The memory addresses of a C kernel call's operands, each ``(tensor, elements the call
    touches from its start)`` checked first: a contiguous float32 CPU tensor that holds them
    (None: an operand the call does not use, address 0). The one way lpcli hands memory to
    the C kernels: they read and write raw addresses and can check nothing themselves."""
    found = []
    for tensor, count in operands:
        if tensor is None:
            found.append(0)
            continue
        if not (tensor.is_cpu and tensor.dtype is torch.float32 and tensor.is_contiguous()
                and tensor.numel() >= count):
            raise ValueError(f"a C kernel needs a contiguous float32 CPU tensor of at least {count} elements, got "
                             f"{'a contiguous' if tensor.is_contiguous() else 'a non-contiguous'} {tensor.dtype} "
                             f"tensor of shape {tuple(tensor.shape)} on {tensor.device}")
        found.append(tensor.data_ptr())
    return found


def _run_native(spec: dict, x: torch.Tensor, y: torch.Tensor, align: int = 64) -> list:
    """Round contiguous float32 ``x`` into ``y`` with the C kernel ``spec`` describes
    (``align``: pieces split at multiples of it, e.g. an MX spec's row); what each piece's
    call returned (an MX spec's counts, or None)."""
    src, dst = addresses((x, x.numel()), (y, x.numel()))
    return in_pieces(lambda start, count: _kernels.quantize(src + 4 * start, dst + 4 * start, count, spec, start),
                     x.numel(), align)


def absmax_value(x: torch.Tensor) -> float:
    """``max |x|`` of a contiguous float32 CPU tensor (NaN if x holds one; 0 if it is empty)."""
    if x.numel() == 0:
        return 0.0
    if _kernels is None:
        low, high = torch.aminmax(x)
        return float(torch.maximum(-low, high))  # one pass, no |x| temporary
    n = x.numel()
    (src,) = addresses((x, n))
    if n < 2 * _PIECE:
        return _kernels.absmax(src, n)
    maxima = in_pieces(lambda start, count: _kernels.absmax(src + 4 * start, count), n)
    return max(maxima, key=lambda m: (math.isnan(m), m))


def in_pieces(job: Callable[[int, int], object], n: int, align: int = 64) -> list:
    """``job(start, count)`` over ``range(n)``: in one call, or in one piece per thread of
    torch's thread count when n is large (the native kernels release the GIL); the pieces
    start at multiples of ``align`` (64: whole cache lines)."""
    global _pool
    threads = torch.get_num_threads()
    if threads == 1 or n < 2 * _PIECE:
        return [job(0, n)] if n else []
    if _pool is None or _pool[0] != threads:
        _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="lpcli-quantize"))
    piece = -(-n // threads)
    piece += -piece % align
    jobs = [_pool[1].submit(job, start, min(piece, n - start)) for start in range(0, n, piece)]
    # Every piece finishes before this returns, even on Ctrl-C: the jobs write into memory
    # that the caller may free as soon as it sees the exception.
    interrupted = None
    while True:
        try:
            wait(jobs)
            break
        except KeyboardInterrupt as stop:
            interrupted = stop
    if interrupted is not None:
        raise interrupted
    return [j.result() for j in jobs]
