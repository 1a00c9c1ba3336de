"""SGD on weights stored in a low-precision format, with or without Kahan summation.

Plain low-precision SGD stores ``w = Q_w(w + u)`` for the intended update
``u = -lr * d`` (d the gradient, with weight decay and momentum folded in as
``torch.optim.SGD`` does). Every ``|u|`` below half a weight LSB rounds away. Kahan
summation keeps what rounding threw away in a compensation tensor ``c`` stored in its
own format ``Q_c`` and adds it back next step (Park et al., arXiv 1810.05486)::

    y = u - c
    t = Q_w(w + y)
    c = Q_c((t - w) - y)
    w = t

Each operation is one float32 operation followed by the named rounding; the tests
hold a float64 reference to exactly this definition.

Diagnostics (per parameter group, on by default): the lost-update fraction (elements
whose intended change was non-zero but whose stored weight did not change, over all
steps) and the lost update mass ``||sum_t u_t - (w_T - w_0)|| / ||sum_t u_t||``, the
share of the intended movement that never reached the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .formats import FixedPoint, Format, parse_format, quantize, saturated


def compensation_format(weight_format: Format) -> Format:
    """Same width as the weights, scaled so its range covers one weight LSB.

    Rounding to nearest leaves at most half an LSB to carry; one LSB of range leaves a
    bit of headroom. Floats and dynamic fixed point carry in their own format.
    """
    if isinstance(weight_format, FixedPoint):
        return FixedPoint(weight_format.width, weight_format.width + weight_format.frac - 1)
    return weight_format


class KahanSGD(torch.optim.Optimizer):
    """SGD whose parameters live in ``weight_format``.

    Args:
        params: parameters or parameter groups; a group may set its own ``lr``,
            ``weight_format``, ``comp_format`` and a ``name`` used in diagnostics.
        lr, momentum, weight_decay: as in ``torch.optim.SGD`` (no dampening).
        weight_format: the storage format of the weights (a format or its spelling).
            The weights are rounded onto it when the optimizer is created.
        comp_format: the compensation's format; derived by :func:`compensation_format`
            when None.
        kahan: False gives the plain low-precision SGD that Kahan is compared with.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        weight_format: Format | str = "fp32",
        comp_format: Format | str | None = None,
        kahan: bool = True,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, weight_format=weight_format,
                        comp_format=comp_format, kahan=kahan, name=None)
        super().__init__(params, defaults)
        self.initial_saturated = 0
        with torch.no_grad():
            for group in self.param_groups:
                group["weight_format"] = parse_format(group["weight_format"])
                if group["comp_format"] is None:
                    group["comp_format"] = compensation_format(group["weight_format"])
                group["comp_format"] = parse_format(group["comp_format"])
                for p in group["params"]:
                    self.initial_saturated += int(saturated(p, group["weight_format"]).sum())
                    p.copy_(quantize(p, group["weight_format"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            wf, cf, kahan = group["weight_format"], group["comp_format"], group["kahan"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["initial"] = p.detach().clone()
                    state["intended"] = torch.zeros_like(p)
                    state["lost"] = torch.zeros((), dtype=torch.float64, device=p.device)
                    state["moved"] = torch.zeros((), dtype=torch.float64, device=p.device)
                    if kahan:
                        state["compensation"] = torch.zeros_like(p)
                d = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                if momentum:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(d)
                    d = state["momentum_buffer"]
                update = d * -lr
                if kahan:
                    c = state["compensation"]
                    y = update - c
                    new = quantize(p + y, wf)
                    c.copy_(quantize((new - p) - y, cf))
                else:
                    new = quantize(p + update, wf)
                nonzero = update != 0
                state["lost"] += (nonzero & (new == p)).sum(dtype=torch.float64)
                state["moved"] += nonzero.sum(dtype=torch.float64)
                state["intended"] += update
                p.copy_(new)
        return loss

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per parameter group: lost-update fraction and lost update mass over the run."""
        report = []
        for index, group in enumerate(self.param_groups):
            lost = moved = 0.0
            residual = intended = 0.0
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                lost += float(state["lost"])
                moved += float(state["moved"])
                applied = p.detach() - state["initial"]
                residual += float(((state["intended"] - applied).double() ** 2).sum())
                intended += float((state["intended"].double() ** 2).sum())
            report.append({
                "name": group["name"] if group["name"] is not None else str(index),
                "weight_format": str(group["weight_format"]),
                "comp_format": str(group["comp_format"]) if group["kahan"] else None,
                "lost_updates": lost / moved if moved else None,
                "lost_mass": math.sqrt(residual / intended) if intended else None,
            })
        return report
