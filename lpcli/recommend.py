"""``recommend``: rules that turn layer statistics into a plan, each decision with
the one-line reason a user can check.

Fixed point ``fx<W>.<F>`` is split into integer bits ``I = W - F`` (range, sign
included) and fraction bits ``F`` (resolution), each from its own rule:

* range: ``I = floor(log2(absmax)) + 2 + headroom`` holds ``absmax`` with
  ``headroom`` doublings to spare (weights grow as training goes on; 50 analyze steps
  see only the start).
* resolution: the step is at most ``rms / 2^resolution_bits``, so rounding noise
  (step/sqrt(12) for nearest rounding) stays ``resolution_bits`` binary orders below
  the signal; for errors and weight gradients also at most ``underflow`` of the
  non-zero values may round to zero, read off the binade histogram (a weight gradient
  that rounds to zero is an update no optimizer can recover).
* weights: the update ``|lr * g|`` against the weight step. Plain SGD drops every
  update below half a step, so without Kahan summation the weights need
  ``F >= -log2(median |u|) - 1``. With Kahan the compensation carries the small
  updates and the weights need only their resolution rule.
* softmax (class count N): the input ``z - max(z)`` needs its range to reach the logit
  gap ``ln((N-1) * c / (1-c))`` of a prediction with confidence ``c``; the error
  ``p - y`` (range +-1) needs half a step below ``1/N`` to hold a non-target
  ``p ~ 1/N`` at the start of training. See :func:`softmax_formats` for both families
  and how the rules were checked against training (``benchmarks/softmax_sweep.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .formats import MAX_FIXED_WIDTH, FixedPoint, FloatFormat, Format
from .optim import compensation_format
from .plan import TENSORS, Plan
from .recipe import Precision


@dataclass(frozen=True)
class Rules:
    headroom_bits: int = 1
    resolution_bits: int = 4
    underflow: float = 0.01
    confidence: float = 0.99  # softmax input range: the logit gap of a prediction this confident
    softmax_input_frac: int = -1  # softmax input fixed point: fraction bits (logit step 2^-F = 2 nats)
    softmax_error_margin: int = 0  # softmax error fixed point: bits beyond F = floor(log2 N)
    softmax_input_man: int = 2  # softmax input float: mantissa bits
    softmax_error_man: int = 2  # softmax error float: mantissa bits
    max_bits: int = MAX_FIXED_WIDTH
    kahan: bool = True


def range_bits(absmax: float, headroom: int) -> int:
    """Integer bits (sign included) whose range holds ``absmax`` with ``headroom`` doublings."""
    if absmax <= 0:
        return 1
    return math.floor(math.log2(absmax)) + 2 + headroom


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
    fraction bits, independent of N (see :func:`softmax_formats`).
    """
    gap = logit_gap(classes, rules.confidence)
    integer = range_bits(gap, 0)
    frac = rules.softmax_input_frac
    fmt = FixedPoint(max(2, integer + frac), max(2, integer + frac) - integer)
    return fmt, (f"z-max(z) must reach -{gap:.1f} = -ln((N-1)c/(1-c)) for N={classes}, c={rules.confidence}: "
                 f"{integer} integer bits (range -{2 ** (integer - 1)}); {fmt.frac} fraction bits "
                 f"(logit step {fmt.step:g})")


