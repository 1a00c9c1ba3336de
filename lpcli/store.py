"""Weights stored in a low-precision format: plain, stochastic rounding, or Kahan summation.

An optimizer (:class:`lpcli.KahanSGD`, :class:`lpcli.KahanAdam`, :class:`lpcli.KahanAdamW`)
computes the intended update ``u`` of each weight in float32; this module stores ``w + u``
onto the weight format ``Q_w`` and keeps the diagnostics of what the store lost. The
update rule and the store are independent: every rule gets all three modes and the same
diagnostics. Per ``mode``:

``plain``       ``w = Q_w(w + u)`` rounding to nearest: every ``|u|`` below half a weight
                LSB rounds away.
``stochastic``  ``w = Q_w(w + u)`` with stochastic rounding (seeded torch.Generator): small
                updates survive in expectation, at the cost of noise.
``kahan``       (Park et al., arXiv 1810.05486) the compensation ``c`` in its own format
                ``Q_c`` keeps what rounding threw away and adds it back next step::

                    y = u - c
                    t = Q_w(w + y)
                    c = Q_c((t - w) - y)
                    w = t

Each line is float32 operations, each rounded to float32. When ``Q_c`` is a float format
(bf16 weights carry in bf16) ``y`` and ``t - w`` are rounded to ``Q_c`` too:
``y = Q_c(u - c)``, ``c = Q_c(Q_c(t - w) - y)``. That is Kahan's sum carried out in the
working precision, and operation for operation torch-optimi's ``kahan_sum=True`` (its
compensation is ``-c``: ``c' += u`` is ``y``, ``w = w + c'`` is ``t``, ``c' += w_old - w``
is the last line, because rounding to nearest commutes with negation). The rounding of
``t - w`` is exact whenever ``|w| >= |y|`` (Fast2Sum, Dekker 1971). A fixed-point ``Q_c``
covers only about one weight LSB and cannot hold ``y``, so there ``y`` and ``t - w`` stay
float32 as written above.

Either compensation has a floor. A fixed-point one drops every update below half its step
(NUMERICS.md). A float one with M mantissa bits grows to about half a weight ulp, where
its own step is ``2^-(M+1)`` of a weight ulp, and ``y = Q_c(u - c)`` rounds back to ``-c``
once ``|u|`` is below half of that: bf16 keeps updates down to about ``2^-9`` weight ulp,
smaller ones stall (measured: AdamW's decay of ``1e-5`` of the weight per step never
reaches bf16 weights; ``1e-4`` does, within one ulp of exact after 1000 steps).

Diagnostics (on by default; ``diagnostics=False`` skips their cost), per parameter
group, from :meth:`LowPrecisionOptimizer.diagnostics`:

* ``lost_updates``: the share of element updates whose intended change ``u`` was
  non-zero but whose stored weight did not change, over all steps (``lost_updates_step``:
  the last step only). A high share is normal for Kahan: most single steps change
  nothing while the compensation collects them.
* ``lost_mass``: ``||sum_t u_t - (w_T - w_0)|| / ||sum_t u_t||``, the share of the
  summed intended movement that never reached the weights. Plain rounding at a width
  that swamps every update reaches 1; Kahan stays near zero (at most about one weight LSB
  per element is still held in ``c``), even when nearly every single step is "lost".

Counters accumulate in tensors (no host synchronisation per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

import torch

from .formats import (
    MAX_FIXED_WIDTH,
    BlockFormat,
    DynamicFixedPoint,
    FixedPoint,
    Float32,
    FloatFormat,
    Format,
    Rounding,
    parse_format,
    saturated,
)
from .kernels import quantize


class Mode(StrEnum):
    """How the store puts an update into the low-precision weights (see the module docstring)."""

    KAHAN = "kahan"
    PLAIN = "plain"
    STOCHASTIC = "stochastic"


MODES = tuple(Mode)


class StepPath(StrEnum):
    """The code that runs a group's step (:meth:`LowPrecisionOptimizer._backend`)."""

    FOREACH = "foreach"  # torch._foreach operations over the group's tensors
    NATIVE = "native"  # the C kernels, the whole step in one pass
    PER_TENSOR = "per-tensor"  # torch operations tensor by tensor
    COMPILED = "compiled"  # a rule's torch.compile'd step
