"""SGD, Adam and AdamW on weights stored in a low-precision format.

Each rule computes the intended update ``u`` of every weight in float32, each line below
one float32 operation after another, each rounded to float32; :mod:`lpcli.store` then
stores ``w + u`` onto the weight format in one of three modes (``plain``, ``stochastic``,
``kahan``: Kahan summation with a compensation in its own format) and counts what the
store lost (:meth:`~lpcli.store.LowPrecisionOptimizer.diagnostics`). Decay and Nesterov
are an explicit multiply then add (two roundings), not an FMA, so that every path (per
tensor, foreach, C, compiled) and the float64 references in the tests agree bit for bit.

**SGD** (:class:`KahanSGD`), ``u = -lr * d`` with::

    d = g + (w * weight_decay)                 # L2 decay folded into the gradient
    m = Q_m(Q_m(m * momentum) + d); d = m      # momentum; buffer starts at zero (optimi's
                                               # convention; torch's first-step copy is equal)
    d = d + (m * momentum)                     # Nesterov only

``Q_m`` is the momentum buffer's format (``momentum_format``; fp32, i.e. none, by
default), applied twice as optimi's bf16 buffer rounds (see NUMERICS.md).

**Adam and AdamW** (:class:`KahanAdam`, :class:`KahanAdamW`) follow torch-optimi's AdamW
(optimi/adam.py, v0.3): the bias correction is folded into the betas, so the moments
hold the bias-corrected averages themselves and are at the gradients' scale from the
first step (at step 1, ``m = g`` and ``v = g*g``)::

    t = t + 1                                  # per tensor, as torch counts (optimi: per group)
    b1 = (beta1**t - beta1) / (beta1**t - 1)   # float64, as optimi.utils.debias_beta;
    b2 = (beta2**t - beta2) / (beta2**t - 1)   # b1, b2, 1 - b1, 1 - b2 then as float32
    d = g + (w * weight_decay)                 # KahanAdam only (L2)
    m = Q_m1((m * b1) + (d * (1 - b1)))        # rounded onto its format once per step,
    v = Q_m2((v * b2) + ((d * d) * (1 - b2)))  # after its update, before use below
    r = m / (sqrt(v) + eps)                    # sqrt correctly rounded (correct_sqrt)
    r = r + (w * weight_decay)                 # KahanAdamW only (decoupled)
    u = r * -lr

``Q_m1``, ``Q_m2`` are ``moment_formats`` (fp32 by default). Decoupled decay is scaled
by lr, ``lr * weight_decay * w`` per step, as optimi's AdamW (its default,
``decouple_lr=False``) and ``torch.optim.AdamW`` apply it; both multiply the weight by
``1 - lr * weight_decay`` before adding the Adam step, which is the same in exact
arithmetic. Here the decay is part of ``u`` instead, so the compensation keeps it and
the diagnostics count it: optimi rounds its decayed bf16 weight outside its Kahan sum,
and a decay below half a bf16 ulp per step never happens there (ours reaches down to the
bf16 compensation's floor, about 2^-9 ulp per step: :mod:`lpcli.store`). ``torch.optim.AdamW``
differs in the bias correction: it stores the biased moments (``m`` starts at
``(1 - beta1) * g`` and ``v`` at ``(1 - beta2) * g*g``, 1000 times below ``g*g`` at
beta2 0.999, which a narrow moment format flushes to zero) and corrects at the step,
``lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``; equal in exact
arithmetic, rounded differently. optimi's defaults are betas (0.9, 0.99) and eps 1e-6;
ours are torch's (0.9, 0.999) and 1e-8.

Paths, bit-identical by construction and by test, chosen once per parameter group (at its
first step, again only when a setting other than ``lr`` changes). On the CPU by default
(``foreach=None``) the whole step runs in C (lpcli/_kernels.c, in blocks of 128 elements
that stay in the L1 cache, so one pass over memory per tensor: the rule's update, then the
one store both rules share) where the kernels are built and the formats allow (not
stochastic rounding, not dynamic fixed point; those take the per-tensor path). Measured on
10M parameters in 20 tensors, one thread (benchmarks/optim.py), it is 5 to 11 times faster
than per tensor and than foreach on the CPU. ``foreach=True`` runs each
operation over all of a group's tensors with ``torch._foreach_*`` (the default on CUDA,
where it saves kernel launches); Adam's moments over the tensors at the same step count.
``foreach=False`` runs the same operations tensor by tensor with torch (the readable
definition the others are tested against). SGD only: ``compile=True`` fuses the step of
each tensor into one loop with ``torch.compile`` (tensors of 4096 elements and more; fixed
point with nearest rounding up to 23 bits, bf16, fp16, fp32; other formats, stochastic
rounding and small tensors take the eager path, with the same bits); if compilation fails
the optimizer warns and stays eager. Compilation takes seconds per kind of group, once.
"""

