"""Micro-benchmark behind docs/performance.md: the three expert matmuls of forward and backward, dense vs grouped.

For E equal blocks of T/E rows: forward ``x @ W^T``, input gradient, weight gradient, each as one dense product
and as ``grouped_mm`` (weights (E, out, in), as the experts store them, and (E, in, out) row-major), plus a padded
``bmm``. Median of repeats, milliseconds.

    python benchmarks/grouped_mm.py
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

try:  # same allocator settings as moe_layer.py
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-4, 0)
    _libc.mallopt(-1, 1 << 30)
except OSError:
    pass

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up: the first calls also grow the heap
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t, d, h = args.tokens, args.dim, args.hidden
    x, g = torch.randn(t, d), torch.randn(t, h)
    w = torch.randn(h, d)
    print(f"# tokens={t} in={d} out={h} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'E':>4} {'product':<8} {'dense':>7} {'grouped (out,in)':>17} {'grouped (in,out)':>17} {'bmm':>7}")
    for e in args.experts:
        offs = (torch.arange(1, e + 1) * (t // e)).to(torch.int32)
        w_oi = torch.randn(e, h, d)            # (E, out, in): used as w_oi^T
        w_io = torch.randn(e, d, h)            # (E, in, out) row-major
        rows = {
            "forward": (lambda: x @ w.T, lambda: F.grouped_mm(x, w_oi.transpose(-2, -1), offs=offs),
                        lambda: F.grouped_mm(x, w_io, offs=offs),
                        lambda: torch.bmm(x.view(e, -1, d), w_oi.transpose(-2, -1))),
            "grad_x": (lambda: g @ w, lambda: F.grouped_mm(g, w_oi, offs=offs),
                       lambda: F.grouped_mm(g, w_io.transpose(-2, -1), offs=offs),
                       lambda: torch.bmm(g.view(e, -1, h), w_oi)),
            "grad_w": (lambda: g.T @ x, lambda: F.grouped_mm(g.T, x, offs=offs),
                       lambda: F.grouped_mm(x.T, g, offs=offs),
                       lambda: torch.bmm(g.view(e, -1, h).transpose(1, 2), x.view(e, -1, d))),
        }
        for name, fns in rows.items():
            ms = [median_ms(fn, args.repeats) for fn in fns]
            print(f"{e:>4} {name:<8} {ms[0]:>7.1f} {ms[1]:>17.1f} {ms[2]:>17.1f} {ms[3]:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