# The diagnostics' counters per tensor: updates u != 0 (moved) and those that left the weight
# unchanged (lost), in all and in the last step; with Kahan, the non-zero residues the
# compensation rounded to zero (comp_dropped) or that lay beyond its range (comp_saturated).
COUNTERS = ("lost", "moved", "step_lost", "step_moved", "comp_dropped", "comp_saturated")


def compensation_format(weight_format: Format, frac: int | None = None) -> Format:
    """A fixed-point compensation whose range covers one weight LSB: ``[-LSB, LSB)``
    (rounding to nearest leaves at most half an LSB to carry), with ``frac`` fraction bits
    (at least one more than the weights'), or without ``frac`` the weights' own width.

    The width alone decides how small an update the compensation keeps: its step is
    ``2^-frac``, and an update below half of it is rounded away by the compensation
    itself, so ``lpcli recommend`` sizes ``frac`` from the update distribution. Floats and
    dynamic fixed point carry in their own format (a float's step follows the value).
    """
    if not isinstance(weight_format, FixedPoint):
        return weight_format
    integer = 1 - weight_format.frac
    if frac is None:
        return FixedPoint(weight_format.width, weight_format.width - integer)
    frac = max(frac, weight_format.frac + 1)
    return FixedPoint(min(MAX_FIXED_WIDTH, integer + frac), min(MAX_FIXED_WIDTH, integer + frac) - integer)


