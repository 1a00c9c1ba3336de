"""Models from a recipe: a YAML layer list built as ``nn.Sequential``, or any
``nn.Module`` from an explicit ``import: package.module:factory`` entry.

Layer names are the modules' qualified names (``"0"``, ``"features.3"``), so a plan
written for one build of a model lines up with the same model built elsewhere.
"""

from __future__ import annotations

import importlib
import sys
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
        except TypeError as exc:
            raise InputError(source, "model.kwargs", f"{spec['import']} rejected the arguments: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    if not isinstance(model, nn.Module):
        raise InputError(source, "model.import", f"{spec['import']} returned {type(model).__name__}, not an nn.Module")
    return model


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a ``weight`` parameter, by qualified name, in registration order."""
    return {name: module for name, module in model.named_modules()
            if name and isinstance(getattr(module, "weight", None), nn.Parameter)}
