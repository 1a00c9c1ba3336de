"""The attention bound against experiment: sweep the formats of an attention softmax's P and S - rowmax(S).

For N = 16, 64, 256 keys a one-layer transformer is trained with fp32 Adam on a synthetic
counting task (below); only its attention softmax is quantized, through the real simulator
(``lpcli.simulate.Simulator(..., attention={"attn": ...})``: the probabilities ``P`` and
the softmax input ``S - rowmax(S)``; their errors ``dP``, ``dS`` stay fp32). Each sweep
varies one role with every other role in fp32:

* fixed probs ``fx<W>.<W-1>`` over W;
* fixed input ``fx<W>.<W-I>`` over W at the recommended integer bits I;
* float probs and input ``e<E>m<M>fn``: over M at the recommended E, and over E at the
  recommended M;

then the recommended probs and input together, per family, and (``--rows both``) the fixed
probs sweep and the recommended pairs again with every rounded row of P divided by its sum
(``attention_rows="renormalized"``). The recommendations are ``lpcli.recommend.
recommend_attention`` on the statistics of the first 50 fp32 steps (``lpcli analyze``'s
default) of the same model and task, first seed. Accuracies are means over the seeds
(model initialization and batch order; the data set is fixed per N): the plain argmax of
the logits on the test set, the model in eval mode with the simulator attached. The
empirical threshold is the smallest value from which every wider one is within
``--tolerance`` points of fp32; ``<=x`` when the narrowest one tried already is.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/attention_sweep.py --seeds 0 1 2 3   # README: ~31 min, 1 core
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/attention_sweep.py            # 3 N, 2 seeds: ~14 min
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/attention_sweep.py --keys 64 --seeds 0 --quick   # ~1 min
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/attention_sweep.py --probs-margin 0   # F = ceil(log2 N)

The task: a sequence of N tokens of 4 types, label the most frequent type. The counts are
multinomial with equal type probabilities, kept only where the top type wins by 1 to
ceil(N/32) tokens (1, 2, 8 for N = 16, 64, 256), so no subset of the keys decides: the
model (token and learned position embeddings, one 2-head attention module ``attn`` whose
single learned query attends over the N tokens through ``F.scaled_dot_product_attention``,
a linear classifier on its output) must average over all of them, and it learns a nearly
uniform P, every key ~1/N. 1000 steps of batch 32, Adam at lr 0.01 decayed linearly to 0:
fp32 reaches 100% for every N, a run takes ~2, 2.5, 4.5 s for N = 16, 64, 256 on one thread.
``--probs-margin``, ``--probs-man``, ``--input-frac``, ``--input-man`` set the ``Rules``
fields ``attention_*`` the recommendations are made with.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from softmax_sweep import float_threshold, thr_value
from softmax_sweep import show as show_sweep
from torch import nn

from lpcli.data import batch_indices
from lpcli.formats import FixedPoint, Float32, FloatFormat, Format
from lpcli.recommend import Rules, recommend_attention
from lpcli.simulate import Simulator
from lpcli.stats import StatsCollector

FP32 = Float32()
ANALYZE_STEPS = 50  # lpcli analyze's default (training.analyze_steps)


@dataclass(frozen=True)
class Task:
    keys: int
    types: int = 4
    dim: int = 16
    heads: int = 2
    samples: int = 12000  # 10000 training, 2000 test sequences
    test: int = 2000
    steps: int = 1000
    lr: float = 1e-2  # Adam, decayed linearly to 0 over the steps
    batch: int = 32
    margin: float = 1 / 32  # the top type wins by 1 .. ceil(margin * N) tokens
    position_std: float = 0.1


TASKS = {n: Task(n) for n in (16, 64, 256)}


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def dataset(task: Task, seed: int = 1) -> Data:
    """Token sequences (``samples`` x N, types ``0 .. types-1``) and their most frequent type."""
    generator = torch.Generator().manual_seed(seed)
    most = max(1, math.ceil(task.margin * task.keys))
    xs, ys, have = [], [], 0
    while have < task.samples:
        tokens = torch.randint(task.types, (4096, task.keys), generator=generator)
        counts = F.one_hot(tokens, task.types).sum(dim=1)
        top2 = counts.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        keep = (margin >= 1) & (margin <= most)
        xs.append(tokens[keep])
        ys.append(counts[keep].argmax(dim=1))
        have += int(keep.sum())
    x, y = torch.cat(xs)[:task.samples], torch.cat(ys)[:task.samples]
    return Data(x[task.test:], y[task.test:], x[:task.test], y[:task.test])


class Attention(nn.Module):
    """A learned query (one position) attending over the sequence: q/k/v projections and
    ``F.scaled_dot_product_attention`` (looked up at call time, as the simulator sees it)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(self.query).expand(b, 1, d).reshape(b, 1, h, d // h).transpose(1, 2)
        k = self.k(x).reshape(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, h, 1, d/h): one row of N keys per head
        return out.transpose(1, 2).reshape(b, d)


class Model(nn.Module):
    def __init__(self, task: Task) -> None:
        super().__init__()
        self.embed = nn.Embedding(task.types, task.dim)
        self.position = nn.Parameter(torch.randn(task.keys, task.dim) * task.position_std)
        self.attn = Attention(task.dim, task.heads)
        self.head = nn.Linear(task.dim, task.types)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(tokens) + self.position))


