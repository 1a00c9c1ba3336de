"""What the simulation costs: one training step of train-check's fp32, plain and Kahan runs.

    PYTHONPATH=. python benchmarks/overhead.py [RECIPE ...] [--rounds 60] [--warmup 10] [--threads N]
        [--profile plain|kahan] [--seed 0] [--accumulators 32 1] [--mx mxfp8-e4m3]

For each recipe (default: digits-mlp, digits-cnn, fashion-cnn, fashion-resnet, vit-fashion) the model,
data, batches and plan come from the functions ``lpcli train-check`` uses (``prepare_run``,
``batch_indices``, the default plan ``recommend(analyze(...))``), and each run's step is
the body of ``lpcli.check._steps``: ``zero_grad``, the forward through ``run_model``, the
loss (``Simulation.cross_entropy`` for the simulated runs), ``backward``, the optimizer's
step (torch's for fp32; the plan's low-precision optimizer through
:class:`lpcli.Simulation` for plain and Kahan), the schedule's step and
``NonFiniteWatch.end_step``. Three copies of the model train side by side in one
process, one step each per round (fp32, plain, Kahan, repeat) on the same batch, so that
load from other processes hits all three alike. Printed per run: the minimum and median
step time in milliseconds over the rounds (after ``--warmup`` untimed rounds), and each
as a ratio to fp32's minimum / median.

A recipe whose data is missing (Fashion-MNIST needs ``apt-get install
dataset-fashion-mnist``) is skipped with the reason. ``--threads`` sets torch's thread
count (default: torch's own). ``--profile RUN`` also prints torch.profiler's table of
that run's step (self CPU time per operator, over ``--rounds`` steps).

``--accumulators C ...`` adds, per chunk size C, a Kahan run whose plan also has every
layer's GEMM accumulators (``recommend --accumulators --accumulator-chunk C``; C = 0: one
sequential sum), stepped in the same rounds, and a second table of their step times.
``--mx FORMAT ...`` adds, per MX format, a Kahan run with that format on every GEMM layer's
input, weight and error (quantized per use in the GEMMs; an fp16 compensation), in that
second table too.

Targets: simulated Kahan step <= 1.3x fp32 on fashion-cnn and fashion-resnet, <= 2x on
digits-mlp (issue 14) and on vit-fashion, whose attention is simulated too (issue 15); with
accumulators in chunks of 32, <= 10x on fashion-cnn at one thread (issue 16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import lpcli
from lpcli import distributed
from lpcli.data import Dataset, batch_indices
from lpcli.distributed import World
from lpcli.errors import InputError
from lpcli.formats import parse_format
from lpcli.kernels import kernel_backend
from lpcli.models import run_model
from lpcli.plan import Plan
from lpcli.recipe import Recipe, load_recipe
from lpcli.recommend import Rules, recommend
from lpcli.results import LOSS_EVERY
from lpcli.simulate import NonFiniteWatch
from lpcli.simulation import Simulation
from lpcli.stats import analyze, prepare_run
from lpcli.training import attach as attach_schedule
from lpcli.training import rule_arguments, torch_optimizer

RECIPES = ("digits-mlp", "digits-cnn", "fashion-cnn", "fashion-resnet", "vit-fashion")
RUNS = ("fp32", "plain", "kahan")
TARGETS = {"digits-mlp": 2.0, "fashion-cnn": 1.3, "fashion-resnet": 1.3, "vit-fashion": 2.0}  # Kahan / fp32
ACCUMULATOR_TARGETS = {("fashion-cnn", 32): 10.0}  # Kahan with accumulators / fp32


@dataclass
class Run:
    """One of train-check's runs, ready to step: what ``check._train`` sets up."""

    name: str
    step: Callable[[torch.Tensor], None]
    close: Callable[[], None]


def make_run(name: str, recipe: Recipe, plan: Plan, model: torch.nn.Module, data: Dataset, seed: int, world: World,
             steps: int) -> Run:
    training = recipe.training
    torch.manual_seed(seed)
    gradient_sum = distributed.GradientSum(model, world)
    simulation = None
    if name == "fp32":
        optimizer = torch_optimizer(model.parameters(), training)
        loss_fn = F.cross_entropy
    else:
        simulation = Simulation(model, plan, source="plan")
        simulation.attach()
        optimizer = simulation.optimizer(lr=training.lr, rule=training.optimizer, mode=name, seed=seed,
                                         **rule_arguments(training))
        loss_fn = simulation.cross_entropy
    watch = NonFiniteWatch(model, list(plan.layers))
    schedule = attach_schedule(optimizer, training, steps)
    model.train()
    recent = torch.zeros((), device=data.x_train.device)
    done = 0

    def step(index: torch.Tensor) -> None:  # the body of lpcli.check._steps
        nonlocal recent, done
        optimizer.zero_grad(set_to_none=True)
        logits = run_model(model, data.x_train[index], recipe.source, recipe.model_label)
        loss = loss_fn(logits, data.y_train[index])
        loss.backward()
        optimizer.step()
        schedule.step()
        where = distributed.first_problem(watch.end_step(loss), world, data.x_train.device)
        if where is not None:
            raise RuntimeError(f"{name} diverged in {where}")
        recent = recent + loss.detach()
        done += 1
        if done % LOSS_EVERY == 0:
            float(distributed.all_sum(loss.detach().clone(), world))

    def close() -> None:
        watch.remove()
        gradient_sum.remove()
        if simulation is not None:
            simulation.detach()

    return Run(name, step, close)


def accumulator_run(chunk: int) -> str:
    return f"acc c={chunk}" if chunk else "acc seq"