from __future__ import annotations

import numbers
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import kernels
from .formats import DynamicFixedPoint, FixedPoint, Float32, FloatFormat, Format, element_format
from .kernels import in_pieces, native_spec
from .store import (
    MODES,
    LowPrecisionOptimizer,
    Mode,
    StepPath,
    compensation_format,
    compensation_range,
    store,
    store_foreach,
)
from .store import round_onto as _q

__all__ = ["MODES", "KahanAdam", "KahanAdamW", "KahanSGD", "compensation_format", "debiased_beta"]


class KahanSGD(LowPrecisionOptimizer):
    """SGD whose parameters (float32 tensors) live on the grid of ``weight_format``.

    Args:
        params: parameters or parameter groups; a group may set its own ``lr``,
            ``momentum``, ``weight_decay``, ``nesterov``, ``mode``, ``weight_format``,
            ``comp_format``, ``momentum_format`` and a ``name`` used in diagnostics.
        lr, momentum, weight_decay, nesterov: as in ``torch.optim.SGD`` (no dampening;
            L2 decay added to the gradient, not decoupled).
        weight_format: the storage format of the weights (a format or its spelling).
            The weights are rounded onto it when their group is added.
        comp_format: the compensation's format; derived by :func:`compensation_format`
            when None.
        kahan: kept for compatibility: False means ``mode="plain"``, True ``"kahan"``.
        mode: ``"kahan"`` (default), ``"plain"`` or ``"stochastic"`` (see :mod:`lpcli.store`).
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
            mode = Mode.PLAIN if kahan is False else Mode.KAHAN
        elif kahan is not None and kahan != (mode == Mode.KAHAN):
            raise ValueError(f"kahan={kahan} contradicts mode={mode!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, mode=mode,
                        weight_format=weight_format, comp_format=comp_format, momentum_format=momentum_format,
                        name=None)
        super().__init__(params, defaults, diagnostics=diagnostics, foreach=foreach, seed=seed, generator=generator)
        self.compile = compile
        self._compiled: dict[tuple, Callable | None] = {}
        self._specs: dict[int, dict[str, Any]] = {}  # per group: its scalars and formats as tensors

    def _check_group(self, group: dict[str, Any]) -> None:
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("nesterov needs a momentum above 0")
        super()._check_group(group)
        mf = group["momentum_format"]
        group["momentum_format"] = Float32() if mf is None else element_format(mf)

    def _state_formats(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"momentum_format": str(group["momentum_format"]) if group["momentum"] else None}

    def _state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            if group["momentum"]:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self._store_state(state, p, group)
        return state

    def _choose_backend(self, group: dict[str, Any], device: torch.device) -> tuple[str, Any]:
        if self.compile and (fused := self._fused_for(group)) is not None:
            return StepPath.COMPILED, fused
        return super()._choose_backend(group, device)

    def _native_specs(self, group: dict[str, Any]) -> tuple | None:
        return _native_specs(group, group["momentum_format"])

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        diag, generator = self.diagnostics_on, self.generator
        states = [self._state(p, group) for p in params]
        backend, needs = self._backend(group, params[0].device)
        if backend == StepPath.FOREACH:
            _foreach_step(params, states, group, diag, generator)
            return
        if backend == StepPath.NATIVE:
            _native_steps(params, states, group, diag, needs, generator)
            return
        cache = self._specs.setdefault(id(group), {})
        for p, state in zip(params, states, strict=True):
            if backend == StepPath.COMPILED and p.numel() >= _FUSE_MIN and p.is_contiguous():
                _fused_tensor(needs, p, state, group, cache, diag)
            else:
                _single_step(p, state, group, diag, generator)

    def _fused_for(self, group: dict[str, Any]) -> Callable | None:
        key = _fused_key(group, self.diagnostics_on)
        if key is None:
            return None
        if key not in self._compiled:
            self._compiled[key] = _compile_fused(key)
        return self._compiled[key]


def _single_step(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], diag: bool,
                 generator: torch.Generator) -> None:
    """One tensor, one operation at a time: the readable definition the other paths match."""
    lr, momentum, decay, mf = group["lr"], group["momentum"], group["weight_decay"], group["momentum_format"]
    w, g = p.detach(), p.grad.detach()
    d = g if decay == 0 else g + w * decay
    if momentum:
        m = state["momentum_buffer"]
        _q(m.mul_(momentum), mf)
        _q(m.add_(d), mf)
        d = d + m * momentum if group["nesterov"] else m
    store(w, d * -lr, state, group, diag, generator)


def _foreach_step(params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any], diag: bool,
                  generator: torch.Generator) -> None:
    """All of a group's tensors per operation (torch._foreach_*); rounding stays per tensor."""
    lr, momentum, decay, mf = group["lr"], group["momentum"], group["weight_decay"], group["momentum_format"]
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
    store_foreach(ws, torch._foreach_mul(d, -lr), states, group, diag, generator)


