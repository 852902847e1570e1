"""Where one MoE layer's time and memory go (docs/performance.md, "Why ERMoE's time misses"): the figures behind the
explanations of benchmarks/moe_layer.py's table, at its shapes (8192 tokens, dim 384, hidden 1536, float32).

    python benchmarks/layer_costs.py                     # all four parts, ERMoE at E=8 and E=64
    python benchmarks/layer_costs.py --parts memory profile --router emoe --experts 64

Parts:
- ``fold``: the experts' first bias folded into the grouped product (a column of ones) against an S x H table of
  per-row biases added after it (``ermoe.experts.fold_first_bias`` forced off), fwd+bwd of the whole layer, as the
  median over interleaved pairs of the ratio folded / table (below 1: folding is faster).
- ``score``: ERMoE's router alone: its projection onto all E bases (fwd+bwd), the same with the Eigenbasis Score's
  norms, and with the overflow-safe per-token scaling as well (medians, ms).
- ``memory``: the peak of one fwd+bwd by kind (PyTorch's MemTracker: parameters, gradients, activations,
  temporaries, MiB).
- ``profile``: torch.profiler's table of 3 fwd+bwd steps by self time.

Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ermoe
import ermoe.experts as experts_mod
from ermoe.routing.base import overflow_safe_scale

TOKENS, DIM, HIDDEN = 8192, 384, 1536


def layer(router: str, num_experts: int) -> ermoe.MoE:
    torch.manual_seed(0)
    return ermoe.MoE(DIM, HIDDEN, num_experts, router=router)


def fwd_bwd_s(module, x: torch.Tensor, grad: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    module(x).backward(grad)
    return time.perf_counter() - start


def fold(router: str, num_experts: int, pairs: int) -> None:
    moe = layer(router, num_experts)
    x, grad = torch.randn(TOKENS, DIM, requires_grad=True), torch.randn(TOKENS, DIM)
    folded_rule = experts_mod.fold_first_bias

    def timed(folded: bool) -> float:
        experts_mod.fold_first_bias = folded_rule if folded else (lambda *shape: False)
        try:
            return fwd_bwd_s(moe, x, grad)
        finally:
            experts_mod.fold_first_bias = folded_rule

    for _ in range(2):
        timed(True), timed(False)
    ratios = []
    for i in range(pairs):
        if i % 2:
            table, folded = timed(False), timed(True)
        else:
            folded, table = timed(True), timed(False)
        ratios.append(folded / table)
    print(f"fold {router} E={num_experts}: folded / table fwd+bwd median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}, {pairs} pairs)")


def score(num_experts: int, repeats: int) -> None:
    rank = ermoe.routing.default_eigen_rank(DIM, num_experts)
    x = torch.randn(TOKENS, DIM, requires_grad=True)
    u = torch.randn(DIM, num_experts * rank, requires_grad=True)

    def projection() -> None:
        (x @ u).sum().backward()

    def norms() -> None:
        z = (x @ u).view(TOKENS, num_experts, rank)
        (z.norm(dim=-1) / (x.norm(dim=-1, keepdim=True) + 1e-6)).sum().backward()

    def scaled_norms() -> None:  # as EigenbasisRouter.forward
        z = (x @ u).view(TOKENS, num_experts, rank)
        s = overflow_safe_scale(x)
        ((z / s.unsqueeze(-1)).norm(dim=-1) / ((x / s).norm(dim=-1, keepdim=True) + 1e-6)).sum().backward()

    for fn in (projection, norms, scaled_norms):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"score E={num_experts} R={rank} {fn.__name__}: {1e3 * statistics.median(times):.1f} ms fwd+bwd")


def memory(router: str, num_experts: int) -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    moe = layer(router, num_experts)
    x, grad = torch.randn(TOKENS, DIM, requires_grad=True), torch.randn(TOKENS, DIM)
    fwd_bwd_s(moe, x, grad)
    tracker = MemTracker()
    tracker.track_external(moe, x)
    with tracker:
        fwd_bwd_s(moe, x, grad)
    peak = tracker.get_tracker_snapshot("peak")[x.device]
    kinds = ", ".join(f"{str(k).rsplit('.', 1)[-1].lower()} {v / 2 ** 20:.1f}" for k, v in peak.items())
    print(f"memory {router} E={num_experts} at the peak (MiB): {kinds}")


def profile(router: str, num_experts: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    moe = layer(router, num_experts)
    x, grad = torch.randn(TOKENS, DIM, requires_grad=True), torch.randn(TOKENS, DIM)
    for _ in range(2):
        fwd_bwd_s(moe, x, grad)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fwd_bwd_s(moe, x, grad)
    print(f"## profile {router} E={num_experts}, 3 fwd+bwd steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["fold", "score", "memory", "profile"],
                        choices=["fold", "score", "memory", "profile"])
    parser.add_argument("--router", default="ermoe", choices=ermoe.list_routers())
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, tokens {TOKENS}, dim {DIM}, "
          f"hidden {HIDDEN}, float32, seed 0")
    for num_experts in args.experts:
        for part in args.parts:
            if part == "fold":
                fold(args.router, num_experts, args.pairs)
            elif part == "score":
                score(num_experts, args.pairs)
            elif part == "memory":
                memory(args.router, num_experts)
            else:
                profile(args.router, num_experts)


if __name__ == "__main__":
    main()