def flushed(counts: dict) -> float:
    """Share of the non-zero probabilities rounded to zero."""
    probs = counts["attention"]["attn"]["probs"]
    return probs["underflow"] / probs["nonzero"] if probs["nonzero"] else 0.0


def train(task: Task, data: Data, formats: dict[str, Format], rows: str, seed: int) -> tuple[float, float, float]:
    """Test accuracy after training with only the attention softmax roles in ``formats``
    quantized, and the share of probabilities flushed to zero in training and at test."""
    torch.manual_seed(seed)
    model = Model(task)
    simulator = Simulator(model, {}, attention={"attn": formats}, attention_rows=rows)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / task.steps)
    for index in batch_indices(len(data.y_train), task.batch, task.steps, seed):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
        schedule.step()
    train_flushed = flushed(simulator.counts())
    simulator.remove()
    model.eval()
    simulator = Simulator(model, {}, attention={"attn": formats}, attention_rows=rows)
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(dim=1) == data.y_test).float().mean())
    test_flushed = flushed(simulator.counts())
    simulator.remove()
    return acc, train_flushed, test_flushed


def statistics(task: Task, data: Data, seed: int) -> dict:
    """The attention stats entry of the first ``ANALYZE_STEPS`` fp32 steps."""
    torch.manual_seed(seed)
    model = Model(task)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    collector = StatsCollector(model, lr=task.lr, optimizer=optimizer, seed=seed)
    for index in batch_indices(len(data.y_train), task.batch, ANALYZE_STEPS, seed):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        collector.step()
        optimizer.step()
    entry = collector.document(task.types)["attention"]["attn"]
    collector.remove()
    return entry


class Runner:
    """Mean accuracy and flushed shares over the seeds, each (input, probs, rows) trained once."""

    def __init__(self, task: Task, seeds: list[int]) -> None:
        self.task, self.seeds, self.data = task, seeds, dataset(task)
        self.cache: dict[tuple[str, str, str], tuple[float, float, float]] = {}

    def results(self, inp: Format, probs: Format, rows: str = "each") -> tuple[float, float, float]:
        key = (str(inp), str(probs), rows)
        if key not in self.cache:
            formats = {role: fmt for role, fmt in (("input", inp), ("probs", probs)) if not isinstance(fmt, Float32)}
            runs = [train(self.task, self.data, formats, rows, s) for s in self.seeds]
            self.cache[key] = tuple(sum(r[i] for r in runs) / len(runs) for i in range(3))
        return self.cache[key]

    def __call__(self, inp: Format, probs: Format, rows: str = "each") -> float:
        return self.results(inp, probs, rows)[0]


def fl(exp: int, man: int) -> FloatFormat:
    return FloatFormat(exp, man, finite=True)


def show(label: str, points: list[tuple[int, float]], rec: int, fp32: float, tol: float) -> str:
    return show_sweep(label, points, rec, fp32, tol, width=38)


