"""Memory per rank of DDP and FSDP2 (``shard: ddp`` / ``shard: fsdp``, docs/distributed.md) for a ViT-B-sized ERMoE
model on this CPU: each rank's bytes of weights, gradients and AdamW moments after one training step, and its peak
resident memory, at each world size (gloo processes, one thread each).

    python benchmarks/fsdp_memory.py                         # ViT-B/16 width and depth, ERMoE in every other block
    python benchmarks/fsdp_memory.py --worlds 2 4 --batch 2 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource

import torch


def _bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _job(rank: int, world: int, args: argparse.Namespace) -> dict:
    import ermoe
    from ermoe.distributed import init_parallel
    from ermoe.train.components import build_optimizer
    from ermoe.train.config import OptimConfig
    from ermoe.train.parallel import Parallel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ermoe.create_model("vit_base", num_classes=1000, img_size=224, in_chans=3, patch_size=16,
                               moe={"router": "ermoe", "num_experts": 8, "blocks": "every_other"})
    parallel = Parallel(init_parallel(1), fsdp=args.shard == "fsdp")
    forward = parallel.prepare(model)
    optimizer = build_optimizer(model, OptimConfig())
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.arange(args.batch) % 1000
    loss = model.training_loss(forward(x), y, torch.nn.functional.cross_entropy) + model.aux_loss()
    loss.backward()
    parallel.after_backward(model)
    optimizer.step()
    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"shard": args.shard, "world": world, "rank": rank, "weights_mb": _bytes(params) / 2 ** 20,
            "grads_mb": _bytes(p.grad for p in params if p.grad is not None) / 2 ** 20,
            "moments_mb": _bytes(moments) / 2 ** 20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_total": parallel.param_counts["total"]}


def main() -> None:
    from ermoe.distributed import run_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        for shard in ("ddp", "fsdp"):
            args.shard = shard
            rows.append(run_local(_job, world, args, timeout_s=600)[0])  # rank 0's (the ranks hold alike)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"ViT-B/16 width and depth, ERMoE with 8 experts in every other block ({rows[0]['params_total'] / 1e6:.1f} M "
          f"parameters), AdamW, {args.batch} images per rank; rank 0 after one step; {platform.machine()}, torch "
          f"{torch.__version__}, gloo")
    print(f"{'shard':>5}  {'world':>5}  {'weights MB':>10}  {'grads MB':>8}  {'moments MB':>10}  {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['shard']:>5}  {r['world']:>5}  {r['weights_mb']:>10.0f}  {r['grads_mb']:>8.0f}  "
              f"{r['moments_mb']:>10.0f}  {r['peak_rss_mb']:>11.0f}")


if __name__ == "__main__":
    main()
