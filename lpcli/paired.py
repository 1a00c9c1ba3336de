"""The paired verdict: is a low-precision run's accuracy loss against fp32 within tolerance?

Both runs are evaluated on the same test examples, so the comparison is of paired
proportions. Only the discordant examples carry information about the difference; the
concordant ones set how the two accuracies co-vary. A Newcombe interval on the loss
``(reference_only - other_only) / n`` gives the verdict:

- ``passed``: the upper bound of the loss is at most the tolerance;
- ``failed``: the lower bound is above the tolerance;
- ``inconclusive``: the interval straddles it — the test set is too small to tell.

Counts are integers and stay integers (:class:`PairedCounts`), so seeds pool by adding
counts, never by averaging rounded accuracies. Standard library only.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from fractions import Fraction
from statistics import NormalDist
from typing import Any, Literal

Verdict = Literal["passed", "failed", "inconclusive"]

# Bounds closer to the tolerance than this (in points, relative to max(1, |tolerance|)) count
# as equal to it. The bounds are a few float64 operations (a square root, products, sums of
# values at most 1) and scaled by 100: their rounding error is below 1e-12 points. A genuine
# margin of 1e-9 points would need around 1e22 test examples to resolve, so nothing real is
# lost, while a bound that equals the tolerance in exact arithmetic (but lands an ulp above
# it) does not flip the verdict.
_SLACK = 1e-9


@dataclass(frozen=True)
class PairedCounts:
    """How two classifiers fared on the same ``n`` test examples.

    The 2x2 table of Newcombe (1998), with the fp32 run as the first classifier::

                           other right    other wrong
        reference right    both           reference_only
        reference wrong    other_only     neither
    """

    both: int  # right in both runs
    reference_only: int  # right in the reference (fp32), wrong in the other run: examples lost
    other_only: int  # wrong in the reference, right in the other run: examples gained
    neither: int  # wrong in both runs

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                raise TypeError(f"PairedCounts.{f.name} must be an integer count, not {value!r}")
            try:
                count = operator.index(value)  # accepts numpy integers, refuses 1.0
            except TypeError:
                raise TypeError(f"PairedCounts.{f.name} must be an integer count, not {value!r}") from None
            if count < 0:
                raise ValueError(f"PairedCounts.{f.name} must be >= 0, got {count}")
            object.__setattr__(self, f.name, int(count))

    @property
    def n(self) -> int:
        return self.both + self.reference_only + self.other_only + self.neither

    @property
    def loss(self) -> Fraction:
        """The observed accuracy loss ``p_ref - p_other`` as an exact share (0 when n is 0)."""
        return Fraction(self.reference_only - self.other_only, self.n) if self.n else Fraction(0)

    @classmethod
    def from_predictions(cls, reference_correct: Any, other_correct: Any) -> PairedCounts:
        """Counts from per-example correctness of the two runs, in the same example order.

        Takes sequences of bools, numpy arrays or torch tensors (any device) of equal length;
        integer values must be 0 or 1.
        """
        ref = _as_flags(reference_correct, "reference_correct")
        other = _as_flags(other_correct, "other_correct")
        if len(ref) != len(other):
            raise ValueError(f"reference_correct has {len(ref)} examples but other_correct has {len(other)}: "
                             "the runs must be evaluated on the same test examples")
        both = sum(1 for r, o in zip(ref, other, strict=True) if r and o)
        ref_right, other_right = sum(ref), sum(other)
        return cls(both=both, reference_only=ref_right - both, other_only=other_right - both,
                   neither=len(ref) - ref_right - other_right + both)

    def __add__(self, other: object) -> PairedCounts:
        """Pool counts over seeds (or test shards) of the same comparison."""
        if not isinstance(other, PairedCounts):
            return NotImplemented
        return PairedCounts(self.both + other.both, self.reference_only + other.reference_only,
                            self.other_only + other.other_only, self.neither + other.neither)

    def __radd__(self, other: object) -> PairedCounts:
        # sum(counts) starts from 0
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented


def _as_flags(values: Any, name: str) -> list[bool]:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu().tolist()
    elif hasattr(values, "tolist"):  # a numpy array
        values = values.tolist()
    flags = []
    for i, v in enumerate(values):
        if isinstance(v, list | tuple):
            raise ValueError(f"{name} must be one-dimensional (element {i} is {v!r})")
        if v not in (0, 1):  # True == 1, False == 0, and 1.0 == 1 as well
            raise ValueError(f"{name}[{i}] is {v!r}; expected a boolean (or 0/1)")
        flags.append(bool(v))
    return flags


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _wilson(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for x successes in n: the roots of (p - x/n)^2 = z^2 p(1-p)/n.

    The quadratic is (n + z^2) p^2 - (2x + z^2) p + x^2/n = 0. The larger root is taken
    from the formula with the + sign (no cancellation) and the smaller from the product of
    the roots, so both keep their relative precision; x = 0 and x = n give 0 and 1 exactly.
    """
    if x == n:
        return n / (n + z * z), 1.0
    a = n + z * z
    b = 2 * x + z * z
    upper = (b + z * math.sqrt(4 * (x * (n - x) / n) + z * z)) / (2 * a)
    lower = (x * (x / n)) / (a * upper)
    return lower, upper


