"""How a recipe trains: its update rule (torch's optimizer for the fp32 baseline and the
analysis, the same hyper-parameters for lpcli's low-precision twins) and its learning-rate
schedule: ``constant``, ``step`` or ``cosine``, each after an optional linear warmup, one
definition for every run through ``torch.optim.lr_scheduler.LambdaLR`` (which any
optimizer accepts)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .recipe import Training

LATE = 0.9  # the compensation is sized for the updates at this point of the schedule


def lr_factor(training: Training, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``, as a share of ``training.lr``.

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then
    ``constant``: 1; ``step``: ``gamma ** (k // step_every)`` after ``k`` post-warmup steps;
    ``cosine``: from 1 down to ``min_lr / lr`` at the last step, along half a cosine.
    """
    warmup = training.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    k = step - warmup
    if training.schedule == "step":
        return training.gamma ** (k // training.step_every)
    if training.schedule == "cosine":
        span = max(1, steps - 1 - warmup)
        floor = training.min_lr / training.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / span)))
    return 1.0


def late_factor(training: Training, steps: int) -> float:
    """The lr factor at ``LATE`` (90%) of the run: where a decaying schedule's updates are
    small but training still counts on them."""
    return lr_factor(training, min(steps - 1, int(LATE * steps)), steps)


def attach(optimizer: torch.optim.Optimizer, training: Training, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule on ``optimizer`` (call its ``step()`` after each optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(training, step, steps))


def rule_arguments(training: Training) -> dict[str, Any]:
    """The recipe's hyper-parameters of its update rule, as the optimizers take them."""
    if training.optimizer == "sgd":
        return {"momentum": training.momentum, "weight_decay": training.weight_decay}
    return {"betas": training.betas, "eps": training.eps, "weight_decay": training.weight_decay}


def torch_optimizer(params: Any, training: Training) -> torch.optim.Optimizer:
    """torch's own optimizer for the recipe's rule: the fp32 baseline and the analysis."""
    rule = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[training.optimizer]
    return rule(params, lr=training.lr, **rule_arguments(training))
