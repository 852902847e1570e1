"""Time the MoE layer for every router against a dense module of the same expert architecture.

The dense module applies one expert to every token (the routing-free limit of the same active size): for MLP experts
``Linear(D, H) -> GELU -> Linear(H, D)``; for ERMoE's eigen experts ``Linear(D, R) -> Linear(R, H) -> GELU ->
Linear(H, D)``. Both run in one process, interleaved (their order alternating), and each router's figure is the
median over repeats of the paired ratio ``t_moe / t_dense``, which cancels this machine's slow drift in speed.

glibc's malloc returns large blocks to the OS with munmap and page-faults them back in on the next step; that
costs the dense module and the MoE layer alike but not evenly, so this script turns mmap off and raises the trim
threshold (``mallopt``) before any tensor is made, as a long training process effectively runs.

    python benchmarks/moe_layer.py                    # table
    python benchmarks/moe_layer.py --json             # the JSON list on stdout, the table on stderr
    python benchmarks/moe_layer.py --memory --no-time # peak memory of fwd+bwd only (deterministic, fast)

Memory (``--memory``): the peak of one forward and backward as ``torch.distributed._tools.mem_tracker.MemTracker``
counts it (every live tensor, by kind, on CPU and GPU alike): the whole peak, and its working part (activations
saved for backward, temporaries and the rest: the peak less parameters, gradients and buffers), whose ratio to the
dense module's is the column ``mem ratio``. The MoE's E experts' parameters are E times the dense module's by
design, so the whole peak is reported but not compared.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import platform
import statistics
import sys
import time


def tune_malloc() -> str:
    """Keep freed memory in the heap (no mmap for big blocks, no trimming). Returns what was done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "malloc untouched (not glibc)"
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 1 << 30)
    return "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB)" if ok else "mallopt failed"


MALLOC_NOTE = tune_malloc()

import torch  # noqa: E402  (after mallopt, so torch's own allocations follow it too)
from torch import nn  # noqa: E402

import ermoe  # noqa: E402
import ermoe.dispatch as ermoe_dispatch  # noqa: E402


def dense_reference(layer: ermoe.MoE) -> nn.Module:
    experts = layer.experts
    if isinstance(experts, ermoe.EigenExperts):
        bias = experts.c is not None
        return nn.Sequential(nn.Linear(layer.dim, experts.rank, bias=False),
                             nn.Linear(experts.rank, layer.hidden_dim, bias=bias), nn.GELU(),
                             nn.Linear(layer.hidden_dim, layer.dim, bias=bias))
    bias = experts.b1 is not None
    return nn.Sequential(nn.Linear(layer.dim, layer.hidden_dim, bias=bias), nn.GELU(),
                         nn.Linear(layer.hidden_dim, layer.dim, bias=bias))


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, sync, amp=contextlib.nullcontext) -> float:
    module.train()
    x.grad = None
    module.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    with amp():
        y = module(x)
    y.backward(grad.to(y.dtype))
    sync()
    return time.perf_counter() - start


def time_fwd(module: nn.Module, x: torch.Tensor, sync, amp=contextlib.nullcontext) -> float:
    module.eval()
    with torch.inference_mode(), amp():
        sync()
        start = time.perf_counter()
        module(x)
        sync()
        return time.perf_counter() - start