def round_onto(x: torch.Tensor, fmt: Format, out: torch.Tensor | None = None, rounding: str = Rounding.NEAREST,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Round in place (``out`` None) or into ``out``; fp32 costs nothing. A block (MX)
    format blocks a tensor of more than two dimensions along its flattened trailing ones
    (a convolution's fan-in, in the order its forward GEMM sums), as the layers' GEMMs take
    it; others along their last dimension."""
    if isinstance(fmt, Float32):
        return x if out is None else out.copy_(x)
    target = x if out is None else out
    if isinstance(fmt, BlockFormat) and x.dim() > 2:
        return target.copy_(quantize(x.reshape(len(x), -1), fmt, rounding, generator).reshape(x.shape))
    return quantize(x, fmt, rounding, generator, out=target)


class LowPrecisionOptimizer(torch.optim.Optimizer):
    """What every optimizer on a low-precision store shares: a group's ``mode``,
    ``weight_format`` and ``comp_format`` checked and parsed, the weights rounded onto their
    format when their group is added (``initial_saturated`` counts those clipped), the
    random source of stochastic rounding (saved in :meth:`state_dict`), the store's state
    per tensor and :meth:`diagnostics`. A subclass checks its own hyper-parameters in
    :meth:`_check_group` (after calling this one), creates its state with
    :meth:`_store_state` and names its state formats in :meth:`_state_formats`.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any], *,
                 diagnostics: bool, foreach: bool | None, seed: int | None,
                 generator: torch.Generator | None) -> None:
        self.initial_saturated = 0
        super().__init__(params, defaults)
        self.diagnostics_on = diagnostics
        self.foreach = foreach
        self._backends: dict[int, tuple[tuple, str, Any]] = {}
        device = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else None
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=device or "cpu").manual_seed(seed)
        self.generator = generator

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check the group and round its weights onto its format (also for groups added
        after construction); a group that fails its check is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        with torch.no_grad():
            group["flushed_at_start"] = 0  # non-zero weights the format rounded to zero
            for p in group["params"]:
                self.initial_saturated += int(saturated(p, group["weight_format"]).sum())
                nonzero = int(torch.count_nonzero(p))
                p.copy_(quantize(p, group["weight_format"]))
                group["flushed_at_start"] += nonzero - int(torch.count_nonzero(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One group's step over its tensors that have a gradient: the update rule's."""
        raise NotImplementedError

    def _backend(self, group: dict[str, Any], device: torch.device) -> tuple[str, Any]:
        """The path of a group's steps and what it needs (the C kernels' format specs),
        decided at the group's first step and again only when its device or a setting other
        than ``lr`` changes: ``"foreach"`` (``foreach=True``; the default on CUDA), ``"native"`` (the C
        kernels: the default on the CPU where they are built and the formats allow),
        ``"per-tensor"`` or a rule's own (:meth:`_choose_backend`). A tensor that does not
        suit the C kernels (not contiguous float32) takes the per-tensor path alone."""
        key = (device.type, *((k, _setting(v)) for k, v in group.items() if k not in ("params", "lr")))
        cached = self._backends.get(id(group))
        if cached is None or cached[0] != key:
            cached = self._backends[id(group)] = (key, *self._choose_backend(group, device))
        return cached[1], cached[2]

    def _choose_backend(self, group: dict[str, Any], device: torch.device) -> tuple[str, Any]:
        if self.foreach or (self.foreach is None and device.type == "cuda"):
            return StepPath.FOREACH, None
        if self.foreach is None and device.type == "cpu" and (specs := self._native_specs(group)) is not None:
            return StepPath.NATIVE, specs
        return StepPath.PER_TENSOR, None

    def _native_specs(self, group: dict[str, Any]) -> tuple | None:
        """The C kernels' specs of the group's formats (weight, compensation, the rule's
        state), or None where they do not apply."""
        return None

    def _check_group(self, group: dict[str, Any]) -> None:
        if not group["lr"] > 0:
            raise ValueError(f"lr must be positive, got {group['lr']}")
        if group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if group["mode"] not in MODES:
            raise ValueError(f"unknown mode {group['mode']!r}; use one of {', '.join(MODES)}")
        group["mode"] = Mode(group["mode"]).value  # a plain string: state dicts load with weights_only=True
        group["weight_format"] = parse_format(group["weight_format"])
        if group["comp_format"] is None:
            group["comp_format"] = compensation_format(group["weight_format"])
        group["comp_format"] = parse_format(group["comp_format"])
        group["kahan"] = group["mode"] == Mode.KAHAN

    def _store_state(self, state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        """The compensation (Kahan) and the diagnostics' sums and counters."""
        if group["mode"] == Mode.KAHAN:
            state["compensation"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if self.diagnostics_on:
            state["initial"] = p.detach().clone(memory_format=torch.contiguous_format)
            state["intended"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            for key in COUNTERS:
                state[key] = torch.zeros((), dtype=torch.int64, device=p.device)

    def _state_formats(self, group: dict[str, Any]) -> dict[str, Any]:
        """The formats of the rule's own state, for :meth:`diagnostics`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["generator"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        if generator is not None:
            self.generator.set_state(generator)

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per parameter group: lost-update shares (run, last step) and the lost update mass."""
        report = []
        for index, group in enumerate(self.param_groups):
            lost = moved = step_lost = step_moved = dropped = clipped = 0
            residual = intended = 0.0
            steps_seen = False
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "intended" not in state:
                    continue
                steps_seen = True
                lost += int(state["lost"])
                moved += int(state["moved"])
                step_lost += int(state["step_lost"])
                step_moved += int(state["step_moved"])
                dropped += int(state["comp_dropped"])
                clipped += int(state["comp_saturated"])
                applied = p.detach().double() - state["initial"].double()
                total = state["intended"].double()
                residual += float(((total - applied) ** 2).sum())
                intended += float((total**2).sum())
            on = self.diagnostics_on and steps_seen
            report.append({
                "name": group["name"] if group["name"] is not None else str(index),
                "mode": group["mode"],
                "weight_format": str(group["weight_format"]),
                "comp_format": str(group["comp_format"]) if group["mode"] == Mode.KAHAN else None,
                **self._state_formats(group),
                "lost_updates": lost / moved if on and moved else None,
                "lost_updates_step": step_lost / step_moved if on and step_moved else None,
                "lost_mass": math.sqrt(residual / intended) if on and intended else None,
                "compensation_dropped": dropped / moved if on and moved and group["mode"] == Mode.KAHAN else None,
                "compensation_saturated": clipped / moved if on and moved and group["mode"] == Mode.KAHAN else None,
                "weights_flushed_at_start": group.get("flushed_at_start", 0) / elements if (
                    elements := sum(p.numel() for p in group["params"])) else None,
            })
        return report


_IMMUTABLE = (int, float, str, type(None), FixedPoint, DynamicFixedPoint, FloatFormat, Float32)


def _setting(value: Any) -> Any:
    """A group setting as :meth:`LowPrecisionOptimizer._backend` compares it: immutable values
    (numbers, strings, formats, tuples of them) as they are, since comparing them is cheaper
    than writing them out; anything else (a list that might be changed in place) as its repr."""
    if isinstance(value, _IMMUTABLE):
        return value
    if type(value) is tuple and all(isinstance(v, _IMMUTABLE) for v in value):
        return value
    return repr(value)


# --- the store, per tensor and per list of tensors ----------------------------------------------


def store(w: torch.Tensor, u: torch.Tensor, state: dict[str, Any], group: dict[str, Any], diag: bool,
          generator: torch.Generator) -> None:
    """``w`` (the parameter's data) takes the update ``u`` in the group's mode: the
    definition the other paths match."""
    wf, cf, mode = group["weight_format"], group["comp_format"], group["mode"]
    if mode == Mode.KAHAN:
        c = state["compensation"]
        float_c = isinstance(cf, (FloatFormat, BlockFormat))  # a step that follows the value
        y = u - c
        if float_c:
            round_onto(y, cf)
        t = round_onto(w + y, wf)
        z = t - w
        if diag:
            _count(state, u, z)
        if float_c:
            round_onto(z, cf)
        residue = z.sub_(y)
        round_onto(residue, cf, out=c)
        if diag:
            count_compensation(state, residue, c, cf)
    else:
        rounding = Rounding.NEAREST if mode == Mode.PLAIN else Rounding.STOCHASTIC
        t = round_onto(w + u, wf, rounding=rounding, generator=generator)
        if diag:
            _count(state, u, t - w)
    if diag:
        state["intended"].add_(u)
    w.copy_(t)


def count_compensation(state: dict[str, Any], residue: torch.Tensor, c: torch.Tensor, cf: Format) -> None:
    """Dropped: a non-zero residue the compensation rounded to zero (an update it could not
    keep); saturated: a residue beyond its range. No host sync."""
    state["comp_dropped"].add_(torch.count_nonzero(residue) - torch.count_nonzero(torch.logical_and(residue, c)))
    state["comp_saturated"].add_(torch.count_nonzero(saturated(residue, cf)))


def compensation_range(cf: Format) -> tuple[float, float]:
    """The range beyond which a residue saturates in ``cf`` (none for float32 and dynamic
    fixed point), as :func:`lpcli.formats.saturated` defines it."""
    if isinstance(cf, (FixedPoint, FloatFormat)):
        return cf.min_value, cf.max_value
    return -math.inf, math.inf


def _count(state: dict[str, Any], u: torch.Tensor, z: torch.Tensor) -> None:
    """Lost: u != 0 and the weight did not move (z = t - w == 0). No host sync."""
    moved = torch.count_nonzero(u)
    changed = torch.count_nonzero(torch.logical_and(u, z))
    state["step_moved"].copy_(moved)
    state["step_lost"].copy_(moved - changed)
    state["moved"].add_(moved)
    state["lost"].add_(moved - changed)


def store_foreach(ws: list[torch.Tensor], us: list[torch.Tensor], states: list[dict[str, Any]],
                  group: dict[str, Any], diag: bool, generator: torch.Generator) -> None:
    """:func:`store` over a group's tensors, each operation over all of them
    (``torch._foreach_*``); rounding stays per tensor, in list order."""
    wf, cf, mode = group["weight_format"], group["comp_format"], group["mode"]
    if mode == Mode.KAHAN:
        cs = [s["compensation"] for s in states]
        float_c = isinstance(cf, (FloatFormat, BlockFormat))  # a step that follows the value
        y = torch._foreach_sub(us, cs)
        if float_c:
            for v in y:
                round_onto(v, cf)
        t = torch._foreach_add(ws, y)
        for v in t:
            round_onto(v, wf)
        z = torch._foreach_sub(t, ws)
        if diag:
            for state, uu, zz in zip(states, us, z, strict=True):
                _count(state, uu, zz)
        if float_c:
            for v in z:
                round_onto(v, cf)
        torch._foreach_sub_(z, y)
        for v, c, state in zip(z, cs, states, strict=True):
            round_onto(v, cf, out=c)
            if diag:
                count_compensation(state, v, c, cf)
    else:
        t = torch._foreach_add(ws, us)
        rounding = Rounding.NEAREST if mode == Mode.PLAIN else Rounding.STOCHASTIC
        for v in t:
            round_onto(v, wf, rounding=rounding, generator=generator)
        if diag:
            z = torch._foreach_sub(t, ws)
            for state, uu, zz in zip(states, us, z, strict=True):
                _count(state, uu, zz)
    if diag:
        torch._foreach_add_([s["intended"] for s in states], us)
    torch._foreach_copy_(ws, t)
