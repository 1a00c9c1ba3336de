"""``train-check``: the recipe trained three ways from the same initial weights and
batch order -- fp32, plain low-precision SGD, Kahan low-precision SGD -- and optionally a
fourth, plain SGD with stochastic rounding, with the diagnostics that explain any gap
between them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import Dataset, balanced_accuracy, batch_indices
from .distributed import World, all_sum
from .errors import InputError, Interrupted
from .models import run_model, user_model
from .paired import PairedCounts, loss_interval, needed_for, verdict_status
from .plan import Plan
from .recipe import Recipe, load_recipe
from .results import LOSS_EVERY, CheckReport, DataSummary, Location, RunSummary, SeedResult, Verdict
from .simulate import NonFiniteWatch, Simulator
from .simulation import Simulation, resolve
from .stats import Progress, prepare_run
from .training import attach as attach_schedule
from .training import rule_arguments, torch_optimizer

RUNS = ("fp32", "plain", "kahan")
UNTESTED = {"test_accuracy": None, "test_accuracy_fp32_logits": None, "test_loss": None}  # a diverged run


@dataclass(frozen=True)
class _Setup:
    """Everything the runs of one train-check share: they differ only in how they train."""

    recipe: Recipe
    plan: Plan
    plan_source: str
    data: Dataset
    model: nn.Module
    initial: dict[str, torch.Tensor]
    batches: list[torch.Tensor]
    seed: int
    world: World
    batch_share: float  # of the global batch's loss that this rank computes
    progress: Progress | None


@dataclass(frozen=True)
class _RunResult:
    summary: RunSummary
    diagnostics: dict[str, Any] | None = None  # low-precision runs: Simulation.diagnostics()
    kept_fp32: list[str] | None = None
    correct: torch.Tensor | None = None  # per test example, on the CPU; None when the run diverged


def train_check(recipe: Recipe | str | Path | None = None, plan: Plan | None = None, *, tolerance: float = 1.0,
                seed: int | None = None, steps: int | None = None, plan_source: str = "plan",
                progress: Progress | None = None, data: Dataset | None = None,
                stochastic: bool = False, device: str | torch.device = "cpu",
                seeds: int | None = None) -> CheckReport:
    """Run the three trainings (four with ``stochastic``) and return the report (see the README).

    ``recipe`` is a loaded :class:`Recipe`, a path or a bundled recipe's name; without
    ``plan`` one is recommended from a fresh analysis. ``stochastic`` adds the run
    ``"stochastic"``: plain low-precision SGD whose weight update rounds stochastically
    (seeded from ``seed``), the usual alternative to Kahan. Ctrl-C raises
    :class:`lpcli.errors.Interrupted`, which says what had finished.

    ``seeds`` (default: the recipe's ``check.seeds``, else 1) repeats the runs with the
    training seeds ``seed, seed + 1, ...`` (model initialisation, batch order) on the same
    data; the verdict pools their paired counts, the runs and diagnostics reported are the
    first seed's.

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
    steps = recipe.training.steps if steps is None else steps
    seeds = recipe.check_seeds if seeds is None else seeds
    first = recipe.training.seed if seed is None else seed
    started = time.perf_counter()
    outcomes: list[tuple[_Setup, dict[str, _RunResult], dict[str, float]]] = []
    for number in range(seeds):
        labelled = progress if seeds == 1 or progress is None else _seed_progress(progress, number, seeds)
        setup = _prepare(recipe, plan, plan_source, first + number, steps, data, device, world, labelled)
        data = setup.data  # loaded once
        outcomes.append((setup, *_runs(setup, stochastic, outcomes)))
    setup, results, seconds = outcomes[0]
    if seeds > 1:
        seconds = {run: sum(o[2].get(run, 0.0) for o in outcomes) for run in seconds}
    seconds["total"] = time.perf_counter() - started

    fp32 = results["fp32"].summary.test_accuracy
    runs = {name: r.summary if name == "fp32" else replace(r.summary, gap_to_fp32=_gap(fp32, r.summary.test_accuracy))
            for name, r in results.items()}
    diagnostics: dict[str, dict[str, dict[str, float | None]]] = {name: {} for name in plan.layers}
    attention: dict[str, dict[str, dict[str, float | None]]] = {name: {} for name in plan.attention}
    accumulators: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {name: {} for name in plan.accumulators}
    for run, result in results.items():
        for name, kinds in (result.diagnostics or {}).get("accumulators", {}).items():
            for kind, values in kinds.items():
                for key, value in values.items():
                    accumulators[name].setdefault(kind, {}).setdefault(key, {})[run] = value
        for name, values in (result.diagnostics or {}).get("layers", {}).items():
            for key, value in values.items():
                diagnostics[name].setdefault(key, {})[run] = value
        for name, values in (result.diagnostics or {}).get("attention", {}).items():
            for key, value in values.items():
                attention[name].setdefault(key, {})[run] = value
    return CheckReport(
        recipe=recipe.source,
        data=DataSummary(setup.data.name, setup.data.classes, len(setup.data.y_train), len(setup.data.y_test),
                         setup.data.notes, setup.data.imbalanced),
        training=replace(recipe.training, steps=steps, seed=setup.seed),
        device=distributed.describe_device(device, world),
        plan=plan,
        runs=runs,
        diagnostics=diagnostics,
        softmax={run: r.diagnostics["softmax"] for run, r in results.items() if r.diagnostics is not None},
        attention=attention,
        accumulators=accumulators,
        kept_fp32=results["kahan"].kept_fp32 or [],
        verdict=paired_verdict([(o[0].seed, o[1]["fp32"], o[1]["kahan"]) for o in outcomes], tolerance),
        seconds=seconds,
    )


def _seed_progress(progress: Progress, number: int, seeds: int) -> Progress:
    return lambda task, done, total: progress(f"{task} (seed {number + 1}/{seeds})", done, total)


def _runs(setup: _Setup, stochastic: bool,
          earlier: list[tuple[_Setup, dict[str, _RunResult], dict[str, float]]]) -> tuple[dict[str, _RunResult],
                                                                                          dict[str, float]]:
    """The runs of one seed, from the same initial weights; an interruption says what had
    finished (the first seed's accuracies once it is complete)."""
    results: dict[str, _RunResult] = {}
    seconds: dict[str, float] = {}
    for run in (*RUNS, "stochastic") if stochastic else RUNS:
        t0 = time.perf_counter()
        setup.model.load_state_dict(setup.initial)
        try:
            with distributed.ieee_fp32(setup.data.x_train.device):
                results[run] = _train(run, setup)
        except Interrupted as stop:
            done = earlier[0][1] if earlier else results
            stop.finished = {name: result.summary.test_accuracy for name, result in done.items()}
            raise
        seconds[run] = time.perf_counter() - t0
    return results, seconds


def _prepare(recipe: Recipe, plan: Plan, plan_source: str, seed: int | None, steps: int, data: Dataset | None,
             device: torch.device, world: World, progress: Progress | None) -> _Setup:
    """The model, the data and the batches every run starts from; a plan that does not fit
    the model fails here, before any training."""
    seed, data, model = prepare_run(recipe, seed, data, device)
    resolve(plan, model, plan_source)
    batches = batch_indices(len(data.y_train), recipe.training.batch_size, steps, seed)
    global_batch = len(batches[0])
    if world.distributed:
        if global_batch < world.size:
            raise InputError(recipe.source, "training.batch_size", f"a batch of {global_batch} cannot be shared "
                             f"by {world.size} processes")
        batches = [distributed.shard(index, world) for index in batches]
    batch_share = len(batches[0]) / global_batch
    if device.type != "cpu":
        batches = list(torch.stack(batches).to(device).unbind(0))  # generated on the CPU: one copy
    return _Setup(recipe, plan, plan_source, data, model, {k: v.clone() for k, v in model.state_dict().items()},
                  batches, seed, world, batch_share, progress if world.rank == 0 else None)


def _gap(fp32: float | None, accuracy: float | None) -> float | None:
    return None if fp32 is None or accuracy is None else fp32 - accuracy


def paired_verdict(outcomes: list[tuple[int, _RunResult, _RunResult]], tolerance: float) -> Verdict:
    """The verdict on (seed, fp32 run, Kahan run) triples: their paired test counts pooled."""
    seeds = []
    for seed, fp32, kahan in outcomes:
        for name, run in (("fp32", fp32), ("Kahan", kahan)):
            if run.summary.diverged:
                why = ": the recipe itself does not train (lower the learning rate)" if name == "fp32" else ""
                seed_note = f" (seed {seed})" if len(outcomes) > 1 else ""
                return Verdict("failed", tolerance, f"the {name} run{seed_note} {run.summary.divergence()}{why}",
                               seeds=tuple(seeds))
        seeds.append(SeedResult(seed, fp32.summary.test_accuracy, kahan.summary.test_accuracy,
                                PairedCounts.from_predictions(fp32.correct, kahan.correct)))
    counts = sum(s.counts for s in seeds)
    lower, upper = (100 * bound for bound in loss_interval(counts))
    status = verdict_status(counts, tolerance)
    n = counts.n
    fp32_acc = (counts.both + counts.reference_only) / n
    kahan_acc = (counts.both + counts.other_only) / n
    pooled = f" over {len(seeds)} seeds" if len(seeds) > 1 else ""
    reason = (f"Kahan {kahan_acc:.2%} vs fp32 {fp32_acc:.2%} on {n} test predictions{pooled}: "
              f"{counts.reference_only} lost, {counts.other_only} gained; loss {float(counts.loss) * 100:.2f} points, "
              f"95% interval [{lower:.2f}, {upper:.2f}] against tolerance {tolerance:g}")
    needed = None
    if status == "inconclusive":
        needed = needed_for(counts, tolerance)
        more = (f"about {needed}x as many test predictions (more test examples, or {needed * len(seeds)} seeds "
                f"pooled) would settle it at the observed rates") if needed else (
                "the observed loss sits on the tolerance: more evidence would not settle it")
        reason += f"; {more}"
    return Verdict(status, tolerance, reason, counts, (lower, upper), tuple(seeds), needed)


def _train(run: str, setup: _Setup) -> _RunResult:
    """One run: fp32 with torch's SGD, or a low-precision run through the plan's Simulation."""
    model, training = setup.model, setup.recipe.training
    torch.manual_seed(setup.seed)  # dropout masks: the same draws in every run
    gradient_sum = distributed.GradientSum(model, setup.world)  # first: the quantizer's hook sees the summed gradient
    simulation = None
    if run == "fp32":
        optimizer = torch_optimizer(model.parameters(), training)
        loss_fn = F.cross_entropy
    else:
        simulation = Simulation(model, setup.plan, source=setup.plan_source)
        simulation.attach()
        optimizer = simulation.optimizer(lr=training.lr, rule=training.optimizer, mode=run, seed=setup.seed,
                                         **rule_arguments(training))
        loss_fn = simulation.cross_entropy
    try:
        curve = _steps(run, optimizer, loss_fn, setup)
        if simulation is None:
            if curve["diverged_at"] is not None:
                return _RunResult(RunSummary(**UNTESTED, **curve))
            with user_model(setup.recipe.source, setup.recipe.model_label):
                tested, predictions = _evaluate_fp32(model, setup.data)
            return _RunResult(RunSummary(**tested, **curve), correct=_correct(predictions, setup.data))
        if setup.world.distributed:
            _sum_counts(simulation.simulator, setup.world, setup.data.x_train.device)
        diagnostics = simulation.diagnostics()
        if curve["diverged_at"] is None:
            with user_model(setup.recipe.source, setup.recipe.model_label):
                evaluation = simulation.evaluate(setup.data.x_test, setup.data.y_test)
            tested = _test_summary(evaluation.accuracy, evaluation.accuracy_fp32_logits, evaluation.loss,
                                   evaluation.predictions, setup.data)
            diagnostics["softmax"]["test_rows_tied"] = evaluation.tied_rows
            correct = _correct(evaluation.predictions, setup.data)
        else:
            tested, correct = UNTESTED, None
            diagnostics["softmax"]["test_rows_tied"] = None
        summary = RunSummary(**tested, **curve, low_precision=True,
                             weights_saturated_at_start=optimizer.initial_saturated)
        return _RunResult(summary, diagnostics, simulation.kept_fp32(), correct)
    finally:
        gradient_sum.remove()
        if simulation is not None:
            simulation.detach()


def _steps(run: str, optimizer: torch.optim.Optimizer, loss_fn: Callable, setup: _Setup) -> dict[str, Any]:
    """The training loop of one run: its loss curve, final loss and where it diverged."""
    model, data, world, batches = setup.model, setup.data, setup.world, setup.batches
    watch = NonFiniteWatch(model, list(setup.plan.layers))
    schedule = attach_schedule(optimizer, setup.recipe.training, len(batches))
    losses: list[float] = []
    diverged_at = diverged_in = None
    model.train()
    window = max(1, min(50, len(batches) // 10))
    recent = torch.zeros((), device=data.x_train.device)
    step = 0
    try:
        for step, index in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            logits = run_model(model, data.x_train[index], setup.recipe.source, setup.recipe.model_label)
            loss = loss_fn(logits, data.y_train[index])
            if world.distributed:
                loss = loss * setup.batch_share  # errors per sample as in one process; rank losses add up to it
            loss.backward()
            optimizer.step()
            schedule.step()
            where = distributed.first_problem(watch.end_step(loss), world, data.x_train.device)
            if where is not None:
                diverged_at, diverged_in = step + 1, Location(*where)
                break
            recent = recent + loss.detach() if step >= len(batches) - window else recent
            if (step + 1) % LOSS_EVERY == 0 or step + 1 == len(batches):
                losses.append(float(all_sum(loss.detach().clone(), world)))
                if setup.progress:
                    setup.progress(run, step + 1, len(batches))
    except KeyboardInterrupt:
        raise Interrupted(run, step + 1, len(batches)) from None
    finally:
        watch.remove()
    if world.distributed:
        all_sum(recent, world)
    return {"final_loss": float(recent) / window if diverged_at is None else None, "loss_curve": losses,
            "diverged_at": diverged_at, "diverged_in": diverged_in}


def _sum_counts(simulator: Simulator, world: World, device: torch.device) -> None:
    """Totals over the ranks of what each rank counted on its slice of the batch. Weight
    gradients are left alone: every rank quantized the same summed gradient."""
    counters = [c for point in simulator.points.values() for c in (point.activation_counts, point.error_counts)]
    counters += [point.counts for point in simulator.inputs.values()]
    counters += [simulator.softmax_input_counts, simulator.softmax_error_counts]
    counters += [c for point in simulator.attention.values() for c in point.counts.values()]
    for counter in counters:
        if counter.totals is None:
            counter.totals = torch.zeros(4, dtype=torch.float64, device=device)
    targets = simulator.target_error_counts.to(device)
    joined = all_sum(torch.cat([c.totals for c in counters] + [targets]), world)
    for counter, totals in zip(counters, joined[:-2].split(4), strict=True):
        counter.totals = totals.clone()
    simulator.target_error_counts = joined[-2:].clone()
    for tally in simulator.gemm_tallies.values():  # host numbers, exact in float64 below 2^53
        tally.unpack(all_sum(tally.packed().to(device), world).cpu())


def _correct(predictions: torch.Tensor, data: Dataset) -> torch.Tensor:
    return (predictions == data.y_test).cpu()


@torch.no_grad()
def _evaluate_fp32(model: nn.Module, data: Dataset) -> tuple[dict[str, Any], torch.Tensor]:
    model.eval()
    logits = model(data.x_test)
    model.train()
    predictions = logits.argmax(dim=1)
    accuracy = float((predictions == data.y_test).float().mean())
    return _test_summary(accuracy, accuracy, float(F.cross_entropy(logits, data.y_test)), predictions,
                         data), predictions


def _test_summary(accuracy: float, fp32_logits: float, loss: float, predictions: torch.Tensor,
                  data: Dataset) -> dict[str, Any]:
    """The test numbers of a run; balanced accuracy beside accuracy on imbalanced data."""
    summary: dict[str, Any] = {"test_accuracy": accuracy, "test_accuracy_fp32_logits": fp32_logits}
    if data.imbalanced:
        summary["test_balanced_accuracy"] = balanced_accuracy(predictions, data.y_test)
    summary["test_loss"] = loss
    return summary
