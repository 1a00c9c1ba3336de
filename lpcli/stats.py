"""``analyze``: per-layer statistics of weights, activations, errors, weight gradients
and update sizes, collected from a few fp32 training steps with hooks.

The stats schema is public, so a stats file made by a user's own loop (see
:class:`StatsCollector`) feeds ``recommend`` like one made here::

    lpcli: {kind: stats, version: 1}
    classes: 10                    # class count at the softmax
    output_layer: "2"              # the layer whose output is the logits (or null)
    training: {lr: 0.05, momentum: 0.0, batch_size: 32, steps: 50, optimizer: sgd,
               late_lr_factor: 1.0}     # the lr at 90% of the schedule over the lr the updates saw
    layers:
      "0":
        module: Linear
        parameters: 8320           # elements of the parameters the layer stores
        parameter_names: ["0.weight", "0.bias"]
        activation_elements: 128   # output elements per sample
        weight: {absmax: 0.61, absmax_initial: 0.12, rms: 0.07, p50: .., p90: .., p99: .., p999: ..,
                 zero_share: 0.0, log2_hist: {lowest: -24, counts: [...]}}
        input: {...}               # the floating-point operands the layer is called with
        activation: {...}          # the layer's output (every floating tensor of a tuple)
        error: {...}               # gradient of the loss w.r.t. that output
        weight_grad: {...}
        momentum: {...}            # the optimizer's momentum buffer or first moment, when it has one
        variance: {...}            # Adam's second moment
        update: {...}              # |w_after - w_before|: the change the optimizer actually made
    tied: {"b.weight": "a.weight"} # aliases of parameters stored under another name
    attention:                     # every module that computed attention (F.scaled_dot_product_attention,
      "encoder.layers.0.self_attn":  #  nn.MultiheadAttention), by the innermost module running it
        module: MultiheadAttention
        keys: 32                   # the most keys a softmax row had
        input: {...}               # |S - rowmax(S)|, the softmax input (finite entries: masks left out)
        probs: {...}               # P (unmasked entries)
        input_error: {...}         # dS, the error at the softmax input
        probs_error: {...}         # dP, the error arriving at P
    gemms:                         # how the sums inside each layer's F.linear / F.conv2d grow
      "0":                         #   (on its own weights; sampled every few steps)
        forward:                   # also input_grad and weight_grad (lpcli.accumulate.GEMMS)
          terms: 65                # the reduction length (the bias is a term)
          addend_rms: 0.03         # rms of the non-zero products
          lengths: [1, 2, 4, .., 64, 65]   # partial sums of the first L terms:
          sum_rms: [...]           #   their rms,
          partial_max: [...]       #   the largest |running sum| up to L
    blocks:                        # how each GEMM operand's values sit in MX blocks of 32 along the
      "0":                         #   sums of the GEMM that takes them (every use; sampled with gemms)
        input:                     # also weight and error (lpcli.accumulate.BLOCK_ROLES)
          block: 32
          values: 52000            # non-zero finite values seen
          below: [...]             # per binade under the block's top: r = |x| / 2^floor(log2 blockmax)
                                   #   in [1, 2), [1/2, 1), ...; the last bin everything further down
          top: {"1.5": 9, "1.75": 4, "1.875": 2, "1.984375": 1}   # values with r at or above each

A layer is every module that registers a trainable parameter itself (``"(root)"`` for
the model's own). A summary is ``{}`` when nothing was seen (an integer input, a
module its parent never calls, no momentum buffer); recommend keeps that role float32.

``log2_hist`` counts non-zero magnitudes per binade: ``counts[i]`` is the number in
``[2^(lowest+i), 2^(lowest+i+1))``. Percentiles are of magnitudes, from a seeded
sample of each step's values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .accumulate import BLOCK_ROLES, GEMMS, OPERAND_ROLES, gemm_call
from .attention import ROLES as ATTENTION_ROLES
from .attention import AttentionMode, ModuleStack, Softmax, mode_around
from .data import Dataset, batch_indices, load_data
from .distributed import ieee_fp32, resolve_device
from .errors import InputError
from .files import check_header, header
from .formats import BlockFormat
from .kernels import block_exponents
from .models import (
    ROOT,
    build_model,
    describe_exception,
    floating_tensors,
    ownership,
    parameter_layers,
    run_model,
    trainable_parameters,
)
from .plan import OPTIONAL_TENSORS, TENSORS
from .recipe import Recipe, load_recipe
from .schema import Fields
from .training import late_factor, torch_optimizer

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}
TENSOR_KINDS = (*TENSORS, "update")
HIST_LOW, HIST_HIGH = -160, 128
SAMPLES_PER_STEP = 4096
# The one progress protocol of long work: (task, steps done, steps in all), e.g. ("kahan", 25, 600).
Progress = Callable[[str, int, int], None]


class TensorSummary:
    """Accumulates one tensor kind of one layer over steps."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.absmax = 0.0
        self.first_absmax: float | None = None
        self.sum_squares = 0.0
        self.elements = 0
        self.zeros = 0
        self.hist = torch.zeros(HIST_HIGH - HIST_LOW, dtype=torch.int64)
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        mag = x.detach().float().abs().flatten()
        if mag.numel() == 0:
            return
        absmax = float(mag.max())
        if self.first_absmax is None:
            self.first_absmax = absmax
        self.absmax = max(self.absmax, absmax)
        self.sum_squares += float(mag.double().square().sum())
        self.elements += mag.numel()
        nonzero = mag[mag != 0]
        self.zeros += mag.numel() - nonzero.numel()
        if nonzero.numel():
            exponents = torch.frexp(nonzero).exponent.long() - 1
            self.hist += torch.bincount(exponents.clamp(HIST_LOW, HIST_HIGH - 1) - HIST_LOW,
                                        minlength=HIST_HIGH - HIST_LOW).cpu()
        if mag.numel() > SAMPLES_PER_STEP:
            index = torch.randint(0, mag.numel(), (SAMPLES_PER_STEP,), generator=self.generator).to(mag.device)
            mag = mag[index]
        self.samples.append(mag.cpu())

    def result(self) -> dict[str, Any]:
        if not self.elements:
            return {}
        sample = torch.cat(self.samples).double().numpy()
        out: dict[str, Any] = {
            "absmax": self.absmax,
            "rms": math.sqrt(self.sum_squares / self.elements),
            **{name: float(np.quantile(sample, q)) for name, q in QUANTILES.items()},
            "zero_share": self.zeros / self.elements,
        }
        nonzero = torch.nonzero(self.hist).flatten()
        if len(nonzero):
            lo, hi = int(nonzero[0]), int(nonzero[-1])
            out["log2_hist"] = {"lowest": lo + HIST_LOW, "counts": self.hist[lo:hi + 1].tolist()}
        return out


