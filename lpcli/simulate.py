"""Low-precision simulation of any ``nn.Module``: each planned layer rounds its input
operand (every floating tensor it is called with: the model input, residual sums and
pooled values enter every matmul on a grid) and its output (activation; every floating
tensor of a tuple output, as an RNN's or attention's) in the forward pass, the gradient
arriving at that output (the error) in the backward pass, and the weight gradients once
accumulated. The input's rounding passes the gradient straight through: that gradient
is rounded where it arrives, at the output of the layer that produced the input.
The model's output feeds a softmax cross-entropy whose input ``z - max(z)`` and
error ``p - y`` (before the 1/batch mean) are rounded to the softmax formats. The
target's error is then replaced by minus the sum of the rounded non-target errors, so
each row sums to zero as ``p - y`` does (``zero_sum_error=False`` rounds every entry on
its own; the logits then drift, see lpcli/recommend.py).

Weights are not touched here: the optimizer stores them (see :mod:`lpcli.optim`).
Counts of saturated and underflowed values are kept per quantization point: on the
device, so that no step waits for the host, except on the CPU, where the C kernels count
in the same pass as they round (:func:`lpcli.kernels.quantize_count`) and the counts are
Python integers.

What a simulated step adds to the model's own work is kept small (benchmarks/overhead.py
measures it), without changing a bit of any result:

* one pass of the C kernels per rounding, the counts included (and whether the tensor
  holds NaN or inf, which the non-finite watch then reads instead of the tensor);
* a layer's output made by a matmul, a convolution or a batch norm is rounded in place
  (their autograd nodes keep their inputs, not their output), its error by hooks on the
  output and its node: no copy and no ``autograd.Function`` (:meth:`_LayerPoint.round_in_place`);
* an input that is, unmodified, the previous layer's rounded output on a grid the input
  format holds (a convolution feeding a batch norm) is not rounded again, and an input
  whose rounding changed nothing last step (a relu or max pool of a rounded output) is
  checked by a read-only pass and passed on as it is (:class:`_InputPoint`);
* the error arriving at a rounded output is rounded before the watch's hook sees it, so
  that the watch finds it marked finite (:meth:`_LayerPoint.round_error_early`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accumulate import BLOCK_ROLES, AccumulatorMode, GemmFormats, GemmTally, OperandFormats
from .attention import ROLES as ATTENTION_ROLES
from .attention import AttentionMode, mode_around, simulated_softmax
from .formats import BlockFormat, DynamicFixedPoint, FixedPoint, Float32, Format, Rounding
from .kernels import (
    Backend,
    BlockStats,
    CountPlan,
    Counts,
    absmax_value,
    count_plan,
    kernel_backend,
    quantize,
    quantize_count,
    quantize_count_planned,
)
from .models import floating_tensors, map_floating, module_name

COUNT_FIELDS = ("elements", "nonzero", "saturated", "underflow")
# What the simulator never rounds, whatever the plan says: the hardware computes these in
# formats lpcli does not model yet, and every report lists them as float32.
NOT_SIMULATED = (
    "accumulators of GEMMs other than a planned layer's F.linear and F.conv2d on its own weight (attention's "
    "QK^T and P·V, RNN cells, matmuls in the model's own code; products summed in float32)",
    "the softmax's exp, sum and log (the output softmax's and attention's)",
    "values inside a planned module between its input and its output (an RNN's gates and state per step, "
    "a norm's mean and variance, MultiheadAttention's projected query, key and value and the P·V entering its "
    "out_proj)",
    "attention in modules without attention formats in the plan (scores, probabilities and their errors)",
    "outputs of modules without parameters (activation functions, pooling, residual sums) until they enter a "
    "planned layer",
)


class Counter:
    """Running totals for one quantization point (elements, non-zero, saturated, underflowed).

    Where the C kernels round (contiguous float32 CPU tensors) they count in the same pass
    and the totals are kept as Python integers (a CPU tensor has no device to wait for);
    elsewhere they stay on the device, so no step waits for the host. :attr:`totals`
    gives both as one float64 tensor (exact: the counts are integers below 2^53)."""

    def __init__(self) -> None:
        self._device: torch.Tensor | None = None
        self._host: list[int] | None = None
        self.last_nonzero: int | None = None  # non-zeros of the last rounding, where the C kernels counted it

    @property
    def totals(self) -> torch.Tensor | None:
        if self._host is None:
            return self._device
        host = torch.tensor(self._host, dtype=torch.float64)
        return host if self._device is None else self._device + host.to(self._device.device)

    @totals.setter
    def totals(self, value: torch.Tensor | None) -> None:
        self._device, self._host = value, None

    def record(self, x: torch.Tensor, q: torch.Tensor, fmt: Format) -> None:
        # Rounding maps 0 to 0, so the values that underflowed are the non-zeros of x
        # that are zeros of q: nonzero(x) - nonzero(q). Two counting passes, no masks.
        nonzero = torch.count_nonzero(x)
        counts = torch.stack([
            torch.full((), float(x.numel()), device=x.device, dtype=torch.float64),  # a fill, not a host copy
            nonzero.double(),
            _saturated_count(x, fmt),
            (nonzero - torch.count_nonzero(q)).double(),
        ])
        self._device = counts if self._device is None else self._device.add_(counts)
        self.last_nonzero = None

    def exclude(self, elements: torch.Tensor) -> None:
        """Take back elements counted by the last rounding that were not values (masked
        attention entries rounded as zeros: nothing saturated or underflowed among them)."""
        if self._host is not None and elements.device.type == "cpu":
            self._host[0] -= int(elements)
        else:
            self._device = self._device.clone() if self._device is not None else torch.zeros(
                len(COUNT_FIELDS), dtype=torch.float64, device=elements.device)
            self._device[0] -= elements.double()

    def add(self, elements: int, nonzero: int, nonzero_rounded: int, saturated: int) -> None:
        """The counts of one rounding, made by the C kernels (:func:`lpcli.kernels.quantize_count`)."""
        self.last_nonzero = nonzero_rounded
        host = self._host
        if host is None:
            self._host = [elements, nonzero, saturated, nonzero - nonzero_rounded]
        else:
            host[0] += elements
            host[1] += nonzero
            host[2] += saturated
            host[3] += nonzero - nonzero_rounded

    def as_dict(self) -> dict[str, float]:
        if self._host is not None and self._device is None:
            return dict(zip(COUNT_FIELDS, map(float, self._host), strict=True))
        totals = self.totals
        if totals is None:
            return dict.fromkeys(COUNT_FIELDS, 0.0)
        return dict(zip(COUNT_FIELDS, totals.tolist(), strict=True))


def rounded(x: torch.Tensor, fmt: Format, simulator: Simulator, counter: Counter | None,
            inplace: bool = False, extra: str | None = None) -> torch.Tensor:
    """``x`` rounded onto ``fmt`` with the simulator's rounding, counted by ``counter``
    (None: not counted). One pass of the C kernels where they apply, or :func:`quantize`
    and :meth:`Counter.record`: the same bits and counts either way. ``inplace``: the
    result may overwrite x. ``extra="nonfinite_q"``: mark the result for the non-finite
    watch (see :func:`_rounded_counts`)."""
    if counter is not None:
        fused = _rounded_counts(x, fmt, simulator, inplace, extra=extra)
        if fused is not None:
            q, (nonzero, nonzero_rounded, saturated, *_) = fused
            counter.add(x.numel(), nonzero, nonzero_rounded, saturated)
            return q
    q = quantize(x, fmt, simulator.rounding, simulator.generator)
    if counter is not None:
        counter.record(x, q, fmt)
    return q


def _rounded_counts(x: torch.Tensor, fmt: Format, simulator: Simulator, inplace: bool = False,
                    counts_only: bool = False, extra: str | None = None) -> tuple[torch.Tensor, Counts] | None:
    """:func:`lpcli.kernels.quantize_count` with the simulator's rounding (None where the C
    kernels do not apply). ``extra="nonfinite_x"`` / ``"nonfinite_q"``: where the kernel
    found no NaN or inf in x / in the result, that tensor is marked so, with its version,
    and :func:`all_finite` reads the mark instead of the tensor (for the tensors the
    non-finite watch looks at; the flag costs the kernel a little)."""
    plan = simulator.plans.get(id(fmt))
    if plan is None or plan.rounding != simulator.rounding or plan.format is not fmt:
        plan = simulator.plans[id(fmt)] = count_plan(fmt, simulator.rounding)
    fused = quantize_count_planned(x, plan, simulator.generator, inplace=inplace, counts_only=counts_only,
                                   extra=extra)
    if fused is not None and not fused[1][3]:
        if extra == "nonfinite_q":
            fused[0]._lpcli_finite = fused[0]._version
        elif extra == "nonfinite_x":
            x._lpcli_finite = x._version
    return fused


def _saturated_count(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    if isinstance(fmt, (Float32, DynamicFixedPoint)):
        return torch.zeros((), device=x.device, dtype=torch.float64)
    return (torch.count_nonzero(x > fmt.max_value) + torch.count_nonzero(x < fmt.min_value)).double()


def shares(counts: Mapping[str, float]) -> dict[str, float | None]:
    """Saturated share of all elements; underflow share of the non-zero ones."""
    elements, nonzero = counts["elements"], counts["nonzero"]
    return {
        "saturated": counts["saturated"] / elements if elements else None,
        "underflow": counts["underflow"] / nonzero if nonzero else None,
    }


class _QuantizeOutput(torch.autograd.Function):
    """Forward: round the activation. Backward: round the error (straight through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, point: _LayerPoint) -> torch.Tensor:
        ctx.point = point
        return point.forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.point.backward(grad), None