def softmax_error_format(classes: int, rules: Rules) -> tuple[FixedPoint, str]:
    """Fixed point for the error ``p - y`` in ``[-1, 1)`` before the 1/batch mean.

    One integer bit (the sign) and ``F = floor(log2 N) + softmax_error_margin`` fraction
    bits: nearest rounding flushes ``|p - y| < 2^-(F+1)``, and ``F = floor(log2 N)`` is the
    fewest with half a step strictly below ``1/N`` (a power-of-two N would otherwise sit on
    a tie that rounds to zero), so a non-target class at its starting ``p ~ 1/N`` is still
    pushed down. Width ``F + 1``: 4, 7, 10 bits for N = 10, 100, 1000.
    """
    frac = math.floor(math.log2(classes)) + rules.softmax_error_margin
    fmt = FixedPoint(frac + 1, frac)
    margin = f" {rules.softmax_error_margin:+d} bit" if rules.softmax_error_margin else ""
    return fmt, (f"p-y in [-1, 1); a non-target p ~ 1/N = {1 / classes:.3g} at the start must survive rounding: "
                 f"half a step < 1/N, F = floor(log2 N) = {math.floor(math.log2(classes))}{margin}: flushes only "
                 f"|p-y| < {2.0 ** -(frac + 1):.3g}")


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

    Range: the fewest exponent bits whose smallest subnormal ``2^(emin - M)`` has its half
    strictly below ``1/N`` (the fixed-point condition, now at the bottom of the float's
    range) and whose largest value reaches 1. Resolution: ``softmax_error_man`` mantissa
    bits, a relative step that, unlike fixed point, does not depend on N.
    """
    fmt = _smallest_float(rules.softmax_error_man, lambda f: f.step / 2 < 1 / classes and f.max_value >= 1)
    return fmt, (f"p-y in [-1, 1]; a non-target p ~ 1/N = {1 / classes:.3g} at the start must survive rounding: "
                 f"{fmt.exp} exponent bits (smallest subnormal {fmt.step:.3g}, half < 1/N); {fmt.man} mantissa "
                 f"bits (relative step 2^-{fmt.man})")


def softmax_formats(classes: int, rules: Rules | None = None, family: str = "fixed") -> tuple[
        Format, str, Format, str]:
    """``(input_fmt, input_reason, error_fmt, error_reason)`` for N = ``classes`` in the
    ``"fixed"`` (``fx<W>.<F>``) or ``"float"`` (``e<E>m<M>fn``) family.

    The rules, and how ``benchmarks/softmax_sweep.py`` bears them out (MLP dim-128-N on
    overlapping Gaussian classes, fp32 SGD everywhere but the softmax, 2 seeds; fp32
    93-95% for N = 10, 100, 1000):

    * error, fixed: ``W = F + 1 = floor(log2 N) + 1`` (4, 7, 10 bits). This is the
      ``log2 N + c`` form, and it fits: the measured thresholds (the narrowest width
      from which every wider one is within 1 point of fp32) were 3, 5, 9 bits, i.e.
      ``floor(log2 N)`` or one less: the rule is 0-2 bits above them. Narrower, the
      non-target errors vanish and accuracy falls steadily with every bit (N=1000:
      95.4% fp32, 94.8 at 9 bits, 92.4 at 7, 88.3 at 5).
    * input, fixed: the range, not the resolution, is what grows with N. Saturating
      ``z - max(z)`` at ``-R`` leaves each wrong class ``e^-R`` of the target's weight;
      ``R >= ln((N-1)c/(1-c))`` (c = 0.99) caps that floor at 1% and gives
      ``I = floor(log2 gap) + 2`` integer bits (4, 5, 5). That is ``log2 ln N + c``, not
      ``log2 N + c``: it grows like log log N. The sweep put the range threshold at
      exactly the rule's I for N = 10 and 1000 (one bit less: 88.6% vs 93.0, 91.4% vs
      95.4; a range of -4 at N=1000 gave 35%) and one bit below it for N = 100. The
      resolution hardly matters: at the rule's range even 2-bit inputs (steps of R/2)
      trained within 1 point for all three N, so ``F = softmax_input_frac = -1`` (a
      logit step of 2 nats) adds no bits for resolution: W = I - 1 = 3, 4, 4 bits.
      These are the most aggressive choices the experiment allows; a task whose
      competitors must be told apart by less than a nat may want ``F >= 0``.
    * error, float: the bottom of the range does the fixed-point job (half the smallest
      subnormal below 1/N), mantissa bits (2) bound the relative error: ``e3m2fn``,
      ``e4m2fn``, ``e5m2fn`` for 10, 100, 1000 classes, i.e. ``E ~ log2 log2 N``: each
      extra exponent bit doubles the binades covered, so a float needs only
      ``O(log log N)`` bits where fixed point needs ``log2 N``.
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


def _fixed(integer: int, frac: int, rules: Rules, what: str) -> tuple[FixedPoint, str]:
    """A format from its integer and fraction bits, narrowed to ``max_bits`` if needed."""
    width = integer + frac
    note = ""
    if width > rules.max_bits:
        frac -= width - rules.max_bits
        width = rules.max_bits
        note = f"; capped at {rules.max_bits} bits (resolution lost)"
    if width < 2:
        frac += 2 - width
        width = 2
    return FixedPoint(width, frac), note


