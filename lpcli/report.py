"""Rich tables for the three commands' results (the face; no numerics here)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .plan import TENSORS, Plan


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _pair(values: dict[str, float | None], runs: tuple[str, ...] = ("plain", "kahan")) -> str:
    """'plain / kahan' (or 'plain / kahan / stochastic') percentages."""
    return "/".join("-" if values.get(run) is None else f"{values[run] * 100:.1f}" for run in runs)


def render_stats(doc: dict[str, Any], console: Console) -> None:
    t = doc["training"]
    table = Table(title=f"Layer statistics: {t['steps']} fp32 steps, lr {t['lr']:g}, {doc['classes']} classes",
                  title_justify="left")
    table.add_column("layer")
    table.add_column("tensor")
    for col in ("absmax", "p99", "rms", "zeros"):
        table.add_column(col, justify="right")
    for name, layer in doc["layers"].items():
        label = f"{name} ({layer['module']})" + (" [logits]" if name == doc.get("output_layer") else "")
        for kind in ("weight", "activation", "error", "weight_grad", "update"):
            s = layer[kind]
            table.add_row(label if kind == "weight" else "", kind, _num(s.get("absmax")), _num(s.get("p99")),
                          _num(s.get("rms")), _pct(s.get("zero_share"), 0))
        table.add_section()
    console.print(table)


def render_plan(plan: Plan, console: Console) -> None:
    table = Table(title="Plan", title_justify="left")
    table.add_column("layer")
    for tensor in TENSORS:
        table.add_column(tensor)
    for name, fmts in plan.layers.items():
        label = name + (" [logits]" if name == plan.output_layer else "")
        table.add_row(label, *(str(fmts[t]) for t in TENSORS))
    console.print(table)
    console.print(f"softmax input [bold]{plan.softmax_input}[/]: {plan.reasons.get('softmax_input', '')}",
                  highlight=False)
    console.print(f"softmax error [bold]{plan.softmax_error}[/]: {plan.reasons.get('softmax_error', '')}",
                  highlight=False)
    console.print(f"optimizer: {plan.reasons.get('optimizer', 'Kahan on' if plan.kahan else 'plain SGD')}",
                  highlight=False)
    reasons = Table(title="Reasons", title_justify="left", show_lines=False)
    reasons.add_column("layer")
    reasons.add_column("tensor")
    reasons.add_column("format")
    reasons.add_column("why")
    for name, fmts in plan.layers.items():
        for tensor in TENSORS:
            why = plan.reasons.get(name, {}).get(tensor, "")
            reasons.add_row(name if tensor == "weight" else "", tensor, str(fmts[tensor]), why)
    console.print(reasons)
    summary = plan.summary
    if summary.get("average_bits"):
        avg = summary["average_bits"]
        console.print(
            f"average bits per stored element: weights {_num(avg['weights'])}, activations "
            f"{_num(avg['activations'])}, errors {_num(avg['errors'])}; overall {summary['vs_16bit']:.0%} of "
            f"uniform 16-bit; weights {summary['weight_bytes'] / 1024:.1f} KiB vs "
            f"{summary['weight_bytes_16bit'] / 1024:.1f} KiB at 16 bits", highlight=False)


def _where(report: dict[str, Any]) -> str:
    device = report.get("device") or {}
    if not device:
        return ""
    name = f" ({device['name']})" if device.get("name") else ""
    processes = device.get("processes", 1)
    return f", on {device['type']}{name}" + (f" x {processes} processes" if processes > 1 else "")


def render_check(report: dict[str, Any], console: Console) -> None:
    t = report["training"]
    console.print(f"[bold]{report['recipe']}[/]\n{report['data']['name']} ({report['data']['classes']} classes), "
                  f"{t['steps']} steps, lr {t['lr']:g}, batch {t['batch_size']}, seed {t['seed']}{_where(report)}",
                  highlight=False)
    runs = Table(title="Runs", title_justify="left")
    for col, justify in (("run", "left"), ("test accuracy", "right"), ("gap to fp32", "right"),
                         ("final loss", "right"), ("test loss", "right")):
        runs.add_column(col, justify=justify)
    for name, run in report["runs"].items():
        gap = run.get("gap_to_fp32")
        runs.add_row(name, f"diverged at step {run['diverged_at']}" if run["diverged"] else
                     _pct(run["test_accuracy"], 2),
                     "-" if gap is None else f"{gap * 100:.2f} pt", _num(run["final_loss"]), _num(run["test_loss"]))
    console.print(runs)
    for name, run in report["runs"].items():
        if run["diverged"]:
            where = run["diverged_in"]
            console.print(f"{name}: the first non-finite value appeared in layer {where['layer']}'s "
                          f"{where['tensor']} at step {run['diverged_at']}", highlight=False)

    plan = report["plan"]
    lp_runs = ("plain", "kahan", "stochastic") if "stochastic" in report["runs"] else ("plain", "kahan")
    run_names = " / ".join(lp_runs)
    diag = Table(title=f"Diagnostics per layer, {run_names}, in %", title_justify="left",
                 caption_justify="left")
    columns = {"lost upd.": "lost_updates", "lost mass": "lost_mass", "err. uflow": "error_underflow",
               "grad uflow": "weight_grad_underflow"}
    diag.add_column("layer")
    diag.add_column("weight")
    for col in [*columns, "saturated"]:
        diag.add_column(col, justify="right")
    for name, d in report["diagnostics"].items():
        cells = [_pair(d.get(key, {}), lp_runs) for key in columns.values()]
        saturated = {run: max((d.get(f"{k}_saturated", {}).get(run) or 0.0)
                              for k in ("weight", "activation", "error", "weight_grad")) for run in lp_runs}
        diag.add_row(name, plan["layers"][name]["weight"], *cells, _pair(saturated, lp_runs))
    diag.caption = ("lost upd.: updates that changed nothing; lost mass: share of the summed intended update "
                    "missing from the weights at the end; uflow: non-zero values rounded to zero")
    console.print(diag)
    soft = report["softmax"]
    console.print(
        f"softmax, {'/'.join(lp_runs)}: input {plan['softmax_input']}: logits saturated "
        f"{_pair({r: soft[r]['logits_saturated'] for r in soft}, lp_runs)}%\n"
        f"error {plan['softmax_error']}: non-target errors flushed "
        f"{_pair({r: soft[r]['non_target_errors_flushed'] for r in soft}, lp_runs)}%", highlight=False)
    verdict = report["verdict"]
    mark = "[bold green]PASSED[/]" if verdict["passed"] else "[bold red]FAILED[/]"
    console.print(f"{mark}: {verdict['reason']}", highlight=False)
