"""Rich tables for the three commands' results (the face; no numerics here)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .formats import Float32
from .plan import TENSORS, Plan
from .results import CheckReport


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _pair(values: dict[str, float | None], runs: tuple[str, ...] = ("plain", "kahan")) -> str:
    """'plain / kahan' (or 'plain / kahan / stochastic') percentages: whole numbers from 10%,
    one decimal below, so a cell stays narrow."""
    return "/".join("-" if values.get(run) is None else _percent(values[run] * 100) for run in runs)


def _percent(value: float) -> str:
    return "0" if value == 0 else f"{value:.0f}" if value >= 9.95 else f"{value:.1f}"


SHOWN_LAYERS = 12  # per-layer tables of longer models show this many rows unless --full
NAME_WIDTH = 24


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """A layer name that fits a column: the start and the end kept, the middle elided."""
    if len(name) <= width:
        return name
    head = (width - 1) // 3
    return f"{name[:head]}…{name[len(name) - (width - 1 - head):]}"


def _shown(names: list[str], full: bool, rank: dict[str, float] | None = None) -> tuple[list[str], int]:
    """The layers a table shows: all with ``full`` or when few; else the ``SHOWN_LAYERS``
    ranked highest by ``rank`` (the first ones without it), kept in model order."""
    if full or len(names) <= SHOWN_LAYERS:
        return names, 0
    order = sorted(names, key=lambda n: -(rank or {}).get(n, 0.0)) if rank else names
    keep = set(order[:SHOWN_LAYERS])
    return [n for n in names if n in keep], len(names) - SHOWN_LAYERS


def _hidden_note(console: Console, hidden: int, what: str) -> None:
    if hidden:
        console.print(f"... {hidden} more layers not shown ({what}); --full shows every layer", highlight=False)


def render_stats(doc: dict[str, Any], console: Console) -> None:
    t = doc["training"]
    table = Table(title=f"Layer statistics: {t['steps']} fp32 steps, lr {t['lr']:g}, {doc['classes']} classes",
                  title_justify="left")
    table.add_column("layer")
    table.add_column("tensor")
    for col in ("absmax", "p99", "rms", "zeros"):
        table.add_column(col, justify="right")
    for name, layer in doc["layers"].items():
        label = f"{short_name(name)} ({layer['module']})" + (" [logits]" if name == doc.get("output_layer") else "")
        kinds = [k for k in ("input", "weight", "activation", "error", "weight_grad", "momentum", "update")
                 if layer.get(k)]
        for index, kind in enumerate(kinds):
            s = layer[kind]
            table.add_row(label if index == 0 else "", kind, _num(s.get("absmax")), _num(s.get("p99")),
                          _num(s.get("rms")), _pct(s.get("zero_share"), 0))
        table.add_section()
    for name, entry in (doc.get("attention") or {}).items():
        label = f"{short_name(name)} ({entry.get('module', '?')}, attention over {entry.get('keys', 0)} keys)"
        roles = [r for r in ("input", "probs", "input_error", "probs_error") if entry.get(r)]
        for index, role in enumerate(roles):
            s = entry[role]
            table.add_row(label if index == 0 else "", ATTENTION_STATS[role], _num(s.get("absmax")),
                          _num(s.get("p99")), _num(s.get("rms")), _pct(s.get("zero_share"), 0))
        table.add_section()
    console.print(table)


ATTENTION_STATS = {"input": "S-rowmax(S)", "probs": "P", "input_error": "dS", "probs_error": "dP"}


ROLE_HEADERS = {"input": "input", "weight": "weight", "activation": "output", "error": "error",
                "weight_grad": "w.grad", "momentum": "mom.", "variance": "var.", "compensation": "comp."}


def render_plan(plan: Plan, console: Console, full: bool = False) -> None:
    table = Table(title="Plan (per layer: the format of each tensor role)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("layer", no_wrap=True)
    # A role float32 in every layer (no momentum, no second moment) is named once, not a column.
    roles = [t for t in TENSORS if any(not isinstance(f[t], Float32) for f in plan.layers.values())]
    for tensor in roles:
        table.add_column(ROLE_HEADERS[tensor], no_wrap=True)
    names, hidden = _shown(list(plan.layers), full)
    for name in names:
        fmts = plan.layers[name]
        label = short_name(name, 18) + (" *" if name == plan.output_layer else "")
        table.add_row(label, *(str(fmts[t]) for t in roles))
    everywhere = [t for t in TENSORS if t not in roles]
    table.caption = "*: the logits (output and error are the softmax's)" + (
        f"; fp32 in every layer: {', '.join(everywhere)}" if everywhere else "")
    table.caption_justify = "left"
    console.print(table)
    _hidden_note(console, hidden, "in model order")
    if plan.tied:
        console.print(f"tied (stored once): {', '.join(f'{a} = {b}' for a, b in plan.tied.items())}",
                      highlight=False)
    if plan.keep_fp32:
        console.print(f"kept in float32: {', '.join(plan.keep_fp32)}", highlight=False)
    console.print(f"softmax input [bold]{plan.softmax_input}[/]: {plan.reasons.get('softmax_input', '')}",
                  highlight=False)
    console.print(f"softmax error [bold]{plan.softmax_error}[/]: {plan.reasons.get('softmax_error', '')}",
                  highlight=False)
    console.print(f"optimizer: {plan.reasons.get('optimizer', 'Kahan on' if plan.kahan else 'plain SGD')}",
                  highlight=False)
    for name, fmts in plan.attention.items():
        formats = ", ".join(f"{role} {fmt}" for role, fmt in fmts.items())
        console.print(f"attention in {name}: {formats}", highlight=False)
    if plan.accumulators:
        console.print(f"accumulators (chunks of {plan.accumulator_chunk or 'the whole'} terms):", highlight=False)
        for name, fmts in plan.accumulators.items():
            console.print(f"  {name}: {', '.join(f'{kind} {fmt}' for kind, fmt in fmts.items())}", highlight=False)
    if full or len(plan.layers) <= 4:
        _render_reasons(plan, console)
    else:
        console.print("reasons for every format: --full, or the plan file (-o)", highlight=False)
    _render_summary(plan, console)


def _render_reasons(plan: Plan, console: Console) -> None:
    reasons = Table(title="Reasons", title_justify="left", show_lines=False)
    reasons.add_column("layer")
    reasons.add_column("tensor")
    reasons.add_column("format")
    reasons.add_column("why")
    for name, fmts in plan.layers.items():
        for tensor in TENSORS:
            why = plan.reasons.get(name, {}).get(tensor, "")
            reasons.add_row(short_name(name) if tensor == TENSORS[0] else "", tensor, str(fmts[tensor]), why)
    for name, fmts in plan.attention.items():
        whys = plan.reasons.get(name, {}).get("attention", {})
        for i, (role, fmt) in enumerate(fmts.items()):
            reasons.add_row(short_name(name) if i == 0 else "", f"attention {role}", str(fmt), whys.get(role, ""))
    for name, fmts in plan.accumulators.items():
        whys = plan.reasons.get(name, {}).get("accumulator", {})
        for i, (kind, fmt) in enumerate(fmts.items()):
            reasons.add_row(short_name(name) if i == 0 else "", f"accumulator {kind}", str(fmt), whys.get(kind, ""))
    console.print(reasons)


def _render_summary(plan: Plan, console: Console) -> None:
    summary = plan.summary
    if summary.get("average_bits"):
        avg = summary["average_bits"]
        console.print(
            f"average bits per stored element: weights {_num(avg['weights'])}, activations "
            f"{_num(avg['activations'])}, errors {_num(avg['errors'])}; overall {summary['vs_16bit']:.0%} of "
            f"uniform 16-bit; weights {summary['weight_bytes'] / 1024:.1f} KiB vs "
            f"{summary['weight_bytes_16bit'] / 1024:.1f} KiB at 16 bits", highlight=False)
    storage = summary.get("storage_bits_per_parameter")
    if storage:
        def parts(point: dict[str, float]) -> str:
            named = [f"{point[k]:.1f} {k}" for k in ("weight", "compensation", "momentum", "variance") if point[k]]
            return f"{point['total']:.1f} ({' + '.join(named)})" if len(named) > 1 else f"{point['total']:.1f}"
        console.print(f"storage bits per parameter: this plan {parts(storage['plan'])}; without Kahan (weights "
                      f"wide enough for the median update) {parts(storage['plain'])}; uniform 16-bit "
                      f"{parts(storage['uniform_16bit'])}", highlight=False)
    cost = summary.get("cost_per_step")
    if cost:
        plan_cost = cost["plan"]
        versus = ", ".join(f"{plan_cost['total_uj'] / cost[p]['total_uj']:.0%} of {label}"
                           for p, label in (("fp32", "fp32"), ("uniform_16bit", "uniform 16-bit"))
                           if cost[p]["total_uj"])
        left = f"; not counted: layers {', '.join(short_name(n) for n in cost['not_counted'])}" \
            if cost["not_counted"] else ""
        console.print(f"estimated per training step (batch {cost['batch']}, {cost['table']}): "
                      f"{plan_cost['total_uj']:.4g} µJ = multiplies {plan_cost['multiply_uj']:.3g} + adds "
                      f"{plan_cost['add_uj']:.3g} + memory {plan_cost['memory_uj']:.4g} "
                      f"({plan_cost['memory_mb']:.3g} MB moved); {versus}{left}", highlight=False)
    families = summary.get("families")
    if families:
        chosen = ", ".join(f"{short_name(u)} {f}" for u, f in families["choice"].items())
        console.print(f"families by {families['objective']}: {chosen}", highlight=False)


def _where(report: CheckReport) -> str:
    device = report.device or {}
    if not device:
        return ""
    name = f" ({device['name']})" if device.get("name") else ""
    processes = device.get("processes", 1)
    return f", on {device['type']}{name}" + (f" x {processes} processes" if processes > 1 else "")


def render_check(report: CheckReport, console: Console, full: bool = False) -> None:
    t, data = report.training, report.data
    schedule = "" if t.schedule == "constant" and not t.warmup_steps else (
        f" ({t.schedule}" + (f", warmup {t.warmup_steps}" if t.warmup_steps else "") + ")")
    console.print(f"[bold]{report.recipe}[/]\n{data.name} ({data.classes} classes), {t.optimizer}, {t.steps} steps, "
                  f"lr {t.lr:g}{schedule}, batch {t.batch_size}, seed {t.seed}{_where(report)}", highlight=False)
    for note in data.notes:
        console.print(f"data: {note}", highlight=False)
    _render_runs(report, console)
    _render_diagnostics(report, console, full)
    _render_softmax(report, console)
    _render_attention(report, console)
    _render_accumulators(report, console)
    if report.kept_fp32:
        console.print("left in float32 (not simulated):", highlight=False)
        for item in report.kept_fp32:
            console.print(f"  - {item}", highlight=False, overflow="fold")
    if len(report.verdict.seeds) > 1:
        _render_seeds(report, console)
    console.print(f"{STATUS_MARK[report.verdict.status]}: {report.verdict.reason}", highlight=False)


STATUS_MARK = {"passed": "[bold green]PASSED[/]", "failed": "[bold red]FAILED[/]",
               "inconclusive": "[bold yellow]INCONCLUSIVE[/]"}


def _render_seeds(report: CheckReport, console: Console) -> None:
    table = Table(title="Seeds (the runs above are the first; the verdict pools all)", title_justify="left")
    for col in ("seed", "fp32", "Kahan", "lost", "gained"):
        table.add_column(col, justify="left" if col == "seed" else "right")
    for s in report.verdict.seeds:
        table.add_row(str(s.seed), _pct(s.fp32_accuracy, 2), _pct(s.kahan_accuracy, 2), str(s.counts.reference_only),
                      str(s.counts.other_only))
    console.print(table)


def _render_runs(report: CheckReport, console: Console) -> None:
    balanced = any(run.test_balanced_accuracy is not None for run in report.runs.values())
    runs = Table(title="Runs (test accuracy: the argmax of the rounded softmax input, as the hardware predicts)",
                 title_justify="left")
    columns = [("run", "left"), ("test acc.", "right"), ("fp32 logits", "right")]
    columns += [("balanced", "right")] if balanced else []
    columns += [("gap to fp32", "right"), ("final loss", "right"), ("test loss", "right")]
    for col, justify in columns:
        runs.add_column(col, justify=justify)
    for name, run in report.runs.items():
        if run.diverged:
            accuracy = [f"diverged at step {run.diverged_at}", "-"] + (["-"] if balanced else [])
        else:
            accuracy = [_pct(run.test_accuracy, 2), _pct(run.test_accuracy_fp32_logits, 2)]
            accuracy += [_pct(run.test_balanced_accuracy, 2)] if balanced else []
        gap = "-" if run.gap_to_fp32 is None else f"{run.gap_to_fp32 * 100:.2f} pt"
        runs.add_row(name, *accuracy, gap, _num(run.final_loss), _num(run.test_loss))
    console.print(runs)
    for name, run in report.runs.items():
        if run.diverged:
            where = run.diverged_in
            console.print(f"{name}: the first non-finite value appeared in layer {where.layer}'s {where.tensor} at "
                          f"step {run.diverged_at}", highlight=False)


DIAGNOSTIC_COLUMNS = {"lost": "lost_updates", "mass": "lost_mass", "err uf": "error_underflow",
                      "grad uf": "weight_grad_underflow"}


def _render_diagnostics(report: CheckReport, console: Console, full: bool) -> None:
    lp_runs = report.low_precision_runs
    diag = Table(title=f"Diagnostics per layer, {' / '.join(lp_runs)}, in %", title_justify="left",
                 caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    diag.add_column("layer", no_wrap=True)
    diag.add_column("weight", no_wrap=True)
    for col in [*DIAGNOSTIC_COLUMNS, "sat"]:
        diag.add_column(col, justify="right", no_wrap=True)
    rank = {name: max([(v.get("kahan") or 0.0) for key, v in d.items() if key != "lost_updates"] or [0.0])
            for name, d in report.diagnostics.items()}
    names, hidden = _shown(list(report.diagnostics), full, rank)
    for name in names:
        d = report.diagnostics[name]
        cells = [_pair(d.get(key, {}), lp_runs) for key in DIAGNOSTIC_COLUMNS.values()]
        saturated = {run: max((d.get(f"{k}_saturated", {}).get(run) or 0.0)
                              for k in ("input", "weight", "activation", "error", "weight_grad")) for run in lp_runs}
        diag.add_row(short_name(name, 20), str(report.plan.layers[name]["weight"]), *cells, _pair(saturated, lp_runs))
    diag.caption = ("lost: updates that changed nothing; mass: share of the summed intended update missing "
                    "from the weights at the end (lost update mass); uf: non-zero errors or weight gradients "
                    "rounded to zero; sat: values saturated (the largest share over the layer's tensors)")
    console.print(diag)
    _hidden_note(console, hidden, "those with the smallest Kahan diagnostics")
    for name in names:
        d = report.diagnostics[name]
        parts = [f"{role} {_pair(d.get(f'{role}_block_flushed', {}), lp_runs)}% flushed, scales over "
                 f"{_binades(d.get(f'{role}_block_binades', {}), lp_runs)} binades"
                 for role in ("input", "weight", "error") if f"{role}_block_flushed" in d]
        if parts:
            console.print(f"block (MX) operands of {short_name(name)}, {' / '.join(lp_runs)}: {'; '.join(parts)}",
                          highlight=False)


def _binades(values: dict[str, float | None], runs: tuple[str, ...]) -> str:
    return "/".join("-" if values.get(run) is None else f"{values[run]:.0f}" for run in runs)


ATTENTION_COLUMNS = {"P flushed": "probs_flushed", "S sat": "input_saturated", "dP uf": "probs_error_underflow",
                     "dS uf": "input_error_underflow"}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _run_table(title: str, columns: tuple[str, ...], left: tuple[str, ...]) -> Table:
    """A compact table of per-run cells: ``left`` columns left-aligned, the others right."""
    table = Table(title=title, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    return table


def _render_attention(report: CheckReport, console: Console) -> None:
    if not report.attention:
        return
    lp_runs = report.low_precision_runs
    table = _run_table(f"Attention per module, {' / '.join(lp_runs)}, in %",
                       ("module", "keys", "P", *ATTENTION_COLUMNS), left=("module", "P"))
    for name, d in report.attention.items():
        keys = max((int(v) for v in d.get("keys", {}).values() if v), default=0)
        table.add_row(short_name(name, 18), str(keys or "-"), str(report.plan.attention[name]["probs"]),
                      *(_pair(d.get(key, {}), lp_runs) for key in ATTENTION_COLUMNS.values()))
    table.caption = ("P: its format; P flushed: non-zero probabilities rounded to zero; S sat: softmax inputs "
                     "S - rowmax(S) saturated; uf: non-zero errors at P (dP) and at the softmax input (dS) rounded "
                     "to zero (the other formats: the plan)")
    console.print(table)


def _render_accumulators(report: CheckReport, console: Console) -> None:
    if not report.accumulators:
        return
    lp_runs = report.low_precision_runs
    table = _run_table(f"Accumulators per layer and GEMM, {' / '.join(lp_runs)}",
                       ("layer", "GEMM", "format", "swamped", "overflow", "retained"), left=("layer", "GEMM", "format"))
    for name, kinds in report.accumulators.items():
        for i, (kind, d) in enumerate(kinds.items()):
            table.add_row(short_name(name, 18) if i == 0 else "", kind, str(report.plan.accumulators[name][kind]),
                          _pair(d.get("swamped", {}), lp_runs), _pair(d.get("overflow", {}), lp_runs),
                          "/".join(_ratio(d.get("retention", {}).get(run)) for run in lp_runs))
    table.caption = (f"chunks of {report.plan.accumulator_chunk or 'the whole'} terms; swamped: additions that "
                     "changed nothing (%); overflow: additions that hit the range (%); retained: the variance of "
                     "the sums over that of the exact sums")
    console.print(table)


def _render_softmax(report: CheckReport, console: Console) -> None:
    lp_runs, soft, plan = report.low_precision_runs, report.softmax, report.plan

    def shares(key: str) -> str:
        return _pair({run: soft[run].get(key) for run in lp_runs}, lp_runs)
    console.print(f"softmax, {'/'.join(lp_runs)}: input {plan.softmax_input}: logits saturated "
                  f"{shares('logits_saturated')}%\nerror {plan.softmax_error}: non-target errors flushed "
                  f"{shares('non_target_errors_flushed')}%", highlight=False)
    if any(soft[run].get("test_rows_tied") is not None for run in lp_runs):
        console.print(f"test rows whose top class ties after rounding: {shares('test_rows_tied')}% (ties go to the "
                      f"lowest index)", highlight=False)
