"""The ``mx`` family of ``recommend``: an MX element type for each GEMM operand (a layer's
input, weight and error), chosen from where the operand's values sit in their blocks (the
stats' ``blocks`` profiles, :class:`lpcli.stats.BlockProfile`).

A profile counts ``r = |x| / 2^floor(log2 blockmax)`` per binade under the block's top
(``below[k]``: r in ``[2^-k, 2^(1-k))``) and at or above each element type's saturation
point in the top binade (``top``). With the block's scale ``X = 2^(floor(log2 blockmax) -
emax)`` an element sees ``v = r * 2^emax``, so for each element type the profile predicts,
binade by binade, what its rounding does (:func:`block_noise`):

* a binade whose values lie below half the element's smallest step flushes to zero (the
  binade edges are powers of two, as the element's steps are, so a binade is flushed whole
  or not at all): its error is the value itself;
* any other binade rounds onto the element's step there (the normal step ``2^(E - M)`` at
  ``v``'s exponent E, or the subnormal step below ``2^emin``; INT8: ``2^-6`` throughout),
  an error of ``step^2 / 12`` in mean square (the binade just above the flushed ones rounds
  to one step or to zero, and its mean square error is the same ``step^2 / 12``);
* the values at or above the element's largest value (FLOOR scaling lets ``amax / X``
  reach past it) saturate, ``(2 - t)^2 / 3`` in mean square for a value uniform between
  the largest ``t`` and 2;
* a value within a binade ``[a, 2a)`` has the mean square ``7 a^2 / 3`` (uniform there).

The predicted noise-to-signal ratio is the summed error over the summed signal, both over
the non-zero values and in each block's own units (every block weighs alike, however far
apart the blocks' scales); it is stated as *effective resolution bits*: the b for which a
fixed-point step of ``rms / 2^b`` (noise ``step^2 / 12``) would be as loud,
``b = -log2(sqrt(12 * NSR))``. ``tests/test_mx_family.py`` checks the prediction against
the real MX rounding of tensors with different spreads.

The rule: the element type with the fewest stored bits among those whose effective
resolution is at least ``resolution_bits`` and, for errors, whose flushed share is at most
``underflow`` (an error flushed in its block is a contribution no later step recovers, as
for the other families' underflow rule); ties go to the higher effective resolution. Where
no element type qualifies, the operand keeps its element-wise float format, said so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .formats import BlockFormat, FixedPoint

# Every element type, cheapest first (stored bits), as the rule and the widening try them.
ELEMENTS = ("fp4-e2m1", "fp6-e2m3", "fp6-e3m2", "fp8-e4m3", "fp8-e5m2", "int8")


@dataclass(frozen=True)
class BlockNoise:
    """What an element type's rounding does to the values of one block profile."""

    nsr: float  # predicted noise power over signal power (non-zero values)
    flushed: float  # share of the non-zero values flushed to zero within their block
    saturated: float  # share at or above the element's largest value at the block's scale

    @property
    def effective_bits(self) -> float:
        """The b of a fixed-point step ``rms / 2^b`` with the same noise power."""
        return math.inf if self.nsr <= 0 else -math.log2(math.sqrt(12 * self.nsr))


def element_step(fmt: BlockFormat, binade: int) -> float | None:
    """The element's step for values in binade ``binade`` under the block top, in units of
    the top binade's lower edge (``r`` units); ``None`` where the values flush to zero."""
    element = fmt.element_format
    if isinstance(element, FixedPoint):
        step = element.step
    else:
        exponent = max(fmt.emax - binade, element.emin)
        step = math.ldexp(1.0, exponent - element.man)
    if math.ldexp(1.0, fmt.emax - binade + 1) <= step / 2:  # the whole binade lies below half a step
        return None
    return math.ldexp(step, -fmt.emax)


def saturation_point(fmt: BlockFormat) -> float:
    """``t``: the element's largest value over ``2^emax`` (a value with ``r >= t`` saturates)."""
    return math.ldexp(fmt.element_max, -fmt.emax)


