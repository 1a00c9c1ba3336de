"""``train-check``: the recipe trained three ways from the same initial weights and
batch order -- fp32, plain low-precision SGD, Kahan low-precision SGD -- with the
diagnostics that explain any gap between them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, batch_indices, load_data
from .errors import InputError
from .models import build_model, quantizable_layers
from .optim import KahanSGD
from .plan import Plan
from .recipe import Recipe
from .simulate import Simulator, shares
from .stats import check_model_output

RUNS = ("fp32", "plain", "kahan")
Progress = Callable[[str, int, int], None]


def check_plan_matches(plan: Plan, model: nn.Module, source: str) -> None:
    layers = quantizable_layers(model)
    for name in plan.layers:
        if name not in layers:
            raise InputError(source, f"layers.{name}",
                             f"the model has no layer {name!r} with weights (layers: {', '.join(layers)})")


def train_check(recipe: Recipe, plan: Plan, *, tolerance: float = 1.0, seed: int | None = None,
                steps: int | None = None, plan_source: str = "plan", progress: Progress | None = None,
                data: Dataset | None = None) -> dict[str, Any]:
    """Run the three trainings and return the report (see the README for its fields)."""
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
    for run in RUNS:
        t0 = time.perf_counter()
        model.load_state_dict(initial)
        result = _train(run, model, plan, recipe, data, batches, seed, progress)
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
    for run in ("plain", "kahan"):
        acc = runs[run]["test_accuracy"]
        runs[run]["gap_to_fp32"] = None if acc is None or fp32_acc is None else fp32_acc - acc
    gap = runs["kahan"]["gap_to_fp32"]
    passed = gap is not None and gap * 100 <= tolerance
    if runs["fp32"]["diverged"]:
        reason = "the fp32 run diverged: the recipe itself does not train (lower the learning rate)"
        passed = False
    elif runs["kahan"]["diverged"]:
        reason = f"the Kahan run diverged at step {runs['kahan']['diverged_at']}"
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
                             kahan=run == "kahan")
        simulator = Simulator(model, plan.layers, plan.softmax_input, plan.softmax_error, plan.output_layer)
        loss_fn = simulator.loss
    losses: list[float] = []
    diverged_at = None
    model.train()
    window = max(1, min(50, len(batches) // 10))
    recent = torch.zeros(())
    for step, index in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[index]), data.y_train[index])
        loss.backward()
        optimizer.step()
        recent = recent + loss.detach() if step >= len(batches) - window else recent
        if (step + 1) % 25 == 0 or step + 1 == len(batches):
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                diverged_at = step + 1
                break
            if progress:
                progress(run, step + 1, len(batches))
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
