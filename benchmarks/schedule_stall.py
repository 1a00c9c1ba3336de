"""The late-training stall: plain low-precision storage stops learning as a schedule decays
the learning rate; Kahan summation keeps learning.

    PYTHONPATH=. python benchmarks/schedule_stall.py [--weight-bits 8] [--steps 1600] [--lr 0.1]
        [--min-lr 0.001] [--phases 4] [--seed 0]

digits-mlp with SGD under a cosine schedule from ``--lr`` down to ``--min-lr``: the plan
comes from the real pipeline (analysis, recommend), every layer's weights then at
``--weight-bits`` (``plan.with_fraction_bits``). fp32, plain and Kahan train from the same
initial weights and batches through :class:`lpcli.Simulation`; at the end of each phase
(an equal share of the steps) the script prints the phase's lr range, each low-precision
run's lost update mass *within the phase* (``||sum u - (v_end - v_start)|| / ||sum u||``
with ``v = w - c``, the weight with what Kahan's compensation still holds for it: a phase
starts with the residue the last one left), and the test loss and accuracy reached (as the
hardware predicts; fp32 from its logits).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from lpcli import Simulation, analyze, load_recipe, recommend
from lpcli.data import batch_indices, load_data
from lpcli.models import build_model
from lpcli.training import attach, lr_factor


def held(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The weight with what Kahan's compensation still holds for it (``w - c``): what the
    updates have reached, counting the part not yet applied."""
    c = optimizer.state[p].get("compensation")
    return p.detach() - c if c is not None else p.detach().clone()


def phase_lost_mass(optimizer: torch.optim.Optimizer, start: dict) -> float:
    residual = intended = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            total = (state["intended"] - start[p][1]).double()
            applied = (held(optimizer, p) - start[p][0]).double()
            residual += float(((total - applied) ** 2).sum())
            intended += float((total ** 2).sum())
    return (residual / intended) ** 0.5 if intended else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--min-lr", type=float, default=0.001)
    parser.add_argument("--phases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    recipe = load_recipe("digits-mlp")
    training = dataclasses.replace(recipe.training, lr=args.lr, steps=args.steps, schedule="cosine",
                                   min_lr=args.min_lr)
    recipe = dataclasses.replace(recipe, training=training)
    data = load_data(recipe.data, recipe.source)
    plan = recommend(analyze(recipe, seed=args.seed, data=data)).with_fraction_bits("weight", args.weight_bits)
    batches = batch_indices(len(data.y_train), training.batch_size, args.steps, args.seed)
    bounds = [round(args.steps * k / args.phases) for k in range(args.phases + 1)]

    rows: dict[str, list[tuple[float | None, float, float]]] = {}
    for run in ("fp32", "plain", "kahan"):
        torch.manual_seed(args.seed)
        model = build_model(recipe.model, recipe.source)
        simulation = None
        if run == "fp32":
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
            loss_fn = F.cross_entropy
        else:
            simulation = Simulation(model, plan)
            simulation.attach()
            optimizer = simulation.optimizer(lr=args.lr, mode=run, seed=args.seed)
            loss_fn = simulation.cross_entropy
        schedule = attach(optimizer, training, args.steps)
        rows[run] = []
        for phase in range(args.phases):
            start = {p: (held(optimizer, p), optimizer.state[p]["intended"].clone() if "intended" in
                         optimizer.state[p] else torch.zeros_like(p)) for g in optimizer.param_groups
                     for p in g["params"]} if simulation else {}
            for index in batches[bounds[phase]:bounds[phase + 1]]:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(data.x_train[index]), data.y_train[index]).backward()
                optimizer.step()
                schedule.step()
            if simulation is None:
                with torch.no_grad():
                    model.eval()
                    logits = model(data.x_test)
                    model.train()
                rows[run].append((None, float((logits.argmax(dim=1) == data.y_test).float().mean()),
                                  float(F.cross_entropy(logits, data.y_test))))
            else:
                evaluation = simulation.evaluate(data.x_test, data.y_test)
                rows[run].append((phase_lost_mass(optimizer, start), evaluation.accuracy, evaluation.loss))
        if simulation is not None:
            simulation.detach()

    print(f"digits-mlp, SGD, cosine lr {args.lr:g} -> {args.min_lr:g} over {args.steps} steps, weights "
          f"{', '.join(str(f['weight']) for f in plan.layers.values())}, seed {args.seed}")
    head = (f"{'phase':>5} {'steps':>11} {'lr':>15} | {'lost mass plain/kahan %':>23} | "
            f"{'test loss fp32/plain/kahan':>26} | {'acc fp32/plain/kahan %':>22}")
    print(head)
    print("-" * len(head))
    for phase in range(args.phases):
        lo, hi = bounds[phase], bounds[phase + 1]
        first, last = (args.lr * lr_factor(training, step, args.steps) for step in (lo, hi - 1))
        mass = "/".join(f"{rows[r][phase][0] * 100:.1f}" for r in ("plain", "kahan"))
        loss = "/".join(f"{rows[r][phase][2]:.4f}" for r in ("fp32", "plain", "kahan"))
        acc = "/".join(f"{rows[r][phase][1] * 100:.2f}" for r in ("fp32", "plain", "kahan"))
        print(f"{phase + 1:>5} {f'{lo + 1}-{hi}':>11} {f'{first:.3g}-{last:.3g}':>15} | {mass:>23} | {loss:>26} | "
              f"{acc:>22}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
