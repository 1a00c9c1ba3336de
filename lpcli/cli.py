"""The ``lpcli`` command line: a thin skin over the library (parse, call, render)."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from . import __version__
from .cost import CostTable, load_cost_table
from .distributed import is_main_process
from .errors import InputError, Interrupted
from .files import dumps, read_document, write_document
from .formats import ALIASES, MX_ELEMENTS, BlockFormat, FormatError, parse_format
from .plan import Plan, plan_from_document
from .recipe import Recipe, bundled_recipes, load_recipe
from .recommend import Rules, RulesError, recommend
from .report import STATUS_MARK, render_check, render_plan, render_stats
from .results import STATUS_EXIT
from .stats import analyze, validate_stats

try:  # typer >= 0.20 carries click's exceptions under its own base class
    from typer.exceptions import TyperException as CommandLineError
except ImportError:  # older typer runs on click itself
    from click import ClickException as CommandLineError


class OneLineErrors(TyperGroup):
    """Command-line mistakes as one line on stderr (exit 2), like every other bad input."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not (sys.argv[1:] if args is None else args):
            args = ["--help"]
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except typer.Abort:
            code = 130
        except CommandLineError as exc:
            sys.stderr.write(f"error: command line: {' '.join(exc.format_message().split())}\n")
            code = exc.exit_code
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=OneLineErrors,
    help="Precision analysis for training neural networks in limited precision: which bit-widths each layer "
         "needs, where gradients get lost, and a short low-precision training check with Kahan-summed SGD.",
    add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode="rich")
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)

RecipeArg = Annotated[str | None, typer.Argument(
    help="Recipe YAML file, or the name of a bundled recipe "
         f"({', '.join(bundled_recipes())}). Default: digits-mlp.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (where stderr is not a "
                                        "terminal, a progress line every 10 s otherwise, or every "
                                        "LPCLI_PROGRESS_EVERY seconds).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where to run: cpu, cuda (cuda:N) or auto (cuda when "
                                        "available, else cpu).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Training seed (default: the recipe's).",
                                                show_default=False)]
SeedsOpt = Annotated[int | None, typer.Option("--seeds", min=1, max=100, help="Repeat the runs with this many "
                                              "training seeds and pool their paired counts (default: the "
                                              "recipe's check.seeds, else 1).", show_default=False)]
FullOpt = Annotated[bool, typer.Option("--full", help="Show every layer (and every reason) in the tables; "
                                       "without it, long models show the 12 layers that matter most.")]


def _output_opt(what: str) -> Any:
    return Annotated[Path | None, typer.Option(
        "-o", "--output", help=f"Write the {what} here (.json for JSON, else YAML), atomically.",
        show_default=False)]


def handle_errors(command: Callable) -> Callable:
    """Bad input: one line on stderr and exit 2. Ctrl-C: exit 130."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (InputError, FormatError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as stop:
            detail = f": {stop.describe()}" if isinstance(stop, Interrupted) else ""
            sys.stderr.write(f"interrupted{detail}; nothing written\n")
            raise typer.Exit(130) from None
    return wrapper




def _progress_every() -> float:
    """Seconds between progress lines where stderr is not a terminal: 10, or LPCLI_PROGRESS_EVERY."""
    value = os.environ.get("LPCLI_PROGRESS_EVERY", "10")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise InputError("environment", "LPCLI_PROGRESS_EVERY", f"must be a number of seconds >= 0, got {value!r}")
    return seconds


@contextmanager
def progress_bar(bar: bool, quiet: bool = False) -> Iterator[Callable[..., None] | None]:
    """Progress on stderr: a rich bar on a terminal (``bar``: the human output), a line every
    10 s (``LPCLI_PROGRESS_EVERY``) where stderr is not a terminal (a log, CI); nothing when
    ``quiet``."""
    if quiet:
        yield None
        return
    if not stderr.is_terminal:
        yield _progress_lines()
        return
    if not bar:
        yield None
        return
    with Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=True) as rich_bar:
        tasks: dict[str, Any] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = rich_bar.add_task(name, total=total)
            rich_bar.update(tasks[name], completed=done)
        yield update


def _progress_lines() -> Callable[[str, int, int], None]:
    every = _progress_every()
    started = last = time.monotonic()

    def update(name: str, done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every:
            last = now
            sys.stderr.write(f"lpcli: {name}: step {done}/{total}, {now - started:.0f} s elapsed\n")
            sys.stderr.flush()
    return update


def check_output(path: Path | None) -> None:
    """Refuse an unwritable output before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(str(path), "", "is a directory; give a file name for -o/--output")
    if not path.parent.is_dir():
        raise InputError(str(path), "", f"directory {str(path.parent)!r} does not exist")


