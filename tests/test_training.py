"""Update rules and learning-rate schedules from a recipe, against torch's own schedulers."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from lpcli.recipe import Training
from lpcli.training import attach, late_factor, lr_factor, torch_optimizer


def training(**fields) -> Training:
    base = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 8, "steps": 100, "seed": 0,
            "analyze_steps": 5}
    return Training(**{**base, **fields})


def lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def one_parameter(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("kind", ["cosine", "step", "warmup"])
def test_schedules_follow_torchs_schedulers(kind):
    steps = 100
    if kind == "cosine":
        t = training(schedule="cosine", min_lr=0.01)
        reference = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps - 1, eta_min=0.01)  # noqa: E731
    elif kind == "step":
        t = training(schedule="step", step_every=30, gamma=0.5)
        reference = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=30, gamma=0.5)  # noqa: E731
    else:
        t = training(warmup_steps=10)
        reference = lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=9)  # noqa: E731
    ours, theirs = one_parameter(), one_parameter()
    assert lrs(attach(ours, t, steps), ours, steps) == pytest.approx(lrs(reference(theirs), theirs, steps),
                                                                     rel=1e-6, abs=1e-12)


def test_warmup_then_cosine_ends_at_min_lr_and_the_late_factor_is_at_ninety_percent():
    t = training(schedule="cosine", warmup_steps=20, min_lr=0.001)
    factors = [lr_factor(t, step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == 1.0 and factors[20] == 1.0
    assert factors[-1] == pytest.approx(0.01) and all(a >= b for a, b in pairwise(factors[20:]))
    assert late_factor(t, 100) == factors[90] < 0.1
    assert late_factor(training(), 100) == 1.0


@pytest.mark.parametrize("rule,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_the_fp32_baseline_is_torchs_rule_with_the_recipes_hyper_parameters(rule, cls):
    fields = {"optimizer": rule, "weight_decay": 0.01}
    fields.update({"momentum": 0.9} if rule == "sgd" else {"betas": (0.8, 0.99), "eps": 1e-6})
    optimizer = torch_optimizer([torch.nn.Parameter(torch.zeros(2))], training(**fields))
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.01
    assert group["momentum"] == 0.9 if rule == "sgd" else (group["betas"], group["eps"]) == ((0.8, 0.99), 1e-6)


def test_a_decaying_schedule_sizes_the_compensation_for_its_late_updates():
    """digits-adamw decays with a cosine: the analysis records updates at the peak lr and
    the late factor; the compensation gets the binades the smaller late updates need."""
    import math

    from lpcli import analyze, load_recipe, recommend

    recipe = load_recipe("digits-adamw")
    stats = analyze(recipe, steps=10)
    late = stats["training"]["late_lr_factor"]
    assert late == pytest.approx(late_factor(recipe.training, recipe.training.steps)) and late < 0.1
    assert stats["training"]["optimizer"] == "adamw"
    constant = recommend({**stats, "training": {**stats["training"], "late_lr_factor": 1.0}})
    decaying = recommend(stats)
    for name, fmts in decaying.layers.items():
        assert fmts["weight"] == constant.layers[name]["weight"]
        shift = fmts["compensation"].frac - constant.layers[name]["compensation"].frac
        assert shift == -math.floor(math.log2(late))
        assert "late in the schedule" in decaying.reasons[name]["compensation"]