# Where optimizers keep the state a plan stores: torch's SGD, Adam, AdamW and lpcli's twins.
STATE_KEYS = {"momentum": ("momentum_buffer", "exp_avg"), "variance": ("exp_avg_sq",)}


GEMM_EVERY = 5  # steps between recordings of the GEMMs' sums (and of their operands' block profiles)
BLOCK = 32  # the block size of the block profiles (OCP MX's)
BELOW = 40  # binades under a block's top counted one by one; the last bin holds the rest
# A block's top binade is [2^emax, 2^(emax+1)) after scaling: an element type whose largest
# value is t * 2^emax saturates the values with r >= t (E2M1: 1.5; E4M3, E5M2, E3M2: 1.75;
# E2M3: 1.875; INT8: 127/64).
TOPS = (1.5, 1.75, 1.875, 127 / 64)
GEMM_PRODUCTS = 1 << 20  # products sampled per GEMM and recording (float64)


class GemmGrowth:
    """How one kind of a layer's GEMM sums grow (see the module docstring): from a sample
    of output elements, every product and running sum, in the order the accumulator adds
    them (``lpcli.accumulate``), in float64."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.terms = 0
        self.addend_square = self.addends = 0.0
        self.products = 0
        self.square: dict[int, float] = {}  # length -> sum of squared partial sums
        self.count: dict[int, int] = {}
        self.largest: dict[int, float] = {}

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        k = a.shape[1]
        budget = max(1, GEMM_PRODUCTS // max(k, 1))
        rows = min(a.shape[0], max(1, math.isqrt(budget)))
        cols = min(b.shape[1], max(1, budget // rows))
        pick_rows = torch.randperm(a.shape[0], generator=self.generator)[:rows]
        pick_cols = torch.randperm(b.shape[1], generator=self.generator)[:cols]
        products = a.detach()[pick_rows].double().cpu().unsqueeze(2) * b.detach()[:, pick_cols].double().cpu()
        nonzero = products != 0
        self.addends += float(nonzero.sum())
        self.addend_square += float((products * products).sum())
        self.products += products.numel()
        partial = products.cumsum(dim=1)
        running = partial.abs().cummax(dim=1).values
        self.terms = max(self.terms, k)
        for length in _lengths(k):
            at = partial[:, length - 1]
            self.square[length] = self.square.get(length, 0.0) + float((at * at).sum())
            self.count[length] = self.count.get(length, 0) + at.numel()
            self.largest[length] = max(self.largest.get(length, 0.0), float(running[:, length - 1].max()))

    def result(self) -> dict[str, Any]:
        if not self.products:
            return {}
        lengths = sorted(self.square)
        return {"terms": self.terms,
                "addend_rms": math.sqrt(self.addend_square / self.addends) if self.addends else 0.0,
                "lengths": lengths,
                "sum_rms": [math.sqrt(self.square[n] / self.count[n]) for n in lengths],
                "partial_max": [self.largest[n] for n in lengths]}


class BlockProfile:
    """How one operand role's values sit in their MX blocks (module docstring, ``blocks``):
    ``r = |x| / 2^floor(log2 blockmax)`` of every non-zero finite value, counted per binade
    under the block's top and at or above each of :data:`TOPS` in the top binade."""

    def __init__(self) -> None:
        self.values = 0
        self.below = [0] * (BELOW + 1)
        self.top = [0] * len(TOPS)

    def add(self, t: torch.Tensor, axis: int) -> None:
        """The values of ``t`` (2-d), blocked along ``axis`` (its sums' dimension)."""
        rows = t.detach().float().movedim(axis, -1).contiguous()
        padded, e = block_exponents(rows, BlockFormat("int8", BLOCK))  # int8: emax 0, e = floor(log2 blockmax)
        magnitude = padded.abs()
        live = (magnitude > 0) & (magnitude < math.inf)
        r = (magnitude * torch.pow(2.0, -e.double()).float())[live]
        binade = (-torch.floor(torch.log2(r))).clamp_(0, BELOW).long()
        self.values += int(r.numel())
        self.below = [a + int(b) for a, b in zip(self.below, torch.bincount(binade, minlength=BELOW + 1), strict=True)]
        self.top = [a + int(torch.count_nonzero(r >= top)) for a, top in zip(self.top, TOPS, strict=True)]

    def result(self) -> dict[str, Any]:
        return {"block": BLOCK, "values": self.values, "below": list(self.below),
                "top": {repr(top): n for top, n in zip(TOPS, self.top, strict=True)}}


