"""The softmax error on a recipe's task: zero-sum rows against rounding every entry on its own.

    PYTHONPATH=. python benchmarks/softmax_error_rows.py mnist1d-mlp --widths 4 5 6 7 --seeds 0 1 2 3

Trains the recipe's model on its data with its optimizer settings (torch SGD, fp32) and only the
softmax error ``p - y`` quantized to ``fx<W>.<W-1>`` (the simulator with no layers), twice per
width: with the target's error taken as minus the sum of the rounded non-target errors (what
train-check simulates: each row sums to zero) and with every entry rounded on its own. Prints the
mean test accuracy over the seeds (%), and fp32's. About 75 s for the command above on one core.
"""

from __future__ import annotations

import argparse
import time

import torch

from lpcli.data import batch_indices, load_data
from lpcli.formats import FixedPoint, Float32, Format
from lpcli.models import build_model
from lpcli.recipe import Recipe, load_recipe
from lpcli.simulate import Simulator


def accuracy(recipe: Recipe, data, error: Format, seed: int, zero_sum: bool) -> float:
    torch.manual_seed(seed)
    model = build_model(recipe.model, recipe.source, recipe.base_dir)
    simulator = Simulator(model, {}, Float32(), error, zero_sum_error=zero_sum)
    t = recipe.training
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    model.train()
    for index in batch_indices(len(data.y_train), t.batch_size, t.steps, seed):
        optimizer.zero_grad(set_to_none=True)
        simulator.loss(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
    simulator.remove()
    model.eval()
    with torch.no_grad():
        return 100 * float((model(data.x_test).argmax(dim=1) == data.y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 5, 6, 7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    recipe = load_recipe(args.recipe)
    data = load_data(recipe.data, recipe.source)

    def mean(error: Format, zero_sum: bool) -> float:
        return sum(accuracy(recipe, data, error, s, zero_sum) for s in args.seeds) / len(args.seeds)

    print(f"{recipe.name}, {recipe.training.steps} steps, seeds {args.seeds}: fp32 {mean(Float32(), True):.1f}%")
    for zero_sum in (True, False):
        cells = [f"{w}: {mean(FixedPoint(w, w - 1), zero_sum):.1f}" for w in args.widths]
        print(f"  error fx<W>.<W-1>, {'zero-sum rows' if zero_sum else 'each entry   '}  " + "  ".join(cells))
    print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
