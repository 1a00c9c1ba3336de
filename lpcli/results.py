"""What train-check finds, as small dataclasses with ``.document()`` (their JSON/YAML
form) like :class:`lpcli.plan.Plan`: the face renders them, verify and plots read
their fields, and the file form is written from them alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .paired import PairedCounts
from .plan import Plan
from .recipe import Training

LOSS_EVERY = 25  # the loss curve keeps every 25th step's batch loss (and the last)


@dataclass(frozen=True)
class Location:
    """Where a value first became NaN or inf: a layer (or ``"loss"``) and a tensor role."""

    layer: str
    tensor: str


@dataclass(frozen=True)
class RunSummary:
    """One training run of a train-check. Accuracies are shares in [0, 1]; None when the
    run diverged. ``gap_to_fp32`` and ``weights_saturated_at_start`` belong to the
    low-precision runs."""

    test_accuracy: float | None
    test_accuracy_fp32_logits: float | None
    test_loss: float | None
    final_loss: float | None  # mean batch loss over the last tenth of the steps (at most 50)
    loss_curve: list[float]
    diverged_at: int | None = None
    diverged_in: Location | None = None
    test_balanced_accuracy: float | None = None  # on imbalanced data only
    low_precision: bool = False
    gap_to_fp32: float | None = None
    weights_saturated_at_start: int | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def divergence(self) -> str:
        where = self.diverged_in
        return f"diverged at step {self.diverged_at} (first non-finite: layer {where.layer} {where.tensor})"

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"test_accuracy": self.test_accuracy,
                               "test_accuracy_fp32_logits": self.test_accuracy_fp32_logits}
        if self.test_balanced_accuracy is not None:
            doc["test_balanced_accuracy"] = self.test_balanced_accuracy
        doc.update({
            "test_loss": self.test_loss,
            "final_loss": self.final_loss,
            "diverged": self.diverged,
            "diverged_at": self.diverged_at,
            "diverged_in": None if self.diverged_in is None else {"layer": self.diverged_in.layer,
                                                                   "tensor": self.diverged_in.tensor},
            "loss_curve": {"every": LOSS_EVERY, "values": list(self.loss_curve)},
        })
        if self.low_precision:
            doc["weights_saturated_at_start"] = self.weights_saturated_at_start
            doc["gap_to_fp32"] = self.gap_to_fp32
        return doc


@dataclass(frozen=True)
class DataSummary:
    name: str
    classes: int
    train: int
    test: int
    notes: tuple[str, ...] = ()
    imbalanced: bool = False

    def document(self) -> dict[str, Any]:
        return {"name": self.name, "classes": self.classes, "train": self.train, "test": self.test,
                "notes": list(self.notes), "imbalanced": self.imbalanced}


def training_document(t: Training) -> dict[str, Any]:
    """The settings a check trained with: the update rule's and the schedule's own."""
    doc: dict[str, Any] = {"optimizer": t.optimizer, "lr": t.lr}
    doc.update({"momentum": t.momentum} if t.optimizer == "sgd" else {"betas": list(t.betas), "eps": t.eps})
    doc.update({"weight_decay": t.weight_decay, "batch_size": t.batch_size, "steps": t.steps, "seed": t.seed,
                "schedule": t.schedule, "warmup_steps": t.warmup_steps})
    if t.schedule == "cosine":
        doc["min_lr"] = t.min_lr
    if t.schedule == "step":
        doc.update(step_every=t.step_every, gamma=t.gamma)
    return doc


STATUS_EXIT = {"passed": 0, "failed": 1, "inconclusive": 3}  # exit 2 stays bad input
INTERVAL_METHOD = "Newcombe's hybrid score interval for paired proportions (method 10), 95%"


@dataclass(frozen=True)
class SeedResult:
    """One seed's paired outcome: its test accuracies and its 2x2 table."""

    seed: int
    fp32_accuracy: float | None
    kahan_accuracy: float | None
    counts: PairedCounts  # a diverged run ends the verdict before its seed is listed

    def document(self) -> dict[str, Any]:
        return {"seed": self.seed, "fp32_accuracy": self.fp32_accuracy, "kahan_accuracy": self.kahan_accuracy,
                "discordant": _discordant(self.counts)}


