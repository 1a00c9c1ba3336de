"""Speed of lpcli.kernels.quantize on the CPU, as ratios to a plain copy measured in the same run.

    python benchmarks/quantize.py [--sizes 20 24] [--repeats 7]

For float32 tensors of 2^20 and 2^24 elements, each format and rounding is timed twice:

* ``out=``: ``quantize(x, fmt, out=y)`` against ``y.copy_(x)``;
* allocating: ``quantize(x, fmt)`` against ``x.clone()``.

Nearest and zero rounding are divided by the copy, stochastic rounding by (a torch.rand
fill of the same size + the copy), the least a stochastic quantizer must do. Each time is
the minimum over ``--repeats`` or more runs (the machine may be shared); the median ratio is
shown too. Where QPyTorch (``qtorch``) imports, its allocating quantizer is timed as well and our
allocating time is shown as a ratio to it. Targets (ratio to the matching baseline, the
minimum-based ratio of the ``out=`` variant): fixed point nearest <= 2, fp16/bf16 <= 1.5,
other floats nearest <= 4, MX nearest <= 2 at 2^24 elements (at 2^20 the copy runs from
the cache while MX's per-block work does not shrink: no target there), stochastic <= 1.5;
and the allocating call at most 0.2x qtorch's time. The first line says which kernels
ran: ``native`` (lpcli/_kernels.c) or ``torch`` (the fallback, or LPCLI_KERNELS=torch).

Transparent huge pages: the script sets torch's ``THP_MEM_ALLOC_ENABLE=1`` (unless the
environment sets it), for every call timed here alike. A fresh 2^24-element output
otherwise costs about 16k page faults, which make a clone 3x slower than a copy into an
existing tensor and dominate every allocating call at that size (a bare clone then takes
0.2x qtorch's float quantizer). Run with ``THP_MEM_ALLOC_ENABLE=0`` to see that.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator; see above

import torch  # noqa: E402

from lpcli.formats import BlockFormat, FixedPoint, FloatFormat, parse_format
from lpcli.kernels import kernel_backend, quantize  # noqa: E402

FORMATS = (
    "fx8.4",
    "fx16.8",
    "fx24.12",
    "dfx8",
    "fp16",
    "bf16",
    "fp8-e4m3",
    "fp8-e5m2",
    "fp6-e2m3",
    "fp6-e3m2",
    "fp4-e2m1",
    "e3m4",
    "e8m3",  # 8 exponent bits: the integer path on the bit pattern
    "mxfp8-e4m3",  # MX block formats (blocks of 32 along the last dimension)
    "mxfp8-e5m2",
    "mxfp6-e3m2",
    "mxfp6-e2m3",
    "mxfp4-e2m1",
    "mxint8",
)
ROUNDINGS = ("nearest", "zero", "stochastic")
QTORCH_TARGET = 0.2  # at least 5x faster than qtorch's equivalent


def timings(fn: Callable[[], object], repeats: int, min_seconds: float = 0.2) -> list[float]:
    """At least ``repeats`` runs, and more (up to 10x) until ``min_seconds`` have passed:
    short calls get more chances to catch a moment when the shared machine is quiet."""
    fn()  # warm up
    out: list[float] = []
    while len(out) < repeats or (sum(out) < min_seconds and len(out) < 10 * repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def target(fmt: str, rounding: str, log_n: int) -> float | None:
    parsed = parse_format(fmt)
    if rounding == "stochastic":
        return 1.5
    if rounding != "nearest":
        return None
    if isinstance(parsed, BlockFormat):
        return 2.0 if log_n >= 24 else None
    if isinstance(parsed, FixedPoint) or fmt.startswith("dfx"):
        return 2.0
    if fmt in ("fp16", "bf16"):
        return 1.5
    return 4.0


def load_qtorch() -> tuple[Callable, Callable] | None:
    try:
        from qtorch.quant import fixed_point_quantize, float_quantize
    except Exception as exc:  # not installed, or its C++ extension failed to build
        print(f"qtorch: not available ({type(exc).__name__}: {str(exc)[:80]}); its column is skipped")
        return None
    return fixed_point_quantize, float_quantize


def qtorch_call(qt: tuple[Callable, Callable], x: torch.Tensor, fmt: str, rounding: str) -> Callable | None:
    if rounding == "zero":
        return None  # qtorch has nearest and stochastic only
    fixed_point_quantize, float_quantize = qt
    parsed = parse_format(fmt)
    if isinstance(parsed, FixedPoint):
        return lambda: fixed_point_quantize(x, parsed.width, parsed.frac, rounding=rounding)
    if isinstance(parsed, FloatFormat):
        # qtorch's float_quantize has no subnormal/overflow handling per fn convention; timing only
        return lambda: float_quantize(x, parsed.exp, parsed.man, rounding=rounding)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 24], help="log2 of the element counts")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine a 2-thread op waits for a busy core)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qt = load_qtorch()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, lpcli kernels: {kernel_backend()}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}"
    )
    misses = []
    for log_n in args.sizes:
        n = 1 << log_n
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, generator=gen) * 4
        y = torch.empty(n)
        u = torch.empty(n)
        copy = timings(lambda: y.copy_(x), args.repeats * 3)  # noqa: B023
        clone = timings(lambda: x.clone(), args.repeats)  # noqa: B023
        rand_copy = timings(lambda: (u.uniform_(generator=gen), y.copy_(x)), args.repeats)  # noqa: B023
        rand_clone = timings(lambda: (torch.rand(n, generator=gen), x.clone()), args.repeats)  # noqa: B023
        print(
            f"\n2^{log_n} elements: copy_ {min(copy) * 1e3:.2f} ms, clone {min(clone) * 1e3:.2f} ms, "
            f"rand+copy_ {min(rand_copy) * 1e3:.2f} ms, rand+clone {min(rand_clone) * 1e3:.2f} ms"
        )
        header = f"{'format':<11} {'rounding':<10} {'out= ms':>8} {'x base':>7} {'(med)':>6} "
        header += f"{'alloc ms':>9} {'x base':>7}"
        print(header + (f" {'x qtorch':>9}" if qt else "") + "  target")
        for fmt in args.formats:
            for rounding in ROUNDINGS:
                stochastic = rounding == "stochastic"
                # baselines are re-measured next to each line; the least of all runs so far counts
                if stochastic:
                    rand_copy += timings(lambda: (u.uniform_(generator=gen), y.copy_(x)), 2)  # noqa: B023
                    rand_clone += timings(lambda: (torch.rand(n, generator=gen), x.clone()), 2)  # noqa: B023
                else:
                    copy += timings(lambda: y.copy_(x), args.repeats)  # noqa: B023
                    clone += timings(lambda: x.clone(), 2)  # noqa: B023
                base_out, base_alloc = (rand_copy, rand_clone) if stochastic else (copy, clone)
                t_out = timings(lambda: quantize(x, fmt, rounding, gen, out=y), args.repeats)  # noqa: B023
                t_alloc = timings(lambda: quantize(x, fmt, rounding, gen), args.repeats)  # noqa: B023
                ratio = min(t_out) / min(base_out)
                median_ratio = statistics.median(t_out) / statistics.median(base_out)
                line = (
                    f"{fmt:<11} {rounding:<10} {min(t_out) * 1e3:8.2f} {ratio:7.2f} {median_ratio:6.2f} "
                    f"{min(t_alloc) * 1e3:9.2f} {min(t_alloc) / min(base_alloc):7.2f}"
                )
                if qt:
                    call = qtorch_call(qt, x, fmt, rounding)
                    if call:
                        vs_qtorch = min(t_alloc) / min(timings(call, 3))
                        line += f" {vs_qtorch:9.2f}"
                        if vs_qtorch > QTORCH_TARGET:
                            misses.append(f"2^{log_n} {fmt} {rounding}: {vs_qtorch:.2f} x qtorch > {QTORCH_TARGET:g}")
                    else:
                        line += f" {'-':>9}"
                goal = target(fmt, rounding, log_n)
                if goal is not None:
                    met = ratio <= goal
                    line += f"  <= {goal:g} {'met' if met else 'MISSED'}"
                    if not met:
                        misses.append(f"2^{log_n} {fmt} {rounding}: {ratio:.2f} > {goal:g}")
                print(line)
    print("\nmissed targets: " + ("; ".join(misses) if misses else "none"))


if __name__ == "__main__":
    main()
