"""``recommend``: rules that turn layer statistics into a plan, each decision with
the one-line reason a user can check.

Fixed point ``fx<W>.<F>`` is split into integer bits ``I = W - F`` (range, sign
included) and fraction bits ``F`` (resolution), each from its own rule:

* range: ``I = floor(log2(top)) + 2 + headroom`` holds ``top`` with ``headroom``
  doublings to spare (weights grow as training goes on; 50 analyze steps see only the
  start). ``top`` is the 99.9th percentile of the magnitudes (``Rules.range_from =
  "p999"``, the default: one outlier no longer costs a bit; the share this clips, read
  off the binade histogram, is stated in the reason) or the absolute maximum
  (``"absmax"``: nothing seen saturates). Weights always take the absolute maximum: a clipped weight
  loses its update at every step, not once.
* resolution: the step is at most ``rms / 2^resolution_bits``, so rounding noise
  (step/sqrt(12) for nearest rounding) stays ``resolution_bits`` binary orders below
  the signal; for errors and weight gradients also at most ``underflow`` of the
  non-zero values may round to zero, read off the binade histogram (a weight gradient
  that rounds to zero is an update no optimizer can recover).
* weights: the update ``|lr * g|`` against the weight step. Plain SGD drops every
  update below half a step, so without Kahan summation the weights need
  ``F >= -log2(median |u|) - 1``. With Kahan the compensation carries the small
  updates and the weights need only their resolution rule.
* errors and weight gradients, and Sakr & Shanbhag (ICLR 2019, "Per-Tensor
  Fixed-Point Quantization of the Back-Propagation Algorithm"): they put a gradient
  tensor's range at a multiple of its *largest* standard deviation and its step at its
  *smallest*, so the range is set by the loud elements and the resolution by the quiet
  ones. lpcli has the same split with what a per-tensor summary holds (one ``rms`` and a
  histogram, no per-element or per-step deviations): the range from the top of the
  distribution (``absmax`` or, for ``range_from="p999"``, the 99.9th percentile, which
  is about 3.3 standard deviations of a Gaussian), the step from its bottom (the
  underflow rule: the step at which at most ``underflow`` of the non-zero values
  round to zero, stricter than a step at the smallest deviation). It is an adaptation,
  not the paper's criteria: their constants come from a noise-gain analysis that
  lpcli does not repeat.
* floats (``Rules.family = "float"``, ``e<E>m<M>fn``; ``e8m<M>`` with 8 exponent bits):
  the same two ends. The exponent bits are the fewest whose window holds the range
  (largest value >= ``top * 2^headroom``) and reaches down to the fixed-point rule's
  step (smallest subnormal <= ``2^-F``, so nothing the fixed point would keep
  underflows); the bias is IEEE's, so the window is not centred on the data and may
  need an exponent bit more than ``log2`` of the binades spanned. Mantissa bits
  ``M = resolution_bits``: the relative step ``2^-M`` puts the step at the rms at most
  ``rms / 2^resolution_bits``, the fixed-point resolution rule (and finer below it).
* MX (``Rules.family = "mx"``): the float family's plan, with each GEMM operand (a layer's
  input, weight and error, where the stats hold its block profile) in the cheapest MX
  element type whose rounding, predicted from where the operand's values sit in their
  blocks, is at most as loud as a fixed-point step of ``rms / 2^mx_resolution_bits``
  (errors: at most ``underflow`` flushed within their blocks); see :mod:`lpcli.mx_family`.
* options applied to every format last: ``margin`` extra resolution bits (fraction or
  mantissa), ``max_bits`` caps a width (resolution lost, said so), ``widths`` rounds a
  width up to the next one the hardware has (fixed point keeps its integer bits and
  gains fraction bits, a float gains mantissa bits); a width above the largest allowed
  is capped with a note.
* softmax (class count N): the input ``z - max(z)`` needs its range to reach the logit
  gap ``ln((N-1) * c / (1-c))`` of a prediction with confidence ``c``; the error
  ``p - y`` (range +-1) needs a step of at most ``1/N`` to hold a non-target
  ``p ~ 1/N`` at the start of training. See :func:`softmax_formats` for both families
  and how the rules were checked against training (``benchmarks/softmax_sweep.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .accumulate import BLOCK_ROLES, GEMMS
from .attention import ROLES as ATTENTION_ROLES
from .cost import CostTable, step_cost, stored_bits
from .errors import InputError
from .formats import MAX_FIXED_WIDTH, BlockFormat, FixedPoint, Float32, FloatFormat, Format
from .models import ROOT
from .mx_family import choose_element, widen_element
from .optim import compensation_format
from .plan import TENSORS, Plan
from .recipe import Precision
from .stats import QUANTILES


class RulesError(ValueError):
    """An invalid rule setting; ``field`` names the :class:`Rules` field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Rules:
    headroom_bits: int = 1
    resolution_bits: int = 4
    underflow: float = 0.01
    confidence: float = 0.99  # softmax input range: the logit gap of a prediction this confident
    softmax_input_frac: int = 2  # softmax input fixed point: fraction bits (logit step 2^-F = 1/4 nat: inference)
    softmax_error_margin: int = 0  # softmax error fixed point: bits beyond F = ceil(log2 N)
    softmax_input_man: int = 2  # softmax input float: mantissa bits
    softmax_error_man: int = 2  # softmax error float: mantissa bits
    attention_probs_margin: int = 2  # attention P fixed point: fraction bits beyond ceil(log2 N_keys)
    attention_probs_man: int = 2  # attention P float: mantissa bits
    attention_input_frac: int = 2  # attention S - rowmax(S) fixed point: fraction bits (a step of 2^-F nats)
    attention_input_man: int = 2  # attention S - rowmax(S) float: mantissa bits
    accumulators: bool = False  # also plan each layer's GEMM accumulators (from the stats' gemms)
    accumulator_chunk: int | None = 32  # terms per partial sum (None: one sequential sum)
    accumulator_fixed_guard: int = 1  # fixed-point accumulator: step at most the products' rms / 2^guard
    accumulator_float_guard: int = 2  # float accumulator: mantissa bits beyond the growth of the sums' spread
    accumulator_error_guard: int = 0  # the same for the input gradient's float accumulator (errors passed back)
    accumulator_range_bits: int = 2  # accumulator range: doublings beyond the headroom (an overflow spoils a sum)
    max_bits: int = MAX_FIXED_WIDTH
    kahan: bool = True
    family: str = "fixed"  # "fixed" (fx<W>.<F>), "float" (e<E>m<M>fn), "mx", or several ("fixed,mx": by objective)
    mx_resolution_bits: float = 2.0  # mx: effective resolution each GEMM operand's element type must reach (mx_family)
    objective: str = "bits"  # with several families, what the choice minimises: bits, energy or memory (lpcli.cost)
    range_from: str = "p999"  # "p999" or "absmax": the value the range must hold (weights: always absmax)
    widths: tuple[int, ...] | None = None  # widths the hardware has; every format is rounded up to one
    margin: int = 0  # extra resolution bits (fraction or mantissa) on every format

    def __post_init__(self) -> None:
        parts = self.families
        if not parts or any(f not in FAMILIES for f in parts) or len(set(parts)) < len(parts):
            raise RulesError("family", f"family must be one of {', '.join(FAMILIES)} or several of them separated by "
                             f"commas (fixed,mx), got {self.family!r}")
        if self.objective not in OBJECTIVES:
            raise RulesError("objective", f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.range_from not in RANGES:
            raise RulesError("range_from", f"range_from must be one of {', '.join(RANGES)}, got {self.range_from!r}")
        if self.widths is not None:
            if not self.widths or any(not 2 <= w <= MAX_FIXED_WIDTH for w in self.widths):
                raise RulesError("widths", f"widths must be 2..{MAX_FIXED_WIDTH}, got {list(self.widths)}")
            if min(self.widths) > self.max_bits:
                raise RulesError("widths", f"no width in {list(self.widths)} is at most max_bits {self.max_bits}")
        if self.margin < 0:
            raise RulesError("margin", f"margin must be >= 0, got {self.margin}")
        if not 0 <= self.mx_resolution_bits <= 8:
            raise RulesError("mx_resolution_bits", f"mx_resolution_bits must be 0..8, got {self.mx_resolution_bits}")
        if self.accumulator_chunk is not None and self.accumulator_chunk < 1:
            raise RulesError("accumulator_chunk", f"accumulator_chunk must be >= 1, got {self.accumulator_chunk}")

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.family.split(","))

    @property
    def allowed_widths(self) -> tuple[int, ...] | None:
        return None if self.widths is None else tuple(sorted({w for w in self.widths if w <= self.max_bits}))

    @property
    def widest(self) -> int:
        allowed = self.allowed_widths
        return allowed[-1] if allowed else self.max_bits


