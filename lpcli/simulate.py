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
Counts of saturated and underflowed values are kept on the device, per quantization
point, so no step waits for the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .formats import DynamicFixedPoint, Float32, Format, quantize
from .models import floating_tensors, map_floating, module_name

COUNT_FIELDS = ("elements", "nonzero", "saturated", "underflow")
# What the simulator never rounds, whatever the plan says: the hardware computes these in
# formats lpcli does not model yet, and every report lists them as float32.
NOT_SIMULATED = (
    "matmul and convolution accumulators (products summed in float32)",
    "the softmax's exp, sum and log",
    "values inside a planned module between its input and its output (an RNN's gates and state per step, "
    "attention scores and probabilities, a norm's mean and variance)",
    "outputs of modules without parameters (activation functions, pooling, residual sums) until they enter a "
    "planned layer",
)


class Counter:
    """Running totals for one quantization point (elements, non-zero, saturated, underflowed)."""

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None

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
        self.totals = counts if self.totals is None else self.totals.add_(counts)

    def as_dict(self) -> dict[str, float]:
        if self.totals is None:
            return dict.fromkeys(COUNT_FIELDS, 0.0)
        return dict(zip(COUNT_FIELDS, self.totals.tolist(), strict=True))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = quantize(x, self.format, self.simulator.rounding, self.simulator.generator)
        if self.simulator.recording:
            self.counts.record(x, q, self.format)
        return q


class _LayerPoint:
    def __init__(self, simulator: Simulator, activation: Format, error: Format) -> None:
        self.simulator = simulator
        self.activation, self.error = activation, error
        self.activation_counts, self.error_counts = Counter(), Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = quantize(x, self.activation, self.simulator.rounding, self.simulator.generator)
        if self.simulator.recording:
            self.activation_counts.record(x, q, self.activation)
        return q

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        q = quantize(grad, self.error, self.simulator.rounding, self.simulator.generator)
        self.error_counts.record(grad, q, self.error)
        return q


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, labels: torch.Tensor, simulator: Simulator) -> torch.Tensor:
        shifted = z - z.amax(dim=1, keepdim=True)
        q = quantize(shifted, simulator.softmax_input, simulator.rounding, simulator.generator)
        if simulator.recording:
            simulator.softmax_input_counts.record(shifted, q, simulator.softmax_input)
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
        error[rows, labels] -= 1.0
        q = quantize(error, sim.softmax_error, sim.rounding, sim.generator)
        sim.softmax_error_counts.record(error, q, sim.softmax_error)
        # The non-target counts are the whole tensor's less the target entries' (one per row).
        target_nonzero = torch.count_nonzero(error[rows, labels])
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