# --- Adam and AdamW ---------------------------------------------------------------------------


def debiased_beta(beta: float, step: int) -> float:
    """``beta * (1 - beta**(t-1)) / (1 - beta**t)`` in optimi's form, in float64: the beta
    that makes a moving average started at zero its own bias-corrected value (0 at step 1)."""
    return (beta**step - beta) / (beta**step - 1)


MomentFormats = Format | str | tuple[Format | str | None, Format | str | None] | None


def _moment_formats(spec: MomentFormats) -> tuple[Format, Format]:
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"moment_formats takes one format or a pair (first, second moment), got {spec!r}")
        first, second = (Float32() if s is None else element_format(s) for s in spec)
        return first, second
    fmt = Float32() if spec is None else element_format(spec)
    return fmt, fmt


class _KahanAdamBase(LowPrecisionOptimizer):
    """Adam's moments and step on the low-precision store; ``decoupled`` picks AdamW's decay."""

    decoupled: bool

    default_weight_decay = 0.0

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        weight_format: Format | str = "fp32",
        comp_format: Format | str | None = None,
        moment_formats: MomentFormats = None,
        *,
        mode: str = Mode.KAHAN,
        diagnostics: bool = True,
        foreach: bool | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if weight_decay is None:
            weight_decay = self.default_weight_decay
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode,
                        weight_format=weight_format, comp_format=comp_format, moment_formats=moment_formats,
                        name=None)
        super().__init__(params, defaults, diagnostics=diagnostics, foreach=foreach, seed=seed, generator=generator)

    def _check_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        group["betas"] = (float(betas[0]), float(betas[1]))
        if not (isinstance(group["eps"], numbers.Real) and group["eps"] >= 0):
            raise ValueError(f"eps must be >= 0, got {group['eps']!r}")
        super()._check_group(group)
        group["moment_formats"] = _moment_formats(group["moment_formats"])

    def _state_formats(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"moment_formats": tuple(str(f) for f in group["moment_formats"])}

    def _state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self._store_state(state, p, group)
        return state

    def _native_specs(self, group: dict[str, Any]) -> tuple | None:
        if any(isinstance(f, DynamicFixedPoint) for f in group["moment_formats"]):
            return None  # its scale is per tensor; the C step rounds blocks
        return _native_specs(group, *group["moment_formats"])

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        diag, generator = self.diagnostics_on, self.generator
        states = [self._state(p, group) for p in params]
        for state in states:
            state["step"] += 1
        backend, specs = self._backend(group, params[0].device)
        if backend == StepPath.FOREACH:
            _adam_foreach(params, states, group, self.decoupled, diag, generator)
            return
        for p, state in zip(params, states, strict=True):
            if backend != StepPath.NATIVE or not _adam_native(p, state, group, self.decoupled, diag, specs):
                _adam_single(p, state, group, self.decoupled, diag, generator)


