"""PNG figures of a train-check report and of a plan (the optional ``plot`` extra:
``pip install 'lpcli[plot]'``).

Figures are drawn on matplotlib's Agg canvas directly, never through ``pyplot``, so
nothing global (the backend, open figures) changes in the caller's process. Each file
is written atomically: a temporary file in the same folder, then a rename. Every
figure has a fixed size in pixels (``FIGSIZE`` at ``DPI``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import write_bytes_atomic
from .formats import Float32
from .plan import TENSORS, Plan
from .results import LOSS_EVERY, CheckReport

DPI = 100
FIGSIZE = (8.0, 4.5)  # inches: 800 x 450 pixels
RUN_COLORS = {"fp32": "#444444", "plain": "#d62728", "kahan": "#1f77b4", "stochastic": "#2ca02c"}


def _figure(rows: int = 1, cols: int = 1, height: float | None = None) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("command line", "--plot", "needs matplotlib: pip install 'lpcli[plot]'") from None
    figure = Figure(figsize=(FIGSIZE[0], height or FIGSIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def check_available(directory: str | Path | None = None) -> None:
    """Fail before any work when figures cannot be drawn: no matplotlib, or ``directory``
    is an existing file (it is created when missing, later)."""
    _figure()
    if directory is not None and Path(directory).exists() and not Path(directory).is_dir():
        raise InputError(str(directory), "", "is a file; --plot needs a directory")


def _directory(directory: str | Path) -> Path:
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise InputError(str(path), "", "is a file; --plot needs a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(str(path), "", f"cannot create the plot directory: {exc.strerror or exc}") from None
    return path


def _save(figure: Any, path: Path) -> Path:
    """PNG at the figure's own size (no tight bounding box: the pixel size stays fixed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_check(report: CheckReport, directory: str | Path, prefix: str = "check") -> list[Path]:
    """Draw a train-check report: ``<prefix>-loss.png`` (each run's training loss) and
    ``<prefix>-diagnostics.png`` (per layer and low-precision run: lost updates, lost update
    mass, error and weight-gradient underflow). Returns the paths written."""
    figure, axes = _figure()  # fails early without matplotlib, before the directory is made
    folder = _directory(directory)
    written = [_save(_loss_figure(figure, axes[0][0], report), folder / f"{prefix}-loss.png")]
    written.append(_save(_diagnostics_figure(report), folder / f"{prefix}-diagnostics.png"))
    return written


def _loss_figure(figure: Any, ax: Any, report: CheckReport) -> Any:
    steps = report.training.steps
    for run, summary in report.runs.items():
        values = summary.loss_curve
        x = [(i + 1) * LOSS_EVERY for i in range(len(values))]
        if x and steps and not summary.diverged and x[-1] > steps:
            x[-1] = steps  # the last point is the last step when steps is not a multiple of LOSS_EVERY
        points = [(a, v) for a, v in zip(x, values, strict=True) if _is_number(v) and v > 0]
        label = run
        if summary.diverged:
            label += f" (diverged at step {summary.diverged_at})"
        elif _is_number(summary.test_accuracy):
            label += f" (test {summary.test_accuracy:.1%})"
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=label, color=RUN_COLORS.get(run))
        else:
            ax.plot([], [], label=label, color=RUN_COLORS.get(run))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (batch)")
    ax.set_title(f"{report.recipe}: {report.data.name}, {steps} steps", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return figure


DIAGNOSTIC_PANELS = (
    ("lost_updates", "lost updates"),
    ("lost_mass", "lost update mass"),
    ("error_underflow", "error underflow"),
    ("weight_grad_underflow", "weight-gradient underflow"),
)


def _diagnostics_figure(report: CheckReport) -> Any:
    diagnostics = report.diagnostics
    layers = list(diagnostics)
    runs = list(report.low_precision_runs)
    figure, axes = _figure(2, 2, height=FIGSIZE[1] * 1.5)
    width = 0.8 / max(1, len(runs))
    for ax, (key, title) in zip(axes.flat, DIAGNOSTIC_PANELS, strict=True):
        for r, run in enumerate(runs):
            values = [diagnostics[layer].get(key, {}).get(run) for layer in layers]
            heights = [100 * v if _is_number(v) else 0.0 for v in values]
            positions = [i + (r - (len(runs) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(positions, heights, width, label=run, color=RUN_COLORS.get(run))
        ax.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 6 else 0, fontsize="small")
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel("%")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle("per layer: plain vs Kahan low-precision SGD", fontsize="medium")
    return figure


def plot_plan(plan: Plan, directory: str | Path, prefix: str = "plan") -> list[Path]:
    """Draw a plan: ``<prefix>-widths.png``, each layer's bit width per tensor role (inputs,
    weights, activations, errors, weight gradients, momentum; fraction bits hatched within fixed-point bars),
    with the softmax input and error formats in the title. Returns the paths written."""
    figure, axes = _figure()
    folder = _directory(directory)
    ax = axes[0][0]
    names: Sequence[str] = list(plan.layers)
    output = plan.output_layer
    width = 0.8 / len(TENSORS)
    tallest = 8
    colors = ("#8c564b", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f", "#17becf", "#bcbd22")
    for t, (tensor, color) in enumerate(zip(TENSORS, colors, strict=True)):
        bits, frac = [], []
        for name in names:
            fmt = plan.layers[name][tensor]
            if name == output and tensor in ("activation", "error"):
                fmt = plan.softmax_input if tensor == "activation" else plan.softmax_error
            bits.append(0 if isinstance(fmt, Float32) else fmt.width)
            frac.append(getattr(fmt, "frac", None))
        positions = [i + (t - (len(TENSORS) - 1) / 2) * width for i in range(len(names))]
        tallest = max(tallest, *bits)
        ax.bar(positions, bits, width, label=tensor, color=color)
        for x, w, f in zip(positions, bits, frac, strict=True):
            if isinstance(f, int) and f > 0:
                ax.bar([x], [min(f, w)], width, fill=False, hatch="//", edgecolor="white", linewidth=0)
    ax.set_xticks(range(len(names)), [f"{n} (out)" if n == output else n for n in names],
                  rotation=30 if len(names) > 6 else 0, fontsize="small")
    ax.set_ylabel("bits (hatched: fraction bits)")
    ax.set_ylim(0, tallest * 1.25)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=4, loc="upper left")
    ax.set_title(f"plan: {plan.classes or '?'} classes, softmax input {plan.softmax_input}, error "
                 f"{plan.softmax_error}", fontsize="medium")
    return [_save(figure, folder / f"{prefix}-widths.png")]
