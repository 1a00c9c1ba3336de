"""digits-mlp trained at several weight widths: fp32, plain, stochastic-rounding and Kahan SGD side by side.

    PYTHONPATH=. python benchmarks/weight_widths.py [--widths 6 8 10 12 16] [--lr 0.05] [--steps 600] [--seed 0]

The plan comes from the real pipeline (``stats.analyze`` -> ``recommend``); each width W then sets every
layer's weight format to W bits with the plan's integer bits (``plan.with_fraction_bits("weight", W)``),
the other tensors as recommended. The default is the recipe's own lr 0.05 and 600 steps (about 20 s per
width); at the narrow widths most of its updates are below half a weight LSB, so swamping decides who
trains. Smaller lr with more steps (e.g. --lr 0.01 --steps 3000) sharpens that at 5x the time.
Columns: test accuracy per run, and per low-precision run the lost-update share and the lost update
mass (mean over the layers; see lpcli.optim). Expectation from NUMERICS.md: Kahan within 1 point of fp32
from W = 8 up; plain needs about 2W - 1 bits to do what Kahan does at W.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--widths", type=int, nargs="+", default=[6, 8, 10, 12, 16])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    recipe = load_recipe("digits-mlp")
    recipe = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, lr=args.lr))
    data = load_data(recipe.data, recipe.source)
    plan = recommend(analyze(recipe, seed=args.seed, data=data))
    print(f"digits-mlp, lr {args.lr:g}, {args.steps} steps, batch {recipe.training.batch_size}, seed {args.seed}")
    print("plan weights: " + ", ".join(f"{n} {f['weight']}" for n, f in plan.layers.items()))
    head = f"{'W':>3} {'weights':>16} | {'fp32':>6} {'plain':>6} {'stoch':>6} {'kahan':>6} | " \
           f"{'lost upd. p/s/k %':>20} | {'lost mass p/s/k %':>20} | {'k-fp32':>7}"
    print(head)
    print("-" * len(head))
    fp32 = None
    started = time.perf_counter()
    for width in args.widths:
        wplan = plan.with_fraction_bits("weight", width)
        report = train_check(recipe, wplan, seed=args.seed, steps=args.steps, data=data, stochastic=True).document()
        runs, diag = report["runs"], report["diagnostics"]
        fp32 = runs["fp32"]["test_accuracy"]
        sizes = {name: 1 for name in diag}  # layers weighted alike unless sizes are known
        acc = [runs[r]["test_accuracy"] for r in ("fp32", *RUNS)]
        cells = " ".join("   div" if a is None else f"{a * 100:6.2f}" for a in acc)
        lost = "/".join(f"{(_mean(diag, 'lost_updates', r, sizes) or 0) * 100:.0f}" for r in RUNS)
        mass = "/".join(f"{(_mean(diag, 'lost_mass', r, sizes) or 0) * 100:.1f}" for r in RUNS)
        gap = "-" if acc[3] is None else f"{(fp32 - acc[3]) * 100:+.2f}"
        fmts = ",".join(str(f["weight"]) for f in wplan.layers.values())
        print(f"{width:>3} {fmts:>16} | {cells} | {lost:>20} | {mass:>20} | {gap:>7}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s; lost updates and mass: mean over layers; "
          "k-fp32: fp32 minus Kahan accuracy, points)")


if __name__ == "__main__":
    main()
