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

from . import distributed
from .data import Dataset, balanced_accuracy, batch_indices
from .distributed import World, all_sum
from .errors import InputError, Interrupted
from .models import run_model
from .plan import Plan
from .recipe import Recipe, load_recipe
from .simulate import NonFiniteWatch, Simulator
from .simulation import Simulation, resolve
from .stats import Progress, prepare_run

RUNS = ("fp32", "plain", "kahan")
LOW_PRECISION_RUNS = ("plain", "kahan", "stochastic")


def train_check(recipe: Recipe | str | Path | None = None, plan: Plan | None = None, *, tolerance: float = 1.0,
                seed: int | None = None, steps: int | None = None, plan_source: str = "plan",
                progress: Progress | None = None, data: Dataset | None = None,
                stochastic: bool = False, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run the three trainings (four with ``stochastic``) and return the report (see the README).

    ``recipe`` is a loaded :class:`Recipe`, a path or a bundled recipe's name; without
    ``plan`` one is recommended from a fresh analysis. ``stochastic`` adds the run
    ``"stochastic"``: plain low-precision SGD whose weight update rounds stochastically
    (seeded from ``seed``), the usual alternative to Kahan. Ctrl-C raises
    :class:`lpcli.errors.Interrupted`, which says what had finished.

    ``device``: ``"cpu"`` (default), ``"cuda"`` (``"cuda:N"``) or ``"auto"`` (CUDA when
    available); model, data, optimizer state and counters all live there. Started by
    ``torchrun`` (``WORLD_SIZE`` > 1), the runs are data parallel: each rank takes its slice
    of the same global batches and the gradients are summed before they are quantized
    (see :mod:`lpcli.distributed`); every rank returns the same report, and only
    :func:`lpcli.distributed.is_main_process` should print it.
    """
    world, device = distributed.setup(device)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if plan is None:
        from .recommend import recommend
        from .stats import analyze

        plan = recommend(analyze(recipe, seed=seed, device=device), precision=recipe.precision,
                         source=recipe.source)
    plan = distributed.broadcast_object(plan, world)
    training = recipe.training
    steps = training.steps if steps is None else steps
    seed, data, model = prepare_run(recipe, seed, data, device)
    resolve(plan, model, plan_source)  # a plan that does not fit fails before any training
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = batch_indices(len(data.y_train), training.batch_size, steps, seed)
    global_batch = len(batches[0])
    if world.distributed:
        if global_batch < world.size:
            raise InputError(recipe.source, "training.batch_size", f"a batch of {global_batch} cannot be shared "
                             f"by {world.size} processes")
        batches = [distributed.shard(index, world) for index in batches]
    batch_share = len(batches[0]) / global_batch  # of the global batch's loss that this rank computes
    if device.type != "cpu":
        batches = list(torch.stack(batches).to(device).unbind(0))  # generated on the CPU: one copy

    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    diagnostics: dict[str, dict[str, Any]] = {name: {} for name in plan.layers}
    softmax: dict[str, Any] = {}
    kept_fp32: list[str] = []
    timings: dict[str, float] = {}
    for run in (*RUNS, "stochastic") if stochastic else RUNS:
        t0 = time.perf_counter()
        model.load_state_dict(initial)
        try:
            with distributed.ieee_fp32(device):
                result = _train(run, model, plan, recipe, data, batches, seed, progress if world.rank == 0 else None,
                                world, batch_share, plan_source)
        except Interrupted as stop:
            stop.finished = {name: summary["test_accuracy"] for name, summary in runs.items()}
            raise
        timings[run] = time.perf_counter() - t0
        runs[run] = result.pop("summary")
        if run != "fp32":
            for name, values in result["diagnostics"]["layers"].items():
                for key, value in values.items():
                    diagnostics[name].setdefault(key, {})[run] = value
            softmax[run] = result["diagnostics"]["softmax"]
            runs[run]["weights_saturated_at_start"] = result["initial_saturated"]
            kept_fp32 = result["kept_fp32"]

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
        "data": {"name": data.name, "classes": data.classes, "train": len(data.y_train), "test": len(data.y_test),
                 "notes": list(data.notes), "imbalanced": data.imbalanced},
        "training": {"lr": training.lr, "momentum": training.momentum, "weight_decay": training.weight_decay,
                     "batch_size": training.batch_size, "steps": steps, "seed": seed},
        "device": distributed.describe_device(device, world),
        "plan": plan.document(),
        "runs": runs,
        "diagnostics": diagnostics,
        "softmax": softmax,
        "kept_fp32": kept_fp32,
        "verdict": {"passed": passed, "tolerance_points": tolerance, "reason": reason},
        "timing": {"seconds": {**timings, "total": time.perf_counter() - started}},
    }


def _divergence(summary: dict[str, Any]) -> str:
    where = summary["diverged_in"]
    return f"diverged at step {summary['diverged_at']} (first non-finite: layer {where['layer']} {where['tensor']})"


def _train(run: str, model: nn.Module, plan: Plan, recipe: Recipe, data: Dataset, batches: list[torch.Tensor],
           seed: int, progress: Progress | None, world: World = World(), batch_share: float = 1.0,
           plan_source: str = "plan") -> dict[str, Any]:
    training = recipe.training
    torch.manual_seed(seed)  # dropout masks: the same draws in every run
    gradient_sum = distributed.GradientSum(model, world)  # first: the quantizer's hook must see the summed gradient
    simulation = None
    if run == "fp32":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
        loss_fn = F.cross_entropy
    else:
        simulation = Simulation(model, plan, source=plan_source)
        simulation.attach()
        optimizer = simulation.optimizer(lr=training.lr, momentum=training.momentum,
                                         weight_decay=training.weight_decay, mode=run, seed=seed)
        loss_fn = simulation.cross_entropy
    try:
        steps = _steps(run, model, optimizer, loss_fn, plan, recipe, data, batches, progress, world, batch_share)
        if world.distributed and simulation is not None:
            _sum_counts(simulation.simulator, world, data.x_train.device)
        if steps["diverged"]:
            summary = {"test_accuracy": None, "test_accuracy_fp32_logits": None, "test_loss": None}
        elif simulation is not None:
            evaluation = simulation.evaluate(data.x_test, data.y_test)
            summary = _test_summary(evaluation.accuracy, evaluation.accuracy_fp32_logits, evaluation.loss,
                                    evaluation.predictions, data)
        else:
            summary = _evaluate_fp32(model, data)
        result: dict[str, Any] = {"summary": {**summary, **steps}}
        if simulation is not None:
            result["diagnostics"] = simulation.diagnostics()
            result["diagnostics"]["softmax"]["test_rows_tied"] = None if steps["diverged"] else evaluation.tied_rows
            result["initial_saturated"] = optimizer.initial_saturated
            result["kept_fp32"] = simulation.kept_fp32()
        return result
    finally:
        gradient_sum.remove()
        if simulation is not None:
            simulation.detach()


def _steps(run: str, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, plan: Plan,
           recipe: Recipe, data: Dataset, batches: list[torch.Tensor], progress: Progress | None, world: World,
           batch_share: float) -> dict[str, Any]:
    """The training loop of one run; the summary of its losses and where it diverged."""
    watch = NonFiniteWatch(model, list(plan.layers))
    losses: list[float] = []
    diverged_at = diverged_in = None
    model.train()
    window = max(1, min(50, len(batches) // 10))
    recent = torch.zeros((), device=data.x_train.device)
    step = 0
    try:
        for step, index in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            logits = run_model(model, data.x_train[index], recipe.source, recipe.model_label)
            loss = loss_fn(logits, data.y_train[index])
            if world.distributed:
                loss = loss * batch_share  # errors per sample as in one process; the rank losses add up to it
            loss.backward()
            optimizer.step()
            where = distributed.first_problem(watch.end_step(loss), world, data.x_train.device)
            if where is not None:
                diverged_at, diverged_in = step + 1, {"layer": where[0], "tensor": where[1]}
                break
            recent = recent + loss.detach() if step >= len(batches) - window else recent
            if (step + 1) % 25 == 0 or step + 1 == len(batches):
                losses.append(float(all_sum(loss.detach().clone(), world)))
                if progress:
                    progress(run, step + 1, len(batches))
    except KeyboardInterrupt:
        raise Interrupted(run, step + 1, len(batches)) from None
    finally:
        watch.remove()
    if world.distributed:
        all_sum(recent, world)
    return {
        "final_loss": float(recent) / window if diverged_at is None else None,
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "diverged_in": diverged_in,
        "loss_curve": {"every": 25, "values": losses},
    }


def _sum_counts(simulator: Simulator, world: World, device: torch.device) -> None:
    """Totals over the ranks of what each rank counted on its slice of the batch. Weight
    gradients are left alone: every rank quantized the same summed gradient."""
    counters = [c for point in simulator.points.values() for c in (point.activation_counts, point.error_counts)]
    counters += [point.counts for point in simulator.inputs.values()]
    counters += [simulator.softmax_input_counts, simulator.softmax_error_counts]
    for counter in counters:
        if counter.totals is None:
            counter.totals = torch.zeros(4, dtype=torch.float64, device=device)
    targets = simulator.target_error_counts.to(device)
    joined = all_sum(torch.cat([c.totals for c in counters] + [targets]), world)
    for counter, totals in zip(counters, joined[:-2].split(4), strict=True):
        counter.totals = totals.clone()
    simulator.target_error_counts = joined[-2:].clone()


@torch.no_grad()
def _evaluate_fp32(model: nn.Module, data: Dataset) -> dict[str, Any]:
    model.eval()
    logits = model(data.x_test)
    model.train()
    predictions = logits.argmax(dim=1)
    accuracy = float((predictions == data.y_test).float().mean())
    return _test_summary(accuracy, accuracy, float(F.cross_entropy(logits, data.y_test)), predictions, data)


def _test_summary(accuracy: float, fp32_logits: float, loss: float, predictions: torch.Tensor,
                  data: Dataset) -> dict[str, Any]:
    """The test numbers of a run; balanced accuracy beside accuracy on imbalanced data."""
    summary: dict[str, Any] = {"test_accuracy": accuracy, "test_accuracy_fp32_logits": fp32_logits}
    if data.imbalanced:
        summary["test_balanced_accuracy"] = balanced_accuracy(predictions, data.y_test)
    summary["test_loss"] = loss
    return summary
