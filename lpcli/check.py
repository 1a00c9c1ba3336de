"""``train-check``: the recipe trained three ways from the same initial weights and
batch order -- fp32, plain low-precision SGD, Kahan low-precision SGD -- and optionally a
fourth, plain SGD with stochastic rounding, with the diagnostics that explain any gap
between them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, batch_indices, load_data
from .errors import InputError, Interrupted
from .models import build_model, quantizable_layers
from .optim import KahanSGD
from .plan import Plan
from .recipe import Recipe, load_recipe
from .simulate import NonFiniteWatch, Simulator, shares
from .stats import check_model_output

RUNS = ("fp32", "plain", "kahan")
LOW_PRECISION_RUNS = ("plain", "kahan", "stochastic")
Progress = Callable[[str, int, int], None]


def check_plan_matches(plan: Plan, model: nn.Module, source: str) -> None:
    layers = quantizable_layers(model)
    for name in plan.layers:
        if name not in layers:
            raise InputError(source, f"layers.{name}",
                             f"the model has no layer {name!r} with weights (layers: {', '.join(layers)})")


def train_check(recipe: Recipe | str | Path | None = None, plan: Plan | None = None, *, tolerance: float = 1.0,
                seed: int | None = None, steps: int | None = None, plan_source: str = "plan",
                progress: Progress | None = None, data: Dataset | None = None,
                stochastic: bool = False) -> dict[str, Any]:
    """Run the three trainings (four with ``stochastic``) and return the report (see the README).

    ``recipe`` is a loaded :class:`Recipe`, a path or a bundled recipe's name; without
    ``plan`` one is recommended from a fresh analysis. ``stochastic`` adds the run
    ``"stochastic"``: plain low-precision SGD whose weight update rounds stochastically
    (seeded from ``seed``), the usual alternative to Kahan. Ctrl-C raises
    :class:`lpcli.errors.Interrupted`, which says what had finished.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if plan is None:
        from .recommend import recommend
        from .stats import analyze

        plan = recommend(analyze(recipe, seed=seed), precision=recipe.precision, source=recipe.source)
    training = recipe.training
    seed = training.seed if seed is None else seed
    steps = training.steps if steps is None else steps
    data = load_data(recipe.data, recipe.source) if data is None else data
    torch.manual_seed(seed)
    model = build_model(recipe.model, recipe.source, recipe.base_dir)
    check_model_output(model, data, recipe.source)
    check_plan_matches(plan, model, plan_source)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = batch_indices(len(data.y_train), training.batch_size, steps, seed)

    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    diagnostics: dict[str, dict[str, Any]] = {name: {} for name in plan.layers}
    softmax: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for run in (*RUNS, "stochastic") if stochastic else RUNS:
        t0 = time.perf_counter()
        model.load_state_dict(initial)
        try:
            result = _train(run, model, plan, recipe, data, batches, seed, progress)
        except Interrupted as stop:
            stop.finished = {name: summary["test_accuracy"] for name, summary in runs.items()}
            raise
        timings[run] = time.perf_counter() - t0
        runs[run] = result.pop("summary")
        if run != "fp32":
            for layer in result["optimizer"]:
                diagnostics[layer["name"]].setdefault("lost_updates", {})[run] = layer["lost_updates"]
                diagnostics[layer["name"]].setdefault("lost_mass", {})[run] = layer["lost_mass"]
            for name, tensors in result["counts"]["layers"].items():
                for tensor, counts in tensors.items():
                    share = shares(counts)
                    diagnostics[name].setdefault(f"{tensor}_underflow", {})[run] = share["underflow"]
                    diagnostics[name].setdefault(f"{tensor}_saturated", {})[run] = share["saturated"]
            softmax[run] = {
                "logits_saturated": shares(result["counts"]["softmax_input"])["saturated"],
                "non_target_errors_flushed": result["counts"]["non_target_flushed"],
                "error_underflow": shares(result["counts"]["softmax_error"])["underflow"],
            }
            runs[run]["weights_saturated_at_start"] = result["initial_saturated"]

    fp32_acc, kahan_acc = runs["fp32"]["test_accuracy"], runs["kahan"]["test_accuracy"]
    for run in (r for r in LOW_PRECISION_RUNS if r in runs):
        acc = runs[run]["test_accuracy"]
        runs[run]["gap_to_fp32"] = None if acc is None or fp32_acc is None else fp32_acc - acc
    gap = runs["kahan"]["gap_to_fp32"]
    passed = gap is not None and gap * 100 <= tolerance
    if runs["fp32"]["diverged"]:
        reason = (f"the fp32 run {_divergence(runs['fp32'])}: the recipe itself does not train "
                  f"(lower the learning rate)")
        passed = False
    elif runs["kahan"]["diverged"]:
        reason = f"the Kahan run {_divergence(runs['kahan'])}"
    else:
        side = "below" if gap >= 0 else "above"
        reason = (f"Kahan low-precision accuracy {kahan_acc:.2%} is {abs(gap) * 100:.2f} points {side} fp32 "
                  f"{fp32_acc:.2%} (tolerance {tolerance:g})")
    return {
        "recipe": recipe.source,
        "data": {"name": data.name, "classes": data.classes, "train": len(data.y_train), "test": len(data.y_test)},
        "training": {"lr": training.lr, "momentum": training.momentum, "weight_decay": training.weight_decay,
                     "batch_size": training.batch_size, "steps": steps, "seed": seed},
        "plan": plan.document(),
        "runs": runs,
        "diagnostics": diagnostics,
        "softmax": softmax,
        "verdict": {"passed": passed, "tolerance_points": tolerance, "reason": reason},
        "timing": {"seconds": {**timings, "total": time.perf_counter() - started}},
    }


