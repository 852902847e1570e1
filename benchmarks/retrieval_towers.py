"""Encode throughput of the retrieval dual encoder's towers with MoE layers (per router) against the dense towers of
the same active size: images/s through the image tower and captions/s through the text tower, in inference mode
(what retrieval over a gallery pays), each measured interleaved with the dense tower's, as the median over repeats
of the paired ratio ``t_moe / t_dense``.

    python benchmarks/retrieval_towers.py                        # the main job's towers (configs/retrieval_ermoe.yaml)
    python benchmarks/retrieval_towers.py --batch 256 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import ermoe

IMAGE = {"name": "vit_tiny", "embed_dim": 96, "num_heads": 3, "depth": 4, "patch_size": 8}
TEXT = {"width": 96, "depth": 2, "num_heads": 3}


def build(router: str | None, experts: int) -> torch.nn.Module:
    moe = None if router is None else {"router": router, "num_experts": experts, "blocks": "every_other"}
    return ermoe.create_model("dual_encoder", img_size=64, in_chans=1, vocab_size=200, context_length=40,
                              image={**IMAGE, "moe": moe}, text={**TEXT, "moe": moe}).eval()


@torch.inference_mode()
def timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--caption-tokens", type=int, default=14, help="real tokens per caption (the rest padding)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--routers", nargs="+", default=["ermoe", "emoe", "softmax_topk", "vmoe", "expert_choice"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 1, 64, 64)
    ids = torch.zeros(args.batch, 40, dtype=torch.long)
    ids[:, :args.caption_tokens] = torch.randint(2, 200, (args.batch, args.caption_tokens))
    dense = build(None, args.experts)
    models = {r: build(r, args.experts) for r in args.routers}
    rows = []
    for tower, inputs in (("image", images), ("text", ids)):
        encode = "encode_image" if tower == "image" else "encode_text"
        for m in (dense, *models.values()):  # warm-up
            timed(getattr(m, encode), inputs)
        dense_times, ratios = [], {r: [] for r in models}
        for rep in range(args.repeats):
            for r, m in models.items():
                pair = [(dense, "dense"), (m, r)] if rep % 2 == 0 else [(m, r), (dense, "dense")]
                times = {name: timed(getattr(model, encode), inputs) for model, name in pair}
                ratios[r].append(times[r] / times["dense"])
                dense_times.append(times["dense"])
        dense_s = statistics.median(dense_times)
        rows.append({"tower": tower, "router": "dense", "ratio": 1.0, "per_s": args.batch / dense_s})
        for r, values in ratios.items():
            ratio = statistics.median(values)
            rows.append({"tower": tower, "router": r, "ratio": ratio, "per_s": args.batch / (dense_s * ratio)})
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {args.batch}, "
          f"64 x 64 images in 8 x 8 patches, captions of {args.caption_tokens} tokens (40 with padding), "
          f"{args.experts} experts in every other block; median of {args.repeats} paired repeats")
    print(f"{'tower':<6} {'router':<14} {'t / dense':>9} {'per s':>9}")
    for row in rows:
        print(f"{row['tower']:<6} {row['router']:<14} {row['ratio']:>9.3f} {row['per_s']:>9.0f}")
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