def _lengths(k: int) -> list[int]:
    """1, 2, 4, ... below ``k``, and ``k``."""
    return [1 << j for j in range(max(k - 1, 0).bit_length()) if 1 << j < k] + [k]


class _GemmWatch(TorchFunctionMode):
    """Records the GEMMs of one layer's ``F.linear`` / ``F.conv2d`` on its own weights, on
    the steps ``due()`` says, into ``growth[kind]``."""

    def __init__(self, weights: set[int], growth: dict[str, GemmGrowth], due: Callable[[], bool],
                 blocks: dict[str, BlockProfile]) -> None:
        super().__init__()
        self.weights, self.growth, self.due, self.blocks = weights, growth, due, blocks

    def _profile(self, kind: str, a: torch.Tensor, b: torch.Tensor, bias: bool) -> None:
        """The operands' block profiles, the bias's terms left out (as MX operands leave them)."""
        left, right = OPERAND_ROLES[kind]
        self.blocks[left].add(a[:, 1:] if bias and kind == "forward" else a, -1)
        if bias and kind == "forward":
            b = b[1:]
        elif bias and kind == "weight_grad":
            b = b[:, 1:]
        self.blocks[right].add(b, 0)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not (torch.is_grad_enabled() and self.due()):
            return out
        call = gemm_call(func, args, kwargs, self.weights)
        if call is None:
            return out
        with torch.no_grad():
            for a, b in call.operands("forward"):
                self.growth["forward"].add(a, b)
                self._profile("forward", a, b, call.bias is not None)
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward(call, grad))
        return out

    def _backward(self, call: Any, grad: torch.Tensor) -> None:
        with torch.no_grad():
            if call.x.requires_grad:
                for a, b in call.operands("input_grad", grad):
                    self.growth["input_grad"].add(a, b)
                    self._profile("input_grad", a, b, False)
            for a, b in call.operands("weight_grad", grad):
                self.growth["weight_grad"].add(a, b)
                self._profile("weight_grad", a, b, call.bias is not None)