class KahanAdamW(_KahanAdamBase):
    """AdamW whose parameters (float32 tensors) live on the grid of ``weight_format``.

    Args:
        params: parameters or parameter groups; a group may set its own ``lr``, ``betas``,
            ``eps``, ``weight_decay``, ``mode``, ``weight_format``, ``comp_format``,
            ``moment_formats`` and a ``name`` used in diagnostics.
        lr, betas, eps: as in ``torch.optim.AdamW`` (and its defaults); the bias correction
            is folded into the betas as torch-optimi does (see :mod:`lpcli.optim`).
        weight_decay: decoupled decay, ``lr * weight_decay * w`` per step as in optimi's and
            torch's AdamW, carried in the update ``u`` so that the compensation keeps it
            (default 0.01, torch's; None takes the default).
        weight_format: the storage format of the weights (a format or its spelling).
            The weights are rounded onto it when their group is added.
        comp_format: the compensation's format; derived by :func:`compensation_format`
            when None.
        moment_formats: the formats of the first and second moments (``exp_avg``,
            ``exp_avg_sq``): a pair, or one format for both; None (or None in the pair)
            keeps a moment in float32. Each moment is rounded onto its format once per
            step, right after its update and before the step uses it. The second moment
            holds squared gradients: its range must reach ``g*g`` and its step resolve it,
            or ``sqrt(v) + eps`` falls to ``eps`` and the step grows by ``1/eps``. A moment
            stalls where ``1 - beta`` is below its format's relative rounding: in bf16
            (``2^-9`` to ``2^-8`` of the value) ``v * 0.999`` rounds back to ``v`` on the
            whole grid, so at beta2 0.999 a bf16 ``v`` never decays and moves only on a
            gradient whose square is several times ``v`` (optimi's bf16 moments do the
            same); at beta2 0.99 it does not stall.
        mode: ``"kahan"`` (default), ``"plain"`` or ``"stochastic"`` (see :mod:`lpcli.store`).
        diagnostics: count lost updates and keep the sums behind the lost update mass
            (``u`` includes the decay).
        foreach: True: ``torch._foreach_*`` over a group's tensors; False: torch operations
            tensor by tensor; None (default): foreach on CUDA; on the CPU the moments with
            torch operations on cache-sized pieces and the store in C (the per-tensor path
            where the C store does not apply, and for dynamic fixed-point moments, whose
            scale is per tensor).
        seed, generator: the random source of stochastic rounding (a generator wins; with
            neither, a seed is drawn from torch's global generator). Its state is part of
            :meth:`state_dict`.
    """

    decoupled = True
    default_weight_decay = 0.01


class KahanAdam(_KahanAdamBase):
    """Adam whose parameters (float32 tensors) live on the grid of ``weight_format``.

    The arguments are :class:`KahanAdamW`'s, except ``weight_decay``: L2 decay as in
    ``torch.optim.Adam``, ``weight_decay * w`` added to the gradient before the moments
    (so the moments normalise it with the gradient; default 0).
    """

    decoupled = False


