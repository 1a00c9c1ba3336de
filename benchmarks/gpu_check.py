"""The CUDA path against the CPU, in one short run (well under 3 minutes on a GPU).

    PYTHONPATH=. python benchmarks/gpu_check.py [--quick]

1. quantize, nearest and toward-zero rounding: bit-identical on CUDA and CPU for every
   format family (fixed point incl. negative fraction bits, dynamic fixed point with its
   own and a given maximum, fp16/bf16 casts, fp8/fp6/fp4, IEEE floats with inf, the
   float64 path of 8-exponent-bit floats), on edge values plus 2^22 random values over
   60 binades, allocating and ``out=``; float16/bfloat16 inputs too.
2. quantize, stochastic rounding on CUDA: each repeated value lands on one of its two grid
   neighbours only, and on average on itself (within 5 standard errors).
3. KahanSGD: 200 steps on CUDA (foreach path) and CPU (per tensor) from the same weights
   and gradients: bit-identical weights, compensation and lost-update counts.
4. train-check of digits-mlp (600 steps) and digits-cnn (200 steps: convolutions, where
   cuDNN would use TF32 if lpcli did not turn it off) on CUDA and CPU: the same verdict
   (unless the CPU's gap sits within 0.3 points of the tolerance), accuracies within a
   point, and two CUDA runs give the same JSON (bar timings).

Prints one line per check and a summary; exits 1 on any mismatch, 0 otherwise (also when
there is no CUDA device: "no CUDA device, skipped").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

FAILURES: list[str] = []
DEVICE = "cuda"  # --self-test-on-cpu: the CPU against itself, to check this script where there is no GPU

NEAREST = ["fx8.4", "fx4.2", "fx16.8", "fx24.12", "fx8.-2", "fx12.14", "dfx8", "dfx16", "fp16", "bf16", "fp8-e4m3",
           "fp8-e5m2", "e5m2", "e4m3", "e3m4", "e2m5", "fp6-e2m3", "fp6-e3m2", "fp4-e2m1", "e8m3", "e4m2fn", "e5m7",
           "e6m9"]
STOCHASTIC = ["fx8.4", "fx16.12", "dfx8", "fp8-e4m3", "fp8-e5m2", "fp4-e2m1", "bf16", "fp16", "e3m4", "e8m3"]


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        FAILURES.append(name)


def guarded(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a crash on the GPU is a failed check, not the end of the run
        check(name, False, f"{type(exc).__name__}: {exc}")


def values(n: int) -> torch.Tensor:
    special = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1.17e-38, 1.1754942e-38,
               3.4e38, -3.4e38, 0.5, 1.5, 2.5, -2.5, 448.0, 464.0, 480.0, 57344.0, 61440.0, 65504.0, 65520.0, 6.0,
               7.5, 28.0, 240.0, 2**-9, 2**-10, 2**-14, 2**-24, 2**-25, 3 * 2**-26, 2**-133, 2**-149]
    gen = torch.Generator().manual_seed(0)
    scaled = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    ties = (torch.randint(-2**12, 2**12, (n // 8,), generator=gen).float() + 0.5) * 2.0**-6  # exact ties for fx
    return torch.cat([torch.tensor(special), -torch.tensor(special), scaled, ties])


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    a, b = a.cpu().float(), b.cpu().float()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    bits = (a.view(torch.int32) != b.view(torch.int32)) & ~(nan_a & nan_b)
    return int((bits | (nan_a != nan_b)).sum())


def quantize_nearest(n: int) -> None:
    from lpcli.kernels import quantize

    print("quantize: CUDA vs CPU, bit for bit")
    x = values(n)
    xc = x.to(DEVICE)
    for fmt in NEAREST:
        for rounding in ("nearest", "zero"):
            def one(fmt: str = fmt, rounding: str = rounding) -> None:
                bad = differing(quantize(xc, fmt, rounding), quantize(x, fmt, rounding))
                out = torch.empty_like(xc)
                quantize(xc, fmt, rounding, out=out)
                bad_out = differing(out, quantize(x, fmt, rounding))
                check(f"{fmt:9s} {rounding:8s}", bad == 0 and bad_out == 0,
                      f"{bad} + {bad_out} (out=) of {x.numel()} differ" if bad or bad_out else "")
            guarded(f"{fmt} {rounding}", one)
    # dynamic fixed point scaled by a given maximum (a MaxHistory's, on the device)
    def given_max() -> None:
        bad = differing(quantize(xc.clamp(-40, 40), "dfx8", absmax=torch.tensor(3.0, device=DEVICE)),
                        quantize(x.clamp(-40, 40), "dfx8", absmax=3.0))
        check("dfx8 absmax=3 (tensor on the device)", bad == 0, f"{bad} differ" if bad else "")
    guarded("dfx8 absmax", given_max)
    for dtype in (torch.float16, torch.bfloat16):
        def low(dtype: torch.dtype = dtype) -> None:
            xs = x[torch.isfinite(x)].clamp(-6e4, 6e4).to(dtype)
            bad = sum(differing(quantize(xs.to(DEVICE), fmt), quantize(xs, fmt))
                      for fmt in ("fx8.4", "fp8-e4m3", "bf16"))
            check(f"{str(dtype):15s} inputs", bad == 0, f"{bad} differ" if bad else "")
        guarded(f"{dtype} inputs", low)


def quantize_stochastic(repeats: int) -> None:
    from lpcli.kernels import quantize

    print("quantize: stochastic rounding on CUDA (two neighbours, unbiased)")
    base = torch.tensor([0.3, -0.3, 1.1, -2.7, 0.013, 2.9, 0.71, -0.0417, 1e-3, 5.0])
    for fmt in STOCHASTIC:
        def one(fmt: str = fmt) -> None:
            x = base[:, None].expand(-1, repeats).contiguous()
            gen = torch.Generator(device=DEVICE).manual_seed(1)
            q = quantize(x.to(DEVICE), fmt, "stochastic", gen).cpu().double()
            toward = quantize(x, fmt, "zero")[:, 0].double()
            worst, problems = 0.0, []
            for row, value in enumerate(base.double().tolist()):
                t = float(toward[row])
                seen = [float(v) for v in torch.unique(q[row])]
                others = [v for v in seen if v != t]
                if len(others) > 1 or (t == value and others) or (t != value and not others):
                    problems.append(f"{value} -> {seen[:4]}")
                    continue
                if t == value:
                    continue
                away = others[0]
                if not (abs(away) > abs(value) and away * value > 0) or float(quantize(torch.tensor([away]), fmt,
                                                                                         "zero")) != away:
                    problems.append(f"{value} -> away {away}")
                    continue
                p = (value - t) / (away - t)
                sigma = abs(away - t) * (p * (1 - p) / repeats) ** 0.5
                z = abs(float(q[row].mean()) - value) / sigma if sigma else 0.0
                worst = max(worst, z)
                if z > 5:
                    problems.append(f"{value}: mean off by {z:.1f} sigma")
            check(f"{fmt:9s} stochastic", not problems, "; ".join(problems) if problems else f"worst {worst:.1f} sigma")
        guarded(f"{fmt} stochastic", one)


def kahan_sgd(steps: int) -> None:
    from lpcli.optim import KahanSGD

    print("KahanSGD: CUDA (foreach) vs CPU (per tensor)")
    for weight, comp, momentum in (("fx8.7", None, 0.0), ("fx10.9", "fx10.16", 0.9), ("bf16", "bf16", 0.0),
                                   ("fp8-e4m3", None, 0.0)):
        def one(weight: str = weight, comp: str | None = comp, momentum: float = momentum) -> None:
            gen = torch.Generator().manual_seed(0)
            shapes = [(64, 128), (128,), (10, 64), (10,)]
            init = [torch.randn(s, generator=gen) * 0.3 for s in shapes]
            grads = [[torch.randn(s, generator=gen) * 0.05 for s in shapes] for _ in range(steps)]
            results = []
            for device in ("cpu", DEVICE):
                params = [torch.nn.Parameter(p.clone().to(device)) for p in init]
                opt = KahanSGD(params, lr=0.05, momentum=momentum, weight_format=weight, comp_format=comp, seed=0)
                for step_grads in grads:
                    for p, g in zip(params, step_grads, strict=True):
                        p.grad = g.to(device)
                    opt.step()
                comp_state = [opt.state[p]["compensation"] for p in params]
                results.append((params, comp_state, opt.diagnostics()))
            (pc, cc, dc), (pg, cg, dg) = results
            bad = sum(differing(a.detach(), b.detach()) for a, b in zip(pc, pg, strict=True))
            bad += sum(differing(a, b) for a, b in zip(cc, cg, strict=True))
            same_diag = [d["lost_updates"] for d in dc] == [d["lost_updates"] for d in dg]
            check(f"{weight:9s} momentum {momentum}", bad == 0 and same_diag,
                  f"{bad} values differ, lost updates {dc[0]['lost_updates']} vs {dg[0]['lost_updates']}"
                  if bad or not same_diag else "")
        guarded(f"KahanSGD {weight}", one)


def train_checks(recipe: str, steps: int | None) -> None:
    from lpcli import train_check

    print(f"train-check {recipe}{f' ({steps} steps)' if steps else ''}: {DEVICE} vs CPU")
    reports = []
    for device in ("cpu", DEVICE, DEVICE):
        t0 = time.perf_counter()
        report = train_check(recipe, steps=steps, device=device).document()
        report.pop("timing")
        reports.append(report)
        accs = " ".join(f"{run} {summary['test_accuracy']:.2%}" for run, summary in report["runs"].items())
        print(f"  {device:4s} {time.perf_counter() - t0:5.1f} s  {accs}  passed={report['verdict']['passed']}")
    cpu, gpu, again = reports
    check("device reported", gpu["device"]["type"] == DEVICE, json.dumps(gpu["device"]))
    gap = cpu["runs"]["kahan"]["gap_to_fp32"]
    near = gap is not None and abs(gap * 100 - cpu["verdict"]["tolerance_points"]) < 0.3
    same = cpu["verdict"]["passed"] == gpu["verdict"]["passed"]
    check("same verdict", same or near, "" if same else "differs, but the CPU gap is within 0.3 points of the "
          "tolerance")
    for run in cpu["runs"]:
        a, b = cpu["runs"][run]["test_accuracy"], gpu["runs"][run]["test_accuracy"]
        check(f"{run} accuracy within 1 point", a is not None and b is not None and abs(a - b) <= 0.01,
              f"cpu {a:.4f} {DEVICE} {b:.4f}" if a is not None and b is not None else f"{a} {b}")
    check(f"{DEVICE} runs repeat byte for byte", json.dumps(gpu, sort_keys=True) == json.dumps(again, sort_keys=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller tensors, fewer digits-cnn steps")
    parser.add_argument("--self-test-on-cpu", action="store_true", help="run every check with the CPU in place "
                        "of CUDA (checks this script, not the GPU)")
    args = parser.parse_args()
    global DEVICE
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.self_test_on_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device, skipped")
        return 0
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (self-test)'}")
    started = time.perf_counter()
    guarded("quantize nearest", lambda: quantize_nearest(1 << (18 if args.quick else 22)))
    guarded("quantize stochastic", lambda: quantize_stochastic(1 << (14 if args.quick else 16)))
    guarded("KahanSGD", lambda: kahan_sgd(50 if args.quick else 200))
    guarded("train-check digits-mlp", lambda: train_checks("digits-mlp", None))
    guarded("train-check digits-cnn", lambda: train_checks("digits-cnn", 60 if args.quick else 200))
    took = time.perf_counter() - started
    if FAILURES:
        print(f"FAILED {len(FAILURES)}: {', '.join(FAILURES)} ({took:.0f} s)")
        return 1
    print(f"all CUDA checks passed ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