def block_noise(profile: dict[str, Any], fmt: BlockFormat) -> BlockNoise:
    """The rounding ``fmt`` would do to the values of ``profile`` (module docstring)."""
    values = profile["values"]
    if not values:
        return BlockNoise(0.0, 0.0, 0.0)
    below = profile["below"]
    noise = signal = flushed = 0.0
    for binade, count in enumerate(below):
        if not count:
            continue
        square = 7 / 3 * math.ldexp(1.0, -2 * binade)  # the last bin: everything further down, counted at its top
        signal += count * square
        step = None if binade == len(below) - 1 else element_step(fmt, binade)
        if step is None:
            noise += count * square
            flushed += count
        else:
            noise += count * step * step / 12
    t = saturation_point(fmt)
    saturated = profile["top"].get(repr(t), 0) if t < 2 else 0
    noise += saturated * (2 - t) ** 2 / 3
    return BlockNoise(noise / signal, flushed / values, saturated / values)


def element_resolution(fmt: BlockFormat) -> int:
    """Bits of resolution in the block's top binade: mantissa bits (INT8: its 6 fraction bits)."""
    element = fmt.element_format
    return element.frac if isinstance(element, FixedPoint) else element.man


def element_depth(fmt: BlockFormat) -> int:
    """Binades under the block's top that the element keeps (the deeper ones flush)."""
    depth = 0
    while element_step(fmt, depth) is not None:
        depth += 1
    return depth


def widen_element(fmt: BlockFormat, kind: str) -> BlockFormat:
    """The cheapest element type (same block size) that keeps at least ``fmt``'s resolution
    and depth and gains resolution (``kind="resolution"``) or depth (``"range"``); ties go
    to the larger gain. ``fmt`` itself where no element type does."""
    resolution, depth = element_resolution(fmt), element_depth(fmt)
    better = []
    for name in ELEMENTS:
        other = BlockFormat(name, fmt.block)
        r, d = element_resolution(other), element_depth(other)
        if r < resolution or d < depth:
            continue
        gain = r - resolution if kind == "resolution" else d - depth
        if gain > 0:
            better.append((other.width, -gain, other))
    return min(better, key=lambda c: c[:2])[2] if better else fmt


@dataclass(frozen=True)
class Choice:
    fmt: BlockFormat | None  # None: no element type qualifies
    reason: str


def choose_element(profile: dict[str, Any], role: str, resolution_bits: float, underflow: float | None,
                   widths: tuple[int, ...] | None, widest: int) -> Choice:
    """The rule of the module docstring for one operand. ``underflow``: the flush limit
    (errors), ``None`` for none; ``widths``/``widest``: the element widths allowed."""
    block = profile.get("block", 32)
    candidates = [BlockFormat(name, block) for name in ELEMENTS]
    allowed = [f for f in candidates if f.width <= widest and (widths is None or f.width in widths)]
    if not allowed:
        return Choice(None, f"no MX element width is allowed (4, 6 and 8 bits; at most {widest})")
    scored = [(f, block_noise(profile, f)) for f in allowed]
    passing = [(f, n) for f, n in scored
               if n.effective_bits >= resolution_bits and (underflow is None or n.flushed <= underflow)]
    need = f"effective resolution >= {resolution_bits:g} bits" + (
        f", at most {underflow:.0%} flushed in their blocks" if underflow is not None else "")
    if not passing:
        best = max(scored, key=lambda c: c[1].effective_bits)
        return Choice(None, f"no MX element type gives {need} (best: {best[0]}, {_describe(best[1])})")
    fmt, noise = min(passing, key=lambda c: (c[0].storage_bits, -c[1].effective_bits))
    cheaper = [f"{f.element} {_describe(n)}" for f, n in scored if f.storage_bits < fmt.storage_bits]
    return Choice(fmt, f"{role} in blocks of {block}: {_describe(noise)} ({need})"
                  + (f"; cheaper element types fall short: {'; '.join(cheaper)}" if cheaper else "")
                  + f"; {fmt.storage_bits:g} bits stored per element with the 8-bit scale")


def _describe(noise: BlockNoise) -> str:
    text = f"{noise.effective_bits:.1f} effective bits"
    if noise.flushed:
        text += f", {noise.flushed:.1%} flushed"
    if noise.saturated:
        text += f", {noise.saturated:.1%} saturated"
    return text

