"""The accumulator rule against experiment: sweep each GEMM kind's accumulator resolution.

For each recipe (default: digits-cnn and fashion-cnn), family (fixed, float) and chunk size
(1: one sequential sum, and 32), the plan is ``lpcli recommend --accumulators`` (the
recipe's analysis, its first seed). Then, one GEMM kind at a time (forward, input_grad,
weight_grad), every layer's accumulator of that kind is given ``offset`` more (or fewer)
resolution bits than recommended, its range kept: fixed point ``fx<W+d>.<F+d>``, floats
``e<E>m<M+d>``; everything else stays at the plan. Each variant trains the recipe's
Kahan run through the real train-check code (``lpcli.check``) for every seed, against
fp32 runs from the same initial weights and batches; and the same plan without
accumulators (float32 sums), the ceiling of what the accumulators can reach. Printed per
kind: the mean Kahan accuracy at each offset (``*`` marks 0, the recommendation), the
empirical threshold (the smallest offset from which every larger one is within
``--tolerance`` points of the plan without accumulators; ``<=x`` when the narrowest one
tried already is) and so how many bits the recommendation lies above it; and the
recommended plan's verdict against fp32 (train-check's paired verdict, pooled over the
seeds), beside the verdict of the plan without accumulators.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/accumulator_sweep.py digits-cnn --seeds 0 1 2
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/accumulator_sweep.py fashion-cnn --seeds 0
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/accumulator_sweep.py digits-cnn --quick   # 1 family, chunk 32

A recipe whose data is missing is skipped with the reason.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from softmax_sweep import thr_value, threshold

from lpcli import distributed
from lpcli.accumulate import GEMMS
from lpcli.check import _prepare, _train, paired_verdict
from lpcli.errors import InputError
from lpcli.formats import FixedPoint, Float32, FloatFormat, Format
from lpcli.plan import Plan
from lpcli.recipe import Recipe, load_recipe
from lpcli.recommend import Rules, recommend
from lpcli.stats import analyze


def shifted(fmt: Format, offset: int) -> Format | None:
    """``fmt`` with ``offset`` more resolution bits, its range kept (None: no such format)."""
    if isinstance(fmt, FixedPoint):
        return FixedPoint(fmt.width + offset, fmt.frac + offset) if 2 <= fmt.width + offset <= 24 else None
    if isinstance(fmt, FloatFormat):
        return FloatFormat(fmt.exp, fmt.man + offset, finite=fmt.finite) if 0 <= fmt.man + offset <= 23 else None
    return fmt


def variant(plan: Plan, kind: str, offset: int) -> Plan | None:
    accumulators = {name: {**fmts, kind: shifted(fmts[kind], offset)} for name, fmts in plan.accumulators.items()}
    if any(fmts[kind] is None for fmts in accumulators.values()):
        return None
    return replace(plan, accumulators=accumulators)


class Runs:
    """fp32 once per seed, and Kahan runs of plan variants, through lpcli.check."""

    def __init__(self, recipe: Recipe, seeds: list[int], steps: int | None) -> None:
        self.recipe, self.seeds = recipe, seeds
        self.steps = steps or recipe.training.steps
        self.world, self.device = distributed.setup("cpu")
        self.data = None
        self.fp32: dict[int, object] = {}

    def setup(self, plan: Plan, seed: int):
        setup = _prepare(self.recipe, plan, "plan", seed, self.steps, self.data, self.device, self.world, None)
        self.data = setup.data
        return setup

    def run(self, plan: Plan) -> tuple[float, str, list]:
        """Mean Kahan accuracy over the seeds, the pooled verdict, and the per-seed results."""
        outcomes = []
        for seed in self.seeds:
            setup = self.setup(plan, seed)
            if seed not in self.fp32:
                setup.model.load_state_dict(setup.initial)
                self.fp32[seed] = _train("fp32", setup)
            setup.model.load_state_dict(setup.initial)
            outcomes.append((seed, self.fp32[seed], _train("kahan", setup)))
        accuracy = statistics.mean(o[2].summary.test_accuracy or 0.0 for o in outcomes)
        return accuracy, paired_verdict(outcomes, 1.0).status, outcomes

    def fp32_accuracy(self) -> float:
        return statistics.mean(r.summary.test_accuracy for r in self.fp32.values())


def describe(plan: Plan, kind: str) -> str:
    fmts = [str(f[kind]) for f in plan.accumulators.values() if not isinstance(f[kind], Float32)]
    return ", ".join(fmts) or "-"


def sweep(recipe: Recipe, stats: dict, family: str, chunk: int, args: argparse.Namespace, runs: Runs) -> dict:
    plan = recommend(stats, Rules(family=family, accumulators=True, accumulator_chunk=chunk),
                     recipe.precision, source=recipe.source)
    t0 = time.perf_counter()
    base, status, _ = runs.run(plan)
    ceiling, ceiling_status, _ = runs.run(replace(plan, accumulators={}))
    fp32 = runs.fp32_accuracy()
    print(f"\n{recipe.source.rsplit('/', 1)[-1]}, {family}, chunk {chunk}: fp32 {fp32 * 100:.2f}%; the plan without "
          f"accumulators {ceiling * 100:.2f}% ({ceiling_status}), with them {base * 100:.2f}% ({status}; verdicts over "
          f"{len(runs.seeds)} seed(s))", flush=True)
    result = {"family": family, "chunk": chunk, "fp32": fp32, "recommended": base, "status": status,
              "ceiling_status": ceiling_status, "kinds": {}}
    for kind in GEMMS:
        if all(isinstance(f[kind], Float32) for f in plan.accumulators.values()):
            continue
        points = []
        for offset in args.offsets:
            if offset == 0:
                points.append((0, base))
                continue
            changed = variant(plan, kind, offset)
            if changed is not None:
                points.append((offset, runs.run(changed)[0]))
        cells = " ".join(f"{d:+d}{'*' if d == 0 else ''}:{acc * 100:.1f}" for d, acc in points)
        thr = threshold(points, ceiling, args.tolerance)
        value = thr_value(thr)
        above = "-" if value is None else f"{-value:+d}"
        print(f"  {kind:<11} [{describe(plan, kind)}]\n    {cells}   threshold {thr}: recommendation {above} bits "
              f"above it", flush=True)
        result["kinds"][kind] = {"points": points, "threshold": thr, "above": None if value is None else -value}
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def summary(results: list[tuple[str, dict]]) -> None:
    print("\nrecipe        family chunk  verdict (without)          " + "  ".join(f"{k:>11}" for k in GEMMS))
    for name, r in results:
        cells = []
        for kind in GEMMS:
            k = r["kinds"].get(kind)
            cells.append("-" if k is None else ("none" if k["above"] is None else f"{k['above']:+d} bits"))
        verdicts = f"{r['status']} ({r['ceiling_status']})"
        print(f"{name:<13} {r['family']:<6} {r['chunk']:>5}  {verdicts:<25}  " +
              "  ".join(f"{c:>11}" for c in cells))
    print("(per GEMM kind: the recommendation's resolution minus the empirical threshold's; criterion: 0 to +2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["digits-cnn", "fashion-cnn"])
    parser.add_argument("--families", nargs="+", default=["fixed", "float"], choices=["fixed", "float"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--offsets", nargs="+", type=int, default=[-5, -4, -3, -2, -1, 0, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the recipe's first seed")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--tolerance", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="float family, chunk 32, offsets -3..0")
    args = parser.parse_args()
    if args.quick:
        args.families, args.chunks, args.offsets = ["float"], [32], [-3, -2, -1, 0]
    torch.set_num_threads(1)
    results = []
    for name in args.recipes:
        try:
            recipe = load_recipe(name)
            first = recipe.training.seed
            runs = Runs(recipe, args.seeds or [first], args.steps)
            stats = analyze(recipe, seed=first)
        except InputError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        for family in args.families:
            for chunk in args.chunks:
                results.append((name, sweep(recipe, stats, family, chunk, args, runs)))
    summary(results)


if __name__ == "__main__":
    main()
