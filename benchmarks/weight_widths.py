"""A recipe trained at several weight widths: fp32, plain, stochastic-rounding and Kahan SGD side by side.

    PYTHONPATH=. python benchmarks/weight_widths.py [--recipe digits-mlp] [--widths 6 8 10 12 16]
        [--lr LR] [--steps N] [--seed 0]

The plan comes from the real pipeline (``stats.analyze`` -> ``recommend``); each width W then sets every
layer's weight format to W bits with the plan's integer bits (``plan.with_fraction_bits("weight", W)``),
the other tensors as recommended. ``--recipe`` names a bundled recipe (default digits-mlp); ``--lr`` and
``--steps`` default to the recipe's own (digits-mlp: lr 0.05, 600 steps, about 10 s per width; fashion-cnn:
lr 0.05 with momentum 0.9 and a cosine schedule, 1000 steps, 2-3 minutes per width on one thread).
Each width is one seed (``--seed``): the recipe's ``check.seeds`` is not used, the table reads the
runs themselves. At the narrow widths most updates are below half a weight LSB, so swamping decides who
trains. Smaller lr with more steps (e.g. --lr 0.01 --steps 3000) sharpens that at 5x the time.
Columns: test accuracy per run, and per low-precision run the lost-update share and the lost update
mass (mean over the layers; see lpcli.optim). Measured (README): Kahan within 1 point of fp32 from W = 4
on digits-mlp and from W = 6 on fashion-cnn; plain SGD needs 10 and 11 bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from lpcli.check import train_check
from lpcli.data import load_data
from lpcli.recipe import load_recipe
from lpcli.recommend import recommend
from lpcli.stats import analyze

RUNS = ("plain", "stochastic", "kahan")


def _mean(diag: dict, metric: str, run: str, sizes: dict[str, int]) -> float | None:
    """Element-weighted mean of a per-layer share over the planned layers."""
    total = weight = 0.0
    for layer, metrics in diag.items():
        value = metrics.get(metric, {}).get(run)
        if value is not None:
            total += value * sizes[layer]
            weight += sizes[layer]
    return total / weight if weight else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-mlp", help="a bundled recipe's name or a recipe file")
    parser.add_argument("--widths", type=int, nargs="+", default=[6, 8, 10, 12, 16])
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    training = recipe.training
    lr = training.lr if args.lr is None else args.lr
    steps = training.steps if args.steps is None else args.steps
    recipe = dataclasses.replace(recipe, training=dataclasses.replace(training, lr=lr))
    data = load_data(recipe.data, recipe.source)
    plan = recommend(analyze(recipe, seed=args.seed, data=data))
    extras = f", momentum {training.momentum:g}" if training.momentum else ""
    if training.schedule != "constant":
        extras += f", {training.schedule} schedule to {training.min_lr:g}"
    print(f"{args.recipe}, lr {lr:g}{extras}, {steps} steps, batch {training.batch_size}, seed {args.seed}")
    print("plan weights: " + ", ".join(f"{n} {f['weight']}" for n, f in plan.layers.items()))
    wplans = {width: plan.with_fraction_bits("weight", width) for width in args.widths}
    spellings = {width: ",".join(str(f["weight"]) for f in wplan.layers.values()) for width, wplan in wplans.items()}
    fw = max(16, *(len(s) for s in spellings.values()))
    head = f"{'W':>3} {'weights':>{fw}} | {'fp32':>6} {'plain':>6} {'stoch':>6} {'kahan':>6} | " \
           f"{'lost upd. p/s/k %':>20} | {'lost mass p/s/k %':>20} | {'k-fp32':>7}"
    print(head)
    print("-" * len(head))
    fp32 = None
    started = time.perf_counter()
    for width, wplan in wplans.items():
        begun = time.perf_counter()
        report = train_check(recipe, wplan, seed=args.seed, steps=steps, data=data, stochastic=True,
                             seeds=1).document()
        runs, diag = report["runs"], report["diagnostics"]
        fp32 = runs["fp32"]["test_accuracy"]
        sizes = {name: 1 for name in diag}  # layers weighted alike unless sizes are known
        acc = [runs[r]["test_accuracy"] for r in ("fp32", *RUNS)]
        cells = " ".join("   div" if a is None else f"{a * 100:6.2f}" for a in acc)
        lost = "/".join(f"{(_mean(diag, 'lost_updates', r, sizes) or 0) * 100:.0f}" for r in RUNS)
        mass = "/".join(f"{(_mean(diag, 'lost_mass', r, sizes) or 0) * 100:.1f}" for r in RUNS)
        gap = "-" if acc[3] is None else f"{(fp32 - acc[3]) * 100:+.2f}"
        print(f"{width:>3} {spellings[width]:>{fw}} | {cells} | {lost:>20} | {mass:>20} | {gap:>7}", flush=True)
        print(f"W={width}: {time.perf_counter() - begun:.0f} s", file=sys.stderr, flush=True)
    print(f"({time.perf_counter() - started:.0f} s; lost updates and mass: mean over layers; "
          "k-fp32: fp32 minus Kahan accuracy, points)")


if __name__ == "__main__":
    main()
