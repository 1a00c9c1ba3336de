"""Speed of lpcli.accumulate's C kernel on fashion-cnn's GEMMs, in ns per addition and as a ratio to torch.mm.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/accumulate.py [--formats fx24.12 bf16 e5m7] [--chunks 1 32]
        [--repeats 5] [--shapes conv1 conv2-wgrad ...]

For each GEMM of one fashion-cnn training step at batch 64 (every one of them simulated) and
each accumulator format and chunk, ``lpcli.accumulate.matmul_counts(a, b, fmt, chunk)`` is
timed against ``torch.mm(a, b)`` on the same float32 operands, both on one torch thread.
Printed: the kernel's time in ms, its ns per addition (``M * N * (K - 1)`` additions) and
its time over torch.mm's. Times are the minimum over ``--repeats`` or more runs (the
machine may be shared); torch.mm is re-measured next to every line. The last line sums the
step: all shapes' kernel times over all shapes' torch.mm times, per format and chunk.

Target: <= 0.7 ns per addition at chunk 32 (a simulated step within 10x fp32's on one
thread). The first line says which kernels ran: ``native`` (lpcli/_kernels.c) or
``torch`` (the fallback, or with LPCLI_KERNELS=torch: very slow on the large shapes).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lpcli.accumulate import matmul_counts
from lpcli.formats import parse_format
from lpcli.kernels import kernel_backend

# name: (M, K, N) of (M, K) @ (K, N); K includes the bias's column of ones where there is one
SHAPES = {
    "conv1": (50176, 26, 8),  # forward, im2col: 64 * 28 * 28 positions x (5 * 5 + 1)
    "conv1-wgrad": (8, 50176, 26),
    "conv2": (6400, 201, 16),  # forward: 64 * 10 * 10 positions x (8 * 5 * 5 + 1)
    "conv2-igrad": (12544, 400, 8),  # input gradient: 64 * 14 * 14 positions x (16 * 5 * 5)
    "conv2-wgrad": (16, 6400, 201),
    "fc1": (64, 401, 64),
    "fc1-igrad": (64, 64, 400),
    "fc1-wgrad": (64, 64, 401),
}
FORMATS = ("fx24.12", "bf16", "e5m7")  # fixed point; floats by TwoSum (bf16) and by Fast2Sum (e5m7)
TARGET_NS = 0.7  # at chunk 32


def best(fn: Callable[[], object], repeats: int, min_seconds: float = 0.1) -> float:
    """Least time of at least ``repeats`` runs, more (up to 10x) until ``min_seconds`` have passed."""
    fn()  # warm up
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 10 * repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the C kernel has one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, lpcli kernels: {kernel_backend()}")
    print(f"{'shape':<12} {'M x K x N':>17} {'format':<8} {'chunk':>5} {'ms':>8} {'ns/add':>7} {'x mm':>7}")
    gen = torch.Generator().manual_seed(0)
    totals: dict[tuple[str, int], list[float]] = {}
    misses = []
    for name in args.shapes:
        m, k, n = SHAPES[name]
        a = torch.randn(m, k, generator=gen)
        b = torch.randn(k, n, generator=gen) * 0.1
        additions = m * n * (k - 1)
        for spec in args.formats:
            fmt = parse_format(spec)
            for chunk in args.chunks:
                mm = best(lambda: torch.mm(a, b), args.repeats * 3)  # noqa: B023
                kernel = best(lambda: matmul_counts(a, b, fmt, chunk), args.repeats)  # noqa: B023
                ns = kernel / additions * 1e9
                total = totals.setdefault((spec, chunk), [0.0, 0.0])
                total[0] += kernel
                total[1] += mm
                line = (
                    f"{name:<12} {f'{m}x{k}x{n}':>17} {spec:<8} {chunk:>5} {kernel * 1e3:8.2f} {ns:7.3f} "
                    f"{kernel / mm:7.1f}"
                )
                if chunk == 32:
                    met = ns <= TARGET_NS
                    line += f"  <= {TARGET_NS:g} {'met' if met else 'MISSED'}"
                    if not met:
                        misses.append(f"{name} {spec} chunk 32: {ns:.3f} ns")
                print(line, flush=True)
    print("\nall shapes (one training step's GEMMs):")
    for (spec, chunk), (kernel, mm) in totals.items():
        print(f"  {spec:<8} chunk {chunk:>3}: {kernel * 1e3:8.2f} ms, {kernel / mm:6.1f} x torch.mm")
    print("\nmissed targets: " + ("; ".join(misses) if misses else "none"))


if __name__ == "__main__":
    main()
