"""Apply a plan to your own model in your own training loop::

    plan = lpcli.load_plan("plan.yaml")
    with lpcli.Simulation(model, plan) as sim:          # hooks on; removed on exit
        optimizer = sim.optimizer(lr=0.05, momentum=0.9)  # the plan's Kahan SGD over its groups
        for x, y in batches:
            optimizer.zero_grad()
            loss = sim.cross_entropy(model(x), y)       # the simulated softmax loss
            loss.backward()
            optimizer.step()
        print(sim.evaluate(x_test, y_test).accuracy, sim.diagnostics())

Every trainable parameter is stored by the optimizer in a planned format: the one of
the layer whose ``parameters`` list names it, or float32 when the plan lists it in
``keep_fp32``. A parameter in neither is an error (never a silent fp32 fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import optim
from .errors import InputError
from .files import read_document
from .formats import BlockFormat, Float32, Rounding
from .kernels import quantize
from .models import module_name, ownership, trainable_parameters
from .plan import TENSORS, Plan, plan_from_document
from .simulate import NOT_SIMULATED, Simulator, shares
from .store import Mode

KEEP_FP32 = "keep_fp32"  # the optimizer group of the parameters the plan keeps in float32
RULES = {"sgd": "KahanSGD", "adam": "KahanAdam", "adamw": "KahanAdamW"}  # the optimizers in lpcli.optim


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (YAML or JSON) written by ``lpcli recommend``."""
    return plan_from_document(read_document(path), str(path))


@dataclass(frozen=True)
class Groups:
    """The plan's parameters resolved on one model: the tensors each layer stores."""

    layers: dict[str, list[tuple[str, nn.Parameter]]]
    keep_fp32: list[tuple[str, nn.Parameter]]


def resolve(plan: Plan, model: nn.Module, source: str = "plan") -> Groups:
    """Check that ``plan`` fits ``model`` and covers every trainable parameter exactly once."""
    modules = dict(model.named_modules())
    for name in (*plan.layers, *plan.attention):
        if module_name(name) not in modules:
            names = ", ".join(n for n in modules if n) or "none"
            raise InputError(source, f"layers.{name}", f"the model has no layer {name!r} (modules: {names})")
    trainable = trainable_parameters(model)
    owned = ownership(model)
    aliases = owned.tied
    placed: dict[str, str] = {}

    def take(names: list[str], where: str) -> list[tuple[str, nn.Parameter]]:
        out = []
        for pname in names:
            canonical = aliases.get(pname, pname)
            if canonical not in trainable:
                raise InputError(source, where, f"the model has no trainable parameter {pname!r}")
            if canonical in placed:
                raise InputError(source, where, f"parameter {canonical!r} is already stored by {placed[canonical]}")
            placed[canonical] = where
            out.append((canonical, trainable[canonical]))
        return out

    layers = {}
    for name in plan.layers:
        names = plan.parameters.get(name)
        if names is None:  # a plan without parameter lists: the module's own parameters
            names = owned.parameters.get(name, [])
        layers[name] = take(list(names), f"layers.{name}.parameters")
    keep = take(list(plan.keep_fp32), KEEP_FP32)
    missing = [n for n in trainable if n not in placed]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise InputError(source, "layers", f"trainable parameters in no layer's parameters and not in keep_fp32: "
                         f"{shown}; plan them or list them in keep_fp32")
    return Groups(layers, keep)


@dataclass(frozen=True)
class Evaluation:
    """Test accuracy as the simulated hardware predicts (argmax of the rounded softmax
    input, ties to the lowest class index) and from the float32 logits, the simulated
    loss, the share of rows whose top class is tied after rounding, and the predictions
    behind the first."""

    accuracy: float
    accuracy_fp32_logits: float
    loss: float
    tied_rows: float
    predictions: torch.Tensor


