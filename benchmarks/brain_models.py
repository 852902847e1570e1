"""Training steps per second of the brain-age models against the dense model of the same active size.

``--family cnn`` (default): the SFCN-style 3D CNN with an MoE over its feature-map cells (per router) against the
same CNN with a dense FFN of the same active size there (``dense_ffn=True``), the plain CNN without either, and the
regional experts (``regional_sfcn3d``: GM/WM/CSF + 1 free SFCN trunk, ERMoE top-2 per volume). ``--family vit3d``:
the 3D ViT over volumetric patches (ERMoE-ba's reference: 7^3 patches, width 256, depth 4) with MoE layers in every
other block (per router) against the dense 3D ViT. Each model's step (forward, L1 loss, backward, AdamW) runs
interleaved with the dense model's, and its figure is the median over repeats of the paired ratio
``t_model / t_dense`` (cancels the machine's drift).

    python benchmarks/brain_models.py                           # the main job's size: 4 mm volumes, batch 16
    python benchmarks/brain_models.py --spacing 2 --batch 4     # the 2 mm grid (91 x 109 x 91)
    python benchmarks/brain_models.py --family vit3d --spacing 2 --batch 2 --repeats 5   # the reference ViT
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import ermoe
from ermoe.data.nifti import mni_grid


def build(kind: str, shape: tuple[int, int, int], channels: list[int], experts: int, family: str,
          spacing: float) -> torch.nn.Module:
    if family == "vit3d":
        moe = None if kind == "dense_ffn" else {"router": kind, "num_experts": experts}
        return ermoe.create_model("vit3d", volume_shape=shape, moe=moe)
    if kind == "regional":
        return ermoe.create_model("regional_sfcn3d", volume_shape=shape, spacing=spacing, channels=channels,
                                  router_kwargs={"threshold": 0.5})
    if kind == "plain":
        return ermoe.create_model("sfcn3d", volume_shape=shape, channels=channels)
    if kind == "dense_ffn":
        return ermoe.create_model("sfcn3d", volume_shape=shape, channels=channels, dense_ffn=True)
    return ermoe.create_model("sfcn3d", volume_shape=shape, channels=channels,
                              moe={"router": kind, "num_experts": experts})


def step_time(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, age: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = model(x)
    loss = (out[:, 0] - age).abs().mean() + model.aux_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    model.after_step(1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64, 64])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--routers", nargs="+", default=["ermoe", "emoe", "softmax_topk", "vmoe", "expert_choice"])
    parser.add_argument("--family", choices=["cnn", "vit3d"], default="cnn")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shape, _ = mni_grid(args.spacing)
    x, age = torch.randn(args.batch, 1, *shape), torch.randn(args.batch)
    kinds = ["dense_ffn", *args.routers] if args.family == "vit3d" else ["dense_ffn", "plain", *args.routers, "regional"]
    models = {k: build(k, shape, args.channels, args.experts, args.family, args.spacing).train() for k in kinds}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    for k in kinds:  # warm-up
        step_time(models[k], opts[k], x, age)
    ratios: dict[str, list[float]] = {k: [] for k in kinds if k != "dense_ffn"}
    dense_times = []
    for r in range(args.repeats):
        for k in ratios:
            pair = [("dense_ffn", None), (k, None)] if r % 2 == 0 else [(k, None), ("dense_ffn", None)]
            times = {name: step_time(models[name], opts[name], x, age) for name, _ in pair}
            ratios[k].append(times[k] / times["dense_ffn"])
            dense_times.append(times["dense_ffn"])
    dense_s = statistics.median(dense_times)
    rows = [{"model": "dense_ffn", "ratio": 1.0, "steps_per_s": 1 / dense_s,
             "active_params": models["dense_ffn"].active_parameters()}]
    for k, values in ratios.items():
        ratio = statistics.median(values)
        rows.append({"model": k, "ratio": ratio, "steps_per_s": 1 / (dense_s * ratio),
                     "active_params": models[k].active_parameters()})
    size = "reference 3D ViT (patch 7, width 256, depth 4)" if args.family == "vit3d" else f"channels {args.channels}"
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; volumes "
          f"{shape} at {args.spacing} mm, batch {args.batch}, {size}, {args.experts} experts; dense reference "
          f"{dense_s:.3f} s a step; median of {args.repeats} paired repeats")
    print(f"{'model':<14} {'t / dense':>9} {'steps/s':>8} {'active params':>14}")
    for row in rows:
        print(f"{row['model']:<14} {row['ratio']:>9.3f} {row['steps_per_s']:>8.2f} {row['active_params']:>14,}")
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
