"""``recommend --verify``: train-check the recommended plan and, while the Kahan run is
outside the tolerance, widen what the diagnostics blame and try again (a bounded loop).

Each round reads the Kahan run's diagnostics (:func:`lpcli.check.train_check`) and picks
the formats to widen, each with its reason:

* a layer whose weights mostly **round to zero at the start** (more than
  ``WEIGHTS_FLUSHED``: such a layer is dead, its updates are all zero, so nothing counts
  as lost): its weight format gains ``step`` fraction bits;
* a **compensation** that rounded more than ``COMPENSATION_DROPPED`` of the non-zero
  residues to zero (updates it could not keep): it gains ``step`` fraction bits, its range
  kept;
* a layer whose **lost update mass** exceeds ``LOST_MASS`` (the updates never reached the
  weights, even through the compensation): its weight format gains ``step`` fraction
  (mantissa) bits;
* **underflow** of errors or weight gradients above ``UNDERFLOW`` (activations:
  ``ACTIVATION_UNDERFLOW``) of the non-zero values: that format gains ``step`` fraction
  bits;
* **saturation** above ``SATURATION`` of the elements: that format gains one integer
  (exponent) bit, its resolution kept;
* the **softmax**: logits saturated above ``LOGITS_SATURATED`` widen the input's range
  by one bit; non-target errors flushed above ``FLUSHED`` give the error one fraction bit;
* a **diverged** run: the layer and tensor where the first non-finite value appeared gains
  one range bit and ``step`` resolution bits;
* nothing above its threshold: every weight and error format gains one resolution bit
  (the diagnostics do not say where the accuracy went, so the cheapest broad step).

An MX operand gains "bits" one element type at a time (:func:`lpcli.mx_family.widen_element`):
resolution moves it to the cheapest type with more mantissa bits and no fewer binades under
its block's top, range to the one with more binades and no fewer mantissa bits; the 8-bit
types at the top of each ladder stay as they are (nothing left to widen).

The thresholds are deliberately above what passing runs show: the README's worked
example passes with 6% lost mass, 3% error underflow and 17% saturated logits (classes
far below the top one); the bundled recipes' recommended plans pass with up to 41% of
logits saturated and 87% of non-target errors flushed, so the softmax alarms are weak.

The widening decisions are made on a validation split held out of the training examples;
the loop stops at the first verdict there that is not ``failed`` (passed, or inconclusive:
the split cannot tell), after ``rounds`` widenings, or when nothing can be widened within
the bit limit, and says which. The final verdict is one more check on the test set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .check import train_check
from .cost import CostTable
from .data import Dataset, load_data
from .formats import BlockFormat, FixedPoint, FloatFormat, Format
from .mx_family import widen_element
from .plan import Plan, follow_weight
from .recipe import Recipe
from .recommend import add_resolution, summarize
from .results import CheckReport

LOST_MASS = 0.3
UNDERFLOW = 0.05
ACTIVATION_UNDERFLOW = 0.2
SATURATION = 0.005
LOGITS_SATURATED = 0.75
FLUSHED = 0.95
WEIGHTS_FLUSHED = 0.5
COMPENSATION_DROPPED = 0.05


@dataclass(frozen=True)
class Widening:
    layer: str  # a layer name, or "softmax"
    tensor: str  # weight, activation, error, weight_grad (softmax: input, error)
    kind: str  # "resolution" or "range"
    bits: int
    why: str


def add_range(fmt: Format, bits: int) -> Format:
    """``bits`` more integer (fixed) or exponent (float) bits; the resolution stays. MX: the
    next element type that keeps more binades under its block's top, its resolution kept
    (one step whatever ``bits``)."""
    if isinstance(fmt, BlockFormat):
        return widen_element(fmt, "range") if bits > 0 else fmt
    if isinstance(fmt, FixedPoint):
        return FixedPoint(min(24, fmt.width + bits), fmt.frac - max(0, fmt.width + bits - 24))
    if isinstance(fmt, FloatFormat):
        exp = min(8, fmt.exp + bits)
        return FloatFormat(exp, fmt.man, finite=exp < 8)
    return fmt


def _range_step(saturated: float) -> int:
    """One more integer bit for a little saturation, two for a lot (>= 5%: the values
    have grown well past the range the analysis saw)."""
    return 2 if saturated >= 0.05 else 1


def blame(report: CheckReport, plan: Plan, step: int = 2) -> list[Widening]:
    """What to widen after a failed check, from the Kahan run's diagnostics."""
    out: list[Widening] = []
    kahan = report.runs["kahan"]
    if kahan.diverged:
        layer, tensor = kahan.diverged_in.layer, kahan.diverged_in.tensor
        if layer in plan.layers and tensor in plan.layers[layer]:
            why = f"the Kahan run diverged at step {kahan.diverged_at}, first non-finite in {layer} {tensor}"
            out += [Widening(layer, tensor, "range", 1, why), Widening(layer, tensor, "resolution", step, why)]
    for layer, d in report.diagnostics.items():
        def value(key: str, d: dict[str, Any] = d) -> float:
            return d.get(key, {}).get("kahan") or 0.0
        clipped, flushed = value("weight_saturated"), value("weight_flushed")
        if flushed > WEIGHTS_FLUSHED:  # a layer whose weights start at zero learns nothing and loses nothing
            out.append(Widening(layer, "weight", "resolution", step,
                                f"{flushed:.0%} of the initial weights round to zero (> {WEIGHTS_FLUSHED:.0%})"))
        elif clipped > SATURATION:  # weights grew past the range: their updates were clipped, not swamped
            out.append(Widening(layer, "weight", "range", _range_step(clipped),
                                f"{clipped:.2%} of weights at the range limit (> {SATURATION:.1%})"))
        elif value("lost_mass") > LOST_MASS:
            out.append(Widening(layer, "weight", "resolution", step,
                                f"lost update mass {value('lost_mass'):.0%} > {LOST_MASS:.0%}"))
        if value("compensation_dropped") > COMPENSATION_DROPPED:
            out.append(Widening(layer, "compensation", "resolution", step,
                                f"the compensation rounded {value('compensation_dropped'):.0%} of the residues to zero "
                                f"(> {COMPENSATION_DROPPED:.0%}): updates it could not keep"))
        for tensor in ("activation", "error", "weight_grad"):
            if layer == plan.output_layer and tensor in ("activation", "error"):
                continue  # the softmax formats, judged below
            limit = ACTIVATION_UNDERFLOW if tensor == "activation" else UNDERFLOW
            under, sat = value(f"{tensor}_underflow"), value(f"{tensor}_saturated")
            if under > limit:
                out.append(Widening(layer, tensor, "resolution", step,
                                    f"{under:.1%} of non-zero values underflow (> {limit:.0%})"))
            if sat > SATURATION:
                out.append(Widening(layer, tensor, "range", _range_step(sat),
                                    f"{sat:.2%} saturated (> {SATURATION:.1%})"))
    soft = report.softmax.get("kahan", {})
    if (soft.get("logits_saturated") or 0.0) > LOGITS_SATURATED:
        out.append(Widening("softmax", "input", "range", 1,
                            f"{soft['logits_saturated']:.0%} of logits saturated (> {LOGITS_SATURATED:.0%})"))
    if (soft.get("non_target_errors_flushed") or 0.0) > FLUSHED:
        out.append(Widening("softmax", "error", "resolution", 1,
                            f"{soft['non_target_errors_flushed']:.0%} of non-target errors p-y flushed "
                            f"(> {FLUSHED:.0%})"))
    if not out:
        why = "no diagnostic above its threshold: one more resolution bit for every weight and error"
        for layer in plan.layers:
            out.append(Widening(layer, "weight", "resolution", 1, why))
            if layer != plan.output_layer:
                out.append(Widening(layer, "error", "resolution", 1, why))
    return out


