"""Step time of KahanSGD and KahanAdamW on the CPU, as ratios to torch and torch-optimi measured in the same run.

    PYTHONPATH=. python benchmarks/optim.py [--params 10_000_000] [--tensors 20] [--rounds 7] [--no-compile]

~10M parameters in ~20 float32 tensors, gradients fixed. Baselines: for SGD ``torch.optim.SGD(momentum=0.9,
foreach=True)`` on float32 and torch-optimi's ``SGD(kahan_sum=True, momentum=0.875)`` on bfloat16
parameters; for AdamW ``torch.optim.AdamW(foreach=True)`` on float32 and torch-optimi's
``AdamW(kahan_sum=True)`` on bfloat16 parameters (bf16 moments; ``foreach=False``, its default on the
CPU and the faster there). Every optimizer is stepped once per round, round after round (interleaved, so
that load from other processes hits all of them alike); each line shows the minimum (and median) over
rounds, divided by its rule's baselines' minimum (median). ``C`` rows are the default on the CPU
(``foreach=None``: the whole step in lpcli/_kernels.c, one pass over memory per tensor); ``per-tensor`` and
``foreach`` are the torch-operation paths; ``compile`` rows (SGD) fuse each tensor's step with
torch.compile, their one-off compilation time printed separately. The fixed-point rows keep their state
(momentum, moments) in float32, the bf16 rows in bf16 as optimi does. One torch thread (see
benchmarks/README.md for why). Targets: with diagnostics, fixed point <= 2x torch; bf16 <= 1x optimi.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lpcli.kernels import kernel_backend
from lpcli.optim import KahanAdamW, KahanSGD


def params(total: int, tensors: int, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    size = total // tensors
    out = []
    for _ in range(tensors):
        p = torch.nn.Parameter((torch.randn(size, generator=gen) * 0.3).to(dtype))
        p.grad = (torch.randn(size, generator=gen) * 1e-2).to(dtype)
        out.append(p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, k = args.params, args.tensors

    baselines = {"SGD": ["torch SGD fp32 (baseline)"], "AdamW": ["torch AdamW fp32 (baseline)"]}
    optimizers: dict[str, torch.optim.Optimizer] = {
        "torch SGD fp32 (baseline)": torch.optim.SGD(params(n, k), lr=0.01, momentum=0.9, foreach=True),
        "torch AdamW fp32 (baseline)": torch.optim.AdamW(params(n, k), lr=1e-3, foreach=True),
    }
    try:
        import optimi

        optimizers["optimi SGD kahan bf16 (baseline)"] = optimi.SGD(
            params(n, k, torch.bfloat16), lr=0.0625, momentum=0.875, kahan_sum=True, foreach=False)
        optimizers["optimi AdamW kahan bf16 (baseline)"] = optimi.AdamW(
            params(n, k, torch.bfloat16), lr=2**-10, kahan_sum=True, foreach=False)
        baselines["SGD"].append("optimi SGD kahan bf16 (baseline)")
        baselines["AdamW"].append("optimi AdamW kahan bf16 (baseline)")
    except ImportError:
        print("torch-optimi not installed: no optimi baselines")
    rules = {name: rule for rule, names in baselines.items() for name in names}
    compiles = (False,) if args.no_compile else (False, True)
    default = "C" if kernel_backend() == "native" else "default"  # foreach=None on the CPU
    for fmt, mf in (("fx12.8", None), ("bf16", "bf16")):
        for compiled in compiles:
            for foreach in ((None, True, False) if not compiled else (True,)):
                for diag in (True, False):
                    path = "compile" if compiled else {None: default, True: "foreach", False: "per-tensor"}[foreach]
                    name = f"KahanSGD {fmt:6} {path:10} diag {'on ' if diag else 'off'}"
                    rules[name] = "SGD"
                    optimizers[name] = KahanSGD(params(n, k), lr=0.0625, momentum=0.875, weight_format=fmt,
                                                momentum_format=mf, foreach=foreach, compile=compiled,
                                                diagnostics=diag)
    for fmt, mf in (("fx12.8", None), ("bf16", "bf16")):
        for foreach in (None, True, False):
            for diag in (True, False):
                path = {None: default, True: "foreach", False: "per-tensor"}[foreach]
                name = f"KahanAdamW {fmt:6} {path:10} diag {'on ' if diag else 'off'}"
                rules[name] = "AdamW"
                optimizers[name] = KahanAdamW(params(n, k), lr=2**-10, weight_format=fmt, moment_formats=mf,
                                              foreach=foreach, diagnostics=diag)
    for name, opt in optimizers.items():  # warm up; compilation happens here
        start = time.perf_counter()
        opt.step()
        if "compile" in name:
            print(f"first step (compilation) {name}: {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)

    print(f"\n{n / 1e6:.0f}M parameters in {k} tensors, {args.threads} thread(s), {args.rounds} rounds; "
          "ratio of min (median)")
    for rule, names in baselines.items():
        base = times[names[0]]
        peer = times[names[1]] if len(names) > 1 else None
        print(f"\n{'optimizer':46} {'ms (min)':>9} {'/ torch ' + rule:>17} {'/ optimi bf16':>15}")
        for name, ts in times.items():
            if rules[name] != rule:
                continue
            med = statistics.median(ts)
            row = f"{name:46} {min(ts) * 1e3:9.2f} {min(ts) / min(base):9.2f} ({med / statistics.median(base):5.2f})"
            if peer:
                row += f" {min(ts) / min(peer):7.2f} ({med / statistics.median(peer):5.2f})"
            print(row)

if __name__ == "__main__":
    main()
