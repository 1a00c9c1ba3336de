"""Estimated cost per training step of recommend's plans, per family and objective.

    PYTHONPATH=. python benchmarks/objectives.py [RECIPE ...] [--cost FILE]

Analyzes each bundled recipe (its own analyze steps), recommends with ``--family fixed``,
``--family float``, ``--family fixed,float`` under each objective (bits, energy, memory),
``--family mx`` and ``--family fixed,mx --objective energy``, and prints one markdown row
per recipe: the plan's estimated energy per step (µJ, lpcli.cost's default 45 nm table or
``--cost``), its memory traffic (MB) and, for the fixed,float plans, the layers whose family
differs from the bits objective's choice. Nothing is
trained: the accuracy of a plan is train-check's to say.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpcli.cost import load_cost_table
from lpcli.recipe import bundled_recipes, load_recipe
from lpcli.recommend import Rules, recommend
from lpcli.stats import analyze

RULES = {
    "fixed": Rules(family="fixed"),
    "float": Rules(family="float"),
    "bits": Rules(family="fixed,float", objective="bits"),
    "energy": Rules(family="fixed,float", objective="energy"),
    "memory": Rules(family="fixed,float", objective="memory"),
    "mx": Rules(family="mx"),
    "fixed,mx": Rules(family="fixed,mx", objective="energy"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=sorted(bundled_recipes()))
    parser.add_argument("--cost", type=Path, default=None, help="cost table (YAML), as recommend --cost")
    args = parser.parse_args()
    table = load_cost_table(args.cost) if args.cost else None
    print("| recipe | fixed | float | fixed,float by bits | by energy | by memory | mx | fixed,mx by energy "
          "| fixed,float: energy's choice where it differs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.recipes:
        stats = analyze(load_recipe(name))
        plans = {key: recommend(stats, rules, cost=table) for key, rules in RULES.items()}

        costs = {key: plan.summary["cost_per_step"]["plan"] for key, plan in plans.items()}
        cells = [f"{c['total_uj']:.4g} µJ, {c['memory_mb']:.3g} MB" for c in costs.values()]

        bits_choice = plans["bits"].summary["families"]["choice"]
        energy_choice = plans["energy"].summary["families"]["choice"]
        moved = [f"{unit} {family}" for unit, family in energy_choice.items() if bits_choice[unit] != family]
        print(f"| {name} | " + " | ".join(cells) + f" | {', '.join(moved) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
