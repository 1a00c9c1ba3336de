"""How fine the softmax input must be for inference: the fixed-point input's fraction bits F.

    PYTHONPATH=. python benchmarks/softmax_input_inference.py [--recipe digits-mlp] [--fracs -1 0 1 2]
        [--seeds 0 1 2 3 4]

For each F and seed, the recipe's recommended plan with ``Rules(softmax_input_frac=F)`` is
train-checked (the whole simulation, Kahan SGD). Kahan's test accuracy is read twice: as
the hardware predicts (the argmax of the rounded ``z - max(z)``, ties to the lowest class
index) and from the fp32 logits. Printed per F: both accuracies, their difference, and the
share of test rows whose top class is tied after rounding (min-max over the seeds). A step
that trains fine (``benchmarks/softmax_sweep.py``) can still tie the top classes: the
recommended ``F = 2`` comes from this table (``lpcli.recommend.softmax_formats``).
"""

from __future__ import annotations

import argparse
import time

import torch

from lpcli import analyze, load_recipe, recommend, train_check
from lpcli.data import load_data
from lpcli.recommend import Rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-mlp")
    parser.add_argument("--fracs", type=int, nargs="+", default=[-1, 0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe)
    data = load_data(recipe.data, recipe.source)
    stats = {seed: analyze(recipe, seed=seed, data=data) for seed in args.seeds}
    started = time.perf_counter()
    print(f"{args.recipe}, seeds {args.seeds}: Kahan at the recommended plan, min-max over the seeds")
    head = f"{'F':>3} {'input':>7} | {'hardware %':>13} | {'fp32 logits %':>13} | {'lost pt':>11} | {'tied rows %':>11}"
    print(head)
    print("-" * len(head))
    for frac in args.fracs:
        rows = []
        for seed in args.seeds:
            plan = recommend(stats[seed], Rules(softmax_input_frac=frac), recipe.precision)
            report = train_check(recipe, plan, seed=seed, data=data)
            kahan = report.runs["kahan"]
            rows.append((kahan.test_accuracy * 100, kahan.test_accuracy_fp32_logits * 100,
                         (kahan.test_accuracy_fp32_logits - kahan.test_accuracy) * 100,
                         report.softmax["kahan"]["test_rows_tied"] * 100))
        cells = [f"{min(c):.1f}-{max(c):.1f}" for c in zip(*rows, strict=True)]
        print(f"{frac:>3} {str(plan.softmax_input):>7} | {cells[0]:>13} | {cells[1]:>13} | {cells[2]:>11} | "
              f"{cells[3]:>11}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