FAMILIES = ("fixed", "float", "mx")
OBJECTIVES = ("bits", "energy", "memory")
# Roles whose small values matter one by one: an error, gradient or momentum entry rounded
# to zero is a contribution no later step recovers, so at most ``underflow`` of them may flush.
UNDERFLOW_ROLES = ("error", "weight_grad", "momentum", "variance")
NOTHING_SEEN = {
    "input": "no floating-point input seen (integer ids, or the module is never called): nothing to round",
    "weight": "stores no parameters of its own (tied to another layer's): nothing to store",
    "activation": "no floating-point output seen (the module is never called): nothing to round",
    "error": "no error seen (the output carries no gradient, or the module is never called): nothing to round",
    "weight_grad": "no weight gradient seen: nothing to round",
    "momentum": "no momentum buffer (momentum 0, or the stats' optimizer keeps none): nothing to store",
    "variance": "no second moment (only Adam and AdamW keep one): nothing to store",
}
RANGES = ("absmax", "p999")


def range_bits(absmax: float, headroom: int) -> int:
    """Integer bits (sign included) whose range holds ``absmax`` with ``headroom`` doublings."""
    if absmax <= 0:
        return 1
    return math.floor(math.log2(absmax)) + 2 + headroom


def range_top(summary: dict[str, Any], range_from: str, tensor: str) -> tuple[float, str]:
    """The magnitude the range must hold and its name: the absolute maximum, or the 99.9th
    percentile with ``range_from="p999"`` (weights always keep the maximum)."""
    if range_from == "p999" and tensor != "weight" and summary.get("p999", 0) > 0:
        return summary["p999"], "p99.9"
    return summary["absmax"], "max"


def saturation_share(summary: dict[str, Any], limit: float) -> float:
    """Predicted share of *all* elements with ``|x| >= limit``, from the binade histogram
    (exact for a power-of-two ``limit``, such as a fixed-point range ``2^(I-1)``; inside a
    binade the count is spread evenly over ``log2 |x|``), scaled by the non-zero share."""
    hist = summary.get("log2_hist")
    if not hist or not hist["counts"] or limit <= 0:
        return 0.0
    counts, lowest = hist["counts"], hist["lowest"]
    edge = math.log2(limit)
    above = 0.0
    for i, c in enumerate(counts):
        lo = lowest + i
        above += c * min(1.0, max(0.0, lo + 1 - edge))
    return above / sum(counts) * (1 - summary.get("zero_share", 0.0))


def noise_fraction_bits(rms: float, resolution_bits: int) -> int:
    """Fraction bits whose step is at most ``rms / 2^resolution_bits``."""
    if rms <= 0:
        return 0
    return math.ceil(resolution_bits - math.log2(rms))


def underflow_share(summary: dict[str, Any], frac: int) -> float:
    """Share of non-zero values below half a step ``2^-(frac+1)``, which nearest rounding
    flushes to zero. Half a step is a binade edge, so the histogram gives it exactly."""
    hist = summary.get("log2_hist")
    if not hist or not hist["counts"]:
        return 0.0
    counts = hist["counts"]
    below = sum(c for i, c in enumerate(counts) if hist["lowest"] + i + 1 <= -frac - 1)
    return below / sum(counts)


def underflow_fraction_bits(summary: dict[str, Any], share: float) -> int:
    """Fewest fraction bits with at most ``share`` of non-zero values rounding to zero."""
    hist = summary.get("log2_hist")
    if not hist or not hist["counts"]:
        return 0
    lowest = hist["lowest"]
    for frac in range(-lowest - 160, -lowest + 2):
        if underflow_share(summary, frac) <= share:
            return frac
    return -lowest + 1


def plain_sgd_fraction_bits(update_median: float) -> int:
    """Fraction bits at which the median update is at least half a weight step."""
    if update_median <= 0:
        return 0
    return math.ceil(-math.log2(update_median) - 1)


def logit_gap(classes: int, confidence: float) -> float:
    """Logit gap that gives the target probability ``confidence`` among ``classes``.

    It is also the range the softmax input needs: a fixed-point ``z - max(z)`` that
    saturates at ``-R`` gives every class below it the probability weight ``e^-R``, so
    the ``N-1`` wrong classes keep at least ``(N-1) e^-R`` against the target's 1 and keep
    being pushed down however well they are separated. ``R >= logit_gap(N, c)`` caps
    that floor at ``(1-c)/c`` (1% for c = 0.99).
    """
    return math.log((classes - 1) * confidence / (1 - confidence))


def softmax_input_format(classes: int, rules: Rules) -> tuple[FixedPoint, str]:
    """Fixed point for the softmax input ``z - max(z)`` (values in ``[-R, 0]``).

    Range: ``I = floor(log2 gap) + 2`` integer bits (sign included), the fewest whose
    range ``-2^(I-1)`` reaches ``-logit_gap(N, c)``. Resolution: ``softmax_input_frac``
    fraction bits, independent of N, for inference: the step must keep the top classes
    apart (see :func:`softmax_formats`).
    """
    gap = logit_gap(classes, rules.confidence)
    integer = range_bits(gap, 0)
    frac = rules.softmax_input_frac
    fmt = FixedPoint(max(2, integer + frac), max(2, integer + frac) - integer)
    return fmt, (f"z-max(z) must reach -{gap:.1f} = -ln((N-1)c/(1-c)) for N={classes}, c={rules.confidence}: "
                 f"{integer} integer bits (range -{2 ** (integer - 1)}); {fmt.frac} fraction bits "
                 f"(logit step {fmt.step:g}: the prediction is the argmax of the rounded input, and a coarser step "
                 f"ties the top classes)")


def softmax_error_format(classes: int, rules: Rules) -> tuple[FixedPoint, str]:
    """Fixed point for the error ``p - y`` in ``[-1, 1)`` before the 1/batch mean.

    One integer bit (the sign) and ``F = ceil(log2 N) + softmax_error_margin`` fraction
    bits: the fewest whose step is at most ``1/N``, so a non-target class at its starting
    ``p ~ 1/N`` is not flushed to zero. The target's error is minus the sum of the rounded
    non-target errors (see :mod:`lpcli.simulate`), so each row still sums to zero and what
    rounding takes from the wrong classes cannot push every logit the same way. Width
    ``F + 1``: 5, 8, 11 bits for N = 10, 100, 1000. One bit fewer flushes every wrong class
    at the start and training stalls (chance accuracy at N = 100 and 1000).
    """
    frac = math.ceil(math.log2(classes)) + rules.softmax_error_margin
    fmt = FixedPoint(frac + 1, frac)
    margin = f" {rules.softmax_error_margin:+d} bit" if rules.softmax_error_margin else ""
    return fmt, (f"p-y in [-1, 1); a non-target p ~ 1/N = {1 / classes:.3g} at the start must not flush: "
                 f"step <= 1/N, F = ceil(log2 N) = {math.ceil(math.log2(classes))}{margin} (the target's error is "
                 f"minus the sum of the others: rows stay zero-sum): flushes only |p-y| < {2.0 ** -(frac + 1):.3g}")