def loss_interval(counts: PairedCounts, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval for the accuracy loss ``p_ref - p_other``, as shares (not points).

    Newcombe's hybrid score interval for a difference of paired proportions, method 10 of
    R. G. Newcombe, "Improved confidence intervals for the difference between binomial
    proportions based on paired data", Statistics in Medicine 17 (1998) 2635-2650.

    With a = both, b = reference_only, c = other_only, d = neither, n = a + b + c + d::

        p1 = (a + b)/n  (reference accuracy),  p2 = (a + c)/n  (other accuracy)
        (l1, u1), (l2, u2): Wilson score intervals for p1 and p2 at the same confidence
        theta = p1 - p2 = (b - c)/n
        L = theta - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        U = theta + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

    where phi estimates the correlation of the two runs' correctness, with Newcombe's
    correction that distinguishes method 10 from method 8 (which uses the plain phi)::

        phi = max(ad - bc - n/2, 0) / sqrt((a+b)(c+d)(a+c)(b+d))   if ad > bc
        phi = (ad - bc) / sqrt((a+b)(c+d)(a+c)(b+d))               otherwise
        phi = 0                                                     if that denominator is 0

    Without the correction, runs that agree on every example (b = c = 0) get phi = 1 and a
    zero-width interval at 0 — the method 8 defect the correction removes.

    The interval lies in [-1, 1] by construction (|phi| <= 1); an empty table gives the
    uninformative (-1, 1).
    """
    z = _z(confidence)
    n = counts.n
    if n == 0:
        return -1.0, 1.0
    a, b, c, d = counts.both, counts.reference_only, counts.other_only, counts.neither
    x1, x2 = a + b, a + c
    p1, p2 = x1 / n, x2 / n
    l1, u1 = _wilson(x1, n, z)
    l2, u2 = _wilson(x2, n, z)

    cross = a * d - b * c  # exact integers
    if x1 * (n - x1) * x2 * (n - x2) == 0:
        phi = 0.0
    else:
        root = math.sqrt(x1 * (n - x1)) * math.sqrt(x2 * (n - x2))
        phi = max(2 * cross - n, 0) / (2 * root) if cross > 0 else cross / root

    theta = (b - c) / n
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, theta - below), min(1.0, theta + above)


def verdict_status(counts: PairedCounts, tolerance_points: float, confidence: float = 0.95) -> Verdict:
    """``passed`` when the loss's upper bound is at most the tolerance (in accuracy points),
    ``failed`` when its lower bound is above it, ``inconclusive`` otherwise.

    Bounds within a relative 1e-9 of the tolerance count as equal to it (see ``_SLACK``), so
    float rounding of a bound that sits exactly on the tolerance cannot flip the verdict.
    """
    tolerance = float(tolerance_points)
    if not math.isfinite(tolerance):
        raise ValueError(f"tolerance_points must be a finite number, got {tolerance_points!r}")
    lower, upper = loss_interval(counts, confidence)
    edge = tolerance + _SLACK * max(1.0, abs(tolerance))
    if 100.0 * upper <= edge:
        return "passed"
    if 100.0 * lower > edge:
        return "failed"
    return "inconclusive"


def needed_for(counts: PairedCounts, tolerance_points: float, confidence: float = 0.95,
               cap: int = 1000) -> int | None:
    """How many times more test examples would settle the verdict, at the observed rates.

    The smallest integer k such that the counts scaled by k (every cell times k: the same
    accuracies and discordant rates on k times the examples) give ``passed`` or ``failed``;
    1 when the verdict is already settled. None when no k up to ``cap`` settles it — always
    the case when the observed loss sits exactly on the tolerance, or with no examples.
    It is an estimate: new examples will not reproduce the observed rates exactly.
    """
    if verdict_status(counts, tolerance_points, confidence) != "inconclusive":
        return 1
    if counts.n == 0:
        return None
    for k in range(2, cap + 1):
        scaled = PairedCounts(k * counts.both, k * counts.reference_only, k * counts.other_only, k * counts.neither)
        if verdict_status(scaled, tolerance_points, confidence) != "inconclusive":
            return k
    return None