def _state_tensor(optimizer: torch.optim.Optimizer, p: torch.Tensor, keys: tuple[str, ...]) -> torch.Tensor | None:
    state = optimizer.state.get(p, {})
    return next((state[k] for k in keys if isinstance(state.get(k), torch.Tensor)), None)


class StatsCollector:
    """Collect layer statistics from any training loop, under any optimizer::

        stats = StatsCollector(model, lr=0.05, optimizer=optimizer)   # before training
        ... loss.backward(); stats.step(); optimizer.step() ...
        stats.save("stats.yaml", classes=10)

    ``step()`` once per iteration (after ``backward()``) records the weights, the weight
    gradients, the update each parameter actually received since the previous call
    (``|w_now - w_then|``, whatever the optimizer does) and, with ``optimizer``, its
    momentum buffers. Inputs, activations and errors are recorded by hooks.
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 layers: list[str] | None = None, seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None, *, rule: str | None = None,
                 late_lr_factor: float = 1.0) -> None:
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.optimizer = optimizer
        self.rule_name = rule or (type(optimizer).__name__.lower() if optimizer is not None else None)
        # The lr late in the schedule over the lr these updates were recorded at (1: the
        # updates already cover the schedule, as in a user's own loop).
        self.late_lr_factor = late_lr_factor
        modules = parameter_layers(model)
        names = list(modules) if layers is None else layers
        self.layers = {name: modules[name] for name in names}
        owned = ownership(model)
        trainable = trainable_parameters(model)
        self.parameter_names = {name: owned.parameters.get(name, []) for name in names}
        self.params = {name: [trainable[n] for n in pnames] for name, pnames in self.parameter_names.items()}
        self.tied = owned.tied
        generator = torch.Generator().manual_seed(seed)
        self.summaries = {name: {kind: TensorSummary(generator) for kind in TENSOR_KINDS} for name in names}
        self.activation_elements: dict[str, int] = {}
        self.previous: dict[int, torch.Tensor] = {}
        self.steps = 0
        self.batch_size: int | None = None
        self._handles = []
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            if module is not model:  # the model's own output is the logits: the softmax's
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        self._outputs: dict[int, str] = {}  # tensors held until the forward ends: ids stay unique
        self._held: list[torch.Tensor] = []
        self.output_layer: str | None = None
        self._handles.append(model.register_forward_pre_hook(self._model_pre_hook))
        self._handles.append(model.register_forward_hook(self._model_hook))
        # Attention, wherever the model computes it: recorded for the innermost module running.
        self._generator = generator
        self.attention: dict[str, dict[str, TensorSummary]] = {}
        self.attention_keys: dict[str, int] = {}
        self.attention_modules: dict[str, str] = {}
        self._stack = ModuleStack(model)
        self._softmaxes: dict[str, Softmax] = {}
        self._handles.extend(mode_around(model, lambda: AttentionMode(self._attention_softmax)))
        # The sums inside each layer's GEMMs, every GEMM_EVERY steps (the first included).
        self.gemms = {name: {kind: GemmGrowth(generator) for kind in GEMMS} for name in names}
        self.blocks = {name: {role: BlockProfile() for role in BLOCK_ROLES} for name in names}
        for name, module in self.layers.items():
            weights = {id(p) for p in module.parameters(recurse=False)}
            self._handles.extend(mode_around(module, lambda weights=weights, growth=self.gemms[name],
                                             blocks=self.blocks[name]: _GemmWatch(
                weights, growth, lambda: self.steps % GEMM_EVERY == 0, blocks)))

    def _model_pre_hook(self, module: nn.Module, args: tuple) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors and tensors[0].ndim and torch.is_grad_enabled():
            self.batch_size = tensors[0].shape[0]

    def _model_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Note which layer's output is the model's output (the logits): a layer that returned
        that tensor, else the model itself when it is a layer (it computes the logits)."""
        if isinstance(output, torch.Tensor) and torch.is_grad_enabled():
            if id(output) in self._outputs:
                self.output_layer = self._outputs[id(output)]
            elif ROOT in self.layers:
                self.output_layer = ROOT
        self._outputs.clear()
        self._held.clear()

    def _input_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not torch.is_grad_enabled():
                return
            seen: set[int] = set()
            for tensor in floating_tensors(args):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    self.summaries[name]["input"].add(tensor)
        return hook

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            tensors = floating_tensors(output)
            if not tensors:
                return
            elements = 0
            for tensor in tensors:
                self._outputs[id(tensor)] = name
                self._held.append(tensor)
                self.summaries[name]["activation"].add(tensor)
                elements += tensor.numel()
                if tensor.requires_grad:
                    tensor.register_hook(lambda grad: self.summaries[name]["error"].add(grad))
            if self.batch_size:
                self.activation_elements[name] = elements // self.batch_size
        return hook

    def _attention_softmax(self) -> Softmax | None:
        name = self._stack.innermost
        if name is None or not torch.is_grad_enabled():
            return None
        if name not in self._softmaxes:
            self._softmaxes[name] = self._recording_softmax(name)
        return self._softmaxes[name]

    def _recording_softmax(self, name: str) -> Softmax:
        summaries = self.attention[name] = {role: TensorSummary(self._generator) for role in ATTENTION_ROLES}
        modules = dict(self.model.named_modules())
        self.attention_modules[name] = type(modules[name] if name in modules else self.model).__name__

        def softmax(scores: torch.Tensor, maybe_masked: bool) -> torch.Tensor:
            self.attention_keys[name] = max(self.attention_keys.get(name, 0), scores.size(-1))
            rowmax = scores.detach().amax(dim=-1, keepdim=True)
            if maybe_masked:
                rowmax = rowmax.nan_to_num(neginf=0.0)
            shifted = scores - rowmax
            p = torch.softmax(shifted, dim=-1)
            kept = None
            if maybe_masked:
                p = p.nan_to_num(nan=0.0)
                kept = torch.isfinite(shifted.detach())
            summaries["input"].add(shifted.detach() if kept is None else shifted.detach()[kept])
            summaries["probs"].add(p.detach() if kept is None else p.detach()[kept])
            if p.requires_grad:
                p.register_hook(lambda grad: summaries["probs_error"].add(grad))
                shifted.register_hook(lambda grad: summaries["input_error"].add(grad))
            return p
        return softmax

    @torch.no_grad()
    def step(self) -> None:
        """Record weights, weight gradients, the updates since the last call and the momentum
        buffers (call once per iteration, after backward)."""
        for name, params in self.params.items():
            summary = self.summaries[name]
            if params:
                summary["weight"].add(torch.cat([p.flatten() for p in params]))
            grads = [p.grad.flatten() for p in params if p.grad is not None]
            if grads:
                summary["weight_grad"].add(torch.cat(grads))
            updates = [(p - self.previous[id(p)]).flatten() for p in params if id(p) in self.previous]
            if updates:
                summary["update"].add(torch.cat(updates))
            for kind, keys in STATE_KEYS.items():
                buffers = [_state_tensor(self.optimizer, p, keys) for p in params] if self.optimizer else []
                buffers = [b.flatten() for b in buffers if b is not None]
                if buffers:
                    summary[kind].add(torch.cat(buffers))
            for p in params:
                if id(p) in self.previous:
                    self.previous[id(p)].copy_(p)
                else:
                    self.previous[id(p)] = p.detach().clone()
        self.steps += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.remove()

    def document(self, classes: int, output_layer: str | None = None, source: dict | None = None) -> dict:
        layers = {}
        for name, module in self.layers.items():
            entry: dict[str, Any] = {
                "module": type(module).__name__,
                "parameters": sum(p.numel() for p in self.params[name]),
                "parameter_names": list(self.parameter_names[name]),
                "activation_elements": self.activation_elements.get(name, 0),
            }
            for kind, summary in self.summaries[name].items():
                entry[kind] = summary.result()
            if self.summaries[name]["weight"].first_absmax is not None:
                entry["weight"]["absmax_initial"] = self.summaries[name]["weight"].first_absmax
            layers[name] = entry
        return {
            "lpcli": header("stats"),
            "source": source or {},
            "classes": classes,
            "output_layer": output_layer if output_layer is not None else self.output_layer,
            "training": {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                         "batch_size": self.batch_size, "steps": self.steps,
                         "optimizer": self.rule_name, "late_lr_factor": self.late_lr_factor},
            "layers": layers,
            "tied": dict(self.tied),
            "attention": {name: {"module": self.attention_modules[name], "keys": self.attention_keys.get(name, 0),
                                 **{role: summary.result() for role, summary in summaries.items()}}
                          for name, summaries in self.attention.items()},
            "gemms": {name: {kind: growth.result() for kind, growth in kinds.items() if growth.result()}
                      for name, kinds in self.gemms.items() if any(g.products for g in kinds.values())},
            "blocks": {name: {role: profile.result() for role, profile in roles.items() if profile.values}
                       for name, roles in self.blocks.items() if any(p.values for p in roles.values())},
        }

    def save(self, path: str, classes: int, output_layer: str | None = None) -> None:
        from .files import write_document

        write_document(path, self.document(classes, output_layer))


