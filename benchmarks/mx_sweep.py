"""The mx family's rule against experiment: sweep the effective resolution it asks of each
GEMM operand.

For each recipe (default: digits-cnn), the stats are the recipe's analysis (its first
seed); for each ``--resolutions`` value b the plan is ``lpcli recommend --family mx
--mx-resolution b``: every GEMM operand (a layer's input, weight and error) takes the
cheapest MX element type whose predicted effective resolution reaches b (errors: at most 1%
flushed in their blocks), the rest the float family's formats. Each plan trains the
recipe's Kahan run through the real train-check code (``lpcli.check``) for every seed,
against fp32 runs from the same initial weights and batches, and the float family's plan
is run as the reference the MX operands replace. Printed per b: the element types chosen
(``-``: an operand left element by element, no MX type qualifying), the bits per stored
element of the operands, the estimated energy per step, the mean Kahan accuracy and the
paired verdict against fp32 (pooled over the seeds); then the empirical threshold: the
smallest b from which every larger one tried is within ``--tolerance`` points of the float
plan's mean accuracy (the plan whose operands the MX formats replace; on a recipe where
even it cannot pass against fp32, the verdicts alone cannot place the threshold).

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks:. python benchmarks/mx_sweep.py digits-cnn --seeds 0 1 2 3 4 5 6 7 8
    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks:. python benchmarks/mx_sweep.py fashion-cnn --seeds 0 --resolutions 1 2 3

A recipe whose data is missing is skipped with the reason.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from accumulator_sweep import Runs

from lpcli.accumulate import BLOCK_ROLES
from lpcli.errors import InputError
from lpcli.formats import BlockFormat
from lpcli.plan import Plan
from lpcli.recipe import load_recipe
from lpcli.recommend import Rules, recommend
from lpcli.stats import analyze


def operands(plan: Plan, stats: dict) -> tuple[str, float]:
    """The element types of the MX operands (count of each; ``-``: element by element) and
    the operands' bits per stored element, weighted by element counts."""
    kinds: Counter[str] = Counter()
    bits = count = 0.0
    for name, profiles in (stats.get("blocks") or {}).items():
        for role in BLOCK_ROLES:
            if role not in profiles or name not in plan.layers or (role == "error" and name == plan.output_layer):
                continue  # the output layer's error is the softmax's
            fmt = plan.layers[name][role]
            kinds[fmt.element if isinstance(fmt, BlockFormat) else "-"] += 1
            layer = stats["layers"][name]
            n = layer["parameters"] if role == "weight" else layer.get("activation_elements", 0)
            bits += (fmt.storage_bits if isinstance(fmt, BlockFormat) else fmt.width) * n
            count += n
    return " ".join(f"{k}x{v}" for k, v in sorted(kinds.items())), bits / count if count else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["digits-cnn"])
    parser.add_argument("--resolutions", nargs="+", type=float, default=[0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the recipe's first seed")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points below the float plan's accuracy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.recipes:
        try:
            recipe = load_recipe(name)
            runs = Runs(recipe, args.seeds or [recipe.training.seed], args.steps)
            stats = analyze(recipe, seed=recipe.training.seed)
        except InputError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        t0 = time.perf_counter()
        reference = recommend(stats, Rules(family="float"), recipe.precision, source=recipe.source)
        ceiling, status, _ = runs.run(reference)
        print(f"\n{name}: fp32 {runs.fp32_accuracy() * 100:.2f}%, {len(runs.seeds)} seed(s); the float plan "
              f"{ceiling * 100:.2f}% ({status}), operands {operands(reference, stats)[1]:.2f} bits, "
              f"{reference.summary['cost_per_step']['plan']['total_uj']:.4g} µJ per step", flush=True)
        print(f"{'b':>4}  {'operand element types':<44} {'bits':>5} {'µJ/step':>8} {'accuracy':>8}  verdict")
        close = []
        for b in args.resolutions:
            plan = recommend(stats, Rules(family="mx", mx_resolution_bits=b), recipe.precision, source=recipe.source)
            kinds, bits = operands(plan, stats)
            accuracy, status, _ = runs.run(plan)
            close.append((b, (ceiling - accuracy) * 100 <= args.tolerance))
            print(f"{b:>4g}  {kinds:<44} {bits:>5.2f} {plan.summary['cost_per_step']['plan']['total_uj']:>8.4g} "
                  f"{accuracy * 100:>7.2f}%  {status}", flush=True)
        ok = [b for b, _ in close if all(near for c, near in close if c >= b)]
        print(f"empirical threshold: {'b >= ' + format(min(ok), 'g') if ok else 'none'} (the smallest b from "
              f"which every larger one is within {args.tolerance:g} points of the float plan); "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