def emit(doc: dict[str, Any], as_json: bool, output: Path | None, render: Callable[[], None], what: str) -> None:
    if output is not None:
        write_document(output, doc)
    if as_json:
        sys.stdout.write(dumps(doc, as_json=True))
        return
    render()
    if output is not None:
        stdout.print(f"wrote {what} to {output}")


def _stats_for(recipe: Recipe, seed: int | None, show_progress: bool, device: str = "cpu",
               quiet: bool = False) -> dict[str, Any]:
    with progress_bar(show_progress, quiet) as progress:
        return analyze(recipe, seed=seed, progress=progress, device=device)


@app.command("analyze")
@handle_errors
def analyze_command(
    recipe: RecipeArg = None,
    output: _output_opt("stats") = None,
    steps: Annotated[int | None, typer.Option(min=1, help="fp32 steps to observe (default: the recipe's "
                                                 "training.analyze_steps, 50).", show_default=False)] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a few fp32 steps with hooks and write per-layer statistics (the input of recommend)."""
    check_output(output)
    loaded = load_recipe(recipe)
    with progress_bar(not as_json, quiet or not is_main_process()) as progress:
        doc = analyze(loaded, steps=steps, seed=seed, progress=progress, device=device)
    if is_main_process():
        emit(doc, as_json, output, lambda: render_stats(doc, stdout), "stats")


def _rules(kahan: bool, headroom: int, max_bits: int, family: str = "fixed", range_from: str = "p999",
           widths: str | None = None, margin: int = 0, accumulators: bool = False,
           accumulator_chunk: int = 32, objective: str = "bits", mx_resolution: float = Rules.mx_resolution_bits
           ) -> Rules:
    parsed = None
    if widths is not None:
        try:
            parsed = tuple(int(w) for w in widths.replace(" ", "").split(",") if w)
        except ValueError:
            raise InputError("command line", "--widths", f"must be comma-separated integers like 4,8,16, "
                             f"got {widths!r}") from None
    try:
        return Rules(kahan=kahan, headroom_bits=headroom, max_bits=max_bits, family=family, range_from=range_from,
                     widths=parsed, margin=margin, accumulators=accumulators,
                     accumulator_chunk=accumulator_chunk or None, objective=objective,
                     mx_resolution_bits=mx_resolution)
    except RulesError as exc:
        raise InputError("command line", RULE_OPTIONS[exc.field], str(exc)) from None


RULE_OPTIONS = {"family": "--family", "range_from": "--range", "widths": "--widths", "margin": "--margin",
                "accumulator_chunk": "--accumulator-chunk", "objective": "--objective",
                "mx_resolution_bits": "--mx-resolution"}
AccumulatorsOpt = Annotated[bool, typer.Option("--accumulators", help="Also plan the accumulator of each layer's "
                                               "three GEMMs (forward, input gradient, weight gradient) from how "
                                               "their sums grow; train-check then sums in them (slow: every "
                                               "addition is rounded).")]
ChunkOpt = Annotated[int, typer.Option(min=0, help="--accumulators: terms per partial sum before the partial sums "
                                       "are added (0: one sequential sum).")]


def _plan(recipe_arg: str | None, stats_path: Path | None, rules: Rules, seed: int | None,
          show_progress: bool, stats_out: dict[str, Any] | None = None,
          device: str = "cpu", quiet: bool = False, cost: CostTable | None = None) -> tuple[Plan, Recipe | None]:
    """The recommended plan and the recipe (None for a stats file alone); ``stats_out``
    receives the stats the plan came from; ``cost``: the cost table of its estimate."""
    recipe = load_recipe(recipe_arg) if recipe_arg is not None or stats_path is None else None
    if stats_path is not None:
        stats = validate_stats(read_document(stats_path), str(stats_path))
    else:
        stats = _stats_for(recipe, seed, show_progress, device, quiet)
    if stats_out is not None:
        stats_out.update(stats)
    precision = recipe.precision if recipe is not None else None
    return recommend(stats, rules, precision, source=recipe.source if recipe else str(stats_path), cost=cost), recipe


@app.command("recommend")
@handle_errors
def recommend_command(
    recipe: RecipeArg = None,
    stats: Annotated[Path | None, typer.Option(help="Stats file from `lpcli analyze` or your own loop; "
                                                  "without it the recipe is analyzed first.",
                                                  show_default=False)] = None,
    output: _output_opt("plan") = None,
    kahan: Annotated[bool, typer.Option(help="Plan for SGD with Kahan summation (else plain SGD).")] = True,
    family: Annotated[str, typer.Option(help="Number family: fixed (fx<W>.<F>), float (e<E>m<M>fn), mx (MX "
                                        "block formats for each GEMM's operands, float elsewhere), or several "
                                        "(fixed,mx): each layer then takes the family --objective prefers.")
                      ] = "fixed",
    mx_resolution: Annotated[float, typer.Option(min=0.0, max=8.0, help="--family mx: effective resolution bits "
                                                 "each GEMM operand's MX element type must reach (the b of a fixed-"
                                                 "point step rms/2^b as loud as its rounding noise).")
                             ] = Rules.mx_resolution_bits,
    objective: Annotated[str, typer.Option(help="With several families, what the choice minimises: bits (stored), "
                                           "energy (estimated per training step) or memory (traffic per step).")
                         ] = "bits",
    cost: Annotated[Path | None, typer.Option(help="Cost table (YAML) for the energy estimate and --objective: "
                                              "pJ figures of your process (see the README); default 45 nm, "
                                              "Horowitz ISSCC 2014.", show_default=False)] = None,
    range_from: Annotated[str, typer.Option("--range", help="What the range must hold: p999 (the 99.9th "
                                            "percentile; the saturation this predicts is in the reason) or absmax "
                                            "(the largest value seen). Weights always use absmax.")] = "p999",
    headroom: Annotated[int, typer.Option(min=0, max=8, help="Range margin, in bits, above the top the "
                                          "range must hold (p99.9 or the maximum).")] = 1,
    margin: Annotated[int, typer.Option(min=0, max=8, help="Extra resolution bits (fraction or mantissa) on "
                                        "every format.")] = 0,
    widths: Annotated[str | None, typer.Option(help="Widths your hardware has, e.g. 4,8,16: every format is "
                                               "rounded up to one (fixed point keeps its integer bits).",
                                               show_default=False)] = None,
    max_bits: Annotated[int, typer.Option(min=2, max=24, help="Widest format to recommend.")] = 24,
    accumulators: AccumulatorsOpt = False,
    accumulator_chunk: ChunkOpt = 32,
    verify: Annotated[bool, typer.Option("--verify", help="Then train-check the plan and, while the Kahan run "
                                         "is outside the tolerance, widen what the diagnostics blame and retry "
                                         "(needs a recipe).")] = False,
    rounds: Annotated[int, typer.Option(min=1, max=8, help="--verify: at most this many widening rounds.")] = 4,
    tolerance: Annotated[float, typer.Option(min=0.0, help="--verify: pass when the Kahan run's accuracy "
                                             "loss against fp32 is within this many points (the upper bound of "
                                             "its 95% interval).")] = 1.0,
    seeds: SeedsOpt = None,
    seed: SeedOpt = None,
    full: FullOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Recommend a format for every layer and tensor, each with its reason, and the softmax widths.

    With --verify, exits by the final verdict on the test set: 0 passed, 1 failed,
    3 inconclusive (the test set cannot tell).
    """
    check_output(output)
    if verify and recipe is None and stats is not None:
        raise InputError("command line", "--verify", "needs a recipe to train (a stats file alone cannot be "
                         "checked): give RECIPE too")
    rules = _rules(kahan, headroom, max_bits, family, range_from, widths, margin, accumulators, accumulator_chunk,
                   objective, mx_resolution)
    table = load_cost_table(cost) if cost is not None else None
    used: dict[str, Any] = {}
    plan, loaded = _plan(recipe, stats, rules, seed, not as_json, used, quiet=quiet, cost=table)
    if not verify:
        emit(plan.document(), as_json, output, lambda: render_plan(plan, stdout, full), "plan")
        return
    from .verify import verify as verify_plan

    assert loaded is not None
    with progress_bar(not as_json, quiet) as progress:
        plan, section = verify_plan(loaded, plan, used, tolerance=tolerance, rounds=rounds, max_bits=rules.widest,
                                    seed=seed, seeds=seeds, progress=progress, cost=table)
    doc = {**plan.document(), "verify": section}
    emit(doc, as_json, output, lambda: (render_plan(plan, stdout, full), _render_verify(section)), "plan")
    raise typer.Exit(STATUS_EXIT[section["final"]["status"]])


def _render_verify(section: dict[str, Any]) -> None:
    """One line per verify round on the validation split (verdict, bits) and what it
    widened, then the final verdict on the test set."""
    validation = section["validation"]
    stdout.print(f"verify: widening decided on {validation['examples']} of the {validation['of_training_examples']} "
                 "training examples held out; the final verdict on the test set", highlight=False)
    for entry in section["rounds"]:
        stdout.print(f"round {entry['round']} (validation): {_outcome_line(entry)}", highlight=False)
        for c in entry["widened"]:
            stdout.print(f"  widen {c['layer']} {c['tensor']}: {c['from']} -> {c['to']} ({c['why']})", highlight=False)
        if entry.get("stopped"):
            stdout.print(f"  stopped: {entry['stopped']}", highlight=False)
    final = section["final"]
    stdout.print(f"{STATUS_MARK[final['status']]} on the test set after {section['widenings']} widening round(s): "
                 f"{final['verdict']}; final plan {final['overall_bits']:.2f} bits per stored element, "
                 f"{final['vs_16bit']:.0%} of uniform 16-bit", highlight=False)


def _outcome_line(entry: dict[str, Any]) -> str:
    gap = "diverged" if entry["gap_points"] is None else f"gap {entry['gap_points']:+.2f} pt"
    interval = "" if entry["loss_interval"] is None else (
        f", loss interval [{entry['loss_interval'][0]:.2f}, {entry['loss_interval'][1]:.2f}]")
    return (f"Kahan {_acc(entry['kahan_accuracy'])} vs fp32 {_acc(entry['fp32_accuracy'])} ({gap}{interval}), "
            f"{entry['overall_bits']:.2f} bits/element ({entry['vs_16bit']:.0%} of 16-bit): {entry['status']}")


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


@app.command("train-check")
@handle_errors
def train_check_command(
    recipe: RecipeArg = None,
    plan_path: Annotated[Path | None, typer.Option("--plan", help="Plan file (from `lpcli recommend`); "
                                                      "without it one is recommended first.",
                                                      show_default=False)] = None,
    output: _output_opt("report") = None,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Pass when the Kahan run's accuracy loss against "
                                             "fp32 is within this many points: the upper bound of its 95% "
                                             "interval (paired, pooled over the seeds).")] = 1.0,
    seeds: SeedsOpt = None,
    weight_bits: Annotated[int | None, typer.Option(min=2, max=24, help="Probe: every weight format at this "
                                                       "width (same range, fewer or more fraction bits).",
                                                       show_default=False)] = None,
    activation_bits: Annotated[int | None, typer.Option(min=2, max=24, help="Probe: activations (and the "
                                                           "softmax input) at this width.",
                                                           show_default=False)] = None,
    error_bits: Annotated[int | None, typer.Option(min=2, max=24, help="Probe: errors (and the softmax "
                                                      "error) at this width.", show_default=False)] = None,
    grad_bits: Annotated[int | None, typer.Option(min=2, max=24, help="Probe: weight gradients at this width.",
                                                     show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps (default: the recipe's).",
                                              show_default=False)] = None,
    stochastic: Annotated[bool, typer.Option("--stochastic", help="Add a fourth run: plain low-precision SGD "
                                             "with stochastic rounding of the weight update.")] = False,
    accumulators: AccumulatorsOpt = False,
    accumulator_chunk: ChunkOpt = 32,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw PNG figures into this directory: loss "
                                              "curves, per-layer diagnostics, plan widths (needs matplotlib: "
                                              "pip install 'lpcli[plot]').", show_default=False)] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "cpu",
    full: FullOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train fp32, plain low-precision SGD and Kahan low-precision SGD side by side and report the diagnostics.

    Exits by the verdict: 0 passed (the upper bound of the 95% interval of the accuracy
    loss is within the tolerance), 1 failed (its lower bound is above it, or a run
    diverged), 3 inconclusive (the test set cannot tell; the verdict says how much more
    evidence would). Exit 2 is bad input.
    """
    check_output(output)
    if plan_path is not None and accumulators:
        raise InputError("command line", "--accumulators", "plans accumulators when no --plan is given; with a "
                         "plan file, put them in the plan (recommend --accumulators)")
    from .check import train_check

    if plot is not None:
        from .plots import check_available

        check_available(plot)
    main = is_main_process()
    loaded = load_recipe(recipe)
    if plan_path is not None:
        plan = plan_from_document(read_document(plan_path), str(plan_path))
    else:
        rules = Rules(accumulators=accumulators, accumulator_chunk=accumulator_chunk or None)
        plan, _ = _plan(recipe, None, rules, seed, not as_json, device=device, quiet=quiet or not main)
        plan = Plan(**{**plan.__dict__, "reasons": {}})
    for tensor, width in (("weight", weight_bits), ("activation", activation_bits), ("error", error_bits),
                          ("weight_grad", grad_bits)):
        if width is not None:
            plan = plan.with_fraction_bits(tensor, width)
    with progress_bar(not as_json, quiet or not main) as progress:
        report = train_check(loaded, plan, tolerance=tolerance, seed=seed, steps=steps,
                             plan_source=str(plan_path or "plan"), progress=progress, stochastic=stochastic,
                             device=device, seeds=seeds)
    if main:
        emit(report.document(), as_json, output, lambda: render_check(report, stdout, full), "report")
        if plot is not None:
            from .plots import plot_check, plot_plan

            figures = plot_check(report, plot) + plot_plan(report.plan, plot)
            if not as_json:
                stdout.print(f"wrote {len(figures)} figures to {plot}: {', '.join(f.name for f in figures)}")
    raise typer.Exit(report.verdict.exit_code)


@app.command("formats")
@handle_errors
def formats_command(as_json: JsonOpt = False) -> None:
    """List the number-format spellings with their ranges."""
    examples = ["fx8.7", "fx16.8", "dfx8", "e5m2", "e4m3fn", "e3m4", *(f"mx{e}" for e in MX_ELEMENTS), "mxfp4-e2m1/16"]
    rows = []
    for spec in ["fp32", *ALIASES, *examples]:
        fmt = parse_format(spec)
        block = isinstance(fmt, BlockFormat)
        rows.append({"format": spec, "canonical": str(fmt), "bits": fmt.width,
                     "stored bits": fmt.storage_bits if block else fmt.width,
                     "max": None if block else getattr(fmt, "max_value", None),
                     "smallest step": None if block else getattr(fmt, "step", None),
                     "scaled": "per block" if block else "per tensor"})
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title="Number formats", title_justify="left")
    for col in ("format", "bits", "stored bits", "largest finite", "smallest step"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["format"], str(row["bits"]), f"{row['stored bits']:g}",
                      row["scaled"] if row["max"] is None else f"{row['max']:g}",
                      row["scaled"] if row["smallest step"] is None else f"{row['smallest step']:g}")
    stdout.print(table)
    stdout.print("fx<W>.<F>: W bits with sign, F fraction bits (2 <= W <= 24). dfx<W>: fraction bits per tensor from "
                 "its maximum. e<E>m<M>: IEEE-style float; e<E>m<M>fn: no infinities, saturating. mx<element>[/<B>]: "
                 "OCP MX, blocks of B elements (default 32) sharing an 8-bit power-of-two scale; in a plan, for "
                 "the GEMM operands (input, weight, error), quantized per use along each GEMM's sums.", markup=False)


def version_callback(value: bool) -> None:
    if value:
        stdout.print(f"lpcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for torch (0: torch's default, one per "
                                         "core). The models here are small: one thread is as fast on an idle "
                                         "machine and far faster on a busy one.")] = 1,
) -> None:
    """lpcli: precision analysis for limited-precision training."""
    if threads:
        import torch

        torch.set_num_threads(threads)