def analyze(recipe: Recipe | str | Path | None = None, steps: int | None = None, seed: int | None = None,
            progress: Progress | None = None, data: Dataset | None = None,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train the recipe's model in fp32 for ``steps`` steps and summarize every layer.

    ``recipe`` is a loaded :class:`Recipe`, a path, or a bundled recipe's name (default
    ``digits-mlp``). ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
    Returns the stats document (see the module docstring).
    """
    device = resolve_device(device)
    with ieee_fp32(device):
        return _analyze(recipe, steps, seed, progress, data, device)


def _analyze(recipe: Recipe | str | Path | None, steps: int | None, seed: int | None,
             progress: Progress | None, data: Dataset | None,
             device: torch.device) -> dict[str, Any]:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    training = recipe.training
    steps = training.analyze_steps if steps is None else steps
    seed, data, model = prepare_run(recipe, seed, data, device)
    if not parameter_layers(model):
        raise InputError(recipe.source, "model", "has no trainable parameter to analyze")
    optimizer = torch_optimizer(model.parameters(), training)  # at the peak lr: see lpcli.recommend
    collector = StatsCollector(model, training.lr, training.momentum, training.weight_decay, seed=seed,
                               optimizer=optimizer, rule=training.optimizer,
                               late_lr_factor=late_factor(training, training.steps))
    model.train()
    for step, index in enumerate(batch_indices(len(data.y_train), training.batch_size, steps, seed)):
        index = index.to(device)  # drawn on the CPU: the same batches on every device
        optimizer.zero_grad(set_to_none=True)
        logits = run_model(model, data.x_train[index], recipe.source, recipe.model_label)
        loss = F.cross_entropy(logits, data.y_train[index])
        loss.backward()
        collector.step()
        optimizer.step()
        if progress:
            progress("analyze", step + 1, steps)
    collector.remove()
    return collector.document(data.classes, collector.output_layer,
                              {"recipe": recipe.source, "data": data.name, "seed": seed,
                               "device": device.type})


def prepare_run(recipe: Recipe, seed: int | None, data: Dataset | None,
                device: torch.device) -> tuple[int, Dataset, nn.Module]:
    """The seed, the data on ``device`` and the model every run of a recipe starts from:
    built from the seed on the CPU, then moved, so every device starts from the same weights."""
    seed = recipe.training.seed if seed is None else seed
    data = (load_data(recipe.data, recipe.source) if data is None else data).to(device)
    torch.manual_seed(seed)
    model = build_model(recipe.model, recipe.source, recipe.base_dir).to(device)
    check_model_output(model, data, recipe.source, recipe.model_label)
    return seed, data, model


def check_model_output(model: nn.Module, data: Dataset, source: str, name: str = "the model") -> None:
    """The model (``name``: its import target) must map a batch of the data to one logit per class."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.x_train[:2])
    except (KeyboardInterrupt, InputError):
        raise
    except Exception as exc:  # the user's forward: any failure is theirs to fix
        dtype = str(data.x_train.dtype).removeprefix("torch.")
        raise InputError(source, "model", f"{name} does not accept the data's samples of shape "
                         f"{tuple(data.x_train.shape[1:])} ({dtype}): {describe_exception(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise InputError(source, "model", f"{name} returns {type(out).__name__}, not a (batch, classes) tensor "
                         "of logits")
    if out.ndim != 2 or out.shape[1] != data.classes:
        raise InputError(source, "model", f"{name} outputs shape {tuple(out.shape[1:])} per sample, "
                         f"but the data has {data.classes} classes")