def _smallest_float(man: int, holds: Callable[[FloatFormat], bool]) -> FloatFormat:
    """The ``e<E>m<man>fn`` format with the fewest exponent bits (1-7) for which ``holds``."""
    for exp in range(1, 8):
        fmt = FloatFormat(exp, man, finite=True)
        if holds(fmt):
            return fmt
    return FloatFormat(7, man, finite=True)


def softmax_input_float(classes: int, rules: Rules) -> tuple[FloatFormat, str]:
    """Float (``e<E>m<M>fn``, saturating) for the softmax input ``z - max(z)``.

    Range: the fewest exponent bits whose largest value reaches ``logit_gap(N, c)``
    (saturation at the top of the range is the same floor as in fixed point).
    Resolution: ``softmax_input_man`` mantissa bits; near 0, where the classes that
    compete with the target sit, a float is finer than the fixed point anyway.
    """
    gap = logit_gap(classes, rules.confidence)
    fmt = _smallest_float(rules.softmax_input_man, lambda f: f.max_value >= gap)
    return fmt, (f"z-max(z) must reach -{gap:.1f} = -ln((N-1)c/(1-c)) for N={classes}, c={rules.confidence}: "
                 f"{fmt.exp} exponent bits (max {fmt.max_value:g}); {fmt.man} mantissa bits (relative step "
                 f"2^-{fmt.man})")


def softmax_error_float(classes: int, rules: Rules) -> tuple[FloatFormat, str]:
    """Float (``e<E>m<M>fn``) for the error ``p - y`` in ``[-1, 1]``.

    Range: the fewest exponent bits whose smallest subnormal ``2^(emin - M)`` is at most
    ``1/(2N)`` (as for fixed point, two steps under a starting ``p ~ 1/N``) and whose
    largest value reaches 1. Resolution: ``softmax_error_man`` mantissa
    bits, a relative step that, unlike fixed point, does not depend on N.
    """
    fmt = _smallest_float(rules.softmax_error_man, lambda f: f.step <= 1 / (2 * classes) and f.max_value >= 1)
    return fmt, (f"p-y in [-1, 1]; a non-target p ~ 1/N = {1 / classes:.3g} at the start must survive rounding: "
                 f"{fmt.exp} exponent bits (smallest subnormal {fmt.step:.3g} <= 1/(2N)); {fmt.man} mantissa "
                 f"bits (relative step 2^-{fmt.man})")


def softmax_formats(classes: int, rules: Rules | None = None, family: str = "fixed") -> tuple[
        Format, str, Format, str]:
    """``(input_fmt, input_reason, error_fmt, error_reason)`` for N = ``classes`` in the
    ``"fixed"`` (``fx<W>.<F>``) or ``"float"`` (``e<E>m<M>fn``) family.

    The rules, and how ``benchmarks/softmax_sweep.py`` bears them out (MLP dim-128-N on
    overlapping Gaussian classes, fp32 SGD everywhere but the softmax, 2 seeds; fp32
    93-95% for N = 10, 100, 1000):

    * error, fixed: ``W = F + 1 = ceil(log2 N) + 1`` (5, 8, 11 bits), with the target's
      error taken as minus the sum of the rounded others (zero-sum rows, see
      :mod:`lpcli.simulate`). This is the ``log2 N + c`` form, and it fits: the measured
      thresholds were 3, 7, 10 bits, the rule 1-2 bits above them. Below the threshold
      every wrong class flushes at the start and training stays at chance (N = 100: 1.0%
      at 6 bits; N = 1000: 0.1% at 9). Rounding each entry on its own instead lets the
      logits drift (MNIST-1D, N = 10: 49 points lost at 4 bits, 1.2 at 6, where zero-sum
      rows lose at most 0.4 from 4 bits on; ``benchmarks/softmax_error_rows.py``).
    * input, fixed: the range, not the resolution, is what grows with N. Saturating
      ``z - max(z)`` at ``-R`` leaves each wrong class ``e^-R`` of the target's weight;
      ``R >= ln((N-1)c/(1-c))`` (c = 0.99) caps that floor at 1% and gives
      ``I = floor(log2 gap) + 2`` integer bits (4, 5, 5). That is ``log2 ln N + c``, not
      ``log2 N + c``: it grows like log log N. The sweep put the range threshold at
      exactly the rule's I for N = 10 and 1000 (one bit less: 88.6% vs 93.0, 91.4% vs
      95.4; a range of -4 at N=1000 gave 35%) and one bit below it for N = 100. The
      resolution hardly matters *for training*: at the rule's range even 2-bit inputs
      (steps of R/2) trained within 1 point for all three N. Inference decides it: the
      hardware's prediction is the argmax of the rounded ``z - max(z)``, and a coarse
      step ties the top classes (ties go to the lowest index). On digits-mlp (seeds 0-4,
      Kahan at the recommended plan) a step of 2 nats (``F = -1``) tied 6.4-7.5% of the
      test rows and cost 1.4-3.3 points against the fp32 logits' argmax; ``F = 0``: ties
      2.5-3.6%, up to 1.1 points; ``F = 1``: 1.1-2.5%, up to 1.1 points; ``F = 2`` (a
      quarter nat): 0.3-1.7% tied, at most 0.6 points lost, as accurate as the fp32
      logits in 3 of 5 seeds. So ``F = softmax_input_frac = 2``: W = I + 2 = 6, 7, 7
      bits.
    * error, float: the bottom of the range does the fixed-point job (half the smallest
      subnormal below 1/N), mantissa bits (2) bound the relative error: ``e4m2fn``,
      ``e4m2fn``, ``e5m2fn`` for 10, 100, 1000 classes, i.e. ``E ~ log2 log2 N``: each
      extra exponent bit doubles the binades covered, so a float needs only
      ``O(log log N)`` bits where fixed point needs ``log2 N``. Measured thresholds 5, 5,
      6 bits (one exponent bit fewer is at chance for N = 100 and 1000).
    * input, float: the fewest exponent bits whose maximum reaches the logit gap, and
      2 mantissa bits: ``e2m2fn``, ``e3m2fn``, ``e3m2fn``. The float's resolution is
      finest near 0, where the competing classes are.

    Training with the recommended input and error formats together stayed within 1
    point of fp32 for every N in both families, and each width is at most 2 bits above
    the measured threshold (see the table in the README).
    """
    rules = rules or Rules()
    if classes < 2:
        raise ValueError(f"softmax formats need at least 2 classes, got {classes}")
    if family == "fixed":
        return (*softmax_input_format(classes, rules), *softmax_error_format(classes, rules))
    if family == "float":
        return (*softmax_input_float(classes, rules), *softmax_error_float(classes, rules))
    raise ValueError(f"family must be 'fixed' or 'float', got {family!r}")


