"""What a plan costs on a chip, per training step: multiply energy, add energy and memory
traffic, from a cost table (:class:`CostTable`) and the layer statistics' GEMM shapes.

The default table holds the 45 nm figures of M. Horowitz, "Computing's energy problem (and
what we can do about it)", ISSCC 2014: an 8-bit integer multiply 0.2 pJ (32-bit 3.1 pJ), a
32-bit integer add 0.1 pJ (8-bit 0.03 pJ), a 16-bit float multiply 1.1 pJ and add 0.4 pJ,
a 32-bit float multiply 3.7 pJ and add 0.9 pJ, and a 64-bit DRAM access 1.3-2.6 nJ (the
lower figure: 20.3 pJ per bit). Every other width follows a scaling law:

* integer multiply: an array of ``w_a x w_b`` partial products, ``int_multiply_8bit *
  w_a * w_b / 64`` (it predicts 3.2 pJ at 32 bits against the measured 3.1);
* integer add: linear in the width, ``int_add_32bit * w / 32`` (0.025 pJ at 8 bits, 0.03
  measured);
* float multiply: the significands' product and the exponents' sum, ``k_sig * (m_a + 1) *
  (m_b + 1) + k_exp * max(e_a, e_b)``, the two constants fitted exactly to the 16- and
  32-bit figures (a fixed-point operand enters as a significand of its width and no
  exponent);
* float add: alignment, addition and normalisation grow with the width, ``float_add_32bit *
  w / 32`` (0.45 pJ at 16 bits, 0.4 measured);
* memory: ``memory_per_bit`` pJ for every bit moved; MX formats move their 8-bit block
  scales too, and their products add one 8-bit exponent addition per pair of blocks.

A training step is counted as three GEMMs per layer that has them (the stats' ``gemms``:
the layers whose F.linear / F.conv2d lpcli observed): forward ``y = W x``, input gradient
and weight gradient, each ``batch x outputs x products`` multiply-adds (``products``: the
forward sum's terms less the bias), the multiplies in the operands' formats and the adds in
the layer's accumulator format (float32 where the plan has none). Memory traffic, per step:
weights read twice (forward, input gradient) and written once; activations and errors
written once and read once; weight gradients, the compensation and the optimizer's state
written once and read once. Element-wise work (batch norm, the optimizer's arithmetic,
softmax) and the layers without GEMM statistics are not counted, and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import read_document
from .formats import BlockFormat, DynamicFixedPoint, FixedPoint, Float32, FloatFormat, Format
from .plan import Plan
from .schema import Fields

GEMM_OPERANDS = {  # GEMM kind -> the two tensor roles it multiplies
    "forward": ("weight", "input"),
    "input_grad": ("weight", "error"),
    "weight_grad": ("error", "input"),
}


@dataclass(frozen=True)
class CostTable:
    """Energy figures (pJ) at the anchor widths the scaling laws start from (module docstring)."""

    source: str = "45 nm, M. Horowitz, ISSCC 2014"
    int_multiply_8bit: float = 0.2
    int_add_32bit: float = 0.1
    float_multiply_16bit: float = 1.1
    float_multiply_32bit: float = 3.7
    float_add_32bit: float = 0.9
    memory_per_bit: float = 1300 / 64  # DRAM, per bit of a 64-bit access

    @property
    def float_multiply_constants(self) -> tuple[float, float]:
        """``(k_sig, k_exp)`` through the 16-bit (11 x 11 significand bits, 5 exponent bits)
        and 32-bit (24 x 24, 8) figures."""
        det = 24 * 24 * 5 - 11 * 11 * 8
        k_sig = (self.float_multiply_32bit * 5 - self.float_multiply_16bit * 8) / det
        k_exp = (self.float_multiply_32bit - 24 * 24 * k_sig) / 8
        return k_sig, k_exp


def load_cost_table(path: Path) -> CostTable:
    """A cost table from YAML or JSON: any of :class:`CostTable`'s fields, positive numbers
    (``source`` a string); the rest keep their defaults."""
    doc = read_document(path)
    names = [f.name for f in fields(CostTable)]
    top = Fields(str(path), "", doc, names)
    values: dict[str, Any] = {}
    for name in names:
        if top.has(name):
            values[name] = top.string(name) if name == "source" else top.number(name, low=0.0, low_open=True)
    table = replace(CostTable(), **values)
    k_sig, k_exp = table.float_multiply_constants
    if k_sig <= 0 or k_exp < 0:
        raise InputError(str(path), "float_multiply_32bit",
                         f"with float_multiply_16bit {table.float_multiply_16bit:g} pJ the fit gives a significand "
                         f"cost {k_sig:.3g} and an exponent cost {k_exp:.3g} pJ per bit: the 32-bit multiply must "
                         "cost more than the 16-bit one by about the ratio of their significand products")
    return table


@dataclass(frozen=True)
class Operand:
    """What a multiplier sees of a format: significand bits (sign included for integers),
    exponent bits (0: an integer), and for MX the block its scale serves."""

    significand: int
    exponent: int
    block: int | None = None


def operand(fmt: Format) -> Operand:
    if isinstance(fmt, (FixedPoint, DynamicFixedPoint)):
        return Operand(fmt.width, 0)
    if isinstance(fmt, FloatFormat):
        return Operand(fmt.man + 1, fmt.exp)
    if isinstance(fmt, BlockFormat):
        return replace(operand(fmt.element_format), block=fmt.block)
    return Operand(24, 8)  # float32


def multiply_energy(a: Format, b: Format, table: CostTable) -> float:
    """pJ of one product of an ``a`` and a ``b`` operand (module docstring's laws)."""
    x, y = operand(a), operand(b)
    if x.exponent == 0 and y.exponent == 0:
        energy = table.int_multiply_8bit * x.significand * y.significand / 64
    else:
        k_sig, k_exp = table.float_multiply_constants
        energy = k_sig * x.significand * y.significand + k_exp * max(x.exponent, y.exponent)
    blocks = [op.block for op in (x, y) if op.block]
    if blocks:  # the two blocks' scales: one 8-bit exponent addition per pair of blocks
        energy += table.int_add_32bit * 8 / 32 / min(blocks)
    return energy


def add_energy(fmt: Format, table: CostTable) -> float:
    """pJ of one addition into an accumulator in ``fmt``."""
    if isinstance(fmt, (FixedPoint, DynamicFixedPoint)):
        return table.int_add_32bit * fmt.width / 32
    return table.float_add_32bit * fmt.width / 32


def stored_bits(fmt: Format) -> float:
    """Bits moved per element (MX: the element and its share of the block scale)."""
    return fmt.storage_bits if isinstance(fmt, BlockFormat) else fmt.width


def step_cost(plan: Plan, stats: dict[str, Any], table: CostTable | None = None) -> dict[str, Any]:
    """Energy (µJ) and memory traffic (MB) of one training step of ``plan``, and the same
    for float32 and uniform 16-bit (fixed point ``fx16`` where the plan's weights are fixed
    point, else ``bf16``; float32 accumulators and no compensation in both), with the
    multiply-adds counted and the layers left out (see the module docstring)."""
    table = table or CostTable()
    training = stats.get("training") or {}
    batch = int(training.get("batch_size") or 1)
    adam = training.get("optimizer") in ("adam", "adamw")
    momentum = adam or bool(training.get("momentum"))
    fixed = any(isinstance(f["weight"], FixedPoint) for f in plan.layers.values())
    sixteen: Format = FixedPoint(16, 8) if fixed else FloatFormat(8, 7)
    # per point: a tensor's format, an accumulator's format (GEMM kind "weight_grad" is not the
    # tensor "weight_grad"), whether Kahan's compensation is stored
    points = {
        "plan": (lambda name, role: plan.layers[name].get(role, Float32()),
                 lambda name, kind: plan.accumulators.get(name, {}).get(kind, Float32()), plan.kahan),
        "fp32": (lambda name, role: Float32(), lambda name, kind: Float32(), False),
        "uniform_16bit": (lambda name, role: sixteen, lambda name, kind: Float32(), False),
    }
    out: dict[str, Any] = {"table": table.source, "batch": batch}
    macs = 0
    counted: set[str] = set()
    for point, (format_of, accumulator_of, kahan) in points.items():
        multiply = add = bits = 0.0
        for name, layer in stats["layers"].items():
            if name not in plan.layers:
                continue
            params, outputs = layer.get("parameters", 0), layer.get("activation_elements", 0)
            for kind, (left, right) in GEMM_OPERANDS.items():
                gemm = ((stats.get("gemms") or {}).get(name) or {}).get(kind)
                if not gemm:
                    continue
                forward = ((stats.get("gemms") or {}).get(name) or {}).get("forward") or gemm
                products = max(forward["terms"] - (1 if _has_bias(name, layer) else 0), 1)
                n = batch * outputs * products
                multiply += n * multiply_energy(format_of(name, left), format_of(name, right), table)
                add += n * add_energy(accumulator_of(name, kind), table)
                if point == "plan":
                    macs += n
                    counted.add(name)
            state = {"momentum": momentum, "variance": adam, "compensation": kahan}
            for role, count, accesses in (("weight", params, 3), ("weight_grad", params, 2),
                                          ("activation", batch * outputs, 2), ("error", batch * outputs, 2),
                                          *((r, params, 2) for r, on in state.items() if on)):
                if count:
                    bits += count * accesses * stored_bits(format_of(name, role))
        memory = bits * table.memory_per_bit
        out[point] = {"multiply_uj": multiply * 1e-6, "add_uj": add * 1e-6, "memory_mb": bits / 8 / 1e6,
                      "memory_uj": memory * 1e-6, "total_uj": (multiply + add + memory) * 1e-6}
    out["multiply_adds"] = macs
    out["not_counted"] = sorted(set(plan.layers) - counted, key=list(plan.layers).index)
    return out


def _has_bias(name: str, layer: dict[str, Any]) -> bool:
    names = layer.get("parameter_names") or []
    return any(n.endswith("bias") for n in names)