def validate_stats(doc: Any, source: str) -> dict[str, Any]:
    """Check a stats document (possibly produced elsewhere) before recommend uses it."""
    doc = check_header(doc, source, "stats")
    top = Fields(source, "", doc, ("lpcli", "source", "classes", "output_layer", "training", "layers", "tied",
                                   "attention", "gemms", "blocks"))
    top.integer("classes", low=2)
    if doc.get("output_layer") is not None and not isinstance(doc["output_layer"], str):
        top.fail("must be a layer name (string) or null", field="output_layer")
    training = top.section("training", ("lr", "momentum", "weight_decay", "batch_size", "steps", "optimizer",
                                         "late_lr_factor"), required=True)
    training.number("lr", low=0.0, low_open=True)
    if training.has("late_lr_factor"):
        training.number("late_lr_factor", low=0.0, high=1.0, low_open=True)
    layers = top.section("layers", required=True)
    if not layers.value:
        layers.fail("has no layers")
    for name, raw in layers.value.items():
        layer = Fields(source, layers.sub(name), raw,
                       ("module", "parameters", "parameter_names", "activation_elements") + TENSOR_KINDS)
        layer.integer("parameters", 0, low=0)
        layer.integer("activation_elements", 0, low=0)
        for kind in TENSOR_KINDS:
            # Written before these roles existed: absent. Nothing seen: empty.
            _check_summary(layer, kind, raw, required=kind not in OPTIONAL_TENSORS)
    attention = top.section("attention")
    if attention.value is not None and not isinstance(attention.value, dict):
        top.fail("must map module names to attention statistics", field="attention")
    for name, raw in (attention.value or {}).items():
        entry = Fields(source, attention.sub(name), raw, ("module", "keys") + ATTENTION_ROLES)
        entry.integer("keys", low=1)
        for role in ATTENTION_ROLES:
            _check_summary(entry, role, raw, required=False)
    _check_per_layer(top, "gemms", "GEMM statistics", GEMMS,
                     _check_growth, ("terms", "addend_rms", "lengths", "sum_rms", "partial_max"))
    _check_per_layer(top, "blocks", "block profiles", BLOCK_ROLES,
                     _check_profile, ("block", "values", "below", "top"))
    return doc