def widen(plan: Plan, widenings: list[Widening], max_bits: int = 24) -> tuple[Plan, list[dict[str, Any]]]:
    """Apply ``widenings`` (capped at ``max_bits``); returns the new plan and what changed."""
    layers = {name: dict(fmts) for name, fmts in plan.layers.items()}
    softmax = {"input": plan.softmax_input, "error": plan.softmax_error}
    changes: list[dict[str, Any]] = []
    done: set[tuple[str, str, str]] = set()
    for w in widenings:
        if (w.layer, w.tensor, w.kind) in done:
            continue
        done.add((w.layer, w.tensor, w.kind))
        old = softmax[w.tensor] if w.layer == "softmax" else layers[w.layer][w.tensor]
        new = add_range(old, w.bits) if w.kind == "range" else add_resolution(old, w.bits)
        if new.width > max_bits or new == old:
            changes.append({"layer": w.layer, "tensor": w.tensor, "from": str(old), "to": str(old),
                            "why": w.why + ("; not widened (no MX element type above it)"
                                            if isinstance(old, BlockFormat) and new == old else
                                            f"; not widened (at the {max_bits}-bit limit)")})
            continue
        if w.layer == "softmax":
            softmax[w.tensor] = new
        else:
            layers[w.layer][w.tensor] = new
            if w.tensor == "weight":
                follow_weight(layers[w.layer])
        changes.append({"layer": w.layer, "tensor": w.tensor, "from": str(old), "to": str(new), "why": w.why})
    if plan.output_layer in layers:
        layers[plan.output_layer].update(activation=softmax["input"], error=softmax["error"])
    return replace(plan, layers=layers, softmax_input=softmax["input"], softmax_error=softmax["error"]), changes


VALIDATION_FRACTION = 0.2  # of the training examples, held out for the widening decisions