def attention_probs_format(keys: int, rules: Rules, family: str) -> tuple[Format, str]:
    """The probabilities ``P`` of an attention softmax over ``keys`` keys, in ``[0, 1]``.

    At the start of training a key holds ``p ~ 1/N``, and a step coarser than that flushes
    it (nearest rounding flushes ``p < step/2``): the output softmax's class-count bound
    with the key count for the class count. Keeping ``1/N`` is not enough for P, though:
    a step of ``1/N`` maps every ``p`` in ``(0.5/N, 1.5/N)`` to ``1/N``, so the forward
    pass stops seeing the scores' changes, the scores drift apart and keys fall below
    ``0.5/N`` and flush, for good (a flushed key's ``dS`` is zero). Fixed point: one
    integer bit (the sign; 1 itself saturates to ``1 - 2^-F``, one step) and ``F =
    ceil(log2 N) + attention_probs_margin`` fraction bits, a step of ``1/(4N)`` by default.
    ``benchmarks/attention_sweep.py`` (one attention layer that must average over all N
    keys, N = 16, 64, 256, 4 seeds) put the fixed-point threshold at exactly ``log2 N + 2``
    bits (6, 8, 10); with a margin of 0, 1 and 2 the recommended formats trained to
    82.8/100.0/86.1%, 99.7/96.4/97.9% and 100.0/99.9/99.9% of fp32's 100%. Float: the
    fewest exponent bits whose smallest subnormal is at most ``1/(2N)`` and whose largest
    value reaches 1, and ``attention_probs_man`` mantissa bits (a relative step, the same
    for every p: sufficient at every N measured).
    """
    log2n = math.ceil(math.log2(max(keys, 2)))
    if family == "float":
        fmt = _smallest_float(rules.attention_probs_man, lambda f: f.step <= 1 / (2 * keys) and f.max_value >= 1)
        return fmt, (f"P in [0, 1]; a key's p ~ 1/N = {1 / keys:.3g} at the start (N = {keys} keys) must survive "
                     f"rounding: {fmt.exp} exponent bits (smallest subnormal {fmt.step:.3g} <= 1/(2N)); {fmt.man} "
                     f"mantissa bits (relative step 2^-{fmt.man})")
    frac = log2n + rules.attention_probs_margin
    fmt = FixedPoint(frac + 1, frac)
    return fmt, (f"P in [0, 1); a key's p ~ 1/N = {1 / keys:.3g} at the start (N = {keys} keys) must not flush and "
                 f"must be resolved: F = ceil(log2 N) + {rules.attention_probs_margin} = {frac}, a step of at most "
                 f"1/{2 ** rules.attention_probs_margin}N (a step of 1/N freezes p near 1/N while the scores drift "
                 f"until keys flush); flushes p < {2.0 ** -(frac + 1):.3g}")


def attention_input_format(keys: int, summary: dict[str, Any], rules: Rules, family: str) -> tuple[Format, str]:
    """The softmax input ``S - rowmax(S)`` of an attention over ``keys`` keys (values <= 0).

    Range: the score spread in the stats (``|S - rowmax(S)|``, its 99.9th percentile or
    maximum, ``range_from``) with ``headroom_bits`` doublings for the scores to sharpen as
    training goes on. A score saturated at ``-R`` keeps ``e^-R`` of the top key's weight,
    so ``N`` keys keep at most ``N e^-R`` between them (said in the reason). Resolution: a
    step of ``2^-F`` nats moves a probability by a factor of at most ``e^(2^-(F+1))``, the
    same for every N: ``attention_input_frac`` fraction bits, or ``attention_input_man``
    mantissa bits (a float is finer near 0, where the keys that matter sit).
    """
    top, name = range_top(summary, rules.range_from, "input") if summary else (0.0, "max")
    integer = range_bits(top, rules.headroom_bits) if top > 0 else 2
    reach = 2.0 ** (integer - 1)
    if family == "float":
        fmt = _smallest_float(rules.attention_input_man, lambda f: f.max_value >= reach * (1 - 2.0 ** -(
            rules.attention_input_man + 1)))
        reach = fmt.max_value
        what = f"{fmt.exp} exponent bits (max {fmt.max_value:g}); {fmt.man} mantissa bits (relative step 2^-{fmt.man})"
    else:
        fmt = FixedPoint(integer + rules.attention_input_frac, rules.attention_input_frac)
        what = (f"{integer} integer bits; {fmt.frac} fraction bits (a step of {fmt.step:g} nats moves p by at most "
                f"x{math.exp(fmt.step / 2):.3f})")
    return fmt, (f"S-rowmax(S): score spread {name} {top:.3g} (+{rules.headroom_bits} bit) -> range -{reach:g}: "
                 f"{what}; "
                 f"N = {keys} keys saturated there keep at most N e^-R = {keys * math.exp(-reach):.2g} of the top "
                 f"key's weight")


def recommend_attention(entry: dict[str, Any], rules: Rules) -> tuple[dict[str, Format], dict[str, str]]:
    """Formats and reasons for one module's attention (``entry``: its stats, see
    :mod:`lpcli.stats`): P and ``S - rowmax(S)`` from the key count and the score spread,
    the errors ``dP`` and ``dS`` from their statistics by the error rules."""
    keys = int(entry.get("keys") or 0)
    formats: dict[str, Format] = {}
    reasons: dict[str, str] = {}
    if not keys:
        for role in ATTENTION_ROLES:
            formats[role], reasons[role] = Float32(), "no attention seen in the analyzed steps: nothing to round"
        return formats, reasons
    formats["input"], reasons["input"] = attention_input_format(keys, entry.get("input") or {}, rules, rules.family)
    formats["probs"], reasons["probs"] = attention_probs_format(keys, rules, rules.family)
    rule = float_tensor_format if rules.family == "float" else fixed_tensor_format
    # The underflow rule on dS asked for 24 bits on vit-fashion, for entries that do not matter.
    for role, as_tensor, note in (("input_error", "activation", "; dS = P(dP - D) is as small as P: its tiny "
                                   "entries belong to keys with P ~ 0, so no underflow rule"),
                                  ("probs_error", "error", "")):
        if entry.get(role):
            formats[role], reasons[role] = rule(as_tensor, entry[role], {"p50": 0.0}, rules)
            reasons[role] += note
        else:
            formats[role], reasons[role] = Float32(), "no error seen (nothing trained through it): nothing to round"
    for role in ("input", "probs"):
        formats[role], note = finish(formats[role], rules)
        reasons[role] += note
    return formats, reasons