class _QuantizeInput(torch.autograd.Function):
    """Forward: round the operand entering a layer. Backward: straight through."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, point: _InputPoint) -> torch.Tensor:
        return point.forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _InputPoint:
    def __init__(self, simulator: Simulator, fmt: Format) -> None:
        self.simulator, self.format = simulator, fmt
        self.counts = Counter()
        # The last rounding here changed no value (a relu or a max pool of a layer's rounded
        # output, on a grid this format holds): try unchanged() first next time.
        self.identity = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sim = self.simulator
        fused = _rounded_counts(x, self.format, sim, extra="changed")
        if fused is None:  # the torch kernels
            self.identity = False
            return rounded(x, self.format, sim, self.counts if sim.recording else None)
        q, (nonzero, nonzero_rounded, saturated, changed) = fused
        if sim.recording:
            self.counts.add(x.numel(), nonzero, nonzero_rounded, saturated)
        self.identity = (not changed and sim.rounding != Rounding.STOCHASTIC
                         and not isinstance(self.format, DynamicFixedPoint))
        return q

    def unchanged(self, x: torch.Tensor) -> bool:
        """Whether rounding x changes no value, where the last rounding here changed none: one
        read pass of the C kernels that counts as the rounding would (and is counted as it),
        without writing a copy. Deterministic roundings only (``identity`` says)."""
        if not self.identity:
            return False
        sim = self.simulator
        fused = _rounded_counts(x, self.format, sim, counts_only=True, extra="changed")
        if fused is None or fused[1][3]:
            self.identity = False
            return False
        nonzero, nonzero_rounded, saturated = fused[1][:3]
        if sim.recording:
            self.counts.add(x.numel(), nonzero, nonzero_rounded, saturated)
        return True

    def already_rounded(self, x: torch.Tensor) -> bool:
        """Whether rounding x would change nothing: x is, unmodified, the activation a layer
        rounded onto a fixed-point grid that this point's format holds (same or more fraction
        and integer bits; in range, so nothing saturates or underflows). The count is then
        taken from that rounding's."""
        sim = self.simulator
        entry = sim.on_grid.get(id(x))
        if entry is None:
            return False
        ref, version, fmt, nonzero = entry
        if ref() is not x or x._version != version or not _holds(self.format, fmt):
            return False
        if sim.recording:
            if nonzero is None:
                return False
            self.counts.add(x.numel(), nonzero, nonzero, 0)
        return True


