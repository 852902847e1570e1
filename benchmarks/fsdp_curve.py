"""How close FSDP2 training (``shard: fsdp``) stays to one process: the tiny digits run of tests/test_distributed.py
trained in one process and sharded over each world size (gloo), and the largest relative difference of the logged
loss over its steps (float32 sums in another order; docs/distributed.md).

    python benchmarks/fsdp_curve.py                 # 2 and 4 processes
    python benchmarks/fsdp_curve.py --worlds 2
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


def _train(rank: int, world: int, out_dir: str, shard: str) -> str:
    from ermoe.train import load_config, train

    return str(train(load_config(None, {**CONFIG, "out_dir": out_dir, "shard": shard}), quiet=True))


def _losses(run: str) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run) / "log.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def main() -> None:
    from ermoe.distributed import run_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = _losses(_train(0, 1, f"{tmp}/one", "ddp"))
        for world in args.worlds:
            sharded = _losses(run_local(_train, world, f"{tmp}/w{world}", "fsdp", timeout_s=600)[0])
            worst = max(abs(a - b) / abs(b) for a, b in zip(sharded, one))
            print(f"fsdp on {world} processes: {len(sharded)} steps, largest relative loss difference to one process "
                  f"{worst:.3g}")


if __name__ == "__main__":
    main()
