"""The softmax bound against experiment: sweep the softmax input and error formats.

For N = 10, 100, 1000 Gaussian classes (``lpcli.data``, synthetic) an MLP
``dim-128-N`` is trained with plain fp32 SGD; only the softmax is quantized, through
the real simulator (``lpcli.simulate.Simulator`` with no layers: ``z - max(z)`` and
``p - y`` before the 1/batch mean). Each sweep varies one format with the other in fp32:

* fixed error ``fx<W>.<W-1>`` over W;
* fixed input: over the width W at the recommended integer bits (``fx<W>.<W-I>``), and
  over the integer bits I at the recommended fraction bits (the range);
* float error and input ``e<E>m<M>fn``: over M at the recommended E, and over E at the
  recommended M;

then the recommended input and error formats together, per family. Accuracies are
means over the seeds (model initialization and batch order; the data set is fixed), read
as the hardware would: the argmax of the rounded softmax input, ties to the lowest index
(a coarse input that trains fine can still tie the top classes at inference).
The empirical threshold is the smallest value from which every wider one is within
``--tolerance`` points of fp32; ``<=x`` when the narrowest one tried already is.

    PYTHONPATH=. python benchmarks/softmax_sweep.py                  # all 3 N, 2 seeds: ~4 min on 1 core
    PYTHONPATH=. python benchmarks/softmax_sweep.py --classes 10 --seeds 0

The tasks are sized so that fp32 reaches >= 90% and the classes overlap enough that the
wrong ones must be pushed down (on well-separated classes 3-4 error bits do for any N).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from lpcli.data import Dataset, batch_indices, load_data
from lpcli.formats import FixedPoint, Float32, FloatFormat, Format
from lpcli.kernels import quantize
from lpcli.recommend import Rules, softmax_formats
from lpcli.simulate import Simulator

FP32 = Float32()


@dataclass(frozen=True)
class Task:
    classes: int
    dim: int
    noise: float
    samples: int
    steps: int
    lr: float
    hidden: int = 128
    batch: int = 32


TASKS = {
    10: Task(10, dim=8, noise=0.6, samples=4000, steps=2000, lr=0.1),
    100: Task(100, dim=16, noise=0.7, samples=10000, steps=2000, lr=0.1),
    # 1000 classes: 24 training samples per class and 1500 steps (2 epochs) keep a run ~5 s.
    1000: Task(1000, dim=32, noise=0.8, samples=30000, steps=1500, lr=0.2),
}


def dataset(task: Task) -> Dataset:
    spec = {"name": "synthetic", "classes": task.classes, "dim": task.dim, "samples": task.samples,
            "noise": task.noise, "test_fraction": 0.2, "seed": 1}
    return load_data(spec, f"synthetic-{task.classes}")


def train(task: Task, data: Dataset, softmax_input: Format, softmax_error: Format, seed: int) -> float:
    """Test accuracy after training with only the softmax quantized, read as the hardware
    would: the argmax of the rounded ``z - max(z)``, ties to the lowest index."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(task.dim, task.hidden), nn.ReLU(), nn.Linear(task.hidden, task.classes))
    simulator = Simulator(model, {}, softmax_input, softmax_error)
    optimizer = torch.optim.SGD(model.parameters(), lr=task.lr)
    for index in batch_indices(len(data.y_train), task.batch, task.steps, seed):
        optimizer.zero_grad(set_to_none=True)
        simulator.loss(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
    simulator.remove()
    with torch.no_grad():
        logits = model(data.x_test)
        rounded = quantize(logits - logits.amax(dim=1, keepdim=True), softmax_input)
        return float((rounded.argmax(dim=1) == data.y_test).float().mean())


class Runner:
    """Mean accuracy over the seeds, each (input, error) pair trained once."""

    def __init__(self, task: Task, seeds: list[int]) -> None:
        self.task, self.seeds, self.data = task, seeds, dataset(task)
        self.cache: dict[tuple[str, str], float] = {}

    def __call__(self, softmax_input: Format, softmax_error: Format) -> float:
        key = (str(softmax_input), str(softmax_error))
        if key not in self.cache:
            accs = [train(self.task, self.data, softmax_input, softmax_error, s) for s in self.seeds]
            self.cache[key] = sum(accs) / len(accs)
        return self.cache[key]


def threshold(points: list[tuple[int, float]], fp32: float, tolerance: float) -> str:
    """Smallest x from which every larger x is within ``tolerance`` points of fp32."""
    ok = [(fp32 - acc) * 100 <= tolerance for _, acc in points]
    idx = len(ok)
    while idx > 0 and ok[idx - 1]:
        idx -= 1
    if idx == len(ok):
        return "none"
    return f"<={points[0][0]}" if idx == 0 else str(points[idx][0])


def thr_value(text: str) -> int | None:
    return None if text == "none" else int(text.lstrip("<="))


def fixed(width: int, frac: int) -> Format:
    return FixedPoint(width, frac)


def show(label: str, points: list[tuple[int, float]], rec: int, fp32: float, tol: float, width: int = 34) -> str:
    cells = " ".join(f"{x}{'*' if x == rec else ''}:{acc * 100:.1f}" for x, acc in points)
    thr = threshold(points, fp32, tol)
    print(f"  {label:<{width}} {cells}   threshold {thr}", flush=True)
    return thr


def sweep(classes: int, seeds: list[int], rules: Rules, tol: float, steps: int | None) -> dict:
    task = TASKS[classes]
    if steps:
        task = Task(**{**task.__dict__, "steps": steps})
    run = Runner(task, seeds)
    started = time.perf_counter()
    fp32 = run(FP32, FP32)
    print(f"N={classes}: dim {task.dim}, noise {task.noise}, {task.samples} samples, MLP {task.dim}-{task.hidden}-"
          f"{classes}, {task.steps} steps, batch {task.batch}, lr {task.lr}, seeds {seeds}: fp32 {fp32 * 100:.1f}%",
          flush=True)
    fx_in, _, fx_err, _ = softmax_formats(classes, rules, "fixed")
    fl_in, _, fl_err, _ = softmax_formats(classes, rules, "float")
    result: dict = {"classes": classes, "fp32": fp32, "rec": {}, "thr": {}, "together": {}}

    # fixed point
    widths = range(max(2, fx_err.width - 5), fx_err.width + 3)
    pts = [(w, run(FP32, fixed(w, w - 1))) for w in widths]
    result["thr"]["fixed_error"] = show(f"error fx<W>.<W-1>, W (rec {fx_err})", pts, fx_err.width, fp32, tol)
    integer = fx_in.integer_bits
    widths = range(max(2, integer - 3), fx_in.width + 3)
    pts = [(w, run(fixed(w, w - integer), FP32)) for w in widths]
    result["thr"]["fixed_input"] = show(f"input fx<W>.<W-{integer}>, W (rec {fx_in})", pts, fx_in.width, fp32, tol)
    pts = [(i, run(fixed(max(2, i + fx_in.frac), max(2, i + fx_in.frac) - i), FP32))
           for i in range(2, integer + 2)]
    result["thr"]["fixed_input_int"] = show(f"input int bits I at F={fx_in.frac}", pts, integer, fp32, tol)

    # float
    def fl(exp: int, man: int) -> Format:
        return FloatFormat(exp, man, finite=True)

    for name, rec, place in (("error", fl_err, "error"), ("input", fl_in, "input")):
        def acc(fmt: Format, place: str = place) -> float:
            return run(FP32, fmt) if place == "error" else run(fmt, FP32)
        pts = [(m, acc(fl(rec.exp, m))) for m in range(0, max(rec.man, 2) + 2)]
        man = show(f"{name} e{rec.exp}m<M>fn, M (rec {rec})", pts, rec.man, fp32, tol)
        pts = [(e, acc(fl(e, rec.man))) for e in range(max(1, rec.exp - 2), rec.exp + 2)]
        exp = show(f"{name} e<E>m{rec.man}fn, E", pts, rec.exp, fp32, tol)
        result["thr"][f"float_{name}_man"], result["thr"][f"float_{name}_exp"] = man, exp

    for family, (inp, err) in (("fixed", (fx_in, fx_err)), ("float", (fl_in, fl_err))):
        acc = run(inp, err)
        result["rec"][family] = (inp, err)
        result["together"][family] = acc
        print(f"  recommended {family:<5} {str(inp):>9} + {str(err):<9} together {acc * 100:.1f}% "
              f"({(fp32 - acc) * 100:+.1f} pt below fp32)", flush=True)
    result["seconds"] = time.perf_counter() - started
    print(f"  ({len(run.cache)} settings x {len(seeds)} seeds, {result['seconds']:.0f} s)", flush=True)
    return result


def float_threshold(thr: dict, name: str, rec: FloatFormat) -> int | None:
    """Narrowest width along either float sweep: ``1 + E_rec + M_thr`` or ``1 + E_thr + M_rec``."""
    man, exp = thr_value(thr[f"float_{name}_man"]), thr_value(thr[f"float_{name}_exp"])
    widths = [w for w in (None if man is None else 1 + rec.exp + man, None if exp is None else 1 + exp + rec.man)
              if w is not None]
    return min(widths) if widths else None


def verdicts(r: dict, tol: float) -> dict[str, str]:
    """Sufficient: recommended input and error together within tol of fp32. Tight: each
    recommended width at most 2 bits above the empirical threshold width."""
    out = {}
    fx_in, fx_err = r["rec"]["fixed"]
    fl_in, fl_err = r["rec"]["float"]
    t = r["thr"]
    empirical = {
        "fixed": (thr_value(t["fixed_input"]), thr_value(t["fixed_error"])),
        "float": tuple(float_threshold(t, x, fmt) for x, fmt in (("input", fl_in), ("error", fl_err))),
    }
    for family, (inp, err) in (("fixed", (fx_in, fx_err)), ("float", (fl_in, fl_err))):
        sufficient = (r["fp32"] - r["together"][family]) * 100 <= tol
        thr_in, thr_err = empirical[family]
        tight = all(th is not None and fmt.width <= th + 2 for fmt, th in ((inp, thr_in), (err, thr_err)))
        out[family] = (f"{inp} ({inp.width}b, thr {thr_in}) + {err} ({err.width}b, thr {thr_err}): "
                       f"{r['together'][family] * 100:.1f}%, sufficient {'yes' if sufficient else 'NO'}, "
                       f"tight {'yes' if tight else 'NO'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="override every task's step count")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points of accuracy below fp32")
    parser.add_argument("--input-frac", type=int, default=None, help="Rules.softmax_input_frac to test")
    parser.add_argument("--confidence", type=float, default=None, help="Rules.confidence to test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rules = Rules()
    if args.input_frac is not None:
        rules = Rules(**{**rules.__dict__, "softmax_input_frac": args.input_frac})
    if args.confidence is not None:
        rules = Rules(**{**rules.__dict__, "confidence": args.confidence})
    results = [sweep(n, args.seeds, rules, args.tolerance, args.steps) for n in args.classes]
    print("\nSummary (width in bits; threshold = smallest width from which every wider one is within "
          f"{args.tolerance:g} pt of fp32;\n fixed input: along W at the recommended integer bits; "
          "float: the narrower of "
          "1 + E_rec + M_threshold and 1 + E_threshold + M_rec)")
    for r in results:
        v = verdicts(r, args.tolerance)
        print(f"N={r['classes']:<5} fp32 {r['fp32'] * 100:.1f}%")
        for family in ("fixed", "float"):
            print(f"  {family:<5} {v[family]}")


if __name__ == "__main__":
    main()
