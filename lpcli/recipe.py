"""Recipes: model + data + training (+ optional fixed precision choices) in one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import validate_data_spec
from .errors import InputError, did_you_mean
from .files import read_document
from .formats import Format
from .models import validate_model_spec
from .plan import TENSORS
from .schema import Fields

RECIPE_KEYS = ("model", "data", "training", "precision", "description")
TRAINING_KEYS = ("lr", "momentum", "weight_decay", "batch_size", "steps", "seed", "analyze_steps")
PRECISION_KEYS = TENSORS + ("softmax_input", "softmax_error", "layers", "kahan")
DEFAULT_RECIPE = "digits-mlp"


@dataclass(frozen=True)
class Training:
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    steps: int
    seed: int
    analyze_steps: int


@dataclass(frozen=True)
class Precision:
    """The user's fixed choices: recommend keeps them and says so."""

    defaults: dict[str, Format] = field(default_factory=dict)
    layers: dict[str, dict[str, Format]] = field(default_factory=dict)
    softmax_input: Format | None = None
    softmax_error: Format | None = None
    kahan: bool | None = None


@dataclass(frozen=True)
class Recipe:
    source: str
    name: str
    description: str
    model: dict[str, Any]
    data: dict[str, Any]
    training: Training
    precision: Precision
    base_dir: Path

    @property
    def model_label(self) -> str:
        """How errors name the model: its import target, or the recipe's layer list."""
        return self.model.get("import", "the layer list")


def recipes_dir() -> Path:
    """Bundled recipes: inside the installed package, or the checkout's ``recipes/``."""
    packaged = Path(__file__).resolve().parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_recipe_path(recipe: str | Path | None) -> Path:
    """A path as given, or a bundled recipe's name (``digits-cnn``); None means the default."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    path = Path(recipe)
    if path.exists() or path.suffix in (".yaml", ".yml", ".json") or len(path.parts) > 1:
        return path
    bundled = recipes_dir() / f"{recipe}.yaml"
    if bundled.exists():
        return bundled
    hint = did_you_mean(str(recipe), bundled_recipes())
    raise InputError(str(recipe), "", f"no such recipe file or bundled recipe{hint}; "
                     f"bundled: {', '.join(bundled_recipes())}")


def load_recipe(recipe: str | Path | None = None) -> Recipe:
    path = resolve_recipe_path(recipe)
    source = str(path)
    doc = read_document(path)
    if doc is None:
        raise InputError(source, "", "is empty; a recipe needs model, data and training sections")
    top = Fields(source, "", doc, RECIPE_KEYS)
    for key in ("model", "data", "training"):
        if not top.has(key):
            top.fail("missing", field=key)
    t = top.section("training", TRAINING_KEYS)
    training = Training(
        lr=t.number("lr", low=0.0, low_open=True),
        momentum=t.number("momentum", 0.0, low=0.0, high=1.0, high_open=True),
        weight_decay=t.number("weight_decay", 0.0, low=0.0),
        batch_size=t.integer("batch_size", low=1),
        steps=t.integer("steps", low=1),
        seed=t.integer("seed", 0, low=0),
        analyze_steps=t.integer("analyze_steps", 50, low=1),
    )
    description = top.value.get("description", "")
    if not isinstance(description, str):
        top.fail("must be a string", field="description")
    return Recipe(
        source=source,
        name=path.stem,
        description=description,
        model=validate_model_spec(top.section("model")),
        data=validate_data_spec(top.section("data"), path.parent),
        training=training,
        precision=_precision(top.section("precision", PRECISION_KEYS)),
        base_dir=path.parent,
    )


def _precision(p: Fields) -> Precision:
    layers = {}
    for name, raw in p.section("layers").value.items():
        entry = Fields(p.source, p.sub(f"layers.{name}"), raw, TENSORS)
        layers[str(name)] = {t: entry.format(t) for t in TENSORS if entry.has(t)}
    return Precision(
        defaults={t: p.format(t) for t in TENSORS if p.has(t)},
        layers=layers,
        softmax_input=p.format("softmax_input") if p.has("softmax_input") else None,
        softmax_error=p.format("softmax_error") if p.has("softmax_error") else None,
        kahan=p.boolean("kahan") if p.has("kahan") else None,
    )
