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
  ``p - y`` (range +-1) needs ``F >= log2 N`` to hold a non-target ``p ~ 1/N`` at the
  start of training, plus ``softmax_error_margin`` bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .formats import MAX_FIXED_WIDTH, FixedPoint, Format
from .optim import compensation_format
from .plan import TENSORS, Plan
from .recipe import Precision


@dataclass(frozen=True)
class Rules:
    headroom_bits: int = 1
    resolution_bits: int = 4
    underflow: float = 0.01
    confidence: float = 0.99
    softmax_input_frac: int = 3
    softmax_error_margin: int = 1
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
    """Logit gap that gives the target probability ``confidence`` among ``classes``."""
    return math.log((classes - 1) * confidence / (1 - confidence))


def softmax_input_format(classes: int, rules: Rules) -> tuple[FixedPoint, str]:
    gap = logit_gap(classes, rules.confidence)
    integer = range_bits(gap, 0)
    fmt = FixedPoint(integer + rules.softmax_input_frac, rules.softmax_input_frac)
    return fmt, (f"z-max(z) must reach -{gap:.1f} = -ln((N-1)c/(1-c)) for N={classes}, c={rules.confidence}: "
                 f"{integer} integer bits (range -{2 ** (integer - 1)}); {rules.softmax_input_frac} fraction bits "
                 f"(logit step {2.0 ** -rules.softmax_input_frac:g})")


def softmax_error_format(classes: int, rules: Rules) -> tuple[FixedPoint, str]:
    frac = math.ceil(math.log2(classes)) + rules.softmax_error_margin
    fmt = FixedPoint(frac + 1, frac)
    return fmt, (f"p-y in [-1, 1); a non-target p ~ 1/N = {1 / classes:.3g} at the start needs "
                 f"F >= log2 N = {math.log2(classes):.1f}, +{rules.softmax_error_margin} bit: flushes only "
                 f"|p-y| < {2.0 ** -(frac + 1):.3g}")


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