class _BlockOperands:
    """What a layer's GEMMs did to their block-format (MX) operands, per role: the counts
    (a value flushed to zero within its block underflowed; one beyond the element's range
    at its block's scale, which the spec's floor scale allows, saturated) and the range
    of the block exponents seen (blocks holding a non-zero value); ``uses``: operands
    quantized in any pass (none: the layer's formats were never applied)."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.counts: dict[str, Counter] = {}
        self.exponents: dict[str, list[int]] = {}
        self.uses = 0

    def record(self, role: str, stats: BlockStats) -> None:
        self.uses += 1
        if not self.simulator.recording:
            return
        self.counts.setdefault(role, Counter()).add(stats.elements, stats.nonzero, stats.nonzero_rounded,
                                                    stats.beyond)
        if stats.emin is not None:
            seen = self.exponents.setdefault(role, [stats.emin, stats.emax])
            seen[0], seen[1] = min(seen[0], stats.emin), max(seen[1], stats.emax)


class _LayerPoint:
    def __init__(self, simulator: Simulator, activation: Format, error: Format) -> None:
        self.simulator = simulator
        self.activation, self.error = activation, error
        self.activation_counts, self.error_counts = Counter(), Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rounded(x, self.activation, self.simulator,
                       self.activation_counts if self.simulator.recording else None, extra="nonfinite_q")

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        early = getattr(grad, "_lpcli_error", None)
        if early is not None and early[0] is self and early[1] == grad._version:
            q, (nonzero, nonzero_rounded, saturated, *_) = early[2]  # see round_error_early
            self.error_counts.add(grad.numel(), nonzero, nonzero_rounded, saturated)
            return q
        return rounded(grad, self.error, self.simulator, self.error_counts)

    def round_in_place(self, t: torch.Tensor) -> bool:
        """Round the activation ``t`` in place, where that is known to be safe and the C
        kernels apply: ``t`` is a layer's fresh output (not a view) whose autograd node does
        not keep it for its own backward (:data:`_KEEP_NO_OUTPUT`: matmul, convolution,
        batch norm). Nothing else holds it yet, so the layer's output simply becomes the
        rounded value, with no copy and no autograd.Function; the error is then rounded by
        :meth:`round_error_early` (a hook on ``t``, before the non-finite watch's) and handed
        to ``t``'s node by a pre-hook on it. False (nothing done) otherwise."""
        node = t.grad_fn
        if t._base is not None or t.output_nr != 0 or type(node).__name__ not in _KEEP_NO_OUTPUT:
            return False
        sim = self.simulator
        fused = _rounded_counts(t, self.activation, sim, inplace=True, extra="nonfinite_q")
        if fused is None:
            return False
        _, (nonzero, nonzero_rounded, saturated, *_) = fused
        counter = self.activation_counts
        if sim.recording:
            counter.add(t.numel(), nonzero, nonzero_rounded, saturated)
        else:
            counter.last_nonzero = None
        t.register_hook(self.round_error_early)
        node.register_prehook(self.hand_over)
        return True

    def hand_over(self, grad_outputs: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
        """A pre-hook on the node of an output rounded in place: its error (output 0), rounded."""
        grad = grad_outputs[0]
        if grad is None:
            return grad_outputs
        return (self.backward(grad), *grad_outputs[1:])

    def round_error_early(self, grad: torch.Tensor) -> None:
        """A hook on the rounded activation: round the error as soon as it arrives, before
        the non-finite watch's own hook looks at it, so that the watch finds it marked
        finite instead of reading it again. :meth:`backward` takes this rounding (and its
        counts) when it receives the same, unchanged tensor, and rounds it itself otherwise:
        the same bits and counts, counted once (deterministic roundings only)."""
        fused = _rounded_counts(grad, self.error, self.simulator, extra="nonfinite_x")
        if fused is not None:
            grad._lpcli_error = (self, grad._version, fused)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, labels: torch.Tensor, simulator: Simulator) -> torch.Tensor:
        shifted = z - z.amax(dim=1, keepdim=True)
        q = rounded(shifted, simulator.softmax_input, simulator,
                    simulator.softmax_input_counts if simulator.recording else None)
        log_p = F.log_softmax(q, dim=1)
        ctx.save_for_backward(log_p, labels)
        ctx.simulator = simulator
        return F.nll_loss(log_p, labels)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_p, labels = ctx.saved_tensors
        sim: Simulator = ctx.simulator
        error = log_p.exp()
        rows = torch.arange(len(labels), device=labels.device)
        target = error[rows, labels] - 1.0  # p - y at the targets
        error[rows, labels] = target
        q = rounded(error, sim.softmax_error, sim, sim.softmax_error_counts)
        # The non-target counts are the whole tensor's less the target entries' (one per row).
        fmt = sim.softmax_error
        counted = None
        if sim.rounding != Rounding.STOCHASTIC and not isinstance(fmt, DynamicFixedPoint):
            # Rounding is element by element, the same for every call: the targets' own
            # rounding, counted in one C call, holds the same values as q's target entries.
            counted = quantize_count(target, fmt, sim.rounding, counts_only=True)
        if counted is not None:
            _, (target_nonzero, target_kept, *_) = counted
            sim.count_targets(target_nonzero, target_nonzero - target_kept)
        else:
            target_nonzero = torch.count_nonzero(target)
            target_flushed = target_nonzero - torch.count_nonzero(q[rows, labels])
            sim.target_error_counts = sim.target_error_counts + torch.stack([target_nonzero, target_flushed]).double()
        if sim.zero_sum_error and not isinstance(sim.softmax_error, Float32):
            # The target's error is minus the sum of the rounded non-target errors, as an
            # accumulator holds it (on the fixed-point grid, at most a few steps beyond -1):
            # each row sums to zero as p - y does, so rounding cannot shift every logit the
            # same way.
            q[rows, labels] = 0.0
            q[rows, labels] = -q.sum(dim=1)
        return q * (grad / len(labels)), None, None


class _AttentionPoint:
    """One module's attention softmax: its four formats (see :mod:`lpcli.attention`), their
    counts and the most keys a row had."""

    def __init__(self, simulator: Simulator, formats: Mapping[str, Format], renormalize: bool) -> None:
        self.simulator, self.renormalize = simulator, renormalize
        fp32 = Float32()
        self.formats = {role: formats.get(role, fp32) for role in ATTENTION_ROLES}
        self.counts = {role: Counter() for role in ATTENTION_ROLES}
        self.keys = 0
        self.softmax = simulated_softmax(self)

    def saw(self, keys: int) -> None:
        self.keys = max(self.keys, keys)

    def round(self, role: str, x: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        fmt = self.formats[role]
        if isinstance(fmt, Float32):
            return x
        sim = self.simulator
        counter = self.counts[role] if sim.recording or role.endswith("_error") else None
        q = rounded(x, fmt, sim, counter)
        if counter is not None and masked is not None:
            counter.exclude(masked.sum())
        return q


class Simulator:
    """Attach quantization to ``model`` for the layers in ``layers``.

    ``layers`` maps a layer name (a qualified module name, ``"(root)"`` for the model
    itself) to ``{"input": fmt, "activation": fmt, "error": fmt, "weight_grad": fmt}``
    (a missing role is float32). ``output_layer`` names the layer whose output is the
    model's output: the softmax formats stand in for its activation and error, so they
    are not applied twice (nor at the root, whose output is the model's). ``parameters``
    gives the tensors whose gradients each layer rounds (default: the module's own;
    pass each tied tensor under one layer only). ``attention`` maps a module's name to the
    formats of the attention it computes (:data:`lpcli.attention.ROLES`; a missing role is
    float32), ``attention_rows`` says how rounded rows of P enter P·V
    (:data:`lpcli.attention.ROWS`). ``accumulators`` maps a layer's name to the
    accumulators of its three GEMMs (:class:`lpcli.accumulate.GemmFormats`): its ``F.linear``
    and ``F.conv2d`` on its own weights sum in them, in chunks of ``accumulator_chunk`` terms
    (None: one sequential sum). Call :meth:`remove` to detach.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, Mapping[str, Format]],
        softmax_input: Format = Float32(),
        softmax_error: Format = Float32(),
        output_layer: str | None = None,
        rounding: str = Rounding.NEAREST,
        generator: torch.Generator | None = None,
        zero_sum_error: bool = True,
        parameters: Mapping[str, list[torch.Tensor]] | None = None,
        attention: Mapping[str, Mapping[str, Format]] | None = None,
        attention_rows: str = "each",
        accumulators: Mapping[str, GemmFormats] | None = None,
        accumulator_chunk: int | None = None,
    ) -> None:
        attention, accumulators = attention or {}, accumulators or {}
        named = dict(model.named_modules())
        modules = {name: named.get(module_name(name)) for name in (*layers, *attention, *accumulators)}
        missing = [name for name, module in modules.items() if module is None]
        if missing:
            raise KeyError(f"model has no layer named {', '.join(map(repr, missing))}")
        self.model = model
        self.softmax_input, self.softmax_error = softmax_input, softmax_error
        self.rounding, self.generator = rounding, generator
        self.zero_sum_error = zero_sum_error
        self.recording = True
        self.points: dict[str, _LayerPoint] = {}
        self.inputs: dict[str, _InputPoint] = {}
        self.grad_counts: dict[str, Counter] = {}
        self.softmax_input_counts, self.softmax_error_counts = Counter(), Counter()
        # The softmax error's target entries: non-zero, flushed (on the device, plus what the C
        # kernels counted on the host; see target_error_counts).
        self._target_device = torch.zeros(2, dtype=torch.float64)
        self._target_host = [0, 0]
        # The latest activations rounded onto a fixed-point grid: id -> (weak reference, version,
        # format, its non-zeros if counted), so that a layer taking one of them unmodified as
        # its input need not round it again (see _InputPoint.already_rounded).
        self.on_grid: dict[int, tuple[weakref.ref, int, FixedPoint, int | None]] = {}
        self.plans: dict[int, CountPlan] = {}  # id of a format -> its plan for the C kernels
        self._handles: list[Any] = []
        fp32 = Float32()
        # What each layer was seen to carry ("called", "input", "output": floating-point
        # tensors), so the report lists a float32 role only where it held a value.
        self.seen: dict[str, set[str]] = {name: set() for name in layers}
        operands = {name: OperandFormats(**{role: f for role in BLOCK_ROLES
                                            if isinstance(f := formats.get(role), BlockFormat)})
                    for name, formats in layers.items()}
        for name, formats in layers.items():
            module = modules[name]
            if operands[name] and not any(p.dim() in (2, 4) for p in module.parameters(recurse=False)):
                raise ValueError(f"layer {name!r}: block (MX) formats apply to the operands of its own F.linear or "
                                 f"F.conv2d, and it has no 2-d or 4-d weight of its own (a {type(module).__name__})")
            input_format = formats.get("input", fp32)
            if isinstance(input_format, BlockFormat):
                input_format = fp32  # quantized per use, in the GEMMs
            input_point = None
            if not isinstance(input_format, Float32):
                input_point = self.inputs[name] = _InputPoint(self, input_format)
            self._handles.append(module.register_forward_pre_hook(_input_hook(self.seen[name], input_point)))
            activation, error = formats.get("activation", fp32), formats.get("error", fp32)
            if isinstance(error, BlockFormat):
                error = fp32  # quantized per use, in the backward GEMMs
            quantized = not (isinstance(activation, Float32) and isinstance(error, Float32))
            point = None
            if name != output_layer and module is not model and quantized:
                point = self.points[name] = _LayerPoint(self, activation, error)
            self._handles.append(module.register_forward_hook(_output_hook(self.seen[name], point)))
            grad_format = formats.get("weight_grad", fp32)
            params = list(module.parameters(recurse=False)) if parameters is None else parameters.get(name, [])
            if not isinstance(grad_format, Float32) and params:
                counter = self.grad_counts[name] = Counter()
                for param in params:
                    self._handles.append(param.register_post_accumulate_grad_hook(
                        _grad_hook(grad_format, counter, self)))
        self.attention: dict[str, _AttentionPoint] = {}
        for name, formats in attention.items():
            point = self.attention[name] = _AttentionPoint(self, formats, attention_rows == "renormalized")
            self._handles.extend(mode_around(modules[name], lambda softmax=point.softmax: AttentionMode(
                lambda: softmax)))
        self.gemm_tallies: dict[str, GemmTally] = {}
        self.block_operands = {name: _BlockOperands(self) for name in layers if operands[name]}
        for name in [*accumulators, *(n for n in layers if operands[n] and n not in accumulators)]:
            gemms = replace(accumulators.get(name, GemmFormats()), operands=operands.get(name, OperandFormats()),
                            rounding=rounding)
            tally = GemmTally() if name in accumulators else None
            if tally is not None:
                self.gemm_tallies[name] = tally
            weights = list(modules[name].parameters(recurse=False))
            blocks = self.block_operands.get(name)
            self._handles.extend(mode_around(modules[name], lambda gemms=gemms, weights=weights, tally=tally,
                                             blocks=blocks: AccumulatorMode(
                weights, gemms, accumulator_chunk, lambda: tally if self.recording else None, generator,
                None if blocks is None else blocks.record)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy through the quantized softmax."""
        if self._target_device.device != logits.device:
            self._target_device = self._target_device.to(logits.device)
        return _SoftmaxCrossEntropy.apply(logits, labels, self)

    @property
    def target_error_counts(self) -> torch.Tensor:
        """The softmax error's target entries over the run, as float64 ``[non-zero, flushed]``."""
        if self._target_host == [0, 0]:
            return self._target_device
        host = torch.tensor(self._target_host, dtype=torch.float64, device=self._target_device.device)
        return self._target_device + host

    @target_error_counts.setter
    def target_error_counts(self, value: torch.Tensor) -> None:
        self._target_device, self._target_host = value, [0, 0]

    def count_targets(self, nonzero: int, flushed: int) -> None:
        self._target_host = [self._target_host[0] + nonzero, self._target_host[1] + flushed]

    def counts(self) -> dict[str, Any]:
        """Totals per layer and tensor, and for the softmax."""
        layers: dict[str, dict[str, dict[str, float]]] = {}
        for name, point in self.inputs.items():
            layers.setdefault(name, {})["input"] = point.counts.as_dict()
        for name, point in self.points.items():
            layers.setdefault(name, {})["activation"] = point.activation_counts.as_dict()
            layers[name]["error"] = point.error_counts.as_dict()
        for name, counter in self.grad_counts.items():
            layers.setdefault(name, {})["weight_grad"] = counter.as_dict()
        for name, blocks in self.block_operands.items():  # input and error per use, in the GEMMs
            for role, counter in blocks.counts.items():
                if role != "weight":
                    layers.setdefault(name, {})[role] = counter.as_dict()
        error = self.softmax_error_counts.as_dict()
        target_nonzero, target_flushed = self.target_error_counts.tolist()
        counted = error["nonzero"] - target_nonzero
        return {
            "layers": layers,
            "attention": {name: {"keys": point.keys, **{role: c.as_dict() for role, c in point.counts.items()}}
                          for name, point in self.attention.items()},
            "accumulators": {name: tally.as_dict() for name, tally in self.gemm_tallies.items()},
            "block_operands": {name: {role: {**blocks.counts[role].as_dict(), "exponents": blocks.exponents.get(role)}
                                      for role in blocks.counts}
                               for name, blocks in self.block_operands.items()},
            "softmax_input": self.softmax_input_counts.as_dict(),
            "softmax_error": error,
            "non_target_flushed": (error["underflow"] - target_flushed) / counted if counted else None,
        }

    def never_called(self) -> list[str]:
        """Layers whose forward never ran while attached: modules whose parent uses their
        parameters without calling them (attention's ``out_proj``)."""
        return [name for name, seen in self.seen.items() if "called" not in seen]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


_EARLY_ERROR = 1 << 14  # elements: below, a hook costs more than the pass of the watch it saves
# Autograd nodes (by class name) that keep their inputs but not their (first) output for
# the backward pass: a layer output made by one of them can be rounded in place.
_KEEP_NO_OUTPUT = frozenset({"AddmmBackward0", "MmBackward0", "ConvolutionBackward0", "NativeBatchNormBackward0",
                             "_LinearBackward", "_Conv2dBackward"})  # the last two: lpcli.accumulate's


def _output_hook(seen: set[str], point: _LayerPoint | None):
    """Note that the layer's output held a floating-point tensor and round it (``point``)."""
    remember = early = False
    if point is not None:
        sim = point.simulator
        # An activation on a fixed-point grid is remembered for the next layer's input
        # rounding; not with stochastic rounding, whose every call draws from the generator.
        remember = isinstance(point.activation, FixedPoint) and sim.rounding != Rounding.STOCHASTIC
        # Errors rounded as they arrive (round_error_early): not with stochastic rounding, to
        # leave the order of the generator's draws alone.
        early = sim.rounding != Rounding.STOCHASTIC

    def round_output(t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad and torch.is_grad_enabled():
            if early and point.round_in_place(t):
                q = t
            else:
                q = _QuantizeOutput.apply(t, point)
                if early and q.numel() >= _EARLY_ERROR:
                    q.register_hook(point.round_error_early)
        else:  # no error will come back: the rounding alone
            q = point.forward(t)
        if remember:
            on_grid = sim.on_grid
            if len(on_grid) >= 8:
                del on_grid[next(iter(on_grid))]
            on_grid[id(q)] = (weakref.ref(q), q._version, point.activation,
                              point.activation_counts.last_nonzero if sim.recording else None)
        return q

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if "output" not in seen and floating_tensors(output):
            seen.add("output")
        if point is None:
            return None
        if type(output) is torch.Tensor:
            return round_output(output) if output.is_floating_point() else output
        return map_floating(output, round_output)
    return hook


def _holds(outer: Format, inner: FixedPoint) -> bool:
    """Whether every value of the fixed-point ``inner`` is a value of ``outer``, which then
    rounds it (to nearest or toward zero) to itself."""
    return (isinstance(outer, FixedPoint) and outer.frac >= inner.frac
            and outer.width - outer.frac >= inner.width - inner.frac)


def _input_hook(seen: set[str], point: _InputPoint | None):
    """Note that the layer was called (with a floating-point input) and round its inputs
    (``point``)."""

    def round_input(t: torch.Tensor) -> torch.Tensor:
        if point.already_rounded(t) or point.unchanged(t):
            return t  # its rounding is itself: no copy, and the gradient passes as it would
        if t.requires_grad and torch.is_grad_enabled():
            return _QuantizeInput.apply(t, point)
        return point.forward(t)  # nothing to pass a gradient to (the model's input)

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if "input" not in seen:
            seen.add("called")
            if floating_tensors(args):
                seen.add("input")
        if point is None:
            return None
        if len(args) == 1 and type(args[0]) is torch.Tensor:
            t = args[0]
            return (round_input(t),) if t.is_floating_point() else args
        done: dict[int, torch.Tensor] = {}  # attention's query, key and value are often one tensor

        def round_once(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in done:
                done[id(t)] = round_input(t)
            return done[id(t)]
        return map_floating(args, round_once)
    return hook


def _grad_hook(fmt: Format, counter: Counter, simulator: Simulator):
    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        q = rounded(grad, fmt, simulator, counter, inplace=True, extra="nonfinite_q")  # in place: C kernels
        if q is not grad:
            grad.copy_(q)
    return hook


class NonFiniteWatch:
    """Finds where NaN or inf first appears in a training step: a layer's activation
    (forward), its error (backward), its weight gradient, or its weights after the update.

    Hooks only collect flags: Python booleans for CPU tensors (one read pass of the C
    kernels, or none where the simulator's kernels marked the tensor finite as they wrote
    or read it), device-side flags elsewhere; :meth:`end_step` reads the device flags with
    one synchronization per step and names the first offender in execution order.
    """

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        modules = dict(model.named_modules())
        self.layers = {name: modules[module_name(name)] for name in layers}
        self._flags: list[tuple[str, str, bool | torch.Tensor]] = []
        self._handles: list[Any] = []
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
            for param in module.parameters(recurse=False):
                self._handles.append(param.register_post_accumulate_grad_hook(
                    lambda p, name=name: self._record(name, "weight_grad", p.grad)))

    def _record(self, layer: str, tensor: str, x: torch.Tensor) -> None:
        self._flags.append((layer, tensor, all_finite(x)))

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            for tensor in floating_tensors(output):
                self._record(name, "activation", tensor)
                if tensor.requires_grad:
                    tensor.register_hook(lambda grad: self._record(name, "error", grad))
        return hook

    def end_step(self, loss: torch.Tensor) -> tuple[str, str] | None:
        """Call after the optimizer step: the first (layer, tensor) that held a
        non-finite value in this step, ``("loss", "loss")`` if only the loss did, or None."""
        for name, module in self.layers.items():
            for param in module.parameters(recurse=False):
                self._record(name, "weight", param)
        flags, self._flags = self._flags, []
        finite = [f for _, _, f in flags] + [all_finite(loss)]
        on_device = [i for i, f in enumerate(finite) if isinstance(f, torch.Tensor)]
        if on_device:  # one synchronization for all of them
            for i, value in zip(on_device, torch.stack([finite[i] for i in on_device]).tolist(), strict=True):
                finite[i] = value
        if all(finite):
            return None
        first = finite.index(False)
        return flags[first][:2] if first < len(flags) else ("loss", "loss")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def all_finite(x: torch.Tensor) -> bool | torch.Tensor:
    """Whether ``x`` holds no NaN or inf: a Python bool from one read pass of the C kernels
    (contiguous float32 CPU tensors), else a device-side flag (``torch.isfinite(x).all()``).
    A tensor that the simulator's C kernels found finite as they wrote or read it (an
    activation, an error, a weight gradient), unchanged since (its version), needs no pass."""
    if getattr(x, "_lpcli_finite", None) == x._version:
        return True
    if x.is_cpu and x.dtype == torch.float32 and x.is_contiguous() and kernel_backend() == Backend.NATIVE:
        return math.isfinite(absmax_value(x.detach()))
    return torch.isfinite(x).all()