class Simulator:
    """Attach quantization to ``model`` for the layers in ``layers``.

    ``layers`` maps a layer name (a qualified module name, ``"(root)"`` for the model
    itself) to ``{"input": fmt, "activation": fmt, "error": fmt, "weight_grad": fmt}``
    (a missing role is float32). ``output_layer`` names the layer whose output is the
    model's output: the softmax formats stand in for its activation and error, so they
    are not applied twice (nor at the root, whose output is the model's). ``parameters``
    gives the tensors whose gradients each layer rounds (default: the module's own;
    pass each tied tensor under one layer only). Call :meth:`remove` to detach.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, Mapping[str, Format]],
        softmax_input: Format = Float32(),
        softmax_error: Format = Float32(),
        output_layer: str | None = None,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
        zero_sum_error: bool = True,
        parameters: Mapping[str, list[torch.Tensor]] | None = None,
    ) -> None:
        modules = {name: dict(model.named_modules()).get(module_name(name)) for name in layers}
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
        self.target_error_counts = torch.zeros(2, dtype=torch.float64)  # non-zero, flushed
        self._handles: list[Any] = []
        fp32 = Float32()
        # What each layer was seen to carry ("called", "input", "output": floating-point
        # tensors), so the report lists a float32 role only where it held a value.
        self.seen: dict[str, set[str]] = {name: set() for name in layers}
        for name, formats in layers.items():
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(_observe_input(self.seen[name])))
            self._handles.append(module.register_forward_hook(_observe_output(self.seen[name])))
            input_format = formats.get("input", fp32)
            if not isinstance(input_format, Float32):
                self.inputs[name] = _InputPoint(self, input_format)
                self._handles.append(module.register_forward_pre_hook(_input_hook(self.inputs[name])))
            activation, error = formats.get("activation", fp32), formats.get("error", fp32)
            quantized = not (isinstance(activation, Float32) and isinstance(error, Float32))
            if name != output_layer and module is not model and quantized:
                point = _LayerPoint(self, activation, error)
                self.points[name] = point
                self._handles.append(module.register_forward_hook(_output_hook(point)))
            grad_format = formats.get("weight_grad", fp32)
            params = list(module.parameters(recurse=False)) if parameters is None else parameters.get(name, [])
            if not isinstance(grad_format, Float32) and params:
                counter = self.grad_counts[name] = Counter()
                for param in params:
                    self._handles.append(param.register_post_accumulate_grad_hook(
                        _grad_hook(grad_format, counter, self)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy through the quantized softmax."""
        if self.target_error_counts.device != logits.device:
            self.target_error_counts = self.target_error_counts.to(logits.device)
        return _SoftmaxCrossEntropy.apply(logits, labels, self)

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
        error = self.softmax_error_counts.as_dict()
        target_nonzero, target_flushed = self.target_error_counts.tolist()
        counted = error["nonzero"] - target_nonzero
        return {
            "layers": layers,
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


def _output_hook(point: _LayerPoint):
    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        return map_floating(output, lambda t: _QuantizeOutput.apply(t, point))
    return hook


def _observe_input(seen: set[str]):
    def hook(module: nn.Module, args: tuple) -> None:
        seen.add("called")
        if "input" not in seen and floating_tensors(args):
            seen.add("input")
    return hook


def _observe_output(seen: set[str]):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if "output" not in seen and floating_tensors(output):
            seen.add("output")
    return hook


def _input_hook(point: _InputPoint):
    def hook(module: nn.Module, args: tuple) -> tuple:
        done: dict[int, torch.Tensor] = {}  # attention's query, key and value are often one tensor

        def round_once(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in done:
                done[id(t)] = _QuantizeInput.apply(t, point)
            return done[id(t)]
        return map_floating(args, round_once)
    return hook


def _grad_hook(fmt: Format, counter: Counter, simulator: Simulator):
    def hook(param: torch.Tensor) -> None:
        q = quantize(param.grad, fmt, simulator.rounding, simulator.generator)
        counter.record(param.grad, q, fmt)
        param.grad.copy_(q)
    return hook


class NonFiniteWatch:
    """Finds where NaN or inf first appears in a training step: a layer's activation
    (forward), its error (backward), its weight gradient, or its weights after the update.

    Hooks only collect device-side flags; :meth:`end_step` reads them with one
    synchronization per step and names the first offender in execution order.
    """

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        modules = dict(model.named_modules())
        self.layers = {name: modules[module_name(name)] for name in layers}
        self._flags: list[tuple[str, str, torch.Tensor]] = []
        self._handles: list[Any] = []
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
            for param in module.parameters(recurse=False):
                self._handles.append(param.register_post_accumulate_grad_hook(
                    lambda p, name=name: self._record(name, "weight_grad", p.grad)))

    def _record(self, layer: str, tensor: str, x: torch.Tensor) -> None:
        self._flags.append((layer, tensor, torch.isfinite(x).all()))

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
        finite = torch.stack([f for _, _, f in flags] + [torch.isfinite(loss).all()])
        if bool(finite.all()):
            return None
        first = int((~finite).nonzero()[0])
        return flags[first][:2] if first < len(flags) else ("loss", "loss")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