def correct_sqrt(v: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root, as IEEE 754 and the C step's ``sqrtf``
    define it. torch's vectorized float32 ``sqrt`` is not: on an AVX2 CPU (torch 2.13, AMD
    EPYC) 17% of random float32 inputs came out one ulp off. Its float64 ``sqrt`` is
    within one ulp, and the square root of a float32 lies at least two float64 ulps away
    from any point halfway between float32 values, so rounding that to float32 is exact."""
    return v.double().sqrt_().float()


def _adam_single(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], decoupled: bool, diag: bool,
                 generator: torch.Generator) -> None:
    """One tensor, one operation at a time: the definition the other paths match."""
    lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
    mf, vf = group["moment_formats"]
    h1, h2 = (debiased_beta(beta, state["step"]) for beta in group["betas"])
    w, g = p.detach(), p.grad.detach()
    if decay and not decoupled:
        g = g + w * decay
    m, v = state["exp_avg"], state["exp_avg_sq"]
    _q(m.mul_(h1).add_(g * (1 - h1)), mf)
    _q(v.mul_(h2).add_((g * g).mul_(1 - h2)), vf)
    r = correct_sqrt(v).add_(eps)
    torch.div(m, r, out=r)
    if decay and decoupled:
        r.add_(w * decay)
    store(w, r.mul_(-lr), state, group, diag, generator)


def _adam_foreach(params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any], decoupled: bool,
                  diag: bool, generator: torch.Generator) -> None:
    """Each operation over all of a group's tensors (torch._foreach_*); the moments over those
    at the same step count (their betas), the store over all of them in the group's order,
    the order in which stochastic rounding draws its random numbers."""
    ws = [p.detach() for p in params]
    us: dict[int, torch.Tensor] = {}
    same_step: dict[int, list[int]] = {}
    for i, state in enumerate(states):
        same_step.setdefault(state["step"], []).append(i)
    for step, indices in same_step.items():
        updates = _adam_updates_foreach([ws[i] for i in indices], [params[i].grad.detach() for i in indices],
                                        [states[i] for i in indices], group, decoupled, step)
        us.update(zip(indices, updates, strict=True))
    store_foreach(ws, [us[i] for i in range(len(ws))], states, group, diag, generator)


def _adam_updates_foreach(ws: list[torch.Tensor], gs: list[torch.Tensor], states: list[dict[str, Any]],
                          group: dict[str, Any], decoupled: bool, step: int) -> list[torch.Tensor]:
    """The moments' update and ``u`` of tensors at the same step count."""
    lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
    mf, vf = group["moment_formats"]
    h1, h2 = (debiased_beta(beta, step) for beta in group["betas"])
    if decay and not decoupled:
        gs = torch._foreach_add(gs, torch._foreach_mul(ws, decay))
    ms = [s["exp_avg"] for s in states]
    vs = [s["exp_avg_sq"] for s in states]
    torch._foreach_mul_(ms, h1)
    torch._foreach_add_(ms, torch._foreach_mul(gs, 1 - h1))
    for m in ms:
        _q(m, mf)
    squares = torch._foreach_mul(gs, gs)
    torch._foreach_mul_(squares, 1 - h2)
    torch._foreach_mul_(vs, h2)
    torch._foreach_add_(vs, squares)
    for v in vs:
        _q(v, vf)
    r = [correct_sqrt(v) for v in vs]
    torch._foreach_add_(r, eps)
    r = torch._foreach_div(ms, r)
    if decay and decoupled:
        torch._foreach_add_(r, torch._foreach_mul(ws, decay))
    torch._foreach_mul_(r, -lr)
    return r


# --- C path ----------------------------------------------------------------------------------
#
# lpcli/_kernels.c carries _single_step and _adam_single over in C, operation for operation
# and with the same quantizers as kernels.quantize, in blocks that stay in cache: one pass
# over memory per tensor, the rule's update and the store (one store, shared by both rules)
# block by block. The default on the CPU where the kernels are built; stochastic rounding
# and dynamic fixed point take the per-tensor path.

