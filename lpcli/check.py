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
from .data import Dataset, batch_indices
from .distributed import World, all_sum
from .errors import InputError, Interrupted
from .formats import Float32
from .models import quantizable_layers
from .optim import KahanSGD
from .plan import Plan
from .recipe import Recipe, load_recipe
from .simulate import NonFiniteWatch, Simulator, shares
from .stats import prepare_run

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
    check_plan_matches(plan, model, plan_source)
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
    timings: dict[str, float] = {}
    for run in (*RUNS, "stochastic") if stochastic else RUNS:
        t0 = time.perf_counter()
        model.load_state_dict(initial)
        try:
            with distributed.ieee_fp32(device):
                result = _train(run, model, plan, recipe, data, batches, seed, progress if world.rank == 0 else None,
                                world, batch_share)
        except Interrupted as stop:
            stop.finished = {name: summary["test_accuracy"] for name, summary in runs.items()}
            raise
        timings[run] = time.perf_counter() - t0
        runs[run] = result.pop("summary")
        if run != "fp32":
            for layer in result["optimizer"]:
                diagnostics[layer["name"]].setdefault("lost_updates", {})[run] = layer["lost_updates"]
                diagnostics[layer["name"]].setdefault("lost_mass", {})[run] = layer["lost_mass"]
            for name, share in result["weights_at_limit"].items():
                diagnostics[name].setdefault("weight_saturated", {})[run] = share
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
        "device": distributed.describe_device(device, world),
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
           seed: int, progress: Progress | None, world: World = World(), batch_share: float = 1.0) -> dict[str, Any]:
    training = recipe.training
    device = data.x_train.device
    torch.manual_seed(seed)  # dropout masks: the same draws in every run
    gradient_sum = distributed.GradientSum(model, world)  # first: the quantizer's hook must see the summed gradient
    simulator = None
    if run == "fp32":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
        loss_fn = F.cross_entropy
    else:
        optimizer = KahanSGD(_param_groups(model, plan), lr=training.lr, momentum=training.momentum,
                             weight_decay=training.weight_decay, comp_format=plan.comp_format,
                             mode=run, seed=seed)
        simulator = Simulator(model, plan.layers, plan.softmax_input, plan.softmax_error, plan.output_layer,
                              zero_sum_error=plan.softmax_error_rows == "zero-sum")
        loss_fn = simulator.loss
    watch = NonFiniteWatch(model, list(plan.layers))
    losses: list[float] = []
    diverged_at = diverged_in = None
    model.train()
    window = max(1, min(50, len(batches) // 10))
    recent = torch.zeros((), device=device)
    step = 0
    try:
        for step, index in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.x_train[index]), data.y_train[index])
            if world.distributed:
                loss = loss * batch_share  # errors per sample as in one process; the rank losses add up to it
            loss.backward()
            optimizer.step()
            where = distributed.first_problem(watch.end_step(loss), world, device)
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
        gradient_sum.remove()
    if world.distributed:
        all_sum(recent, world)
        if simulator is not None:
            _sum_counts(simulator, world, device)
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
        result["weights_at_limit"] = _weights_at_limit(model, plan)
        simulator.remove()
    return result


def _sum_counts(simulator: Simulator, world: World, device: torch.device) -> None:
    """Totals over the ranks of what each rank counted on its slice of the batch. Weight
    gradients are left alone: every rank quantized the same summed gradient."""
    counters = [c for point in simulator.points.values() for c in (point.activation_counts, point.error_counts)]
    counters += [simulator.softmax_input_counts, simulator.softmax_error_counts]
    for counter in counters:
        if counter.totals is None:
            counter.totals = torch.zeros(4, dtype=torch.float64, device=device)
    targets = simulator.target_error_counts.to(device)
    joined = all_sum(torch.cat([c.totals for c in counters] + [targets]), world)
    for counter, totals in zip(counters, joined[:-2].split(4), strict=True):
        counter.totals = totals.clone()
    simulator.target_error_counts = joined[-2:].clone()


def _weights_at_limit(model: nn.Module, plan: Plan) -> dict[str, float | None]:
    """Per layer, the share of stored weights sitting at the format's range limit at the
    end: weights that kept growing and were clipped, so their updates were lost."""
    modules = dict(model.named_modules())
    shares: dict[str, float | None] = {}
    for name, fmts in plan.layers.items():
        fmt = fmts["weight"]
        params = [p.detach() for p in modules[name].parameters(recurse=False)]
        if not params or not hasattr(fmt, "max_value") or isinstance(fmt, Float32):
            shares[name] = None
            continue
        at_limit = sum(int(((p >= fmt.max_value) | (p <= fmt.min_value)).sum()) for p in params)
        shares[name] = at_limit / sum(p.numel() for p in params)
    return shares


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