def sweep(keys: int, seeds: list[int], rules: Rules, tol: float, steps: int | None, rows: str,
          quick: bool) -> dict:
    task = TASKS[keys]
    if steps:
        task = Task(**{**task.__dict__, "steps": steps})
    run = Runner(task, seeds)
    main_rows = "renormalized" if rows == "renormalized" else "each"
    started = time.perf_counter()
    fp32 = run(FP32, FP32)
    print(f"N={keys}: {task.types} token types, top type wins by 1..{max(1, math.ceil(task.margin * keys))}, "
          f"{len(run.data.y_train)}/{len(run.data.y_test)} train/test sequences; dim {task.dim}, {task.heads} heads, "
          f"{task.steps} steps, batch {task.batch}, Adam lr {task.lr} (linear decay), seeds {seeds}, rows {main_rows}: "
          f"fp32 {fp32 * 100:.1f}%", flush=True)
    entry = statistics(task, run.data, seeds[0])
    rec = {family: recommend_attention(entry, Rules(**{**rules.__dict__, "family": family}))[0]
           for family in ("fixed", "float")}
    fx_in, fx_p = rec["fixed"]["input"], rec["fixed"]["probs"]
    fl_in, fl_p = rec["float"]["input"], rec["float"]["probs"]
    spread = entry["input"]
    print(f"  stats ({ANALYZE_STEPS} fp32 steps, seed {seeds[0]}): keys {entry['keys']}, |S-rowmax(S)| p99.9 "
          f"{spread.get('p999', 0):.3g} max {spread['absmax']:.3g}; recommended fixed {fx_p} (P) {fx_in} (input), "
          f"float {fl_p} (P) {fl_in} (input)", flush=True)
    result: dict = {"keys": keys, "rules": rules, "fp32": fp32, "rec": {}, "thr": {}, "together": {}, "flushed": {},
                    "renorm": {}}

    # fixed point
    widths = range(max(2, fx_p.width - 3), fx_p.width + 2) if quick else range(2, max(12, fx_p.width + 3) + 1)
    pts = [(w, run(FP32, FixedPoint(w, w - 1), main_rows)) for w in widths]
    result["thr"]["fixed_probs"] = show(f"probs fx<W>.<W-1>, W (rec {fx_p})", pts, fx_p.width, fp32, tol)
    if rows == "both":
        pts = [(w, run(FP32, FixedPoint(w, w - 1), "renormalized")) for w in widths]
        result["thr"]["fixed_probs_renorm"] = show("  same, rows renormalized", pts, fx_p.width, fp32, tol)
    integer = fx_in.integer_bits
    low = max(2, fx_in.width - 1 if quick else integer - 2)
    pts = [(w, run(FixedPoint(w, w - integer), FP32, main_rows)) for w in range(low, fx_in.width + (2 if quick else 3))]
    result["thr"]["fixed_input"] = show(f"input fx<W>.<W-{integer}>, W (rec {fx_in})", pts, fx_in.width, fp32, tol)

    # float
    for name, fmt in (("probs", fl_p), ("input", fl_in)):
        def acc(f: Format, name: str = name) -> float:
            return run(FP32, f, main_rows) if name == "probs" else run(f, FP32, main_rows)
        mans = range(max(0, fmt.man - 1), fmt.man + 2) if quick else range(0, max(fmt.man, 2) + 2)
        pts = [(m, acc(fl(fmt.exp, m))) for m in mans]
        man = show(f"{name} e{fmt.exp}m<M>fn, M (rec {fmt})", pts, fmt.man, fp32, tol)
        exps = range(max(1, fmt.exp - (1 if quick else 2)), min(7, fmt.exp + 1) + 1)
        pts = [(e, acc(fl(e, fmt.man))) for e in exps]
        exp = show(f"{name} e<E>m{fmt.man}fn, E", pts, fmt.exp, fp32, tol)
        result["thr"][f"float_{name}_man"], result["thr"][f"float_{name}_exp"] = man, exp

    for family, (inp, probs) in (("fixed", (fx_in, fx_p)), ("float", (fl_in, fl_p))):
        acc, train_flushed, test_flushed = run.results(inp, probs, main_rows)
        result["rec"][family] = (inp, probs)
        result["together"][family] = acc
        _, probs_train, probs_test = run.results(FP32, probs, main_rows)
        result["flushed"][family] = (probs_train, probs_test)
        print(f"  recommended {family:<5} {str(probs):>8} (P) + {str(inp):<8} (input) together {acc * 100:.1f}% "
              f"({(fp32 - acc) * 100:+.1f} pt below fp32); P alone flushes {probs_train * 100:.2f}% of the "
              f"probabilities in training, {probs_test * 100:.2f}% at test", flush=True)
        if rows == "both":
            result["renorm"][family] = run(inp, probs, "renormalized")
            print(f"  recommended {family:<5} the same, rows renormalized: together "
                  f"{result['renorm'][family] * 100:.1f}%", flush=True)
    result["seconds"] = time.perf_counter() - started
    print(f"  ({len(run.cache)} settings x {len(seeds)} seeds, {result['seconds']:.0f} s)", flush=True)
    return result


def empirical(r: dict) -> dict[str, tuple[int | None, int | None]]:
    """Threshold widths (probs, input) per family."""
    t = r["thr"]
    fl_in, fl_p = r["rec"]["float"]
    return {"fixed": (thr_value(t["fixed_probs"]), thr_value(t["fixed_input"])),
            "float": (float_threshold(t, "probs", fl_p), float_threshold(t, "input", fl_in))}


