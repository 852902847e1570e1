"""Memory per rank of DDP and FSDP2 (``shard: ddp`` / ``shard: fsdp``, docs/distributed.md) for a ViT-B-sized ERMoE
model on this CPU: each rank's bytes of weights, gradients and AdamW moments after one training step, and its peak
resident memory, at each world size (gloo processes, one thread each); then one checkpoint written in each format
(``checkpoint_format``: single, the whole model and optimizer gathered on rank 0; sharded, each rank its part through
torch.distributed.checkpoint): its seconds, what rank 0 wrote, and rank 0's peak resident memory after it.

    python benchmarks/fsdp_memory.py                         # ViT-B/16 width and depth, ERMoE in every other block
    python benchmarks/fsdp_memory.py --worlds 2 4 --batch 2 --json   # and FSDP2 beside expert parallelism of 2 on 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

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
    parallel = Parallel(init_parallel(args.ep), fsdp=args.shard == "fsdp")
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
    row = {"shard": args.shard, "format": args.format, "world": world, "ep": args.ep, "rank": rank,
           "weights_mb": _bytes(params) / 2 ** 20,
           "grads_mb": _bytes(p.grad for p in params if p.grad is not None) / 2 ** 20,
           "moments_mb": _bytes(moments) / 2 ** 20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "params_total": parallel.param_counts["total"]}
    return {**row, **_checkpoint(model, optimizer, parallel, args)}


def _checkpoint(model, optimizer, parallel, args: argparse.Namespace) -> dict:
    """Write one checkpoint as the trainer does (a collective) into a fresh folder: its seconds, rank 0's bytes on
    disk and peak resident memory afterwards."""
    from ermoe.train.checkpoint import save_checkpoint, trainer_state
    from ermoe.train import whole_state
    from ermoe.train.shards import optimizer_layout, save_sharded_checkpoint, shard_tensors

    folder = Path(parallel.broadcast(tempfile.mkdtemp(prefix="ermoe_ckpt_") if parallel.main else None))
    parallel.barrier()
    t0 = time.perf_counter()
    if args.format == "sharded":
        state = trainer_state(1, {"optimization": {"optimizer": optimizer_layout(optimizer, model)}})
        save_sharded_checkpoint(folder, 1, shard_tensors(model, optimizer, None, parallel), state, 1, parallel)
    else:
        weights = whole_state.model_state(parallel, model)
        state = trainer_state(1, {"optimization": {"optimizer": whole_state.optimizer_state(parallel, optimizer, model)}})
        if parallel.main:
            save_checkpoint(folder, 1, weights, state, 1)
        parallel.barrier()
    seconds = time.perf_counter() - t0
    ckpt = folder / "step_00000001"
    mine = [f for f in ckpt.rglob("*") if f.is_file() and not f.name.startswith("__") or f.name.startswith("__0_")]
    out = {"save_s": seconds, "rank0_wrote_mb": sum(f.stat().st_size for f in mine) / 2 ** 20,
           "checkpoint_mb": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2 ** 20,
           "peak_rss_after_save_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    parallel.barrier()
    if parallel.main:
        shutil.rmtree(folder)
    return out


def main() -> None:
    from ermoe.distributed import run_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--ep", type=int, nargs="*", default=[2], help="expert-parallel sizes beside FSDP2 (sharded "
                        "checkpoints) on the largest world size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    jobs = [(world, shard, fmt, 1) for world in args.worlds
            for shard, fmt in (("ddp", "single"), ("fsdp", "single"), ("fsdp", "sharded"))]
    jobs += [(max(args.worlds), "fsdp", "sharded", ep) for ep in args.ep]
    eps = args.ep
    for world, args.shard, args.format, args.ep in jobs:
        rows.append(run_local(_job, world, args, timeout_s=900)[0])  # rank 0's (the ranks hold alike)
    args.ep = eps
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"ViT-B/16 width and depth, ERMoE with 8 experts in every other block ({rows[0]['params_total'] / 1e6:.1f} M "
          f"parameters), AdamW, {args.batch} images per rank; rank 0 after one step; {platform.machine()}, torch "
          f"{torch.__version__}, gloo")
    columns = [("shard", 5, "shard", ""), ("checkpoint", 10, "format", ""), ("world", 5, "world", ""),
               ("ep", 2, "ep", ""), ("weights MB", 10, "weights_mb", ".0f"), ("grads MB", 8, "grads_mb", ".0f"),
               ("moments MB", 10, "moments_mb", ".0f"), ("peak RSS MB", 11, "peak_rss_mb", ".0f"),
               ("save s", 6, "save_s", ".1f"), ("rank 0 wrote MB", 15, "rank0_wrote_mb", ".0f"),
               ("peak RSS after save MB", 22, "peak_rss_after_save_mb", ".0f")]
    print("  ".join(f"{title:>{width}}" for title, width, _, _ in columns))
    for r in rows:
        print("  ".join(f"{r[key]:>{width}{fmt}}" for _, width, key, fmt in columns))


if __name__ == "__main__":
    main()