def peak_memory(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """(whole peak, working peak) of one forward and backward, MiB (see the module docstring)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    module.train()
    x.grad = None
    module.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(module, x)
    with tracker:
        module(x).backward(grad)
    peak = tracker.get_tracker_snapshot("peak")[x.device]
    fixed = sum(peak.get(kind, 0) for kind in (_MemRefType.PARAM, _MemRefType.GRAD, _MemRefType.BUFFER))
    return peak["Total"] / 2 ** 20, (peak["Total"] - fixed) / 2 ** 20


def paired_ratio(moe: nn.Module, dense: nn.Module, timer, repeats: int, warmup: int) -> tuple[float, float, float]:
    """Median of t_moe / t_dense over ``repeats`` interleaved pairs; also the median times (s)."""
    for _ in range(warmup):
        timer(dense), timer(moe)
    ratios, t_moe, t_dense = [], [], []
    for i in range(repeats):
        if i % 2:
            td, tm = timer(dense), timer(moe)
        else:
            tm, td = timer(moe), timer(dense)
        ratios.append(tm / td)
        t_moe.append(tm)
        t_dense.append(td)
    return statistics.median(ratios), statistics.median(t_moe), statistics.median(t_dense)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--routers", nargs="+", default=ermoe.list_routers())
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router-kwargs", type=json.loads, default={},
                        help='JSON keyword arguments for every router, e.g. \'{"rank": 32}\'')
    parser.add_argument("--amp", action="store_true", help="float32 weights and input, bf16 autocast (as training "
                        "runs with optim.amp=bf16); --dtype must be float32")
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="torch.compile both modules with this "
                        "backend (inductor, aot_eager, ...); the warm-up includes the compilation")
    parser.add_argument("--json", action="store_true", help="print the results as a JSON list (table to stderr)")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of fwd+bwd (module docstring)")
    parser.add_argument("--no-time", action="store_true", help="skip the timings (with --memory: memory only)")
    parser.add_argument("--keep-dispatched", action="store_true", help="keep the dispatched tokens for backward "
                        "instead of gathering them again (ermoe.dispatch.recomputed_dispatch off: a baseline)")
    args = parser.parse_args(argv)
    ermoe_dispatch.RECOMPUTE_DISPATCHED = not args.keep_dispatched

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.amp and dtype != torch.float32:
        parser.error("--amp keeps float32 weights under bf16 autocast: leave --dtype at float32")
    amp = functools.partial(torch.autocast, device.type, torch.bfloat16) if args.amp else contextlib.nullcontext
    if device.type == "cuda":
        def sync() -> None:
            torch.cuda.synchronize()
    else:
        def sync() -> None:
            pass

    table = sys.stderr if args.json else sys.stdout
    print(f"# {platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} device={device} dtype={args.dtype} {MALLOC_NOTE}", file=table)
    print(f"# tokens={args.tokens} dim={args.dim} hidden={args.hidden} top_k={args.top_k} "
          f"repeats={args.repeats} seed={args.seed} amp={'bf16' if args.amp else 'none'} compile={args.compile}",
          file=table)
    header = f"{'router':<15} {'E':>4} {'fwd+bwd ms':>11} {'dense ms':>9} {'ratio':>6} {'fwd ms':>8} {'dense ms':>9} {'ratio':>6}"
    if args.memory:
        header += f" {'peak MiB':>9} {'dense':>7} {'work MiB':>9} {'dense':>7} {'mem ratio':>9}"
    print(header, file=table)
    print("-" * len(header), file=table)
    results = []
    for num_experts in args.experts:
        for name in args.routers:
            torch.manual_seed(args.seed)
            moe = ermoe.MoE(args.dim, args.hidden, num_experts, router=name, top_k=args.top_k,
                             router_kwargs=args.router_kwargs or None).to(device, dtype)
            dense = dense_reference(moe).to(device, dtype)
            if args.compile:
                moe, dense = torch.compile(moe, backend=args.compile), torch.compile(dense, backend=args.compile)
            x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)

            def fwd_bwd(m: nn.Module) -> float:
                return time_fwd_bwd(m, x, grad, sync, amp)

            def fwd(m: nn.Module) -> float:
                return time_fwd(m, x, sync, amp)

            nan = float("nan")
            fb_ratio, fb_moe, fb_dense = (nan,) * 3 if args.no_time else \
                paired_ratio(moe, dense, fwd_bwd, args.repeats, args.warmup)
            f_ratio, f_moe, f_dense = (nan,) * 3 if args.no_time else \
                paired_ratio(moe, dense, fwd, args.repeats, args.warmup)
            row = {"router": name, "num_experts": num_experts, "fwd_bwd_ratio": round(fb_ratio, 4),
                   "fwd_ratio": round(f_ratio, 4), "fwd_bwd_ms": round(fb_moe * 1e3, 2),
                   "dense_fwd_bwd_ms": round(fb_dense * 1e3, 2), "fwd_ms": round(f_moe * 1e3, 2),
                   "dense_fwd_ms": round(f_dense * 1e3, 2), "tokens": args.tokens, "dim": args.dim,
                   "hidden": args.hidden, "top_k": args.top_k, "dtype": args.dtype, "device": str(device),
                   "amp": "bf16" if args.amp else None, "compile": args.compile,
                   "threads": torch.get_num_threads()}
            line = (f"{name:<15} {num_experts:>4} {row['fwd_bwd_ms']:>11.1f} {row['dense_fwd_bwd_ms']:>9.1f} "
                    f"{fb_ratio:>6.2f} {row['fwd_ms']:>8.1f} {row['dense_fwd_ms']:>9.1f} {f_ratio:>6.2f}")
            if args.memory:
                (peak, work), (dense_peak, dense_work) = (peak_memory(m, x, grad) for m in (moe, dense))
                row.update(peak_mib=round(peak, 1), dense_peak_mib=round(dense_peak, 1), work_mib=round(work, 1),
                           dense_work_mib=round(dense_work, 1), mem_ratio=round(work / dense_work, 3))
                line += f" {peak:>9.1f} {dense_peak:>7.1f} {work:>9.1f} {dense_work:>7.1f} {work / dense_work:>9.2f}"
            results.append(row)
            print(line, flush=True, file=table)
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