def verdicts(r: dict, tol: float) -> dict[str, str]:
    """Sufficient: recommended P and input together within tol of fp32. Bits above the
    threshold: recommended width minus the empirical threshold width, per role (tight: <= 2)."""
    out = {}
    thr = empirical(r)
    for family in ("fixed", "float"):
        inp, probs = r["rec"][family]
        thr_p, thr_in = thr[family]
        sufficient = (r["fp32"] - r["together"][family]) * 100 <= tol

        def above(fmt: Format, th: int | None) -> str:
            return "?" if th is None else f"{fmt.width - th:+d}"

        tight = all(th is not None and fmt.width <= th + 2 for fmt, th in ((probs, thr_p), (inp, thr_in)))
        out[family] = (f"{probs} ({probs.width}b, thr {thr_p}, {above(probs, thr_p)}) + {inp} ({inp.width}b, thr "
                       f"{thr_in}, {above(inp, thr_in)}): {r['together'][family] * 100:.1f}%, sufficient "
                       f"{'yes' if sufficient else 'NO'}, tight {'yes' if tight else 'NO'}")
    return out


def summary(results: list[dict], tol: float) -> None:
    print("\nSummary (width in bits, threshold / recommended; threshold = smallest width from which every wider "
          f"one is within {tol:g} pt of fp32;\n fixed input: along W at the recommended integer bits; float: the "
          "narrower of 1 + E_rec + M_threshold and 1 + E_threshold + M_rec)")
    renorm = any("fixed_probs_renorm" in r["thr"] for r in results)
    header = (f"{'N':>5} | {'fp32':>6} | {'fixed P':>9} | {'renorm P':>8} | {'fixed S':>9} | {'float P':>9} | "
              f"{'float S':>9} | c = fixed P thr - log2 N")
    print(" P: the probabilities; S: the softmax input S - rowmax(S); renorm P: the fixed P threshold with the "
          "rounded rows of P renormalized")
    print(header if renorm else header.replace(f" {'renorm P':>8} |", ""))
    for r in results:
        thr = empirical(r)
        cells = []
        for family, role in (("fixed", 0), ("fixed", 1), ("float", 0), ("float", 1)):
            th = thr[family][role]
            cells.append(f"{'-' if th is None else th:>3} / {r['rec'][family][1 - role].width:<3}")
        extra = ""
        if renorm:
            extra = f" {thr_value(r['thr'].get('fixed_probs_renorm', 'none')) or '-':>8} |"
        th = thr["fixed"][0]
        c = "-" if th is None else f"{th - math.log2(r['keys']):+g}"
        print(f"{r['keys']:>5} | {r['fp32'] * 100:5.1f}% | {cells[0]:>9} |{extra} {cells[1]:>9} | {cells[2]:>9} | "
              f"{cells[3]:>9} | {c}")
    cs = [thr["fixed"][0] - math.log2(r["keys"]) for r, thr in ((r, empirical(r)) for r in results)
          if thr["fixed"][0] is not None]
    if len(cs) == len(results) and len(cs) > 1:
        print(f"fixed P threshold = log2 N + c: c = {', '.join(f'{c:+g}' for c in cs)} for N = "
              f"{', '.join(str(r['keys']) for r in results)} (spread {max(cs) - min(cs):g} bits; the rule's c is "
              f"1 + attention_probs_margin = {1 + results[0]['rules'].attention_probs_margin})")
    for r in results:
        v = verdicts(r, tol)
        print(f"N={r['keys']:<4} fp32 {r['fp32'] * 100:.1f}%")
        for family in ("fixed", "float"):
            fl_train, fl_test = r["flushed"][family]
            print(f"  {family:<5} {v[family]}; P flushed {fl_train * 100:.2f}% (training) {fl_test * 100:.2f}% (test)")
            if family in r["renorm"]:
                print(f"  {'':<5} renormalized rows together {r['renorm'][family] * 100:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="override every task's step count")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points of accuracy below fp32")
    parser.add_argument("--rows", choices=("each", "renormalized", "both"), default="both",
                        help="how rounded rows of P enter P.V; both: every sweep as 'each', the fixed probs sweep and "
                             "the recommended pairs also renormalized")
    parser.add_argument("--quick", action="store_true", help="fewer widths, around the recommendations")
    parser.add_argument("--probs-margin", type=int, default=None, help="Rules.attention_probs_margin to test")
    parser.add_argument("--probs-man", type=int, default=None, help="Rules.attention_probs_man to test")
    parser.add_argument("--input-frac", type=int, default=None, help="Rules.attention_input_frac to test")
    parser.add_argument("--input-man", type=int, default=None, help="Rules.attention_input_man to test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rules = Rules()
    for option, field in (("probs_margin", "attention_probs_margin"), ("probs_man", "attention_probs_man"),
                          ("input_frac", "attention_input_frac"), ("input_man", "attention_input_man")):
        if getattr(args, option) is not None:
            rules = Rules(**{**rules.__dict__, field: getattr(args, option)})
    started = time.perf_counter()
    results = [sweep(n, args.seeds, rules, args.tolerance, args.steps, args.rows, args.quick) for n in args.keys]
    summary(results, args.tolerance)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