_KAHAN, _FLOAT_C, _MOMENTUM, _NESTEROV, _DECAY, _DIAG, _L2 = 1, 2, 4, 8, 16, 32, 64


def _native_specs(group: dict[str, Any], *state_formats: Format) -> tuple[tuple, ...] | None:
    """The C kernels' specs of the weight, compensation and state formats, or None."""
    if group["mode"] == Mode.STOCHASTIC:
        return None
    specs = tuple(native_spec(fmt) for fmt in (group["weight_format"], group["comp_format"], *state_formats))
    return None if None in specs else specs


def _native_suits(*tensors: torch.Tensor | None) -> bool:
    return all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors if t is not None)


def _native_flags(group: dict[str, Any], diag: bool, *, momentum: bool = False, nesterov: bool = False,
                  decay: bool = False, l2: bool = False) -> int:
    kahan = group["mode"] == Mode.KAHAN
    return ((_KAHAN if kahan else 0) | (_FLOAT_C if kahan and isinstance(group["comp_format"], FloatFormat) else 0)
            | (_MOMENTUM if momentum else 0) | (_NESTEROV if nesterov else 0)
            | (_DECAY if decay else 0) | (_L2 if l2 else 0) | (_DIAG if diag else 0))


def _native_call(kernel: Callable, tensors: tuple[torch.Tensor | None, ...], scalars: tuple[float, ...], flags: int,
                 specs: tuple[tuple, ...], group: dict[str, Any], state: dict[str, Any], diag: bool) -> None:
    """``kernel(*tensors, n, *scalars, flags, *specs, c_lo, c_hi)`` over the tensors (None where
    unused), split among torch's threads for large tensors; the counts go to the state."""
    _native_run(kernel, tensors, scalars, flags, specs, compensation_range(group["comp_format"]), state, diag)


def _native_run(kernel: Callable, tensors: tuple[torch.Tensor | None, ...], scalars: tuple[float, ...], flags: int,
                specs: tuple[tuple, ...], comp_range: tuple[float, float], state: dict[str, Any], diag: bool) -> None:
    n = tensors[0].numel()
    addresses = kernels.addresses(*((t, n) for t in tensors))
    if n < 2 * kernels._PIECE:  # what in_pieces would do, in one call, without its overhead
        counts = kernel(*addresses, n, *scalars, flags, *specs, *comp_range)
        if diag:
            _set_counts(state, *counts)
        return

    def run(start: int, count: int) -> tuple[int, int, int, int]:
        at = [a + 4 * start if a else 0 for a in addresses]
        return kernel(*at, count, *scalars, flags, *specs, *comp_range)

    counts = in_pieces(run, n)
    if diag:
        _set_counts(state, *(sum(c[i] for c in counts) for i in range(4)))


def _set_counts(state: dict[str, Any], moved: int, lost: int, dropped: int = 0, clipped: int = 0) -> None:
    state["step_moved"].fill_(moved)
    state["step_lost"].fill_(lost)
    state["moved"].add_(moved)
    state["lost"].add_(lost)
    if dropped:  # adding 0 changes nothing: two operations saved on most steps
        state["comp_dropped"].add_(dropped)
    if clipped:
        state["comp_saturated"].add_(clipped)


def _native_steps(params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any], diag: bool,
                  specs: tuple[tuple, ...], generator: torch.Generator) -> None:
    """A group's SGD step in C, tensor by tensor (:func:`_single_step` for a tensor that does
    not suit the kernel); what the group's tensors share is worked out once."""
    flags = _native_flags(group, diag, momentum=bool(group["momentum"]), nesterov=group["nesterov"],
                          decay=bool(group["weight_decay"]))
    scalars = (group["lr"], group["momentum"], group["weight_decay"])
    kernel, comp_range = kernels._kernels.sgd_step, compensation_range(group["comp_format"])
    for p, state in zip(params, states, strict=True):
        tensors = (p.detach(), p.grad.detach(), state.get("momentum_buffer"), state.get("compensation"),
                   state.get("intended") if diag else None)
        if _native_suits(*tensors):
            _native_run(kernel, tensors, scalars, flags, specs, comp_range, state, diag)
        else:
            _single_step(p, state, group, diag, generator)