def _divergence(summary: dict[str, Any]) -> str:
    where = summary["diverged_in"]
    return f"diverged at step {summary['diverged_at']} (first non-finite: layer {where['layer']} {where['tensor']})"


def _train(run: str, model: nn.Module, plan: Plan, recipe: Recipe, data: Dataset, batches: list[torch.Tensor],
           seed: int, progress: Progress | None) -> dict[str, Any]:
    training = recipe.training
    torch.manual_seed(seed)  # dropout masks: the same draws in every run
    simulator = None
    if run == "fp32":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
        loss_fn = F.cross_entropy
    else:
        optimizer = KahanSGD(_param_groups(model, plan), lr=training.lr, momentum=training.momentum,
                             weight_decay=training.weight_decay, comp_format=plan.comp_format,
                             mode=run, seed=seed)
        simulator = Simulator(model, plan.layers, plan.softmax_input, plan.softmax_error, plan.output_layer)
        loss_fn = simulator.loss
    watch = NonFiniteWatch(model, list(plan.layers))
    losses: list[float] = []
    diverged_at = diverged_in = None
    model.train()
    window = max(1, min(50, len(batches) // 10))
    recent = torch.zeros(())
    step = 0
    try:
        for step, index in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.x_train[index]), data.y_train[index])
            loss.backward()
            optimizer.step()
            where = watch.end_step(loss)
            if where is not None:
                diverged_at, diverged_in = step + 1, {"layer": where[0], "tensor": where[1]}
                break
            recent = recent + loss.detach() if step >= len(batches) - window else recent
            if (step + 1) % 25 == 0 or step + 1 == len(batches):
                losses.append(float(loss.detach()))
                if progress:
                    progress(run, step + 1, len(batches))
    except KeyboardInterrupt:
        raise Interrupted(run, step + 1, len(batches)) from None
    finally:
        watch.remove()
    if simulator is not None:
        simulator.recording = False
    accuracy, test_loss = _evaluate(model, data, loss_fn) if diverged_at is None else (None, None)
    result: dict[str, Any] = {
        "summary": {
            "test_accuracy": accuracy,
            "test_loss": test_loss,
            "final_loss": float(recent) / window if diverged_at is None else None,
            "diverged": diverged_at is not None,
            "diverged_at": diverged_at,
            "diverged_in": diverged_in,
            "loss_curve": {"every": 25, "values": losses},
        },
    }
    if simulator is not None:
        result["counts"] = simulator.counts()
        result["optimizer"] = optimizer.diagnostics()
        result["initial_saturated"] = optimizer.initial_saturated
        simulator.remove()
    return result


def _param_groups(model: nn.Module, plan: Plan) -> list[dict[str, Any]]:
    groups = []
    seen: set[int] = set()
    modules = dict(model.named_modules())
    for name, fmts in plan.layers.items():
        params = [p for p in modules[name].parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append({"params": params, "weight_format": fmts["weight"], "name": name})
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "weight_format": "fp32", "name": "(unplanned)"})
    return groups


@torch.no_grad()
def _evaluate(model: nn.Module, data: Dataset, loss_fn: Callable) -> tuple[float, float]:
    model.eval()
    logits = model(data.x_test)
    accuracy = float((logits.argmax(dim=1) == data.y_test).float().mean())
    loss = float(loss_fn(logits, data.y_test))
    model.train()
    return accuracy, loss