def accumulator_format(growth: dict[str, Any], chunk: int | None, rules: Rules,
                       result_max: float = 0.0, kind: str = "forward") -> tuple[Format, str]:
    """The accumulator of one GEMM kind of one layer, from how its sums grow (the stats'
    ``gemms``: the rms ``a`` of the non-zero products, and per length ``L`` the rms of the
    sum of ``L`` terms and the largest running sum up to ``L``), summed in chunks of
    ``chunk`` terms (``lpcli.accumulate``). ``result_max``: the largest sum the layer's stats
    saw in full (its output for the forward GEMM, its weight gradient), beyond the sample.

    An addition rounds to the running sum's resolution; an addend far below it is swamped.
    Sakr et al. ("Accumulation Bit-Width Scaling for Ultra-Low Precision Training of Deep
    Networks", ICLR 2019) show that the variance a float accumulator retains collapses once
    the mantissa is too short for the growth of the sum's spread over its addends' (for
    independent addends ``1/2 log2 n`` bits), and that chunking splits that growth. lpcli's
    rule (its own) takes the growth measured in the stats instead of assuming independent
    addends, and calibrates its guard bits against ``benchmarks/accumulator_sweep.py``:

    * float: mantissa bits = ``ceil(log2(growth))`` + ``accumulator_float_guard`` (for the
      ``input_grad`` GEMM, ``kind``: ``accumulator_error_guard``), the growth being the
      larger of two stages' spread ratios: the rms of a chunk's sum over the products' rms
      ``a``, and (with chunks) the rms of the whole sum over the chunk sums' rms; the
      exponent holds the largest running sum (+ headroom) and resolves
      ``a / 2^accumulator_float_guard``;
    * fixed point: the range holds the largest running sum (+ headroom); the step is
      ``a / 2^accumulator_fixed_guard`` whatever the length (a fixed-point addition's error
      is absolute).

    A fixed-point guard of 1 bit rounds each addend to about its rms over 2: unbiased noise
    below the spread of the sum. A float's step grows with the running sum, and the sums
    that reach 2-4x their rms (the tail, which carries the activations' signal) keep 1-2
    bits less than the rms stage says: its guard is one bit more. Both were calibrated on
    digits-cnn (3 seeds: a fixed guard of 2 lay 1 to 3 bits above the empirical thresholds;
    a float guard of 1 lost 1.1 points in the forward GEMMs at chunk 1, the threshold one
    bit above it); the README has the sweeps. The input gradient's float sums need no
    guard: their error is relative, so small errors survive (a fixed-point step flushes
    them), and it is noise that every weight gradient below sums over its batch and
    positions (with 2 guard bits, digits-cnn lost nothing at 0 or 1 mantissa bits, 4 bits
    less). The range takes ``accumulator_range_bits`` doublings beyond the headroom: the
    running sums are sampled (their tail is seen in part), they grow as the weights grow
    in training, and a running sum that overflows spoils its whole output (on digits-cnn,
    float accumulators sized on the sample alone overflowed in 2-6% of the forward
    additions and training collapsed).
    """
    terms, lengths = growth["terms"], growth["lengths"]
    addend, top = growth["addend_rms"], max(growth["partial_max"][-1], result_max)
    if addend <= 0 or top <= 0:
        return Float32(), "no non-zero products seen in the analyzed steps: left in float32"
    c = terms if chunk is None or chunk >= terms or chunk == 1 else chunk  # chunks of 1: one sequential sum

    def at(series: str, length: int) -> float:  # at the first recorded length >= length
        return growth[series][next(i for i, n in enumerate(lengths) if n >= length)]

    headroom = rules.headroom_bits + rules.accumulator_range_bits
    guard = rules.accumulator_fixed_guard if rules.family == "fixed" else rules.accumulator_float_guard
    man_guard = rules.accumulator_error_guard if kind == "input_grad" else guard
    split = "one sequential sum" if c == terms else f"chunks of {c}"
    if rules.family == "fixed":
        integer = range_bits(top, headroom)
        frac = math.ceil(-math.log2(addend)) + guard
        fmt, note = _fixed(integer, frac, replace(rules, margin=0, widths=None, max_bits=MAX_FIXED_WIDTH))
        return fmt, (f"{terms} terms, {split}: range |running sum| up to {top:.3g} (+{headroom} bits); step at most "
                     f"the products' rms {addend:.3g} / 2^{guard} (an absolute error per addition: the same for any "
                     f"length){note}")
    within = f"a chunk's sum (rms {at('sum_rms', c):.3g})" if c < terms else f"the sum (rms {at('sum_rms', c):.3g})"
    stages = [(addend, at("sum_rms", c), f"the products (rms {addend:.3g}) to {within}")]
    if c < terms:
        whole = at("sum_rms", terms)
        stages.append((at("sum_rms", c), whole,
                       f"the chunk sums (rms {at('sum_rms', c):.3g}) to the whole sum (rms {whole:.3g})"))
    small, big, what = max(stages, key=lambda stage: stage[1] / stage[0])
    growth_bits = max(0, math.ceil(math.log2(big / small)))
    man = min(23, growth_bits + man_guard)
    errors = " (errors passed back: noise the weight gradients below average)" if kind == "input_grad" else ""
    exp = next((e for e in range(2, 9) if _float(e, man).max_value >= top * 2.0 ** headroom
                and _float(e, man).step <= addend * 2.0 ** -guard), 8)
    return _float(exp, man), (f"{terms} terms, {split}: mantissa {growth_bits} bits for the growth from {what}, "
                              f"+{man_guard} guard bit(s){errors} (after Sakr et al., ICLR 2019); exponent holds "
                              f"{top:.3g} (+{headroom} bits) and steps of {addend * 2.0 ** -guard:.3g}")


def recommend_accumulators(gemms: dict[str, Any], layer: dict[str, Any], rules: Rules) -> tuple[
        dict[str, Format], dict[str, str]]:
    """Formats and reasons for one layer's three GEMM accumulators (``gemms``: their stats;
    ``layer``: the layer's, whose output and weight gradient are two of the sums)."""
    formats: dict[str, Format] = {}
    reasons: dict[str, str] = {}
    results = {"forward": layer.get("activation") or {}, "weight_grad": layer.get("weight_grad") or {}}
    for kind in GEMMS:
        if gemms.get(kind):
            result_max = results.get(kind, {}).get("absmax", 0.0)
            formats[kind], reasons[kind] = accumulator_format(gemms[kind], rules.accumulator_chunk, rules,
                                                                result_max, kind)
        else:
            formats[kind], reasons[kind] = Float32(), "this GEMM was not seen in the analyzed steps: float32"
    return formats, reasons


def _float(exp: int, man: int) -> FloatFormat:
    """``e<E>m<M>fn`` (saturating) below 8 exponent bits, IEEE-style ``e8m<M>`` at 8."""
    return FloatFormat(exp, man, finite=exp < 8)


def set_width(fmt: Format, width: int) -> Format:
    """``fmt`` at ``width`` bits with its range kept: fixed point keeps its integer bits
    (fraction bits change), a float keeps its exponent bits (mantissa bits change; below
    one mantissa bit the exponent gives way)."""
    if isinstance(fmt, FixedPoint):
        return FixedPoint(width, width - fmt.integer_bits)
    if isinstance(fmt, FloatFormat):
        exp = min(fmt.exp, width - 1)
        return _float(exp, min(23, width - 1 - exp))
    return fmt


def add_resolution(fmt: Format, bits: int) -> Format:
    """``bits`` more fraction (fixed) or mantissa (float) bits; the range stays. MX: the
    next element type with more resolution and no less depth (one step whatever ``bits``;
    :func:`lpcli.mx_family.widen_element`)."""
    if isinstance(fmt, BlockFormat):
        return widen_element(fmt, "resolution") if bits > 0 else fmt
    if isinstance(fmt, FixedPoint):
        return FixedPoint(min(MAX_FIXED_WIDTH, max(2, fmt.width + bits)), fmt.frac + bits)
    if isinstance(fmt, FloatFormat):
        return _float(fmt.exp, max(0, min(23, fmt.man + bits)))
    return fmt


def finish(fmt: Format, rules: Rules) -> tuple[Format, str]:
    """The last, global steps for every format, each noted: ``margin`` extra resolution
    bits, the cap at ``max_bits`` (or the widest allowed width), the round-up to an
    allowed width. Returns the format and the note to append to its reason."""
    notes = []
    if rules.margin:
        fmt = add_resolution(fmt, rules.margin)
        notes.append(f"+{rules.margin} bit margin")
    widest = rules.widest
    if fmt.width > widest:
        old = fmt.width
        fmt = set_width(fmt, widest)
        what = "widths allowed" if rules.widths else "--max-bits"
        notes.append(f"capped from {old} at {widest} bits ({what}; resolution lost)")
    allowed = rules.allowed_widths
    if allowed:
        target = next(w for w in allowed if w >= fmt.width)
        if target > fmt.width:
            old = fmt
            fmt = set_width(fmt, target)
            kept = (f"same {fmt.integer_bits} integer bits, +{fmt.frac - old.frac} fraction bits"
                    if isinstance(fmt, FixedPoint) else
                    f"same {fmt.exp} exponent bits, +{fmt.man - old.man} mantissa bits")
            notes.append(f"rounded up from {old.width} to {target} bits, the next width allowed ({kept})")
    return fmt, "".join(f"; {n}" for n in notes)


def _fixed(integer: int, frac: int, rules: Rules) -> tuple[FixedPoint, str]:
    """A fixed-point format from its integer and fraction bits, then :func:`finish`."""
    width, note = integer + frac, ""
    if width > MAX_FIXED_WIDTH:
        note = f"; capped from {width} at {MAX_FIXED_WIDTH} bits (resolution lost)"
        frac, width = frac - (width - MAX_FIXED_WIDTH), MAX_FIXED_WIDTH
    if width < 2:
        frac, width = frac + 2 - width, 2
    fmt, more = finish(FixedPoint(width, frac), rules)
    return fmt, note + more  # type: ignore[return-value]


