"""Number formats: the value objects, their spellings and their arithmetic.

Every value a simulated low-precision training step touches is rounded onto one of
these (:func:`lpcli.kernels.quantize` does the rounding). Values stay in float32
tensors: a format only decides which float32 values are allowed. That bounds fixed
point at 24 bits (float32 holds 24 significant bits) and floats at 8 exponent / 23
mantissa bits.

Spellings (``parse_format`` accepts them, ``str(fmt)`` writes them):

* ``fx<W>.<F>``  fixed point, W bits with sign, F fraction bits (F may be negative or
  larger than W). Values: multiples of ``2^-F`` in ``[-2^(W-F-1), 2^(W-F-1) - 2^-F]``.
* ``dfx<W>``     dynamic fixed point: W bits, F chosen per tensor from its absolute
  maximum (the largest F whose range still holds it).
* ``e<E>m<M>``   IEEE-style float: bias ``2^(E-1)-1``, subnormals, the top exponent
  reserved for inf/NaN; with nearest rounding overflow goes to inf as IEEE does.
* ``e<E>m<M>fn`` float without infinities (OCP convention): at 8 bits and wider the
  all-ones code is NaN (as ``float8_e4m3fn``), below 8 bits every code is finite (as
  the OCP MX fp6/fp4 types). Overflow and inf saturate to the largest finite value.
  E = 8 is rejected (its range would pass float32's).
* aliases: ``fp32`` (no quantization), ``fp16``, ``bf16``, ``fp8-e4m3``, ``fp8-e5m2``,
  ``fp6-e2m3``, ``fp6-e3m2``, ``fp4-e2m1``.
* ``mx<element>[/<B>]`` block-scaled (OCP Microscaling v1.0): ``mxfp8-e4m3``,
  ``mxfp8-e5m2``, ``mxfp6-e3m2``, ``mxfp6-e2m3``, ``mxfp4-e2m1``, ``mxint8``; blocks of B
  elements (default 32, e.g. ``mxfp4-e2m1/16``) share one power-of-two scale (see
  :class:`BlockFormat`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

import torch


class Rounding(StrEnum):
    """How a value between two neighbours on a format's grid is rounded (see lpcli.kernels)."""

    NEAREST = "nearest"  # ties to even
    STOCHASTIC = "stochastic"
    ZERO = "zero"


ROUNDINGS = tuple(Rounding)
MAX_FIXED_WIDTH = 24  # float32 holds 24 significant bits


class FormatError(ValueError):
    """A format string or format parameter that does not describe a valid format."""


@dataclass(frozen=True)
class FixedPoint:
    """Two's complement fixed point with ``width`` bits and ``frac`` fraction bits."""

    width: int
    frac: int

    def __post_init__(self) -> None:
        if not 2 <= self.width <= MAX_FIXED_WIDTH:
            raise FormatError(f"fixed-point width must be 2..{MAX_FIXED_WIDTH}, got {self.width}")
        if not -64 <= self.frac <= 100:
            raise FormatError(f"fixed-point fraction bits must be -64..100, got {self.frac}")

    @property
    def step(self) -> float:
        return 2.0**-self.frac

    @property
    def max_value(self) -> float:
        return (2 ** (self.width - 1) - 1) * self.step

    @property
    def min_value(self) -> float:
        return -(2 ** (self.width - 1)) * self.step

    @property
    def integer_bits(self) -> int:
        """Bits left of the binary point, sign included."""
        return self.width - self.frac

    def __str__(self) -> str:
        return f"fx{self.width}.{self.frac}"


@dataclass(frozen=True)
class DynamicFixedPoint:
    """Fixed point whose fraction bits follow each tensor's absolute maximum."""

    width: int

    def __post_init__(self) -> None:
        if not 2 <= self.width <= MAX_FIXED_WIDTH:
            raise FormatError(f"dynamic fixed-point width must be 2..{MAX_FIXED_WIDTH}, got {self.width}")

    def frac_for(self, absmax: torch.Tensor) -> torch.Tensor:
        """Largest F with ``absmax <= (2^(W-1) - 1) * 2^-F``, as a float32 scalar tensor.

        Computed from the exponent of ``absmax`` and corrected by exact power-of-two
        scaling, so no log2 rounding can pick a scale that saturates.
        """
        qmax = float(2 ** (self.width - 1) - 1)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        frac = torch.floor(torch.log2(qmax / safe)).clamp(-64, 100)
        frac = torch.where(safe * pow2(frac) > qmax, frac - 1, frac)
        frac = torch.where(safe * pow2(frac + 1) <= qmax, frac + 1, frac)
        return torch.where(absmax > 0, frac, torch.zeros_like(frac)).clamp(-64, 100)

    def frac_of(self, absmax: float) -> int:
        """:meth:`frac_for` of a Python float, in exact float64 arithmetic (no tensors)."""
        if not absmax > 0:  # zero and NaN
            return 0
        if math.isinf(absmax):
            return -64
        qmax = float(2 ** (self.width - 1) - 1)
        frac = min(max(math.floor(math.log2(qmax / absmax)), -66), 102)
        while math.ldexp(absmax, frac) > qmax:
            frac -= 1
        while math.ldexp(absmax, frac + 1) <= qmax:
            frac += 1
        return min(max(frac, -64), 100)

    def __str__(self) -> str:
        return f"dfx{self.width}"


