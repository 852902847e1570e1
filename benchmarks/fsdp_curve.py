"""How close FSDP2 training (``shard: fsdp``) stays to one process: the tiny digits run of tests/test_distributed.py
trained in one process and sharded over each world size (gloo), and the largest relative difference of the logged
loss over its steps (float32 sums in another order; docs/distributed.md); with ``--ep``, FSDP2 beside expert
parallelism of that size too.

    python benchmarks/fsdp_curve.py                 # 2 and 4 processes; and 4 with ep_size 2
    python benchmarks/fsdp_curve.py --worlds 2 --ep
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CONFIG = {  # tests/distributed_cases.py's tiny_digits
    "run_name": "run", "progress": False, "tensorboard": False, "log_every": 1, "probe_size": 32,
    "data": {"name": "digits", "train_limit": 512, "hflip": True, "crop_padding": 1},
    "model": {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
              "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all", "router_kwargs": {"standardize": True}}},
    "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 3, "eval_batch_size": 128},
}


def _train(rank: int, world: int, out_dir: str, shard: str, ep_size: int = 1) -> str:
    from ermoe.train import load_config, train

    return str(train(load_config(None, {**CONFIG, "out_dir": out_dir, "shard": shard, "ep_size": ep_size}),
                     quiet=True))


def _losses(run: str) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run) / "log.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def main() -> None:
    from ermoe.distributed import run_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--ep", type=int, nargs="*", default=[2], help="expert-parallel sizes beside FSDP2 (on the "
                        "largest world size); none: FSDP2 alone")
    args = parser.parse_args()
    jobs = [(world, 1) for world in args.worlds] + [(max(args.worlds), ep) for ep in args.ep]
    with tempfile.TemporaryDirectory() as tmp:
        one = _losses(_train(0, 1, f"{tmp}/one", "ddp"))
        for world, ep in jobs:
            sharded = _losses(run_local(_train, world, f"{tmp}/w{world}ep{ep}", "fsdp", ep, timeout_s=600)[0])
            worst = max(abs(a - b) / abs(b) for a, b in zip(sharded, one))
            beside = f" beside expert parallelism of {ep}" if ep > 1 else ""
            print(f"fsdp on {world} processes{beside}: {len(sharded)} steps, largest relative loss difference to one "
                  f"process {worst:.3g}")


if __name__ == "__main__":
    main()
