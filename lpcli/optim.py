"""SGD on weights stored in a low-precision format: plain, stochastic rounding, or Kahan summation.

The intended update of a weight is ``u = -lr * d``. Before it, in this order and each
one float32 operation (rounded to float32)::

    d = g + (w * weight_decay)                 # L2 decay folded into the gradient
    m = Q_m(Q_m(m * momentum) + d); d = m      # momentum; buffer starts at zero (optimi's
                                               # convention; torch's first-step copy is equal)
    d = d + (m * momentum)                     # Nesterov only

``Q_m`` is the momentum buffer's format (``momentum_format``; fp32, i.e. none, by
default). Decay and Nesterov are an explicit multiply then add (two roundings), not an
FMA, so that every path (per tensor, foreach, compiled) and the float64 reference in
the tests agree bit for bit. Then, per ``mode``:

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

When ``Q_c`` is a float format (bf16 weights carry in bf16) ``y`` and ``t - w`` are
rounded to ``Q_c`` too: ``y = Q_c(u - c)``, ``c = Q_c(Q_c(t - w) - y)``. That is Kahan's
sum carried out in the working precision, and operation for operation torch-optimi's
``SGD(kahan_sum=True)`` (its compensation is ``-c``: ``c' += u`` is ``y``, ``w = w + c'``
is ``t``, ``c' += w_old - w`` is the last line, because rounding to nearest commutes
with negation). The rounding of ``t - w`` is exact whenever ``|w| >= |y|`` (Fast2Sum,
Dekker 1971). A fixed-point ``Q_c`` covers only about one weight LSB and cannot hold
``y``, so there ``y`` and ``t - w`` stay float32 as written above.

Diagnostics (on by default; ``diagnostics=False`` skips their cost), per parameter
group, from :meth:`KahanSGD.diagnostics`:

* ``lost_updates``: the share of element updates whose intended change ``u`` was
  non-zero but whose stored weight did not change, over all steps (``lost_updates_step``:
  the last step only). A high share is normal for Kahan: most single steps change
  nothing while the compensation collects them.
* ``lost_mass``: ``||sum_t u_t - (w_T - w_0)|| / ||sum_t u_t||``, the share of the
  summed intended movement that never reached the weights. Plain SGD at a width that
  swamps every update reaches 1; Kahan stays near zero (at most about one weight LSB per
  element is still held in ``c``), even when nearly every single step is "lost".

Counters accumulate in tensors (no host synchronisation per step).

Paths, bit-identical by construction and by test: on the CPU by default (``foreach=None``)
the step runs in C (lpcli/_kernels.c: the operations below, in blocks of 128 elements
that stay in the L1 cache, so one pass over memory per tensor), where the kernels are
built and the formats allow (not stochastic rounding, not dynamic fixed point; those
take the per-tensor path). ``foreach=True`` runs each operation over all of a group's
tensors with ``torch._foreach_*`` (the default on CUDA, where it saves kernel launches);
``foreach=False`` runs the same operations tensor by tensor with torch (the readable
definition the others are tested against). ``compile=True`` fuses the step of each
tensor into one loop with ``torch.compile`` (tensors of 4096 elements and more; fixed
point with nearest rounding up to 23 bits, bf16, fp16, fp32; other formats, stochastic
rounding and small tensors take the eager path, with the same bits); if compilation
fails the optimizer warns and stays eager. Compilation takes seconds per kind of group,
once.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import formats
from .formats import (
    MAX_FIXED_WIDTH,
    FixedPoint,
    Float32,
    FloatFormat,
    Format,
    in_pieces,
    native_spec,
    parse_format,
    quantize,
    saturated,
)

MODES = ("kahan", "plain", "stochastic")


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


class KahanSGD(torch.optim.Optimizer):
    """SGD whose parameters (float32 tensors) live on the grid of ``weight_format``.

    Args:
        params: parameters or parameter groups; a group may set its own ``lr``,
            ``momentum``, ``weight_decay``, ``nesterov``, ``mode``, ``weight_format``,
            ``comp_format``, ``momentum_format`` and a ``name`` used in diagnostics.
        lr, momentum, weight_decay, nesterov: as in ``torch.optim.SGD`` (no dampening;
            L2 decay added to the gradient, not decoupled).
        weight_format: the storage format of the weights (a format or its spelling).
            The weights are rounded onto it when the optimizer is created.
        comp_format: the compensation's format; derived by :func:`compensation_format`
            when None.
        kahan: kept for compatibility: False means ``mode="plain"``, True ``"kahan"``.
        mode: ``"kahan"`` (default), ``"plain"`` or ``"stochastic"`` (see the module).
        momentum_format: format of the momentum buffer; None keeps it in float32.
        diagnostics: count lost updates and keep the sums behind the lost update mass.
        foreach: True: ``torch._foreach_*`` over a group's tensors; False: torch operations
            tensor by tensor; None (default): foreach on CUDA, the C step on the CPU (the
            per-tensor path where it does not apply).
        compile: fuse each tensor's step with ``torch.compile`` where the formats allow.
        seed, generator: the random source of stochastic rounding (a generator wins; with
            neither, a seed is drawn from torch's global generator). Its state is part of
            :meth:`state_dict`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        weight_format: Format | str = "fp32",
        comp_format: Format | str | None = None,
        kahan: bool | None = None,
        *,
        mode: str | None = None,
        nesterov: bool = False,
        momentum_format: Format | str | None = None,
        diagnostics: bool = True,
        foreach: bool | None = None,
        compile: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if mode is None:
            mode = "plain" if kahan is False else "kahan"
        elif kahan is not None and kahan != (mode == "kahan"):
            raise ValueError(f"kahan={kahan} contradicts mode={mode!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, mode=mode,
                        weight_format=weight_format, comp_format=comp_format, momentum_format=momentum_format,
                        name=None)
        super().__init__(params, defaults)
        self.diagnostics_on = diagnostics
        self.foreach = foreach
        self.compile = compile
        self._compiled: dict[tuple, Callable | None] = {}
        self._specs: dict[int, dict[str, Any]] = {}  # per group: its scalars and formats as tensors
        self.initial_saturated = 0
        device = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else None
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=device or "cpu").manual_seed(seed)
        self.generator = generator
        with torch.no_grad():
            for group in self.param_groups:
                self._check_group(group)
                for p in group["params"]:
                    self.initial_saturated += int(saturated(p, group["weight_format"]).sum())
                    p.copy_(quantize(p, group["weight_format"]))

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        if not group["lr"] > 0:
            raise ValueError(f"lr must be positive, got {group['lr']}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
        if group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("nesterov needs a momentum above 0")
        if group["mode"] not in MODES:
            raise ValueError(f"unknown mode {group['mode']!r}; use one of {', '.join(MODES)}")
        group["weight_format"] = parse_format(group["weight_format"])
        if group["comp_format"] is None:
            group["comp_format"] = compensation_format(group["weight_format"])
        group["comp_format"] = parse_format(group["comp_format"])
        mf = group["momentum_format"]
        group["momentum_format"] = Float32() if mf is None else parse_format(mf)
        group["kahan"] = group["mode"] == "kahan"

    # --- state ----------------------------------------------------------------------------

    def _state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            if group["momentum"]:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if group["mode"] == "kahan":
                state["compensation"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if self.diagnostics_on:
                state["initial"] = p.detach().clone(memory_format=torch.contiguous_format)
                state["intended"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                for key in ("lost", "moved", "step_lost", "step_moved"):
                    state[key] = torch.zeros((), dtype=torch.int64, device=p.device)
        return state

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

    # --- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p, group) for p in params]
            fused = self._fused_for(group) if self.compile else None
            if fused is not None:
                cache = self._specs.setdefault(id(group), {})
                for p, state in zip(params, states, strict=True):
                    if p.numel() < _FUSE_MIN or not p.is_contiguous():
                        _single_step(p, state, group, self.diagnostics_on, self.generator)
                    else:
                        _fused_tensor(fused, p, state, group, cache, self.diagnostics_on)
            elif self.foreach or (self.foreach is None and params[0].is_cuda):
                _foreach_step(params, states, group, self.diagnostics_on, self.generator)
            elif self.foreach is None and (specs := _native_specs(group)) is not None:
                for p, state in zip(params, states, strict=True):
                    if not _native_step(p, state, group, self.diagnostics_on, specs):
                        _single_step(p, state, group, self.diagnostics_on, self.generator)
            else:
                for p, state in zip(params, states, strict=True):
                    _single_step(p, state, group, self.diagnostics_on, self.generator)
        return loss

    def _fused_for(self, group: dict[str, Any]) -> Callable | None:
        key = _fused_key(group, self.diagnostics_on)
        if key is None:
            return None
        if key not in self._compiled:
            self._compiled[key] = _compile_fused(key)
        return self._compiled[key]

    # --- diagnostics ----------------------------------------------------------------------

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per parameter group: lost-update shares (run, last step) and the lost update mass."""
        report = []
        for index, group in enumerate(self.param_groups):
            lost = moved = step_lost = step_moved = 0
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
                applied = p.detach().double() - state["initial"].double()
                total = state["intended"].double()
                residual += float(((total - applied) ** 2).sum())
                intended += float((total**2).sum())
            on = self.diagnostics_on and steps_seen
            report.append({
                "name": group["name"] if group["name"] is not None else str(index),
                "mode": group["mode"],
                "weight_format": str(group["weight_format"]),
                "comp_format": str(group["comp_format"]) if group["mode"] == "kahan" else None,
                "momentum_format": str(group["momentum_format"]) if group["momentum"] else None,
                "lost_updates": lost / moved if on and moved else None,
                "lost_updates_step": step_lost / step_moved if on and step_moved else None,
                "lost_mass": math.sqrt(residual / intended) if on and intended else None,
            })
        return report


# --- eager paths -----------------------------------------------------------------------------


def _q(x: torch.Tensor, fmt: Format, out: torch.Tensor | None = None, rounding: str = "nearest",
       generator: torch.Generator | None = None) -> torch.Tensor:
    """Round in place (``out`` None) or into ``out``; fp32 costs nothing."""
    if isinstance(fmt, Float32):
        return x if out is None else out.copy_(x)
    return quantize(x, fmt, rounding, generator, out=x if out is None else out)


def _single_step(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], diag: bool,
                 generator: torch.Generator) -> None:
    """One tensor, one operation at a time: the readable definition the other paths match."""
    lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
    wf, cf, mf, mode = group["weight_format"], group["comp_format"], group["momentum_format"], group["mode"]
    w, g = p.detach(), p.grad.detach()
    d = g if decay == 0 else g + w * decay
    if momentum:
        m = state["momentum_buffer"]
        _q(m.mul_(momentum), mf)
        _q(m.add_(d), mf)
        d = d + m * momentum if group["nesterov"] else m
    u = d * -lr
    if mode == "kahan":
        c = state["compensation"]
        float_c = isinstance(cf, FloatFormat)
        y = u - c
        if float_c:
            _q(y, cf)
        t = _q(w + y, wf)
        z = t - w
        if diag:
            _count(state, u, z)
        if float_c:
            _q(z, cf)
        _q(z.sub_(y), cf, out=c)
    else:
        t = _q(w + u, wf, rounding="nearest" if mode == "plain" else "stochastic", generator=generator)
        if diag:
            _count(state, u, t - w)
    if diag:
        state["intended"].add_(u)
    w.copy_(t)


def _count(state: dict[str, Any], u: torch.Tensor, z: torch.Tensor) -> None:
    """Lost: u != 0 and the weight did not move (z = t - w == 0). No host sync."""
    moved = torch.count_nonzero(u)
    changed = torch.count_nonzero(torch.logical_and(u, z))
    state["step_moved"].copy_(moved)
    state["step_lost"].copy_(moved - changed)
    state["moved"].add_(moved)
    state["lost"].add_(moved - changed)


def _foreach_step(params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any], diag: bool,
                  generator: torch.Generator) -> None:
    """All of a group's tensors per operation (torch._foreach_*); rounding stays per tensor."""
    lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
    wf, cf, mf, mode = group["weight_format"], group["comp_format"], group["momentum_format"], group["mode"]
    ws = [p.detach() for p in params]
    d = [p.grad.detach() for p in params]
    if decay != 0:
        d = torch._foreach_add(d, torch._foreach_mul(ws, decay))
    if momentum:
        ms = [s["momentum_buffer"] for s in states]
        torch._foreach_mul_(ms, momentum)
        for m in ms:
            _q(m, mf)
        torch._foreach_add_(ms, d)
        for m in ms:
            _q(m, mf)
        d = torch._foreach_add(d, torch._foreach_mul(ms, momentum)) if group["nesterov"] else ms
    u = torch._foreach_mul(d, -lr)
    if mode == "kahan":
        cs = [s["compensation"] for s in states]
        float_c = isinstance(cf, FloatFormat)
        y = torch._foreach_sub(u, cs)
        if float_c:
            for v in y:
                _q(v, cf)
        t = torch._foreach_add(ws, y)
        for v in t:
            _q(v, wf)
        z = torch._foreach_sub(t, ws)
        if diag:
            for state, uu, zz in zip(states, u, z, strict=True):
                _count(state, uu, zz)
        if float_c:
            for v in z:
                _q(v, cf)
        torch._foreach_sub_(z, y)
        for v, c in zip(z, cs, strict=True):
            _q(v, cf, out=c)
    else:
        t = torch._foreach_add(ws, u)
        rounding = "nearest" if mode == "plain" else "stochastic"
        for v in t:
            _q(v, wf, rounding=rounding, generator=generator)
        if diag:
            z = torch._foreach_sub(t, ws)
            for state, uu, zz in zip(states, u, z, strict=True):
                _count(state, uu, zz)
    if diag:
        torch._foreach_add_([s["intended"] for s in states], u)
    torch._foreach_copy_(ws, t)


# --- C path ----------------------------------------------------------------------------------
#
# lpcli/_kernels.c carries _single_step over in C, operation for operation and with the same
# quantizers as formats.quantize, in blocks that stay in cache: one pass over memory per
# tensor. The default on the CPU where the kernels are built; stochastic rounding and
# dynamic fixed point take the eager path.

_KAHAN, _FLOAT_C, _MOMENTUM, _NESTEROV, _DECAY, _DIAG = 1, 2, 4, 8, 16, 32


def _native_specs(group: dict[str, Any]) -> tuple[tuple, tuple, tuple] | None:
    """The C kernels' specs of the weight, compensation and momentum formats, or None."""
    if group["mode"] == "stochastic":
        return None
    specs = tuple(native_spec(group[key]) for key in ("weight_format", "comp_format", "momentum_format"))
    return None if None in specs else specs


def _native_step(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], diag: bool,
                 specs: tuple[tuple, tuple, tuple]) -> bool:
    """One tensor's step in C; False (nothing done) where the tensors do not suit it."""
    w, g = p.detach(), p.grad.detach()
    buffers = [state[key] for key in ("momentum_buffer", "compensation", "intended") if key in state]
    if not (w.device.type == "cpu" and all(t.dtype == torch.float32 and t.is_contiguous() for t in (w, g, *buffers))):
        return False
    kahan = group["mode"] == "kahan"
    flags = ((_KAHAN if kahan else 0) | (_FLOAT_C if kahan and isinstance(group["comp_format"], FloatFormat) else 0)
             | (_MOMENTUM if group["momentum"] else 0) | (_NESTEROV if group["nesterov"] else 0)
             | (_DECAY if group["weight_decay"] else 0) | (_DIAG if diag else 0))
    addresses = [t.data_ptr() for t in (w, g)]
    addresses += [state[key].data_ptr() if key in state else 0 for key in ("momentum_buffer", "compensation")]
    addresses += [state["intended"].data_ptr() if diag else 0]
    wspec, cspec, mspec = specs

    def run(start: int, count: int) -> tuple[int, int]:
        at = [a + 4 * start if a else 0 for a in addresses]
        return formats._kernels.step(*at, count, group["lr"], group["momentum"], group["weight_decay"], flags,
                             wspec, cspec, mspec)

    counts = in_pieces(run, w.numel())
    if diag:
        moved, lost = sum(c[0] for c in counts), sum(c[1] for c in counts)
        state["step_moved"].fill_(moved)
        state["step_lost"].fill_(lost)
        state["moved"].add_(moved)
        state["lost"].add_(lost)
    return True


# --- compiled path ---------------------------------------------------------------------------
#
# The fused step is written with plain torch operations and inline rounding (the same
# operations formats.quantize uses for these formats: clamp, + C, - C for fixed point; a
# cast for bf16/fp16), so compiled and eager give the same bits. Format parameters, lr,
# momentum and decay are passed as 0-d tensors: one compiled graph serves every layer
# and every learning rate of a kind.


_FUSE_MIN = 4096  # smaller tensors take the eager step: same bits, no compilation for their shapes


def _kind(fmt: Format) -> str | None:
    if isinstance(fmt, Float32):
        return "fp32"
    if isinstance(fmt, FixedPoint) and fmt.width <= 23:
        return "fixed"
    if fmt == FloatFormat(8, 7):
        return "bf16"
    if fmt == FloatFormat(5, 10):
        return "fp16"
    return None


def _fused_key(group: dict[str, Any], diag: bool) -> tuple | None:
    if group["mode"] == "stochastic":
        return None
    kinds = tuple(_kind(group[k]) for k in ("weight_format", "comp_format", "momentum_format"))
    if None in kinds:
        return None
    if group["mode"] != "kahan":
        kinds = (kinds[0], "fp32", kinds[2])
    return (*kinds, group["mode"] == "kahan", group["momentum"] != 0, group["nesterov"],
            group["weight_decay"] != 0, diag)


def _fmt_tensor(fmt: Format, device: torch.device) -> torch.Tensor:
    """(lo, hi, C) for fixed point; unused zeros otherwise."""
    if isinstance(fmt, FixedPoint):
        values = [fmt.min_value, fmt.max_value, 1.5 * 2.0**23 * fmt.step]
    else:
        values = [0.0, 0.0, 0.0]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _inline_q(x: torch.Tensor, kind: str, spec: torch.Tensor) -> torch.Tensor:
    if kind == "fixed":
        return (torch.minimum(torch.maximum(x, spec[0]), spec[1]) + spec[2]) - spec[2]
    if kind == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    if kind == "fp16":
        return x.to(torch.float16).to(torch.float32)
    return x


def _make_fused(key: tuple) -> Callable:
    wk, ck, mk, kahan, has_momentum, nesterov, has_decay, diag = key
    float_c = ck in ("bf16", "fp16")

    def fused(w, g, m, c, intended, scalars, wspec, cspec, mspec):
        lr, momentum, decay = scalars[0], scalars[1], scalars[2]
        d = g + w * decay if has_decay else g
        if has_momentum:
            m_new = _inline_q(_inline_q(m * momentum, mk, mspec) + d, mk, mspec)
            m.copy_(m_new)
            d = d + m_new * momentum if nesterov else m_new
        u = d * -lr
        if kahan:
            y = u - c
            if float_c:
                y = _inline_q(y, ck, cspec)
            t = _inline_q(w + y, wk, wspec)
            z = t - w
            zq = _inline_q(z, ck, cspec) if float_c else z
            c.copy_(_inline_q(zq - y, ck, cspec))
        else:
            t = _inline_q(w + u, wk, wspec)
            z = t - w
        if diag:
            # moved and lost in one reduction: moved + lost * 2^32 (a tensor has < 2^31 elements)
            nonzero = u != 0
            counts = (nonzero.to(torch.int64) + (nonzero & (z == 0)).to(torch.int64) * 2**32).sum()
            intended.add_(u)
        else:
            counts = None
        w.copy_(t)
        return counts

    return fused


def _compile_fused(key: tuple) -> Callable | None:
    fused = _make_fused(key)
    # A code object of its own per key, so that each kind counts against dynamo's recompile limit alone.
    code = fused.__code__.replace(co_name=f"kahan_step_{abs(hash(key)):x}")
    fused = types.FunctionType(code, fused.__globals__, code.co_name, fused.__defaults__, fused.__closure__)
    try:
        # emulate_precision_casts: keep every bf16/fp16 round trip (inductor may drop them otherwise)
        return torch.compile(fused, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})
    except Exception as error:  # noqa: BLE001 - any backend failure means: stay eager
        warnings.warn(f"torch.compile unavailable ({error}); using the eager step", stacklevel=3)
        return None


def _fused_tensor(fused: Callable, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                  cache: dict[str, Any], diag: bool) -> None:
    device = p.device
    spec_key = (group["lr"], group["momentum"], group["weight_decay"], group["weight_format"],
                group["comp_format"], group["momentum_format"], str(device))
    if cache.get("key") != spec_key:
        cache.clear()
        cache["key"] = spec_key
        cache["scalars"] = torch.tensor([group["lr"], group["momentum"], group["weight_decay"]],
                                        dtype=torch.float32, device=device)
        for name in ("weight_format", "comp_format", "momentum_format"):
            cache[name] = _fmt_tensor(group[name], device)
    w = p.detach().view(-1)
    flat = lambda key: state[key].view(-1) if key in state else w.new_zeros(0)  # noqa: E731
    counts = fused(w, p.grad.detach().reshape(-1), flat("momentum_buffer"), flat("compensation"),
                        flat("intended"), cache["scalars"], cache["weight_format"], cache["comp_format"],
                        cache["momentum_format"])
    if diag:
        state["step_moved"].copy_(counts % 2**32)
        state["step_lost"].copy_(counts // 2**32)
        state["moved"].add_(state["step_moved"])
        state["lost"].add_(state["step_lost"])