class Simulation:
    """The plan attached to ``model``: a context manager that adds every hook on entry and
    removes every one on exit (or call :meth:`attach` / :meth:`detach`).

    ``rounding`` and ``generator`` apply to the activations, errors and gradients
    (``"nearest"`` by default); the optimizer has its own (see :meth:`optimizer`).
    """

    def __init__(self, model: nn.Module, plan: Plan, *, rounding: str = Rounding.NEAREST,
                 generator: torch.Generator | None = None, source: str = "plan") -> None:
        self.model, self.plan = model, plan
        self.rounding, self.generator = rounding, generator
        self.groups = resolve(plan, model, source)
        self.simulator: Simulator | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._fastpath: bool | None = None

    def __enter__(self) -> Simulation:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        if self.simulator is not None:
            return
        plan = self.plan
        self.simulator = Simulator(
            self.model, plan.layers, plan.softmax_input, plan.softmax_error, plan.output_layer,
            rounding=self.rounding, generator=self.generator, zero_sum_error=plan.softmax_error_rows == "zero-sum",
            parameters={name: [p for _, p in params] for name, params in self.groups.layers.items()},
            attention=plan.attention, attention_rows=plan.attention_rows,
            accumulators=plan.gemm_formats(), accumulator_chunk=plan.accumulator_chunk)
        # Fused attention fast paths skip the submodules' hooks: off while simulating.
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def detach(self) -> None:
        if self.simulator is not None:
            self.simulator.remove()
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def _attached(self) -> Simulator:
        if self.simulator is None:
            raise RuntimeError("the simulation is not attached: use it in a `with` block or call attach()")
        return self.simulator

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy through the plan's softmax formats."""
        return self._attached().loss(logits, labels)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The class the hardware picks: argmax of the rounded ``z - max(z)``, ties to the
        lowest index (``torch.argmax`` returns the first maximum)."""
        return self._rounded_logits(logits).argmax(dim=1)

    def _rounded_logits(self, logits: torch.Tensor) -> torch.Tensor:
        shifted = logits - logits.amax(dim=1, keepdim=True)
        return quantize(shifted, self.plan.softmax_input, self.rounding, self.generator)

    def optimizer(self, lr: float, *, rule: str = "sgd", mode: str | None = None, seed: int | None = None,
                  **kwargs: Any) -> torch.optim.Optimizer:
        """The plan's low-precision optimizer over its groups: each layer's parameters in its
        weight format, with its compensation format (the plan's ``optimizer.comp_format``
        instead, when it sets one) and its state formats, and the ``keep_fp32`` parameters
        in float32. ``rule``: ``"sgd"`` (:class:`lpcli.KahanSGD`; the plan's ``momentum``
        holds its buffer), ``"adam"`` or ``"adamw"`` (:class:`lpcli.KahanAdam`,
        :class:`lpcli.KahanAdamW`; ``momentum`` and ``variance`` hold the two moments).
        ``mode`` defaults to the plan's (``kahan`` or ``plain``); other keyword arguments
        (``momentum``, ``betas``, ``weight_decay``, ...) go to the optimizer."""
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        groups: list[dict[str, Any]] = []
        for name, params in self.groups.layers.items():
            if params:
                fmts = self.plan.layers[name]
                state = ({"momentum_format": fmts["momentum"]} if rule == "sgd" else
                         {"moment_formats": (fmts["momentum"], fmts["variance"])})
                groups.append({"params": [p for _, p in params], "weight_format": fmts["weight"], "name": name,
                               "comp_format": self.plan.comp_format or fmts["compensation"], **state})
        if self.groups.keep_fp32:
            groups.append({"params": [p for _, p in self.groups.keep_fp32], "weight_format": Float32(),
                           "name": KEEP_FP32})
        if mode is None:
            mode = Mode.KAHAN if self.plan.kahan else Mode.PLAIN
        self._optimizer = getattr(optim, RULES[rule])(groups, lr=lr, mode=mode, seed=seed, **kwargs)
        return self._optimizer

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> Evaluation:
        """The model in eval mode on ``inputs``, through the simulation (nothing counted)."""
        sim = self._attached()
        was_training, was_recording = self.model.training, sim.recording
        self.model.eval()
        sim.recording = False
        try:
            logits = self.model(inputs)
            rounded = self._rounded_logits(logits)
            predictions = rounded.argmax(dim=1)
            tied = float(((rounded == rounded.amax(dim=1, keepdim=True)).sum(dim=1) > 1).float().mean())
            loss = float(sim.loss(logits, labels))
        finally:
            sim.recording = was_recording
            self.model.train(was_training)
        return Evaluation(
            accuracy=float((predictions == labels).float().mean()),
            accuracy_fp32_logits=float((logits.argmax(dim=1) == labels).float().mean()),
            loss=loss, tied_rows=tied, predictions=predictions)

    def diagnostics(self) -> dict[str, Any]:
        """Per layer and for the softmax, the shares that explain a gap to fp32 (the
        ``diagnostics`` and ``softmax`` of a train-check report, for this one run)."""
        counts = self._attached().counts()
        layers: dict[str, dict[str, float | None]] = {name: {} for name in self.plan.layers}
        if self._optimizer is not None:
            for group in self._optimizer.diagnostics():
                if group["name"] in layers:
                    layers[group["name"]].update(lost_updates=group["lost_updates"], lost_mass=group["lost_mass"],
                                                 weight_flushed=group["weights_flushed_at_start"],
                                                 compensation_dropped=group["compensation_dropped"],
                                                 compensation_saturated=group["compensation_saturated"])
        for name, share in self.weights_at_limit().items():
            layers[name]["weight_saturated"] = share
        for name, tensors in counts["layers"].items():
            for tensor, c in tensors.items():
                share = shares(c)
                layers[name][f"{tensor}_underflow"] = share["underflow"]
                layers[name][f"{tensor}_saturated"] = share["saturated"]
        for name, roles in counts["block_operands"].items():  # MX operands, as the GEMMs took them
            for role, c in roles.items():
                share, exponents = shares(c), c["exponents"]
                layers[name][f"{role}_block_flushed"] = share["underflow"]
                layers[name][f"{role}_saturated"] = share["saturated"]
                layers[name][f"{role}_block_binades"] = (None if exponents is None
                                                         else float(exponents[1] - exponents[0]))
        return {
            "layers": layers,
            "attention": {name: attention_diagnostics(values) for name, values in counts["attention"].items()},
            "accumulators": {name: accumulator_diagnostics(values)
                             for name, values in counts["accumulators"].items()},
            "softmax": {
                "logits_saturated": shares(counts["softmax_input"])["saturated"],
                "non_target_errors_flushed": counts["non_target_flushed"],
                "error_underflow": shares(counts["softmax_error"])["underflow"],
            },
        }

    def weights_at_limit(self) -> dict[str, float | None]:
        """Per layer, the share of stored weights at the format's range limit: weights that
        kept growing and were clipped, so their updates were lost."""
        out: dict[str, float | None] = {}
        for name, params in self.groups.layers.items():
            fmt = self.plan.layers[name]["weight"]
            if not params or not hasattr(fmt, "max_value") or isinstance(fmt, Float32):
                out[name] = None
                continue
            at_limit = sum(int(((p >= fmt.max_value) | (p <= fmt.min_value)).sum()) for _, p in params)
            out[name] = at_limit / sum(p.numel() for _, p in params)
        return out

    def kept_fp32(self) -> list[str]:
        """What the simulated hardware would hold that this simulation leaves in float32:
        the plan's float32 roles and ``keep_fp32`` parameters, the model's buffers, layers
        whose forward never ran, and what the simulator never rounds (see
        :data:`lpcli.simulate.NOT_SIMULATED`)."""
        out = [f"parameter {name} (keep_fp32)" for name, _ in self.groups.keep_fp32]
        seen = self.simulator.seen if self.simulator is not None else {}
        never = set(self.simulator.never_called()) if self.simulator is not None else set()
        for name, fmts in self.plan.layers.items():
            held = self._held_roles(name, seen.get(name, set()))
            roles = [t for t in TENSORS if t in held and isinstance(fmts[t], Float32)]
            if name in never:
                out.append(f"layer {name}: its forward never ran (its parent uses its parameters directly)")
            if roles:
                out.append(f"layer {name}: {', '.join(roles)}")
        buffers = [n for n, b in self.model.named_buffers() if b.is_floating_point()]
        if buffers:
            out.append(f"buffers ({_shorten_list(buffers)})")
        for name, fmts in self.plan.attention.items():
            keys = self.simulator.attention[name].keys if self.simulator is not None else 0
            roles = [role for role, fmt in fmts.items() if isinstance(fmt, Float32)]
            if keys and roles:
                out.append(f"attention in {name}: {', '.join(roles)}")
        out.extend(self._accumulators_kept_fp32())
        blocks = self.simulator.block_operands if self.simulator is not None else {}
        for name, operands in blocks.items():
            if not operands.uses and "called" in seen.get(name, set()):
                roles = [r for r in ("input", "weight", "error") if isinstance(self.plan.layers[name][r], BlockFormat)]
                out.append(f"layer {name}: {', '.join(roles)} never quantized per use (MX): it computed no F.linear "
                           "or F.conv2d on its own weight (an MX weight is still stored on its blocks)")
        if isinstance(self.plan.softmax_input, Float32):
            out.append("softmax input z - max(z)")
        if isinstance(self.plan.softmax_error, Float32):
            out.append("softmax error p - y")
        return out + list(NOT_SIMULATED)

    def _accumulators_kept_fp32(self) -> list[str]:
        """Planned layers whose GEMMs sum in float32: every GEMM of the layers without
        accumulators (one line), the GEMM kinds a layer's accumulator leaves in fp32, and
        layers whose accumulators were planned but saw no F.linear or F.conv2d run."""
        plain = [name for name, params in self.groups.layers.items() if params and name not in self.plan.accumulators]
        out = [f"accumulators of {_shorten_list(plain)}: every GEMM"] if plain else []
        tallies = self.simulator.gemm_tallies if self.simulator is not None else {}
        for name, fmts in self.plan.accumulators.items():
            kinds = [kind for kind, fmt in fmts.items() if isinstance(fmt, Float32)]
            if kinds:
                out.append(f"accumulators of {name}: {', '.join(kinds)}")
            tally = tallies.get(name)
            if tally is not None and len(kinds) < len(fmts) and not tally.as_dict():
                out.append(f"accumulators of {name}: planned, but no F.linear or F.conv2d on its weights ran")
        return out

    def _held_roles(self, layer: str, seen: set[str]) -> set[str]:
        """The roles of ``layer`` that held a value in the runs so far: an input or output
        seen as floating point (the logits' are the softmax's), parameters to store, and
        momentum when the optimizer keeps it."""
        held = set()
        if "input" in seen:
            held.add("input")
        if "output" in seen and layer != self.plan.output_layer and module_name(layer):
            held.update(("activation", "error"))
        if self.groups.layers.get(layer):
            held.update(("weight", "weight_grad"))
            opt = self._optimizer
            if opt is not None and any(g.get("momentum") or "betas" in g for g in opt.param_groups):
                held.add("momentum")
            if opt is not None and any("betas" in g for g in opt.param_groups):
                held.add("variance")
            if opt is not None and any(g["mode"] == Mode.KAHAN for g in opt.param_groups):
                held.add("compensation")
        return held


def attention_diagnostics(counts: dict[str, Any]) -> dict[str, float | None]:
    """One module's attention over a run: the key count, the share of probabilities flushed
    to zero (of the non-zero ones), of softmax inputs saturated, and of errors underflowed."""
    return {
        "keys": counts["keys"],
        "probs_flushed": shares(counts["probs"])["underflow"],
        "probs_saturated": shares(counts["probs"])["saturated"],
        "input_saturated": shares(counts["input"])["saturated"],
        "input_underflow": shares(counts["input"])["underflow"],
        "probs_error_underflow": shares(counts["probs_error"])["underflow"],
        "input_error_underflow": shares(counts["input_error"])["underflow"],
    }


def accumulator_diagnostics(tally: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """One layer's accumulators over a run, per GEMM kind: the share of additions that
    changed nothing (swamped) and that hit the format's range (overflow), and the variance
    retention ratio (variance of the accumulated sums over that of the exact sums)."""
    return {kind: {"swamped": c["swamped"] / c["additions"] if c["additions"] else None,
                   "overflow": c["saturated"] / c["additions"] if c["additions"] else None,
                   "retention": c["retention"]}
            for kind, c in tally.items()}


def _shorten_list(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")

