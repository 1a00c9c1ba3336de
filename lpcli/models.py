"""Models from a recipe: a YAML layer list built as ``nn.Sequential``, or any
``nn.Module`` from an explicit ``import: package.module:factory`` entry.

Layer names are the modules' qualified names (``"0"``, ``"features.3"``), so a plan
written for one build of a model lines up with the same model built elsewhere.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .schema import Fields

LAYER_TYPES: dict[str, tuple[str, ...]] = {
    "linear": ("in", "out", "bias"),
    "conv2d": ("in", "out", "kernel", "stride", "padding", "bias"),
    "relu": (),
    "maxpool2d": ("kernel", "stride"),
    "flatten": (),
    "batchnorm": ("features",),
    "dropout": ("p",),
    "reshape": ("shape",),
}
SPATIAL = {"conv2d", "maxpool2d"}


def validate_model_spec(model: Fields) -> dict[str, Any]:
    """Check the recipe's ``model`` section; returns a normalized spec."""
    if model.has("import"):
        spec = Fields(model.source, model.path, model.value, ("import", "kwargs"))
        target = spec.string("import")
        if ":" not in target or not all(target.split(":", 1)):
            spec.fail("must look like 'package.module:factory'", field=spec.sub("import"))
        kwargs = spec.section("kwargs").value
        return {"import": target, "kwargs": dict(kwargs)}
    spec = Fields(model.source, model.path, model.value, ("layers", "import"))
    layers = spec.value.get("layers")
    if not isinstance(layers, list) or not layers:
        spec.fail("needs 'layers' (a non-empty list) or 'import: package.module:factory'",
                  field=spec.sub("layers"))
    normalized = []
    spatial = False
    for index, raw in enumerate(layers):
        layer = Fields(spec.source, f"{spec.path}.layers[{index}]", raw)
        kind = layer.string("type", choices=LAYER_TYPES)
        layer = Fields(spec.source, layer.path, raw, ("type",) + LAYER_TYPES[kind])
        entry: dict[str, Any] = {"type": kind}
        if kind == "linear":
            entry.update(in_features=layer.integer("in", low=1), out_features=layer.integer("out", low=1),
                         bias=layer.boolean("bias", True))
        elif kind == "conv2d":
            entry.update(in_channels=layer.integer("in", low=1), out_channels=layer.integer("out", low=1),
                         kernel_size=layer.integer("kernel", low=1), stride=layer.integer("stride", 1, low=1),
                         padding=layer.integer("padding", 0, low=0), bias=layer.boolean("bias", True))
        elif kind == "maxpool2d":
            kernel = layer.integer("kernel", low=1)
            entry.update(kernel_size=kernel, stride=layer.integer("stride", kernel, low=1))
        elif kind == "batchnorm":
            entry.update(num_features=layer.integer("features", low=1), spatial=spatial)
        elif kind == "dropout":
            entry.update(p=layer.number("p", 0.5, low=0.0, high=1.0, high_open=True))
        elif kind == "reshape":
            shape = raw.get("shape")
            if not isinstance(shape, list) or not shape or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
                layer.fail("must be a list of positive integers, e.g. [1, 8, 8]", field=layer.sub("shape"))
            entry.update(shape=list(shape))
        if kind in SPATIAL or (kind == "reshape" and len(entry["shape"]) == 3):
            spatial = True
        elif kind in ("flatten", "linear") or kind == "reshape":
            spatial = False
        normalized.append(entry)
    return {"layers": normalized}