def _range_reason(summary: dict[str, Any], rules: Rules, tensor: str, limit: float, what: str) -> tuple[float, str]:
    top, name = range_top(summary, rules.range_from, tensor)
    why = f"range {name} |x| {top:.3g} (+{rules.headroom_bits} bit): {what}"
    if name != "max" or summary["absmax"] > limit:
        why += f", predicts ~{saturation_share(summary, limit):.3%} saturated (max |x| {summary['absmax']:.3g})"
    return top, why


def fixed_tensor_format(tensor: str, summary: dict[str, Any], update: dict[str, Any],
                        rules: Rules) -> tuple[FixedPoint, str]:
    """Fixed point for one tensor of one layer with its reason (see the module docstring)."""
    top, _ = range_top(summary, rules.range_from, tensor)
    integer = range_bits(top, rules.headroom_bits)
    _, why = _range_reason(summary, rules, tensor, 2.0 ** (integer - 1), f"{integer} int bits")
    frac = noise_fraction_bits(summary["rms"], rules.resolution_bits)
    why += f"; step <= rms {summary['rms']:.3g}/2^{rules.resolution_bits}: F>={frac}"
    if tensor in UNDERFLOW_ROLES:
        under = underflow_fraction_bits(summary, rules.underflow)
        if under > frac:
            frac = under
            why += f"; <= {rules.underflow:.0%} of non-zero values underflow: F>={under}"
    if tensor == "weight":
        plain = plain_sgd_fraction_bits(update["p50"])
        if rules.kahan:
            fmt, _ = _fixed(integer, frac, rules)
            lost = underflow_share(update, fmt.frac)
            why += (f"; median |lr*g| {update['p50']:.2g} vs LSB/2 {fmt.step / 2:.2g}: "
                    + (f"~{lost:.0%} of updates below it, Kahan keeps them in the compensation"
                       if lost > 0 else "updates exceed LSB/2, Kahan kept on")
                    + f" (without Kahan: F>={plain}, {integer + plain} bits)")
        elif plain > frac:
            frac = plain
            why += f"; without Kahan, median |lr*g| {update['p50']:.2g} must reach LSB/2: F>={plain}"
    fmt, note = _fixed(integer, frac, rules)
    return fmt, why + note


def float_tensor_format(tensor: str, summary: dict[str, Any], update: dict[str, Any],
                        rules: Rules) -> tuple[FloatFormat, str]:
    """Float (``e<E>m<M>fn``) for one tensor: exponent bits from the dynamic range (the top
    the range must hold against the fixed-point rule's step ``2^-F``, the smallest value
    that must not underflow), mantissa bits from the resolution rule."""
    top, _ = range_top(summary, rules.range_from, tensor)
    need_top = math.ldexp(1.0, range_bits(top, rules.headroom_bits) - 1) if top > 0 else 1.0
    frac = noise_fraction_bits(summary["rms"], rules.resolution_bits)
    bottom_why = f"step of rms/2^{rules.resolution_bits}"
    if tensor in UNDERFLOW_ROLES:
        under = underflow_fraction_bits(summary, rules.underflow)
        if under > frac:
            frac, bottom_why = under, f"<= {rules.underflow:.0%} of non-zero values underflow"
    bottom = 2.0 ** -frac
    man = rules.resolution_bits
    man_why = f"relative step 2^-{man}: step at the rms <= rms/2^{rules.resolution_bits}"
    if tensor == "weight" and not rules.kahan and update["p50"] > 0 and summary["rms"] > 0:
        plain = math.ceil(math.floor(math.log2(summary["rms"])) - 1 - math.log2(update["p50"]))
        if plain > man:
            man = min(23, plain)
            man_why = f"without Kahan, median |lr*g| {update['p50']:.2g} must reach half an ulp at the rms"
    fmt = next((f for f in (_float(e, man) for e in range(1, 9))
                if f.max_value >= need_top * (1 - 2.0 ** -(man + 1)) and f.step <= bottom), _float(8, man))
    binades = math.log2(need_top / bottom)
    _, why = _range_reason(summary, rules, tensor, fmt.max_value, f"top {need_top:.3g}")
    why += (f"; down to {bottom:.3g} ({bottom_why}): {binades:.0f} binades, {fmt.exp} exponent bits (max "
            f"{fmt.max_value:.3g}, smallest subnormal {fmt.step:.3g}); {man} mantissa bits ({man_why})")
    if tensor == "weight" and rules.kahan:
        why += "; updates below half an ulp are carried by Kahan in the compensation"
    fmt2, note = finish(fmt, rules)
    return fmt2, why + note  # type: ignore[return-value]


def late_lr_factor(stats: dict[str, Any]) -> float:
    return (stats.get("training") or {}).get("late_lr_factor") or 1.0