def _adam_native(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], decoupled: bool, diag: bool,
                 specs: tuple[tuple, ...]) -> bool:
    """One tensor's Adam or AdamW step in C, :func:`_adam_single`'s operations in one pass
    over memory; False (nothing done) where the tensors do not suit it."""
    tensors = (p.detach(), p.grad.detach(), state["exp_avg"], state["exp_avg_sq"], state.get("compensation"),
               state.get("intended") if diag else None)
    if not _native_suits(*tensors):
        return False
    decay = group["weight_decay"]
    h1, h2 = (debiased_beta(beta, state["step"]) for beta in group["betas"])
    flags = _native_flags(group, diag, decay=bool(decay and decoupled), l2=bool(decay and not decoupled))
    scalars = (group["lr"], decay, h1, 1 - h1, h2, 1 - h2, group["eps"])
    _native_call(kernels._kernels.adam_step, tensors, scalars, flags, specs, group, state, diag)
    return True


# --- compiled path ---------------------------------------------------------------------------
#
# The fused step is written with plain torch operations and inline rounding (the same
# operations kernels.quantize uses for these formats: clamp, + C, - C for fixed point; a
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
    if group["mode"] == Mode.STOCHASTIC:
        return None
    kinds = tuple(_kind(group[k]) for k in ("weight_format", "comp_format", "momentum_format"))
    if None in kinds:
        return None
    if group["mode"] != Mode.KAHAN:
        kinds = (kinds[0], "fp32", kinds[2])
    return (*kinds, group["mode"] == Mode.KAHAN, group["momentum"] != 0, group["nesterov"],
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
            residue = zq - y
            c_new = _inline_q(residue, ck, cspec)
            c.copy_(c_new)
        else:
            t = _inline_q(w + u, wk, wspec)
            z = t - w
        if diag:
            # two counts per reduction: a + b * 2^32 (a tensor has < 2^31 elements)
            nonzero = u != 0
            counts = (nonzero.to(torch.int64) + (nonzero & (z == 0)).to(torch.int64) * 2**32).sum()
            if kahan:
                out_of_range = (residue > scalars[4]) | (residue < scalars[3])
                comp = ((residue != 0) & (c_new == 0)).to(torch.int64) + out_of_range.to(torch.int64) * 2**32
                counts = torch.stack([counts, comp.sum()])
            else:
                counts = torch.stack([counts, torch.zeros_like(counts)])
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
        cache["scalars"] = torch.tensor([group["lr"], group["momentum"], group["weight_decay"],
                                         *compensation_range(group["comp_format"])], dtype=torch.float32, device=device)
        for name in ("weight_format", "comp_format", "momentum_format"):
            cache[name] = _fmt_tensor(group[name], device)
    w = p.detach().view(-1)
    flat = lambda key: state[key].view(-1) if key in state else w.new_zeros(0)  # noqa: E731
    counts = fused(w, p.grad.detach().reshape(-1), flat("momentum_buffer"), flat("compensation"),
                        flat("intended"), cache["scalars"], cache["weight_format"], cache["comp_format"],
                        cache["momentum_format"])
    if diag:
        state["step_moved"].copy_(counts[0] % 2**32)
        state["step_lost"].copy_(counts[0] // 2**32)
        state["moved"].add_(state["step_moved"])
        state["lost"].add_(state["step_lost"])
        state["comp_dropped"].add_(counts[1] % 2**32)
        state["comp_saturated"].add_(counts[1] // 2**32)