@dataclass(frozen=True)
class FloatFormat:
    """Binary float with ``exp`` exponent bits and ``man`` stored mantissa bits."""

    exp: int
    man: int
    finite: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.exp <= 8:
            raise FormatError(f"float exponent bits must be 1..8, got {self.exp}")
        if not 0 <= self.man <= 23:
            raise FormatError(f"float mantissa bits must be 0..23, got {self.man}")
        if not self.finite and self.exp < 2:
            raise FormatError("an IEEE-style float needs at least 2 exponent bits; use the 'fn' variant")
        if self.finite and self.exp == 8:
            raise FormatError("an 'fn' float with 8 exponent bits reaches beyond float32's range; use e8m<M>")

    @property
    def width(self) -> int:
        return 1 + self.exp + self.man

    @property
    def bias(self) -> int:
        return 2 ** (self.exp - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        top = 2**self.exp - 1 if self.finite else 2**self.exp - 2
        return top - self.bias

    @property
    def has_nan_code(self) -> bool:
        return not self.finite or self.width >= 8

    @property
    def max_value(self) -> float:
        top_mantissa = 2**self.man - 1
        if self.finite and self.has_nan_code:
            top_mantissa -= 1  # the all-ones code is NaN
        return math.ldexp(1.0 + top_mantissa / 2**self.man, self.emax)

    @property
    def min_value(self) -> float:
        return -self.max_value

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def step(self) -> float:
        """Smallest positive value (the subnormal step)."""
        return math.ldexp(1.0, self.emin - self.man)

    def __str__(self) -> str:
        for alias, fmt in ALIASES.items():
            if fmt == self:
                return alias
        return f"e{self.exp}m{self.man}{'fn' if self.finite else ''}"


@dataclass(frozen=True)
class Float32:
    """No quantization: values stay float32."""

    width: int = 32
    max_value: float = float(torch.finfo(torch.float32).max)
    min_value: float = -float(torch.finfo(torch.float32).max)
    step: float = float(2.0**-149)

    def __str__(self) -> str:
        return "fp32"


@dataclass(frozen=True)
class BlockFormat:
    """OCP Microscaling (MX): each block of ``block`` consecutive elements shares a scale.

    A block's scale is ``X = 2^e``, ``e = floor(log2 amax) - emax_elem`` clamped to
    [-127, 127] (E8M0), with amax the largest finite magnitude in the block (an all-zero
    block gets e = -127); each element is ``X * Q(v / X)``, Q rounding onto the element
    format and saturating at its largest value (FLOOR scaling can put ``amax / X`` above
    it). NaN stays NaN and does not enter amax; inf saturates like any value beyond the
    range. ``int8`` elements are ``k * 2^-6`` with k in [-127, 127].
    """

    element: str  # a key of MX_ELEMENTS
    block: int = 32

    def __post_init__(self) -> None:
        if self.element not in MX_ELEMENTS:
            raise FormatError(f"unknown MX element {self.element!r}; use one of {', '.join(MX_ELEMENTS)}")
        if not 1 <= self.block <= MAX_BLOCK:
            raise FormatError(f"MX block size must be 1..{MAX_BLOCK}, got {self.block}")

    @property
    def element_format(self) -> FloatFormat | FixedPoint:
        return MX_ELEMENTS[self.element][0]

    @property
    def emax(self) -> int:
        """The exponent of the element format's largest power of two (the spec's emax_elem)."""
        return MX_ELEMENTS[self.element][1]

    @property
    def element_max(self) -> float:
        """The largest element magnitude (int8: 127 * 2^-6, the symmetric range)."""
        return self.element_format.max_value

    @property
    def width(self) -> int:
        """Bits per element, the shared scale not counted (see :attr:`storage_bits`)."""
        return self.element_format.width

    @property
    def storage_bits(self) -> float:
        """Bits stored per element: the element and its share of the block's 8-bit scale."""
        return self.width + 8 / self.block

    def __str__(self) -> str:
        return f"mx{self.element}" + ("" if self.block == 32 else f"/{self.block}")


MAX_BLOCK = 1 << 16
# element name -> (element format, emax_elem); int8's elements k * 2^-6 are fx8.6 without -128
MX_ELEMENTS: dict[str, tuple[FloatFormat | FixedPoint, int]] = {
    "fp8-e4m3": (FloatFormat(4, 3, finite=True), 8),
    "fp8-e5m2": (FloatFormat(5, 2), 15),
    "fp6-e3m2": (FloatFormat(3, 2, finite=True), 4),
    "fp6-e2m3": (FloatFormat(2, 3, finite=True), 2),
    "fp4-e2m1": (FloatFormat(2, 1, finite=True), 2),
    "int8": (FixedPoint(8, 6), 0),
}

Format = FixedPoint | DynamicFixedPoint | FloatFormat | Float32 | BlockFormat

ALIASES: dict[str, Format] = {
    "fp16": FloatFormat(5, 10),
    "bf16": FloatFormat(8, 7),
    "fp8-e4m3": FloatFormat(4, 3, finite=True),
    "fp8-e5m2": FloatFormat(5, 2),
    "fp6-e2m3": FloatFormat(2, 3, finite=True),
    "fp6-e3m2": FloatFormat(3, 2, finite=True),
    "fp4-e2m1": FloatFormat(2, 1, finite=True),
}

_FIXED = re.compile(r"fx(\d+)\.(-?\d+)")
_DYNAMIC = re.compile(r"dfx(\d+)")
_FLOAT = re.compile(r"e(\d+)m(\d+)(fn)?")
_BLOCK = re.compile(r"mx([a-z0-9-]+?)(?:/(\d+))?")

ACCEPTED_FORMS = (
    "fx<W>.<F> (fixed point, e.g. fx8.7), dfx<W> (dynamic fixed point, e.g. dfx8), "
    "e<E>m<M>[fn] (float, e.g. e4m3fn), mx<element>[/<block>] (MX block-scaled, e.g. mxfp8-e4m3, "
    "mxint8/16), or one of fp32, " + ", ".join(ALIASES)
)


def parse_format(spec: str | Format) -> Format:
    """Parse a format string; raise :class:`FormatError` listing the accepted forms."""
    if isinstance(spec, (FixedPoint, DynamicFixedPoint, FloatFormat, Float32, BlockFormat)):
        return spec
    if not isinstance(spec, str):
        raise FormatError(f"a format must be a string, got {type(spec).__name__} {spec!r}; use {ACCEPTED_FORMS}")
    text = spec.strip().lower()
    if text == "fp32":
        return Float32()
    if text in ALIASES:
        return ALIASES[text]
    try:
        if m := _FIXED.fullmatch(text):
            return FixedPoint(int(m[1]), int(m[2]))
        if m := _DYNAMIC.fullmatch(text):
            return DynamicFixedPoint(int(m[1]))
        if m := _FLOAT.fullmatch(text):
            return FloatFormat(int(m[1]), int(m[2]), finite=bool(m[3]))
        if m := _BLOCK.fullmatch(text):
            return BlockFormat(m[1], 32 if m[2] is None else int(m[2]))
    except FormatError as exc:
        raise FormatError(f"{spec!r}: {exc}") from None
    raise FormatError(f"unknown format {spec!r}; use {ACCEPTED_FORMS}")


def element_format(spec: str | Format) -> Format:
    """:func:`parse_format` where values are rounded one at a time (activations, gradients,
    optimizer state, softmax, attention, accumulators): a block (MX) format is refused."""
    fmt = parse_format(spec)
    if isinstance(fmt, BlockFormat):
        raise FormatError(f"{str(fmt)!r} is a block (MX) format: block formats apply to the operands of a layer's "
                          "GEMMs (its input, weight and error) and to stored weights, not here; use a fixed-point "
                          "or float format")
    return fmt


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact ``2^exponent`` for integer-valued float tensors in [-126, 127], built from bits."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def saturated(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Boolean mask of the finite values outside the format's range (clipped or made inf)."""
    if isinstance(fmt, (Float32, DynamicFixedPoint, BlockFormat)):
        return torch.zeros_like(x, dtype=torch.bool)
    return (x > fmt.max_value) | (x < fmt.min_value)


def lsb(fmt: Format, value: float = 1.0) -> float:
    """The distance between neighbours of the format near ``value`` (for reasons and rules)."""
    if isinstance(fmt, FixedPoint):
        return fmt.step
    if isinstance(fmt, FloatFormat):
        exponent = max(math.frexp(abs(value))[1] - 1, fmt.emin) if value else fmt.emin
        return math.ldexp(1.0, exponent - fmt.man)
    if isinstance(fmt, DynamicFixedPoint):
        return 2.0 ** -fmt.frac_of(abs(value))
    if isinstance(fmt, BlockFormat):  # value as its block's largest magnitude
        if not value:
            return 0.0
        e = max(math.frexp(abs(value))[1] - 1 - fmt.emax, -127)
        return math.ldexp(lsb(fmt.element_format, math.ldexp(abs(value), -e)), e)
    return math.ulp(value) if value else fmt.step