def mx_plan(plan: Plan, stats: dict, fmt: str) -> Plan:
    """``plan`` with ``fmt`` (an MX format) on the GEMM operands (input, weight, error) of
    every layer whose GEMMs the stats saw (the output layer's error is the softmax's), and
    an fp16 compensation for those weights."""
    block, layers = parse_format(fmt), {}
    for name, fmts in plan.layers.items():
        fmts = dict(fmts)
        if name in (stats.get("gemms") or {}):
            roles = ("input", "weight") if name == plan.output_layer else ("input", "weight", "error")
            fmts.update({role: block for role in roles}, compensation=parse_format("fp16"))
        layers[name] = fmts
    return replace(plan, layers=layers)


def measure(name: str, args: argparse.Namespace) -> dict[str, list[float]] | None:
    try:
        recipe = load_recipe(name)
        world, device = distributed.setup("cpu")
        seed, data, model = prepare_run(recipe, args.seed, None, device)
    except InputError as exc:
        print(f"{name}: skipped ({exc})")
        return None
    stats = analyze(recipe, seed=seed, data=data)
    plan = recommend(stats, precision=recipe.precision, source=recipe.source)
    steps = args.warmup + args.rounds
    batches = batch_indices(len(data.y_train), recipe.training.batch_size, steps, seed)
    initial = copy.deepcopy(model.state_dict())
    plans = [(run, run, plan) for run in RUNS]
    for chunk in args.accumulators:
        rules = Rules(accumulators=True, accumulator_chunk=chunk or None)
        plans.append((accumulator_run(chunk), "kahan", recommend(stats, rules, recipe.precision,
                                                                 source=recipe.source)))
    for fmt in args.mx:
        plans.append((fmt, "kahan", mx_plan(plan, stats, fmt)))
    runs = []
    for label, run, run_plan in plans:
        copy_ = copy.deepcopy(model)
        copy_.load_state_dict(initial)
        made = make_run(run, recipe, run_plan, copy_, data, seed, world, steps)
        runs.append(Run(label, made.step, made.close))
    times: dict[str, list[float]] = {run.name: [] for run in runs}
    try:
        for i, index in enumerate(batches):
            for run in runs:
                t0 = time.perf_counter()
                run.step(index)
                elapsed = time.perf_counter() - t0
                if i >= args.warmup:
                    times[run.name].append(elapsed)
        if args.profile:
            profile(next(r for r in runs if r.name == args.profile), batches[: args.rounds], name)
    finally:
        for run in runs:
            run.close()
    print(f"{name}: batch {len(batches[0])}, {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(plan.layers)} planned layers")
    return times


def profile(run: Run, batches: list[torch.Tensor], name: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for index in batches:
            run.step(index)
    print(f"\n{name}, {run.name} step, {len(batches)} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=("fp32", "plain", "kahan"), default=None)
    parser.add_argument("--accumulators", nargs="*", type=int, default=[], metavar="CHUNK",
                        help="also Kahan runs with accumulators in chunks of CHUNK terms (0: sequential)")
    parser.add_argument("--mx", nargs="*", default=[], metavar="FORMAT",
                        help="also Kahan runs with this MX format on every GEMM layer's input, weight and error")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds "
          f"after {args.warmup} warm-up rounds; lpcli from {lpcli.__file__.rsplit('/', 2)[0]}, "
          f"{kernel_backend()} kernels")
    rows = []
    for name in args.recipes:
        times = measure(name, args)
        if times is not None:
            rows.append((name, times))
    header = (f"{'recipe':>15} | {'fp32 ms min/med':>16} | {'plain ms min/med':>16} | {'kahan ms min/med':>16} | "
              f"{'plain/fp32':>11} | {'kahan/fp32':>11} | target")
    print("\n" + header + "\n" + "-" * len(header))
    for name, times in rows:
        mins = {run: min(t) * 1e3 for run, t in times.items()}
        meds = {run: statistics.median(t) * 1e3 for run, t in times.items()}
        cells = [f"{mins[run]:7.2f}/{meds[run]:<8.2f}" for run in RUNS]
        ratios = [f"{mins[run] / mins['fp32']:4.2f}/{meds[run] / meds['fp32']:<6.2f}" for run in ("plain", "kahan")]
        target = TARGETS.get(name)
        verdict = "" if target is None else (
            f"<= {target:g}: {'met' if mins['kahan'] / mins['fp32'] <= target else 'missed'}")
        print(f"{name:>15} | {cells[0]:>16} | {cells[1]:>16} | {cells[2]:>16} | {ratios[0]:>11} | {ratios[1]:>11} | "
              f"{verdict}")
    extra = [(accumulator_run(chunk), chunk) for chunk in args.accumulators] + [(fmt, None) for fmt in args.mx]
    if extra:
        header = (f"{'recipe':>15} | {'kahan with':>12} | {'ms min/med':>20} | {'/fp32 min/med':>13} | "
                  "target")
        print("\n" + header + "\n" + "-" * len(header))
        for name, times in rows:
            fp32_min, fp32_med = min(times["fp32"]), statistics.median(times["fp32"])
            for label, chunk in extra:
                t = times[label]
                ratio = min(t) / fp32_min
                target = ACCUMULATOR_TARGETS.get((name, chunk))
                verdict = "" if target is None else f"<= {target:g}: {'met' if ratio <= target else 'missed'}"
                med = statistics.median(t)
                print(f"{name:>15} | {label:>12} | {min(t) * 1e3:9.1f}/{med * 1e3:<10.1f} | "
                      f"{ratio:5.2f}/{med / fp32_med:<7.2f} | {verdict}")


if __name__ == "__main__":
    main()
