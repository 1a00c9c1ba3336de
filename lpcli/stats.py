"""``analyze``: per-layer statistics of weights, activations, errors, weight gradients
and update sizes, collected from a few fp32 training steps with hooks.

The stats schema is public, so a stats file made by a user's own loop (see
:class:`StatsCollector`) feeds ``recommend`` like one made here::

    lpcli: {kind: stats, version: 1}
    classes: 10                    # class count at the softmax
    output_layer: "2"              # the layer whose output is the logits (or null)
    training: {lr: 0.05, momentum: 0.0, batch_size: 32, steps: 50}
    layers:
      "0":
        module: Linear
        parameters: 8320           # elements of the layer's parameters
        activation_elements: 128   # output elements per sample
        weight: {absmax: 0.61, absmax_initial: 0.12, rms: 0.07, p50: .., p90: .., p99: .., p999: ..,
                 zero_share: 0.0, log2_hist: {lowest: -24, counts: [...]}}
        activation: {...}          # the layer's output
        error: {...}               # gradient of the loss w.r.t. that output
        weight_grad: {...}
        update: {...}              # |intended update| = |lr * (momentum buffer or gradient)|

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

from .data import Dataset, batch_indices, load_data
from .distributed import ieee_fp32, resolve_device
from .errors import InputError
from .files import check_header, header
from .models import build_model, quantizable_layers
from .recipe import Recipe, load_recipe
from .schema import Fields

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}
TENSOR_KINDS = ("weight", "activation", "error", "weight_grad", "update")
HIST_LOW, HIST_HIGH = -160, 128
SAMPLES_PER_STEP = 4096


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


class StatsCollector:
    """Collect layer statistics from any training loop::

        stats = StatsCollector(model, lr=0.05)      # before training
        ... loss.backward(); stats.step(); optimizer.step() ...
        stats.save("stats.yaml", classes=10)

    ``step()`` after ``backward()`` records weights, weight gradients and the update
    SGD will apply (it keeps its own momentum buffer when ``momentum`` is set).
    Activations and errors are recorded by hooks during forward and backward.
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 layers: list[str] | None = None, seed: int = 0) -> None:
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        modules = quantizable_layers(model)
        names = list(modules) if layers is None else layers
        self.layers = {name: modules[name] for name in names}
        generator = torch.Generator().manual_seed(seed)
        self.summaries = {name: {kind: TensorSummary(generator) for kind in TENSOR_KINDS} for name in names}
        self.activation_elements: dict[str, int] = {}
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}
        self.steps = 0
        self.batch_size: int | None = None
        self._handles = [module.register_forward_hook(self._forward_hook(name))
                         for name, module in self.layers.items()]
        self._outputs: dict[int, tuple[str, torch.Tensor]] = {}  # held until the forward ends: ids stay unique
        self.output_layer: str | None = None
        self._handles.append(model.register_forward_hook(self._model_hook))

    def _model_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Note which layer's output is the model's output (the logits)."""
        if isinstance(output, torch.Tensor) and id(output) in self._outputs:
            self.output_layer = self._outputs[id(output)][0]
        self._outputs.clear()

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
                return
            self._outputs[id(output)] = (name, output)
            self.summaries[name]["activation"].add(output)
            self.activation_elements[name] = output[0].numel()
            self.batch_size = output.shape[0]
            if output.requires_grad:
                output.register_hook(lambda grad: self.summaries[name]["error"].add(grad))
        return hook

    @torch.no_grad()
    def step(self) -> None:
        """Record weights, weight gradients and intended updates (call after backward)."""
        for name, module in self.layers.items():
            params = [p for p in module.parameters(recurse=False) if p.grad is not None]
            if not params:
                continue
            summary = self.summaries[name]
            summary["weight"].add(torch.cat([p.flatten() for p in params]))
            summary["weight_grad"].add(torch.cat([p.grad.flatten() for p in params]))
            updates = []
            for p in params:
                d = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p
                if self.momentum:
                    buf = self.buffers.get(p)
                    buf = d.clone() if buf is None else buf.mul_(self.momentum).add_(d)
                    self.buffers[p] = buf
                    d = buf
                updates.append((d * self.lr).flatten())
            summary["update"].add(torch.cat(updates))
        self.steps += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def document(self, classes: int, output_layer: str | None = None, source: dict | None = None) -> dict:
        layers = {}
        for name, module in self.layers.items():
            entry: dict[str, Any] = {
                "module": type(module).__name__,
                "parameters": sum(p.numel() for p in module.parameters(recurse=False)),
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
                         "batch_size": self.batch_size, "steps": self.steps},
            "layers": layers,
        }

    def save(self, path: str, classes: int, output_layer: str | None = None) -> None:
        from .files import write_document

        write_document(path, self.document(classes, output_layer))


def analyze(recipe: Recipe | str | Path | None = None, steps: int | None = None, seed: int | None = None,
            progress: Callable[[int, int], None] | None = None, data: Dataset | None = None,
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
             progress: Callable[[int, int], None] | None, data: Dataset | None,
             device: torch.device) -> dict[str, Any]:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    training = recipe.training
    steps = training.analyze_steps if steps is None else steps
    seed, data, model = prepare_run(recipe, seed, data, device)
    layers = quantizable_layers(model)
    if not layers:
        raise InputError(recipe.source, "model", "has no layer with a weight to analyze")
    optimizer = torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum,
                                weight_decay=training.weight_decay)
    collector = StatsCollector(model, training.lr, training.momentum, training.weight_decay, seed=seed)
    model.train()
    for step, index in enumerate(batch_indices(len(data.y_train), training.batch_size, steps, seed)):
        index = index.to(device)  # drawn on the CPU: the same batches on every device
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
        loss.backward()
        collector.step()
        optimizer.step()
        if progress:
            progress(step + 1, steps)
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
    check_model_output(model, data, recipe.source)
    return seed, data, model


def check_model_output(model: nn.Module, data: Dataset, source: str) -> None:
    """The model must map a batch of the data to one logit per class."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.x_train[:2])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(source, "model", f"does not accept the data's samples of shape "
                         f"{tuple(data.x_train.shape[1:])}: {first}") from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != data.classes:
        raise InputError(source, "model", f"outputs shape {tuple(out.shape[1:])} per sample, "
                         f"but the data has {data.classes} classes")


def validate_stats(doc: Any, source: str) -> dict[str, Any]:
    """Check a stats document (possibly produced elsewhere) before recommend uses it."""
    doc = check_header(doc, source, "stats")
    top = Fields(source, "", doc, ("lpcli", "source", "classes", "output_layer", "training", "layers"))
    top.integer("classes", low=2)
    if doc.get("output_layer") is not None and not isinstance(doc["output_layer"], str):
        top.fail("must be a layer name (string) or null", field="output_layer")
    training = top.section("training", ("lr", "momentum", "weight_decay", "batch_size", "steps"), required=True)
    training.number("lr", low=0.0, low_open=True)
    layers = top.section("layers", required=True)
    if not layers.value:
        layers.fail("has no layers")
    for name, raw in layers.value.items():
        layer = Fields(source, layers.sub(name), raw, ("module", "parameters", "activation_elements") + TENSOR_KINDS)
        layer.integer("parameters", 0, low=0)
        layer.integer("activation_elements", 0, low=0)
        for kind in ("weight", "activation", "error", "weight_grad", "update"):
            summary = layer.section(kind, ("absmax", "absmax_initial", "rms", "zero_share", "log2_hist") +
                                    tuple(QUANTILES), required=True)
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
    return doc