def recommend_layer(name: str, layer: dict[str, Any], lr: float, rules: Rules, fixed: dict[str, Format]) -> tuple[
        dict[str, Format], dict[str, str]]:
    formats: dict[str, Format] = {}
    reasons: dict[str, str] = {}
    for tensor in TENSORS:
        if tensor in fixed:
            formats[tensor] = fixed[tensor]
            reasons[tensor] = "fixed by the recipe's precision section"
            continue
        summary = layer[tensor]
        integer = range_bits(summary["absmax"], rules.headroom_bits)
        frac = noise_fraction_bits(summary["rms"], rules.resolution_bits)
        why = f"range |x|<={summary['absmax']:.3g} (+{rules.headroom_bits} bit): {integer} int bits; " \
              f"step <= rms {summary['rms']:.3g}/2^{rules.resolution_bits}: F>={frac}"
        if tensor in ("error", "weight_grad"):
            under = underflow_fraction_bits(summary, rules.underflow)
            if under > frac:
                frac = under
                why += f"; <= {rules.underflow:.0%} of non-zero values underflow: F>={under}"
        if tensor == "weight":
            update = layer["update"]
            plain = plain_sgd_fraction_bits(update["p50"])
            if rules.kahan:
                fmt, note = _fixed(integer, frac, rules, tensor)
                lost = underflow_share(update, fmt.frac)
                why += (f"; median |lr*g| {update['p50']:.2g} vs LSB/2 {fmt.step / 2:.2g}: "
                        + (f"~{lost:.0%} of updates below it, Kahan keeps them in {compensation_format(fmt)}"
                           if lost > 0 else "updates exceed LSB/2, Kahan kept on")
                        + f" (plain SGD would need F>={plain}, {integer + plain} bits)")
            elif plain > frac:
                frac = plain
                why += f"; without Kahan, median |lr*g| {update['p50']:.2g} must reach LSB/2: F>={plain}"
        fmt, note = _fixed(integer, frac, rules, tensor)
        formats[tensor] = fmt
        reasons[tensor] = why + note
    return formats, reasons


def recommend(stats: dict[str, Any], rules: Rules | None = None, precision: Precision | None = None,
              layer_names: list[str] | None = None, source: str = "stats") -> Plan:
    """A plan for the layers in ``stats`` (validated by :func:`lpcli.stats.validate_stats`)."""
    rules = rules or Rules()
    precision = precision or Precision()
    if precision.kahan is not None:
        rules = Rules(**{**rules.__dict__, "kahan": precision.kahan})
    for name in precision.layers:
        if name not in stats["layers"]:
            raise InputError(source, f"precision.layers.{name}",
                             f"the model has no layer {name!r} (layers: {', '.join(stats['layers'])})")
    classes = stats["classes"]
    lr = stats["training"]["lr"]
    layers: dict[str, dict[str, Format]] = {}
    reasons: dict[str, Any] = {}
    for name, layer in stats["layers"].items():
        fixed = {**precision.defaults, **precision.layers.get(name, {})}
        layers[name], reasons[name] = recommend_layer(name, layer, lr, rules, fixed)

    softmax_input, why_input = softmax_input_format(classes, rules)
    softmax_error, why_error = softmax_error_format(classes, rules)
    if precision.softmax_input is not None:
        softmax_input, why_input = precision.softmax_input, "fixed by the recipe's precision section"
    if precision.softmax_error is not None:
        softmax_error, why_error = precision.softmax_error, "fixed by the recipe's precision section"
    reasons["softmax_input"], reasons["softmax_error"] = why_input, why_error
    output_layer = stats.get("output_layer")
    if output_layer in layers:
        layers[output_layer].update(activation=softmax_input, error=softmax_error)
        reasons[output_layer]["activation"] = "the softmax input (see softmax_input)"
        reasons[output_layer]["error"] = "the error at the logits (see softmax_error)"
    reasons["optimizer"] = ("Kahan summation on: updates below half a weight LSB are carried in a compensation "
                            "tensor" if rules.kahan else "Kahan summation off (recipe): weights sized for plain SGD")
    plan = Plan(layers=layers, softmax_input=softmax_input, softmax_error=softmax_error, kahan=rules.kahan,
                classes=classes, output_layer=output_layer, reasons=reasons)
    return Plan(**{**plan.__dict__, "summary": summarize(plan, stats)})


def summarize(plan: Plan, stats: dict[str, Any]) -> dict[str, Any]:
    """Average bits per stored element, weighted by element counts, against uniform 16-bit."""
    totals = {"weights": [0.0, 0], "activations": [0.0, 0], "errors": [0.0, 0]}
    for name, fmts in plan.layers.items():
        layer = stats["layers"].get(name, {})
        params, acts = layer.get("parameters", 0), layer.get("activation_elements", 0)
        for key, tensor, count in (("weights", "weight", params), ("activations", "activation", acts),
                                   ("errors", "error", acts)):
            totals[key][0] += fmts[tensor].width * count
            totals[key][1] += count
    average = {key: (bits / count if count else None) for key, (bits, count) in totals.items()}
    stored_bits = sum(bits for bits, _ in totals.values())
    stored_count = sum(count for _, count in totals.values())
    weight_bits, weight_count = totals["weights"]
    return {
        "average_bits": average,
        "overall_bits": stored_bits / stored_count if stored_count else None,
        "vs_16bit": stored_bits / (16 * stored_count) if stored_count else None,
        "weight_bytes": weight_bits / 8,
        "weight_bytes_16bit": weight_count * 2,
    }
