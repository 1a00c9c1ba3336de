"""The plan: a format per layer and tensor, the softmax formats and the optimizer.

As ``recommend`` writes it and a user may edit it::

    lpcli: {kind: plan, version: 1}
    classes: 10
    output_layer: "2"
    layers:
      "0": {input: fx8.4, weight: fx8.7, activation: fx12.6, error: fx12.11, weight_grad: fx12.14,
            momentum: fp32, compensation: fx12.18, parameters: ["0.weight", "0.bias"]}
      "2": {input: fx9.5, weight: fx8.7, activation: fx8.4, error: fx5.4, weight_grad: fx12.14,
            momentum: fp32, compensation: fx12.18, parameters: ["2.weight", "2.bias"]}
    keep_fp32: []               # trainable parameters left in float32, by choice (reported)
    tied: {}                    # alias -> the parameter name that stores it (planned once)
    softmax_input: fx8.4        # z - max(z) at the last layer's output; the class-count bound
    softmax_error: fx5.4        # p - y, before the 1/batch mean
    softmax_error_rows: zero-sum  # the target's error is minus the rounded others (or: each)
    attention_rows: each        # rounded rows of attention's P enter P·V as they are (or: renormalized)
    optimizer: {kahan: true}    # comp_format: one compensation format for every layer, overriding theirs
    reasons: {...}              # one line per decision (informative; ignored when read)

A module that computes attention (``nn.MultiheadAttention``, or any module calling
``F.scaled_dot_product_attention``) has ``attention: {input, probs, input_error,
probs_error}`` in its entry (see :mod:`lpcli.attention`); a module with no parameters of
its own (a user's attention block around its projections) has an entry with ``attention``
alone.

A layer whose GEMMs are planned has ``accumulator: {forward, input_grad, weight_grad}``
(fixed point or float formats; fp32 or absent: torch's float32 sum), and the plan has
``accumulator_chunk``: the terms each partial sum takes before the chunk sums are added
(null: one sequential sum; see :mod:`lpcli.accumulate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .accumulate import BLOCK_ROLES, GEMMS, GemmFormats
from .attention import ROLES as ATTENTION_ROLES
from .attention import ROWS as ATTENTION_ROWS
from .files import check_header, header
from .formats import FixedPoint, Float32, FloatFormat, Format
from .optim import compensation_format
from .schema import Fields

# The tensor roles of a planned layer, the one definition every module uses:
#   input       the operand entering the layer's matmul/conv (residual sums, pooled values, the model input)
#   weight      the parameters as the optimizer stores them
#   activation  the layer's output (every floating tensor of a tuple output)
#   error       the gradient arriving at that output
#   weight_grad the accumulated gradient of each parameter
#   momentum    the optimizer's momentum buffer (SGD) or first moment (Adam, AdamW)
#   variance    Adam's and AdamW's second moment
#   compensation  Kahan's compensation: what rounding the weights threw away, added back next step
TENSORS = ("input", "weight", "activation", "error", "weight_grad", "momentum", "variance", "compensation")
# Roles a plan written before they existed may leave out: float32, or for the compensation the
# default derived from the weight format (lpcli.optim.compensation_format).
OPTIONAL_TENSORS = ("input", "momentum", "variance", "compensation")
PLAN_KEYS = ("lpcli", "classes", "output_layer", "layers", "keep_fp32", "tied", "softmax_input", "softmax_error",
             "softmax_error_rows", "attention_rows", "accumulator_chunk", "optimizer", "reasons", "summary", "source",
             "verify")
# How the rounded softmax error is formed: "zero-sum" (the target's error is minus the sum of
# the rounded non-target errors, so every row sums to zero) or "each" (every entry rounded).
ERROR_ROWS = ("zero-sum", "each")


@dataclass(frozen=True)
class Plan:
    layers: dict[str, dict[str, Format]]
    softmax_input: Format
    softmax_error: Format
    softmax_error_rows: str = "zero-sum"
    kahan: bool = True
    comp_format: Format | None = None
    classes: int | None = None
    output_layer: str | None = None
    reasons: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    # Per layer, the qualified parameter names its weight format stores; None: the module's own.
    parameters: dict[str, list[str] | None] = field(default_factory=dict)
    keep_fp32: tuple[str, ...] = ()
    tied: dict[str, str] = field(default_factory=dict)
    # Per module computing attention, the formats of its softmax (lpcli.attention.ROLES).
    attention: dict[str, dict[str, Format]] = field(default_factory=dict)
    attention_rows: str = "each"
    # Per layer, the accumulator format of each GEMM (lpcli.accumulate.GEMMS; float32 where absent).
    accumulators: dict[str, dict[str, Format]] = field(default_factory=dict)
    accumulator_chunk: int | None = None

    def gemm_formats(self) -> dict[str, GemmFormats]:
        """The accumulators as the simulator takes them (None: torch's float32 sum)."""
        return {name: GemmFormats(**{kind: None if isinstance(fmt, Float32) else fmt for kind, fmt in fmts.items()})
                for name, fmts in self.accumulators.items()}

    def document(self) -> dict[str, Any]:
        optimizer: dict[str, Any] = {"kahan": self.kahan}
        if self.comp_format is not None:
            optimizer["comp_format"] = str(self.comp_format)
        doc: dict[str, Any] = {
            "lpcli": header("plan"),
            "classes": self.classes,
            "output_layer": self.output_layer,
            "layers": {name: self._layer_document(name) for name in self.layers | self.attention},
            "keep_fp32": list(self.keep_fp32),
            "tied": dict(self.tied),
            "softmax_input": str(self.softmax_input),
            "softmax_error": str(self.softmax_error),
            "softmax_error_rows": self.softmax_error_rows,
            "optimizer": optimizer,
        }
        if self.attention:
            doc["attention_rows"] = self.attention_rows
        if self.accumulators:
            doc["accumulator_chunk"] = self.accumulator_chunk
        if self.reasons:
            doc["reasons"] = self.reasons
        if self.summary:
            doc["summary"] = self.summary
        return doc

    def _layer_document(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if name in self.layers:
            entry = {t: str(self.layers[name][t]) for t in TENSORS}
            if self.parameters.get(name) is not None:
                entry["parameters"] = list(self.parameters[name])
        if name in self.attention:
            entry["attention"] = {role: str(fmt) for role, fmt in self.attention[name].items()}
        if name in self.accumulators:
            entry["accumulator"] = {kind: str(fmt) for kind, fmt in self.accumulators[name].items()}
        return entry

    def with_fraction_bits(self, tensor: str, width: int) -> Plan:
        """The same plan with every fixed-point ``tensor`` format at ``width`` bits,
        keeping each format's integer bits (its range) and changing its resolution."""
        layers = {name: dict(fmts) for name, fmts in self.layers.items()}
        for name, fmts in layers.items():
            if tensor == "activation" and name == self.output_layer:
                continue
            fmts[tensor] = resize(fmts[tensor], width)
            if tensor == "weight":
                follow_weight(fmts)
        plan = replace(self, layers=layers)
        if tensor == "activation":
            plan = plan.with_softmax(input_width=width)
        if tensor == "error":
            plan = plan.with_softmax(error_width=width)
        return plan

    def with_softmax(self, input_width: int | None = None, error_width: int | None = None) -> Plan:
        softmax_input = resize(self.softmax_input, input_width) if input_width else self.softmax_input
        softmax_error = resize(self.softmax_error, error_width) if error_width else self.softmax_error
        layers = {name: dict(fmts) for name, fmts in self.layers.items()}
        if self.output_layer in layers:
            layers[self.output_layer].update(activation=softmax_input, error=softmax_error)
        return replace(self, layers=layers, softmax_input=softmax_input, softmax_error=softmax_error)


def follow_weight(fmts: dict[str, Format]) -> None:
    """After a layer's weight format changed: a fixed-point compensation keeps its step and
    moves its range to the new weight LSB (``lpcli.optim.compensation_format``)."""
    if isinstance(fmts["compensation"], FixedPoint):
        fmts["compensation"] = compensation_format(fmts["weight"], fmts["compensation"].frac)


def resize(fmt: Format, width: int) -> Format:
    """Fixed point at a new width with the same integer bits; other formats unchanged."""
    if isinstance(fmt, FixedPoint):
        return FixedPoint(width, width - fmt.integer_bits)
    return fmt


def plan_from_document(doc: Any, source: str) -> Plan:
    doc = check_header(doc, source, "plan")
    top = Fields(source, "", doc, PLAN_KEYS)
    layers_section = top.section("layers", required=True)
    if not layers_section.value:
        layers_section.fail("has no layers")
    layers: dict[str, dict[str, Format]] = {}
    parameters: dict[str, list[str] | None] = {}
    attention: dict[str, dict[str, Format]] = {}
    accumulators: dict[str, dict[str, Format]] = {}
    for name, raw in layers_section.value.items():
        entry = Fields(source, layers_section.sub(name), raw, TENSORS + ("parameters", "attention", "accumulator"))
        if entry.has("accumulator"):
            accumulators[str(name)] = _accumulators(entry.section("accumulator", GEMMS))
        if entry.has("attention"):
            section = entry.section("attention", ATTENTION_ROLES)
            attention[str(name)] = {role: section.format(role, "fp32") for role in ATTENTION_ROLES}
            if not any(entry.has(t) for t in TENSORS) and not entry.has("parameters"):
                continue  # a module with attention and nothing else to plan (no weights: no GEMMs of its own)
        fmts = {t: entry.format(t, "fp32" if t in OPTIONAL_TENSORS else None, blocks=t in BLOCK_ROLES)
                for t in TENSORS}
        if not entry.has("compensation"):
            fmts["compensation"] = compensation_format(fmts["weight"])
        layers[str(name)] = fmts
        parameters[str(name)] = _names(entry, "parameters") if entry.has("parameters") else None
    keep_fp32 = _names(top, "keep_fp32") if top.has("keep_fp32") else []
    tied = top.section("tied").value
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        top.fail("must map parameter names to parameter names", field="tied")
    optimizer = top.section("optimizer", ("kahan", "comp_format"))
    classes = top.integer("classes", low=2) if doc.get("classes") is not None else None
    output_layer = doc.get("output_layer")
    if output_layer is not None and str(output_layer) not in layers:
        top.fail(f"names no layer of the plan ({', '.join(layers)})", field="output_layer")
    plan = Plan(
        layers=layers,
        softmax_input=top.format("softmax_input"),
        softmax_error=top.format("softmax_error"),
        softmax_error_rows=top.string("softmax_error_rows", "zero-sum", choices=ERROR_ROWS),
        kahan=optimizer.boolean("kahan", True),
        comp_format=optimizer.format("comp_format") if optimizer.has("comp_format") else None,
        classes=classes,
        output_layer=None if output_layer is None else str(output_layer),
        reasons=doc.get("reasons") or {},
        summary=doc.get("summary") or {},
        parameters=parameters,
        keep_fp32=tuple(keep_fp32),
        tied=dict(tied),
        attention=attention,
        attention_rows=top.string("attention_rows", "each", choices=ATTENTION_ROWS),
        accumulators=accumulators,
        accumulator_chunk=top.integer("accumulator_chunk", low=1) if doc.get("accumulator_chunk") is not None
        else None,
    )
    if plan.output_layer is not None:
        entry = plan.layers[plan.output_layer]
        for tensor, softmax_key in (("activation", "softmax_input"), ("error", "softmax_error")):
            if entry[tensor] != getattr(plan, softmax_key):
                top.fail(f"is {entry[tensor]} but {softmax_key} is {getattr(plan, softmax_key)}: the output "
                         f"layer's {tensor} is the softmax's; make them equal",
                         field=f"layers.{plan.output_layer}.{tensor}")
    return plan


def _accumulators(section: Fields) -> dict[str, Format]:
    fmts = {kind: section.format(kind, "fp32") for kind in GEMMS}
    for kind, fmt in fmts.items():
        if not isinstance(fmt, (FixedPoint, FloatFormat, Float32)):
            section.fail(f"must be fixed point (fx<W>.<F>), a float format (e<E>m<M>) or fp32, got {fmt}",
                         field=section.sub(kind))
    return fmts


def _names(fields: Fields, key: str) -> list[str]:
    value = fields.value.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        fields.fail("must be a list of parameter names", field=fields.sub(key))
    return list(value)
