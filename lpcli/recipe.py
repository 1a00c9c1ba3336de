"""Recipes: model + data + training (+ optional fixed precision choices) in one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accumulate import BLOCK_ROLES
from .data import validate_data_spec
from .errors import InputError, did_you_mean
from .files import read_document
from .formats import Format
from .models import validate_model_spec
from .plan import TENSORS
from .schema import Fields

RECIPE_KEYS = ("model", "data", "training", "precision", "check", "description")
CHECK_KEYS = ("seeds",)
TRAINING_KEYS = ("optimizer", "lr", "momentum", "betas", "eps", "weight_decay", "batch_size", "steps", "seed",
                 "analyze_steps", "schedule", "warmup_steps", "min_lr", "step_every", "gamma")
OPTIMIZERS = ("sgd", "adam", "adamw")  # adam: L2 decay added to the gradient; adamw: decoupled decay
SCHEDULES = ("constant", "step", "cosine")
PRECISION_KEYS = TENSORS + ("softmax_input", "softmax_error", "layers", "kahan")
DEFAULT_RECIPE = "digits-mlp"


@dataclass(frozen=True)
class Training:
    """How the recipe trains. ``lr`` is the peak learning rate; the schedule scales it
    (see :mod:`lpcli.schedule`). ``momentum`` is SGD's; Adam and AdamW use ``betas``."""

    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    steps: int
    seed: int
    analyze_steps: int
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr, then the schedule
    min_lr: float = 0.0  # cosine: the lr it decays to at the last step
    step_every: int = 0  # step: the lr is multiplied by gamma every step_every steps after warmup
    gamma: float = 0.1


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
    check_seeds: int = 1  # train-check pools its paired verdict over this many seeds by default

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
    training = _training(top.section("training", TRAINING_KEYS))
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
        check_seeds=top.section("check", CHECK_KEYS).integer("seeds", 1, low=1, high=100),
    )


def _training(t: Fields) -> Training:
    optimizer = t.string("optimizer", "sgd", choices=OPTIMIZERS)
    if optimizer != "sgd" and t.has("momentum"):
        t.fail(f"applies to sgd; {optimizer} uses betas", field=t.sub("momentum"))
    if optimizer == "sgd" and (t.has("betas") or t.has("eps")):
        t.fail("apply to adam and adamw; sgd uses momentum", field=t.sub("betas" if t.has("betas") else "eps"))
    betas = t.value.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        t.fail(f"must be two numbers in [0, 1), like [0.9, 0.999]; got {betas!r}", field=t.sub("betas"))
    schedule = t.string("schedule", "constant", choices=SCHEDULES)
    steps = t.integer("steps", low=1)
    lr = t.number("lr", low=0.0, low_open=True)
    if schedule != "step" and (t.has("step_every") or t.has("gamma")):
        t.fail("apply to schedule: step", field=t.sub("step_every" if t.has("step_every") else "gamma"))
    if schedule != "cosine" and t.has("min_lr"):
        t.fail("applies to schedule: cosine", field=t.sub("min_lr"))
    training = Training(
        lr=lr,
        momentum=t.number("momentum", 0.0, low=0.0, high=1.0, high_open=True),
        weight_decay=t.number("weight_decay", 0.0, low=0.0),
        batch_size=t.integer("batch_size", low=1),
        steps=steps,
        seed=t.integer("seed", 0, low=0),
        analyze_steps=t.integer("analyze_steps", 50, low=1),
        optimizer=optimizer,
        betas=(float(betas[0]), float(betas[1])),
        eps=t.number("eps", 1e-8, low=0.0, low_open=True),
        schedule=schedule,
        warmup_steps=t.integer("warmup_steps", 0, low=0, high=steps - 1),
        min_lr=t.number("min_lr", 0.0, low=0.0, high=lr),
        step_every=t.integer("step_every", 1, low=1) if schedule == "step" else 0,
        gamma=t.number("gamma", 0.1, low=0.0, high=1.0, low_open=True),
    )
    if schedule == "step" and not t.has("step_every"):
        t.fail("missing (schedule: step needs step_every)", field=t.sub("step_every"))
    return training


def _precision(p: Fields) -> Precision:
    layers = {}
    for name, raw in p.section("layers").value.items():
        entry = Fields(p.source, p.sub(f"layers.{name}"), raw, TENSORS)
        layers[str(name)] = {t: entry.format(t, blocks=t in BLOCK_ROLES) for t in TENSORS if entry.has(t)}
    return Precision(
        defaults={t: p.format(t, blocks=t in BLOCK_ROLES) for t in TENSORS if p.has(t)},
        layers=layers,
        softmax_input=p.format("softmax_input") if p.has("softmax_input") else None,
        softmax_error=p.format("softmax_error") if p.has("softmax_error") else None,
        kahan=p.boolean("kahan") if p.has("kahan") else None,
    )