def late_updates(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stats' layers with their update summaries as late in the schedule (see
    :func:`scaled`): what the weight and compensation rules size against."""
    late = late_lr_factor(stats)
    return {name: {**layer, "update": scaled(layer["update"], late)} if late < 1 and layer.get("update") else layer
            for name, layer in stats["layers"].items()}


def scaled(summary: dict[str, Any], factor: float) -> dict[str, Any]:
    """An update summary as it would be at ``factor`` times the lr (updates are proportional
    to the lr under SGD and Adam alike). The binade histogram moves by
    ``floor(log2 factor)`` binades, a power of two at most ``factor``: the smaller updates
    it implies ask for more bits, never fewer."""
    shift = math.floor(math.log2(factor))
    out = {key: value * 2.0 ** shift if key in ("absmax", "rms", *QUANTILES) else value
           for key, value in summary.items()}
    if summary.get("log2_hist"):
        out["log2_hist"] = {**summary["log2_hist"], "lowest": summary["log2_hist"]["lowest"] + shift}
    return out


def compensation_rule(weight: Format, update: dict[str, Any], rules: Rules) -> tuple[Format, str]:
    """Kahan's compensation for weights in ``weight``, from the update distribution.

    It holds the residue rounding leaves (at most half a weight LSB), so its range is one
    weight LSB; its step must keep the updates themselves: at most ``rules.underflow`` (1%)
    of the non-zero updates may fall below half a compensation step, where the
    compensation rounds them away (read off the update's binade histogram). A
    compensation with the weights' width and that range has a step of
    ``LSB * 2^-(W-1)``: on digits-mlp at 5 weight bits it dropped most updates, and Kahan
    lost to fp32 (``benchmarks/weight_widths.py``). Floats carry in their own format.
    """
    if not rules.kahan:
        return Float32(), "plain low-precision storage (no Kahan summation): no compensation is stored"
    if not isinstance(weight, FixedPoint):
        return weight, (f"carried in the weights' own format {weight}, as torch-optimi's Kahan summation does (a "
                        f"float's step follows the value)")
    if not update.get("log2_hist"):
        fmt = compensation_format(weight)
        return fmt, f"no update statistics: the weights' width with a range of one weight LSB ({fmt})"
    frac = underflow_fraction_bits(update, rules.underflow)
    fmt = compensation_format(weight, frac)
    fmt, note = finish(fmt, rules)
    dropped = underflow_share(update, fmt.frac)
    plain = compensation_format(weight)
    return fmt, (f"range one weight LSB {weight.step:g} ({fmt.integer_bits} int bits): holds the rounding residue "
                 f"(<= LSB/2); step 2^-{fmt.frac}: {dropped:.1%} of non-zero updates |u| fall below half of it "
                 f"(<= {rules.underflow:.0%}; the weights' width, {plain}, would drop "
                 f"{underflow_share(update, plain.frac):.0%})" + note)


def recommend_layer(layer: dict[str, Any], rules: Rules, fixed: dict[str, Format]) -> tuple[
        dict[str, Format], dict[str, str]]:
    """Formats and reasons for one layer's four tensors; ``fixed`` are the recipe's choices."""
    formats: dict[str, Format] = {}
    reasons: dict[str, str] = {}
    rule = float_tensor_format if rules.family == "float" else fixed_tensor_format
    for tensor in TENSORS:
        if tensor in fixed:
            formats[tensor] = fixed[tensor]
            reasons[tensor] = "fixed by the recipe's precision section"
        elif tensor == "compensation":
            formats[tensor], reasons[tensor] = compensation_rule(formats["weight"], layer.get("update") or {}, rules)
        elif not layer.get(tensor):
            formats[tensor], reasons[tensor] = Float32(), NOTHING_SEEN[tensor]
        else:
            formats[tensor], reasons[tensor] = rule(tensor, layer[tensor], layer.get("update") or {"p50": 0.0}, rules)
    return formats, reasons


def recommend(stats: dict[str, Any], rules: Rules | None = None, precision: Precision | None = None,
              source: str = "stats", cost: CostTable | None = None) -> Plan:
    """A plan for the layers in ``stats`` (validated by :func:`lpcli.stats.validate_stats`);
    with several families, each layer takes the family whose formats cost least by
    ``rules.objective`` (:func:`choose_families`); ``cost``: the cost table of the summary's
    estimate and of the energy and memory objectives."""
    rules = rules or Rules()
    if len(rules.families) > 1:
        plans = {f: recommend(stats, replace(rules, family=f), precision, source, cost) for f in rules.families}
        return choose_families(plans, stats, rules.objective, cost)
    if rules.family == "mx":
        floats = recommend(stats, replace(rules, family="float"), precision, source, cost)
        return block_operands(floats, stats, rules, precision or Precision(), source, cost)
    precision = precision or Precision()
    if precision.kahan is not None:
        rules = replace(rules, kahan=precision.kahan)
    for name in precision.layers:
        if name not in stats["layers"]:
            raise InputError(source, f"precision.layers.{name}",
                             f"the model has no layer {name!r} (layers: {', '.join(stats['layers'])})")
    classes = stats["classes"]
    late = late_lr_factor(stats)
    layers: dict[str, dict[str, Format]] = {}
    reasons: dict[str, Any] = {}
    for name, layer in late_updates(stats).items():
        fixed = {**precision.defaults, **precision.layers.get(name, {})}
        layers[name], reasons[name] = recommend_layer(layer, rules, fixed)
        if late < 1 and layer.get("update") and "compensation" not in fixed:
            reasons[name]["compensation"] += (f"; updates as late in the schedule (90% of the steps: lr x{late:.3g}, "
                                              f"taken as x2^{math.floor(math.log2(late))})")

    softmax_input, why_input, softmax_error, why_error = softmax_formats(classes, rules, rules.family)
    softmax_input, note = finish(softmax_input, rules)
    why_input += note
    softmax_error, note = finish(softmax_error, rules)
    why_error += note
    if precision.softmax_input is not None:
        softmax_input, why_input = precision.softmax_input, "fixed by the recipe's precision section"
    if precision.softmax_error is not None:
        softmax_error, why_error = precision.softmax_error, "fixed by the recipe's precision section"
    reasons["softmax_input"], reasons["softmax_error"] = why_input, why_error
    output_layer = stats.get("output_layer")
    for name in {output_layer, ROOT} & set(layers):  # the model's own output is the logits too
        layers[name].update(activation=softmax_input, error=softmax_error)
        reasons[name]["activation"] = "the softmax input (see softmax_input)"
        reasons[name]["error"] = "the error at the logits (see softmax_error)"
    reasons["optimizer"] = ("Kahan summation on: updates below half a weight LSB are carried in a compensation "
                            "tensor" if rules.kahan else "Kahan summation off (recipe): weights sized for plain SGD")
    parameters = {name: list(layer["parameter_names"]) if "parameter_names" in layer else None
                  for name, layer in stats["layers"].items()}
    attention: dict[str, dict[str, Format]] = {}
    for name, entry in (stats.get("attention") or {}).items():
        attention[name], why = recommend_attention(entry, rules)
        reasons.setdefault(name, {})["attention"] = why
    accumulators: dict[str, dict[str, Format]] = {}
    if rules.accumulators:
        if not stats.get("gemms"):
            raise InputError(source, "gemms", "the stats have no GEMM statistics to size accumulators from: analyze "
                             "again with this lpcli (the GEMMs of F.linear and F.conv2d layers are recorded)")
        for name, gemms in stats["gemms"].items():
            if name in layers:
                accumulators[name], why = recommend_accumulators(gemms, stats["layers"].get(name, {}), rules)
                reasons[name]["accumulator"] = why
    plan = Plan(layers=layers, softmax_input=softmax_input, softmax_error=softmax_error, kahan=rules.kahan,
                classes=classes, output_layer=output_layer, reasons=reasons, parameters=parameters,
                tied=dict(stats.get("tied") or {}), attention=attention, accumulators=accumulators,
                accumulator_chunk=rules.accumulator_chunk)
    return replace(plan, summary=summarize(plan, stats, cost))


def block_operands(plan: Plan, stats: dict[str, Any], rules: Rules, precision: Precision, source: str,
                   cost: CostTable | None = None) -> Plan:
    """The mx family: ``plan`` (the float family's) with each GEMM operand (a layer's input,
    weight and error, where the stats hold its block profile) in the MX element type
    :func:`lpcli.mx_family.choose_element` picks. The rest stays element by element in the
    float family's formats: activations, weight gradients, optimizer state, the softmax
    (the output layer's error is the softmax's), attention, accumulators, and a
    compensation for MX weights (it holds each weight's residue, at most half its
    element's step at its block's scale, on that weight's own scale)."""
    blocks = stats.get("blocks")
    if not blocks:
        raise InputError(source, "blocks", "the stats have no block profiles for the mx family to choose from: "
                         "analyze again with this lpcli (it records where each GEMM operand's values sit in MX "
                         "blocks)")
    softmax_layers = {plan.output_layer, ROOT} & set(plan.layers)
    layers: dict[str, dict[str, Format]] = {}
    reasons = dict(plan.reasons)
    for name, fmts in plan.layers.items():
        fixed = {**precision.defaults, **precision.layers.get(name, {})}
        profiles = blocks.get(name) or {}
        new, why = dict(fmts), dict(reasons.get(name) or {})
        for role in BLOCK_ROLES:
            if role in fixed or (role == "error" and name in softmax_layers) or isinstance(fmts[role], Float32):
                continue
            if role not in profiles:
                why[role] += "; element by element: not an operand of a GEMM on this layer's own weight"
                continue
            choice = choose_element(profiles[role], role, rules.mx_resolution_bits + rules.margin,
                                    rules.underflow if role in UNDERFLOW_ROLES else None, rules.allowed_widths,
                                    rules.widest)
            if choice.fmt is None:
                why[role] = f"{choice.reason}: the float rule's {fmts[role]}, element by element ({why[role]})"
            else:
                new[role], why[role] = choice.fmt, choice.reason
        if isinstance(new["weight"], BlockFormat) and plan.kahan and "compensation" not in fixed:
            why["compensation"] = (f"{fmts['compensation']}, the float rule's format for these weights, element by "
                                   "element: it holds each MX weight's rounding residue (at most half its element's "
                                   "step at its block's scale) on that weight's own scale")
        layers[name], reasons[name] = new, why
    plan = replace(plan, layers=layers, reasons=reasons)
    return replace(plan, summary=summarize(plan, stats, cost))


SOFTMAX_UNIT = "softmax"  # the softmax formats' unit in choose_families (layer names never contain a space)
ATTENTION_UNIT = "attention of "


def choose_families(plans: dict[str, Plan], stats: dict[str, Any], objective: str = "bits",
                    cost: CostTable | None = None) -> Plan:
    """One plan from one plan per family (``plans``, all from the same stats): each unit, a
    layer (its tensors and accumulators), the softmax (its input and error, which the
    output layer shares) or an attention module, takes one family's formats.

    ``bits``: per unit, the family whose formats store fewer bits in a training step (weights,
    weight gradients, compensation and optimizer state per parameter; inputs, activations
    and errors per element of a batch; ties go to the family named first). ``energy`` and
    ``memory``: from that choice, each unit in turn moves to the family that lowers the
    plan's estimated energy or memory traffic per step (:func:`lpcli.cost.step_cost`),
    until no move does. Every format still comes from its family's rules, so each one
    satisfies them; only the choice between them follows the objective."""
    families = list(plans)
    first = plans[families[0]]
    softmax_layers = {first.output_layer, ROOT} & set(first.layers)  # as recommend sets them
    units = [*first.layers, SOFTMAX_UNIT, *(ATTENTION_UNIT + name for name in first.attention)]

    def build(choice: dict[str, str]) -> Plan:
        softmax = plans[choice[SOFTMAX_UNIT]]
        layers, reasons = {}, {}
        for name in first.layers:
            chosen = plans[choice[name]]
            layers[name] = dict(chosen.layers[name])
            reasons[name] = dict(chosen.reasons.get(name, {}))
            if name in softmax_layers:
                layers[name].update(activation=softmax.softmax_input, error=softmax.softmax_error)
            reasons[name]["family"] = choice[name]
        attention = {name: plans[choice[ATTENTION_UNIT + name]].attention[name] for name in first.attention}
        for name in first.attention:
            reasons.setdefault(name, {})["attention"] = plans[choice[ATTENTION_UNIT + name]].reasons[name]["attention"]
        return replace(first, layers=layers, softmax_input=softmax.softmax_input, softmax_error=softmax.softmax_error,
                       attention=attention,
                       accumulators={name: plans[choice[name]].accumulators[name] for name in first.accumulators},
                       reasons={**first.reasons, **reasons, "softmax_input": softmax.reasons["softmax_input"],
                                "softmax_error": softmax.reasons["softmax_error"]}, summary={})

    def unit_bits(family: str, unit: str) -> float:
        plan = plans[family]
        if unit == SOFTMAX_UNIT:
            return stored_bits(plan.softmax_input) + stored_bits(plan.softmax_error)
        if unit.startswith(ATTENTION_UNIT):
            return sum(stored_bits(f) for f in plan.attention[unit[len(ATTENTION_UNIT):]].values())
        layer = stats["layers"].get(unit, {})
        params, outputs = layer.get("parameters", 0), layer.get("activation_elements", 0) * batch
        counts = {"weight": params, "weight_grad": params, "momentum": params, "variance": params,
                  "compensation": params if plan.kahan else 0, "input": outputs,
                  "activation": 0 if unit in softmax_layers else outputs,
                  "error": 0 if unit in softmax_layers else outputs}
        return sum(stored_bits(plan.layers[unit][role]) * count for role, count in counts.items())

    batch = int((stats.get("training") or {}).get("batch_size") or 1)
    choice = {unit: min(families, key=lambda f, u=unit: unit_bits(f, u)) for unit in units}
    why: dict[str, str] = {}
    if objective == "bits":
        for unit in units:
            why[unit] = ", ".join(f"{f} {unit_bits(f, unit):,.0f}" for f in families) + " stored bits"
    else:
        key, unit_name = ("total_uj", "µJ") if objective == "energy" else ("memory_mb", "MB")

        def measure(trial: dict[str, str]) -> float:
            return step_cost(build(trial), stats, cost)["plan"][key]

        best = measure(choice)
        moved = True
        while moved:
            moved = False
            for unit in units:
                for family in families:
                    if family != choice[unit] and (value := measure({**choice, unit: family})) < best * (1 - 1e-9):
                        choice, best, moved = {**choice, unit: family}, value, True
        for unit in units:
            why[unit] = ", ".join(f"{f} {measure({**choice, unit: f}):.4g}" for f in families) + \
                f" {unit_name} per step for the plan"
    plan = build(choice)
    reasons = dict(plan.reasons)
    for unit in first.layers:
        reasons[unit] = {**reasons[unit], "family": f"{choice[unit]} (by {objective}: {why[unit]})"}
    plan = replace(plan, reasons=reasons)
    summary = summarize(plan, stats, cost)
    summary["families"] = {"objective": objective, "choice": choice, "why": why}
    return replace(plan, summary=summary)


def summarize(plan: Plan, stats: dict[str, Any], cost: CostTable | None = None) -> dict[str, Any]:
    """What the plan costs. The datapath: average bits of the weights, activations and errors
    the multipliers see, weighted by element counts, against uniform 16-bit. The storage,
    per parameter: weight, compensation and momentum buffer in their formats, against the
    plain-SGD plan (no compensation, weights as wide as plain SGD needs) and uniform 16-bit."""
    totals = {"weights": [0.0, 0], "activations": [0.0, 0], "errors": [0.0, 0]}
    for name, fmts in plan.layers.items():
        layer = stats["layers"].get(name, {})
        params, acts = layer.get("parameters", 0), layer.get("activation_elements", 0)
        for key, tensor, count in (("weights", "weight", params), ("activations", "activation", acts),
                                   ("errors", "error", acts)):
            totals[key][0] += stored_bits(fmts[tensor]) * count  # MX: with the block scales' share
            totals[key][1] += count
    average = {key: (bits / count if count else None) for key, (bits, count) in totals.items()}
    all_bits = sum(bits for bits, _ in totals.values())
    all_count = sum(count for _, count in totals.values())
    weight_bits, weight_count = totals["weights"]
    return {
        "average_bits": average,
        "overall_bits": all_bits / all_count if all_count else None,
        "vs_16bit": all_bits / (16 * all_count) if all_count else None,
        "weight_bytes": weight_bits / 8,
        "weight_bytes_16bit": weight_count * 2,
        "storage_bits_per_parameter": storage_bits(plan, stats),
        "cost_per_step": step_cost(plan, stats, cost),
    }


def storage_bits(plan: Plan, stats: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """Bits stored per parameter, averaged over the parameters: this plan (weight +
    compensation with Kahan + the optimizer's state: SGD's momentum buffer when it keeps one,
    Adam's two moments), the plan without Kahan (weights from the same rules, wide enough
    that the median update reaches half an LSB; no compensation; the same state) and
    uniform 16-bit."""
    training = stats.get("training") or {}
    adam = training.get("optimizer") in ("adam", "adamw")
    with_momentum = adam or bool(training.get("momentum"))
    rules = Rules(kahan=False, family="float" if any(isinstance(f["weight"], (FloatFormat, BlockFormat))
                                                     for f in plan.layers.values()) else "fixed")
    rule = float_tensor_format if rules.family == "float" else fixed_tensor_format
    parts = ("weight", "compensation", "momentum", "variance")
    points = {point: dict.fromkeys(parts, 0.0) for point in ("plan", "plain", "uniform_16bit")}
    count = 0
    layers = late_updates(stats)
    for name, fmts in plan.layers.items():
        layer = layers.get(name, {})
        params = layer.get("parameters", 0)
        if not params:
            continue
        count += params
        state = {"momentum": fmts["momentum"].width if with_momentum else 0,
                 "variance": fmts["variance"].width if adam else 0}
        plain = rule("weight", layer["weight"], layer.get("update") or {"p50": 0.0}, rules)[0] \
            if layer.get("weight") else fmts["weight"]
        sizes = {"plan": {"weight": stored_bits(fmts["weight"]),
                          "compensation": stored_bits(fmts["compensation"]) if plan.kahan else 0, **state},
                 "plain": {"weight": max(plain.width, stored_bits(fmts["weight"])), "compensation": 0, **state},
                 "uniform_16bit": {"weight": 16, "compensation": 0,
                                   **{k: 16 if v else 0 for k, v in state.items()}}}
        for point, widths in sizes.items():
            for part, bits in widths.items():
                points[point][part] += bits * params
    if not count:
        return None
    return {point: {**{k: v / count for k, v in parts.items()}, "total": sum(parts.values()) / count}
            for point, parts in points.items()}