@dataclass(frozen=True)
class Verdict:
    """Is the Kahan run's accuracy loss against fp32 within the tolerance? Decided on the
    paired counts (:mod:`lpcli.paired`) pooled over ``seeds``: ``passed`` when the upper
    bound of the 95% interval of the loss is at most the tolerance, ``failed`` when its
    lower bound is above it (or a run diverged), ``inconclusive`` otherwise, with
    ``needed`` the factor of test examples (or seeds) that would settle it at the observed
    rates (None: none within 1000)."""

    status: str
    tolerance_points: float
    reason: str
    counts: PairedCounts | None = None
    interval_points: tuple[float, float] | None = None  # the loss fp32 - Kahan, in accuracy points
    seeds: tuple[SeedResult, ...] = ()
    needed: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def exit_code(self) -> int:
        return STATUS_EXIT[self.status]

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": self.status, "passed": self.passed, "tolerance_points": self.tolerance_points,
                               "reason": self.reason}
        if self.counts is not None:
            c = self.counts
            doc.update({
                "test_examples": c.n,
                "discordant": _discordant(c),
                "concordant": {"both_right": c.both, "both_wrong": c.neither},
                "loss_points": float(c.loss) * 100,
                "loss_interval": list(self.interval_points),
                "interval_method": INTERVAL_METHOD,
            })
        if self.status == "inconclusive":
            doc["evidence_needed"] = self.needed
        doc["seeds"] = [s.document() for s in self.seeds]
        return doc


def _discordant(c: PairedCounts) -> dict[str, int]:
    return {"fp32_only": c.reference_only, "kahan_only": c.other_only}


@dataclass(frozen=True)
class CheckReport:
    """A train-check: the runs side by side, the diagnostics that explain their gaps, what
    stayed float32 and the verdict.

    ``diagnostics[layer][key][run]`` and ``softmax[run][key]`` are shares in [0, 1] (None
    where nothing was counted), for the low-precision runs: keys ``lost_updates``,
    ``lost_mass``, ``weight_saturated`` and ``<role>_underflow`` / ``<role>_saturated``;
    softmax ``logits_saturated``, ``non_target_errors_flushed``, ``error_underflow`` and
    ``test_rows_tied``. ``attention[module][key][run]``: each attention module's ``keys``
    (the most keys a row had) and shares ``probs_flushed``, ``probs_saturated``,
    ``input_saturated``, ``input_underflow``, ``probs_error_underflow``,
    ``input_error_underflow`` (see :func:`lpcli.simulation.attention_diagnostics`).
    ``accumulators[layer][gemm][key][run]``: per planned accumulator and GEMM kind, the
    shares ``swamped`` and ``overflow`` of its additions and the variance ``retention``
    ratio (see :func:`lpcli.simulation.accumulator_diagnostics`).
    """

    recipe: str
    data: DataSummary
    training: Training  # the recipe's, with the steps and seed of this check
    device: dict[str, Any]
    plan: Plan
    runs: dict[str, RunSummary]
    diagnostics: dict[str, dict[str, dict[str, float | None]]]
    softmax: dict[str, dict[str, float | None]]
    kept_fp32: list[str]
    verdict: Verdict
    seconds: dict[str, float] = field(default_factory=dict)
    attention: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    accumulators: dict[str, dict[str, dict[str, dict[str, float | None]]]] = field(default_factory=dict)

    @property
    def low_precision_runs(self) -> tuple[str, ...]:
        return tuple(name for name, run in self.runs.items() if run.low_precision)

    def document(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "data": self.data.document(),
            "training": training_document(self.training),
            "device": self.device,
            "plan": self.plan.document(),
            "runs": {name: run.document() for name, run in self.runs.items()},
            "diagnostics": self.diagnostics,
            "softmax": self.softmax,
            "attention": self.attention,
            "accumulators": self.accumulators,
            "kept_fp32": list(self.kept_fp32),
            "verdict": self.verdict.document(),
            "timing": {"seconds": dict(self.seconds)},
        }