class Reshape(nn.Module):
    """``x.view(batch, *shape)``: lets a layer list feed flat data to convolutions."""

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def build_model(spec: dict[str, Any], source: str, base_dir: Path | None = None) -> nn.Module:
    """Build the module a normalized model spec describes (weights from torch's RNG)."""
    if "import" in spec:
        return _import_model(spec, source, base_dir)
    modules: list[nn.Module] = []
    for entry in spec["layers"]:
        kind = entry["type"]
        args = {k: v for k, v in entry.items() if k not in ("type", "spatial")}
        if kind == "linear":
            modules.append(nn.Linear(**args))
        elif kind == "conv2d":
            modules.append(nn.Conv2d(**args))
        elif kind == "relu":
            modules.append(nn.ReLU())
        elif kind == "maxpool2d":
            modules.append(nn.MaxPool2d(**args))
        elif kind == "flatten":
            modules.append(nn.Flatten())
        elif kind == "batchnorm":
            modules.append((nn.BatchNorm2d if entry["spatial"] else nn.BatchNorm1d)(**args))
        elif kind == "dropout":
            modules.append(nn.Dropout(**args))
        elif kind == "reshape":
            modules.append(Reshape(**args))
    return nn.Sequential(*modules)


def _import_model(spec: dict[str, Any], source: str, base_dir: Path | None) -> nn.Module:
    module_name, factory_name = spec["import"].split(":", 1)
    added = base_dir is not None and str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InputError(source, "model.import", f"cannot import {module_name!r}: {exc}") from None
        factory = module
        for part in factory_name.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise InputError(source, "model.import", f"{module_name!r} has no attribute {factory_name!r}")
        try:
            model = factory(**spec["kwargs"])
        except KeyboardInterrupt:
            raise
        except TypeError as exc:
            raise InputError(source, "model.kwargs", f"{spec['import']} rejected the arguments: {exc}") from None
        except Exception as exc:  # the user's factory: any failure is theirs to fix
            raise InputError(source, "model.import", f"{spec['import']} raised {describe_exception(exc)}") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    if not isinstance(model, nn.Module):
        raise InputError(source, "model.import", f"{spec['import']} returned {type(model).__name__}, not an nn.Module")
    return model


ROOT = "(root)"  # the layer name of parameters registered on the model itself (no module name to give)


def layer_name(qualified: str) -> str:
    """The plan's name for a module: its qualified name, or :data:`ROOT` for the model."""
    return qualified or ROOT


def module_name(layer: str) -> str:
    """The qualified module name behind a plan's layer name."""
    return "" if layer == ROOT else layer


def parameter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a trainable parameter themselves (any type: ``Linear``, ``LSTM``,
    ``MultiheadAttention``, norms, a model with a bare ``nn.Parameter``), by layer name,
    in registration order. A module registered twice appears once, under its first name."""
    return {layer_name(name): module for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter once, under its first qualified name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class Ownership:
    """Which layer stores which parameter: each trainable parameter belongs to the layer that
    registered it first; a later name for the same tensor (tied weights, a module registered
    twice) is an alias of that first name."""

    parameters: dict[str, list[str]]  # layer name -> the qualified names it stores
    tied: dict[str, str]  # alias -> the name that stores it


def ownership(model: nn.Module) -> Ownership:
    layers = parameter_layers(model)
    owned: dict[str, list[str]] = {name: [] for name in layers}
    first = {id(p): name for name, p in trainable_parameters(model).items()}
    for name in first.values():
        owned[layer_name(name.rpartition(".")[0])].append(name)
    tied = {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) in first and first[id(p)] != name}
    return Ownership(owned, tied)


def map_floating(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to every floating-point tensor in it (nested tuples,
    lists and named tuples such as ``PackedSequence``); everything else kept as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        items = [map_floating(v, fn) for v in value]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def floating_tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_floating(value, lambda t: found.append(t) or t)
    return found


@contextmanager
def user_model(source: str, name: str = "the model") -> Iterator[None]:
    """Run the user's model inside: an exception from their code becomes bad input naming
    the model (one line, exit 2), in training and in evaluation alike."""
    try:
        yield
    except (KeyboardInterrupt, InputError):
        raise
    except Exception as exc:  # the user's forward: any failure is theirs to fix
        raise InputError(source, "model", f"the forward of {name} raised {describe_exception(exc)}") from None


def run_model(model: nn.Module, x: torch.Tensor, source: str, name: str = "the model") -> torch.Tensor:
    """``model(x)`` under :func:`user_model`."""
    with user_model(source, name):
        return model(x)


def describe_exception(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
