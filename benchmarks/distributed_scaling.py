"""Expert-parallel scaling of one MoE layer on torch.distributed: training tokens/s (forward + backward + gradient
reduction) at each world size (experts sharded over all ranks, each rank routing its own fixed number of tokens:
weak scaling), the share of the step spent in the token exchange (the two all-to-alls each way and the count
exchange) at several token counts, the same rank's dense FFN of the same active size timed alone, as a ratio, and
the straggler factor of the routed loads (the busiest rank's assignments over the mean rank's, per step: what the
exchange waits for; docs/distributed.md).

    python benchmarks/distributed_scaling.py                      # gloo on this CPU, 1 and 2 processes
    python benchmarks/distributed_scaling.py --worlds 1 2 4 --router softmax_topk --tokens 4096 --json

Each process runs with one thread: on a 2-core machine two processes are the most that do not share a core, and
gloo over loopback TCP is what the exchange costs here (NCCL over NVLink is another matter: run it on GPUs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.distributed as dist

import ermoe.distributed as ed
from ermoe import MoE
from ermoe.routing.stats import ep_straggler


def _job(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    groups = ed.init_parallel(world)
    torch.manual_seed(0)
    layer = MoE(args.dim, args.hidden, args.experts, router=args.router)
    ed.shard_experts(layer, groups)
    ed.sync_routing(layer, groups)
    model = ed.wrap_data_parallel(layer, groups)
    dense = torch.nn.Sequential(torch.nn.Linear(args.dim, args.hidden, bias=False), torch.nn.GELU(),
                                torch.nn.Linear(args.hidden, args.dim, bias=False))
    results = []
    for tokens in args.tokens:
        torch.manual_seed(1 + rank)
        results.append(_measure(model, layer, dense, torch.randn(tokens, args.dim), groups, args))
    return results


def _measure(model, layer: MoE, dense, x: torch.Tensor, groups, args: argparse.Namespace) -> dict:
    """Median step times of the MoE layer (with its exchange share) and the dense FFN on ``x``, and the global
    expert loads of every measured step."""
    world = groups.world_size
    # Every exchange (the counts, the rows out, the outputs back, and both again in backward) is one
    # all_to_all_single: timing that function alone counts each once (its time includes waiting for the peer).
    spent = {"exchange": 0.0, "calls": 0}
    all_to_all = dist.all_to_all_single

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return all_to_all(*a, **k)
        finally:
            spent["exchange"] += time.perf_counter() - t0
            spent["calls"] += 1

    dist.all_to_all_single = timed  # this process only
    moe_times, dense_times, shares, counts, calls = [], [], [], [], []
    try:
        for rep in range(args.warmup + args.repeats):
            spent["exchange"], spent["calls"] = 0.0, 0
            dist.barrier() if world > 1 else None
            t0 = time.perf_counter()
            for _ in range(args.steps):
                model(x).square().mean().backward()
                ed.reduce_expert_grads(layer, groups)
                if rep >= args.warmup:
                    counts.append(layer.last_routing.tokens_per_expert.clone())
            t_moe = time.perf_counter() - t0
            share = spent["exchange"] / t_moe
            t0 = time.perf_counter()
            for _ in range(args.steps):
                dense(x).square().mean().backward()
            t_dense = time.perf_counter() - t0
            if rep >= args.warmup:
                moe_times.append(t_moe)
                dense_times.append(t_dense)
                shares.append(share)
                calls.append(spent["calls"] / args.steps)
    finally:
        dist.all_to_all_single = all_to_all
    loads = torch.stack(counts)  # (measured steps, E): this rank's tokens' assignments
    if world > 1:
        dist.all_reduce(loads)
    return {"moe_s": statistics.median(moe_times), "dense_s": statistics.median(dense_times),
            "exchange_share": statistics.median(shares), "exchanges_per_step": statistics.median(calls),
            "loads": loads.tolist()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--router", default="ermoe")
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="tokens per rank per step (one row per world size and token count)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for world in args.worlds:
        if args.experts % world:
            raise SystemExit(f"--experts {args.experts} cannot be sharded over {world} ranks")
        ranks = ed.run_local(_job, world, args, timeout_s=600)
        for i, tokens in enumerate(args.tokens):
            per_rank = [r[i] for r in ranks]
            slowest = max(r["moe_s"] for r in per_rank)  # a step ends when the slowest rank's does
            loads = per_rank[0]["loads"]  # the global loads, the same on every rank
            rows.append({"world": world, "router": args.router, "tokens": tokens,
                         "tokens_per_s": world * tokens * args.steps / slowest,
                         "per_rank_tokens_per_s": tokens * args.steps / slowest,
                         "moe_over_dense": statistics.median(r["moe_s"] / r["dense_s"] for r in per_rank),
                         "exchange_share": statistics.median(r["exchange_share"] for r in per_rank),
                         "exchanges_per_step": per_rank[0]["exchanges_per_step"],
                         "straggler": statistics.mean(float(ep_straggler(torch.tensor(c), world)) for c in loads),
                         "straggler_at_E": statistics.mean(float(ep_straggler(torch.tensor(c), args.experts))
                                                           for c in loads),
                         "loads": loads})
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "args": vars(args), "rows": rows}, indent=1))
    else:
        print(f"router {args.router}, D={args.dim}, H={args.hidden}, E={args.experts}, gloo, 1 thread per process "
              f"({platform.machine()}, torch {torch.__version__}); straggler: busiest rank's assignments / mean, at these "
              f"ranks and at {args.experts} (one expert each)")
        print(f"{'ranks':>5}  {'tokens/rank':>11}  {'tokens/s':>10}  {'per rank':>10}  {'MoE/dense':>9}  "
              f"{'exchange share':>14}  {'straggler':>9}  {'at E':>5}")
        for r in rows:
            print(f"{r['world']:>5}  {r['tokens']:>11}  {r['tokens_per_s']:>10.0f}  {r['per_rank_tokens_per_s']:>10.0f}  "
                  f"{r['moe_over_dense']:>9.2f}  {r['exchange_share']:>14.1%}  {r['straggler']:>9.3f}  "
                  f"{r['straggler_at_E']:>5.2f}")
    return rows


if __name__ == "__main__":
    main()