def validation_split(data: Dataset, fraction: float = VALIDATION_FRACTION, seed: int = 0) -> Dataset:
    """``data`` with a random ``fraction`` of its training examples held out as its test set
    (and the test set set aside): what verify decides on, so that its final verdict on the
    real test set is not the one it chased."""
    count = len(data.y_train)
    held = max(1, round(count * fraction))
    if count - held < 1:
        raise ValueError(f"{count} training examples are too few to hold out a validation split")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).to(data.y_train.device)
    val, train = order[:held], order[held:]
    return replace(data, x_train=data.x_train[train], y_train=data.y_train[train], x_test=data.x_train[val],
                   y_test=data.y_train[val], name=f"{data.name} (validation split)")


def verify(recipe: Recipe, plan: Plan, stats: dict[str, Any], *, tolerance: float = 1.0, rounds: int = 4,
           max_bits: int = 24, seed: int | None = None, seeds: int | None = None, steps: int | None = None,
           step: int = 2, progress: Callable[[str, int, int], None] | None = None,
           data: Dataset | None = None, cost: CostTable | None = None) -> tuple[Plan, dict[str, Any]]:
    """Widen ``plan`` while the Kahan run's verdict on a validation split (``VALIDATION_FRACTION``
    of the training examples, held out) is ``failed``, at most ``rounds`` times; an
    ``inconclusive`` verdict stops the widening (the split cannot tell, so the diagnostics
    have nothing to act on). Then one train-check of the last plan on the full training set
    and the real test set gives the final verdict. Returns the last plan (its reasons
    extended by what was widened, its summary recomputed) and the ``verify`` section: every
    round's verdict, what was widened and why, and the final verdict."""
    data = load_data(recipe.data, recipe.source) if data is None else data
    held_out = validation_split(data, seed=recipe.training.seed if seed is None else seed)
    history: list[dict[str, Any]] = []
    for number in range(rounds + 1):
        report = train_check(recipe, plan, tolerance=tolerance, seed=seed, steps=steps, progress=progress,
                             data=held_out, seeds=seeds)
        entry = {"round": number, **_outcome(report, plan, stats), "widened": []}
        history.append(entry)
        if report.verdict.status != "failed" or number == rounds:
            break
        new_plan, changes = widen(plan, blame(report, plan, step), max_bits)
        entry["widened"] = changes
        if new_plan == plan:
            entry["stopped"] = "nothing left to widen within the bit limit"
            break
        plan = _note(new_plan, changes, number + 1)
    plan = replace(plan, summary={**plan.summary, **summarize(plan, stats, cost)})  # the family choice stays
    final = train_check(recipe, plan, tolerance=tolerance, seed=seed, steps=steps, progress=progress, data=data,
                        seeds=seeds)
    outcome = _outcome(final, plan, stats)
    section = {
        "tolerance_points": tolerance,
        "validation": {"examples": len(held_out.y_test), "of_training_examples": len(data.y_train),
                       "seed": recipe.training.seed if seed is None else seed},
        "rounds": history,
        "widenings": sum(1 for entry in history if any(c["from"] != c["to"] for c in entry["widened"])),
        "final": {**outcome, "on": "test set"},
        "passed": outcome["status"] == "passed",
    }
    return plan, section


def _outcome(report: CheckReport, plan: Plan, stats: dict[str, Any]) -> dict[str, Any]:
    """A check's verdict and accuracies (pooled over its seeds, as the verdict is) with the
    plan's cost."""
    verdict = report.verdict.document()
    summary = summarize(plan, stats)
    counts = report.verdict.counts
    if counts is None:  # a run diverged
        fp32 = kahan = gap = None
    else:
        fp32 = (counts.both + counts.reference_only) / counts.n
        kahan = (counts.both + counts.other_only) / counts.n
        gap = float(counts.loss) * 100
    return {
        "status": report.verdict.status,
        "fp32_accuracy": fp32,
        "kahan_accuracy": kahan,
        "gap_points": gap,
        "loss_interval": verdict.get("loss_interval"),
        "discordant": verdict.get("discordant"),
        "overall_bits": summary["overall_bits"],
        "vs_16bit": summary["vs_16bit"],
        "verdict": report.verdict.reason,
        "seconds": report.seconds["total"],
    }


def _note(plan: Plan, changes: list[dict[str, Any]], number: int) -> Plan:
    """Append each widening to the reason of the format it changed."""
    reasons = {k: (dict(v) if isinstance(v, dict) else v) for k, v in plan.reasons.items()}
    for c in changes:
        if c["from"] == c["to"]:
            continue
        text = f"; verify round {number}: {c['from']} -> {c['to']} ({c['why']})"
        if c["layer"] == "softmax":
            key = f"softmax_{c['tensor']}"
            reasons[key] = str(reasons.get(key, "")) + text
        else:
            reasons.setdefault(c["layer"], {})
            reasons[c["layer"]][c["tensor"]] = str(reasons[c["layer"]].get(c["tensor"], "")) + text
    return replace(plan, reasons=reasons)