def _check_per_layer(top: Fields, key: str, what: str, parts: tuple[str, ...], check: Callable[[Fields], None],
                     fields: tuple[str, ...]) -> None:
    """A section mapping layer names to their ``parts`` (each optional), each checked by ``check``."""
    section = top.section(key)
    if section.value is not None and not isinstance(section.value, dict):
        top.fail(f"must map layer names to {what}", field=key)
    for name, raw in (section.value or {}).items():
        layer = Fields(top.source, section.sub(name), raw, parts)
        for part in parts:
            if layer.has(part):
                check(layer.section(part, fields))


def _check_profile(profile: Fields) -> None:
    """One operand role's block profile: counts that add up to its values."""
    profile.integer("block", low=1)
    values = profile.integer("values", low=0)
    below = profile.value.get("below")
    if (not isinstance(below, list) or len(below) != BELOW + 1
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in below)
            or sum(below) != values):
        profile.fail(f"must be {BELOW + 1} non-negative integers adding up to values ({values})",
                     field=profile.sub("below"))
    tops = profile.section("top", [repr(t) for t in TOPS], required=True)
    for key in tops.value:
        tops.integer(key, low=0, high=values)


def _check_growth(growth: Fields) -> None:
    """One GEMM kind's growth: lengths rising from 1 to ``terms``, and a non-negative
    rms and largest partial sum at each."""
    terms = growth.integer("terms", low=1)
    growth.number("addend_rms", low=0.0)
    lengths = growth.value.get("lengths")
    if (not isinstance(lengths, list) or not lengths or not all(isinstance(n, int) and not isinstance(n, bool)
                                                                  for n in lengths)
            or lengths != sorted(set(lengths)) or lengths[0] < 1 or lengths[-1] != terms):
        growth.fail(f"must be rising integers from 1 to terms ({terms})", field=growth.sub("lengths"))
    for key in ("sum_rms", "partial_max"):
        values = growth.value.get(key)
        if not isinstance(values, list) or len(values) != len(lengths) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
            growth.fail(f"must be {len(lengths)} non-negative numbers, one per length", field=growth.sub(key))


def _check_summary(fields: Fields, kind: str, raw: dict[str, Any], required: bool) -> None:
    """One tensor summary of a stats file (``{}``: nothing seen, and so is an absent one)."""
    summary = fields.section(kind, ("absmax", "absmax_initial", "rms", "zero_share", "log2_hist") +
                             tuple(QUANTILES), required=required)
    if not summary.value:
        raw[kind] = {}
        return
    for key in ("absmax", "rms"):
        summary.number(key, low=0.0)
    for key in QUANTILES:
        summary.number(key, 0.0, low=0.0)
    summary.number("zero_share", 0.0, low=0.0, high=1.0)
    if summary.has("absmax_initial"):
        summary.number("absmax_initial", low=0.0)
    if summary.has("log2_hist"):
        hist = summary.section("log2_hist", ("lowest", "counts"))
        hist.integer("lowest", low=-400, high=400)
        counts = hist.value.get("counts")
        if not isinstance(counts, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            hist.fail("must be a list of non-negative integers", field=hist.sub("counts"))
