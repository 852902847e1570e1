"""Sparse upcycling measured (docs/upcycling.md).

``--eigen-error RUN``: ERMoE's eigen experts upcycled from a trained dense ViT's FFNs, their step-0 relative output
error against the dense FFN as a function of the rank R (``split`` and ``shared`` bases), on the features each block
sees over the first test images; and the whole model's step-0 test top-1 at the shipped rank.

``--eigen-finetune RUN``: the same upcycled ERMoE at each rank and basis choice, fine-tuned for K epochs: test top-1
before and after, and how far each MoE layer then lies from the dense FFN.

``--compare``: the main job's dense ViT (``configs/fmnist_ermoe_vit_tiny.yaml`` with ``model.moe=null``), upcycled
into ERMoE and into Switch (``configs/fmnist_switch_vit_tiny.yaml``'s router) and fine-tuned for K epochs, against
the same MoE trained from scratch for the dense run's epochs plus K, and against the dense model continued for K epochs
with the same fine-tuning recipe (``model.init_checkpoint``: what restarting the schedule alone does); each seed's runs
under ``--out``, reused when finished (a run cut short is resumed). ``--stem``: every run's patch embedding is the
frozen ImageNet EfficientNet-Lite0 stem (``model.stem=efficientnet_lite0``, its features cached: ``data.stem_cache``),
the pretrained-stem condition. Prints a markdown table: test top-1, load CV of the MoE layers, and each
upcycled model's step-0 test top-1 (before fine-tuning).

    python benchmarks/upcycling.py --compare --seeds 0 1 2 --finetune-epochs 1      # ~1 hour on 2 cores
    python benchmarks/upcycling.py --compare --stem --out runs/upcycling-stem             # ~1 hour, + 4 min caching
    python benchmarks/upcycling.py --eigen-error runs/upcycling/dense-seed0
    python benchmarks/upcycling.py --eigen-finetune runs/upcycling/dense-seed0 --out runs/upcycling-rank  # ~12 min

Run it alone on the machine (the runs' wall-clock times are recorded in their metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "configs/fmnist_ermoe_vit_tiny.yaml"
ROUTERS = {  # row name -> the model.moe overrides on top of the main job's config
    "ERMoE": ["model.moe.router=ermoe"],
    "Switch": ["model.moe.router=softmax_topk", "model.moe.router_kwargs.balance_weight=0.01"],
}


EXTRA: list[str] = []  # --stem and --override: appended to every run's overrides
STEM = ["model.stem=efficientnet_lite0", "data.stem_cache=true"]


def _config(overrides: list[str]):
    from ermoe.train import load_config
    return load_config(MAIN, [*overrides, *EXTRA])


def _run(out: Path, name: str, overrides: list[str]) -> dict:
    """Train (or finish, or reuse) one run; its metrics."""
    from ermoe.train import train
    run = out / name
    if (run / "metrics.json").exists():
        return json.loads((run / "metrics.json").read_text())
    base = [f"out_dir={out}", f"run_name={name}", "progress=false", "tensorboard=false", *overrides]
    cfg = _config(base)
    print(f"training {name}: {' '.join(overrides)}", flush=True)
    train(cfg, resume=run if (run / "checkpoints").exists() else None, quiet=True)
    return json.loads((run / "metrics.json").read_text())


def _load_cv(metrics: dict) -> float:
    return statistics.fmean(layer["load_cv"] for layer in metrics["layers"].values())


def step0_top1(overrides: list[str]) -> float:
    """The test top-1 of the model the config builds, before any training step (the upcycled weights)."""
    from ermoe.train import trainer as trainer_mod
    cfg = _config(["progress=false", "tensorboard=false", *overrides])
    task, model, _ = trainer_mod.setup(cfg)
    with contextlib.redirect_stdout(sys.stderr):
        return task.evaluate(model.eval(), contextlib.nullcontext)["test_top1"]


def compare(out: Path, seeds: list[int], finetune_epochs: int) -> str:
    dense_epochs = _config([]).optim.epochs
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        dense = _run(out, f"dense-seed{seed}", [f"seed={seed}", "model.moe=null"])
        rows.setdefault("Dense", []).append({"top1": dense["test_top1"], "cv": None, "step0": None})
        # The control: the dense model trained K more epochs with the same fine-tuning recipe (warm-up and cosine
        # decay again), started from its weights by model.init_checkpoint: what the restart alone does.
        m = _run(out, f"dense-continued-seed{seed}", [f"seed={seed}", "model.moe=null",
                                                      f"model.init_checkpoint={out / f'dense-seed{seed}'}",
                                                      f"optim.epochs={finetune_epochs}"])
        rows.setdefault(f"Dense continued, +{finetune_epochs} epoch(s)", []).append(
            {"top1": m["test_top1"], "cv": None, "step0": None})
        for router, moe in ROUTERS.items():
            up = [f"seed={seed}", *moe, f"model.upcycle_from={out / f'dense-seed{seed}'}",
                  f"optim.epochs={finetune_epochs}"]
            start = step0_top1(up)
            m = _run(out, f"upcycled-{router.lower()}-seed{seed}", up)
            rows.setdefault(f"{router} upcycled, +{finetune_epochs} epoch(s)", []).append(
                {"top1": m["test_top1"], "cv": _load_cv(m), "step0": start})
            m = _run(out, f"scratch-{router.lower()}-seed{seed}",
                     [f"seed={seed}", *moe, f"optim.epochs={dense_epochs + finetune_epochs}"])
            rows.setdefault(f"{router} from scratch, {dense_epochs + finetune_epochs} epochs", []).append(
                {"top1": m["test_top1"], "cv": _load_cv(m), "step0": None})

    def cell(values: list[float | None], digits: int) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"

    lines = [f"seeds {seeds}; mean ± std over seeds; dense: {dense_epochs} epochs", "",
             "| model | test top-1 | load CV (mean of layers) | step-0 test top-1 |", "|---|---|---|---|"]
    for name, rs in rows.items():
        lines.append(f"| {name} | {cell([r['top1'] for r in rs], 4)} | {cell([r['cv'] for r in rs], 3)} | "
                     f"{cell([r['step0'] for r in rs], 4)} |")
    return "\n".join(lines)


BLOCKS = [1, 3]  # the main job's every_other blocks


@torch.no_grad()
def _block_inputs(model, task, images: int) -> tuple[dict[int, torch.Tensor], int]:
    """The ``(B, N, D)`` input of each MoE-replaced block's FFN over the first ``images`` test images."""
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in BLOCKS}
    hooks = [model.blocks[i].mlp.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0]))
             for i in BLOCKS]
    seen = 0
    for batch in task.eval_batches("test"):
        model(*batch.inputs)
        seen += len(batch.target)
        if seen >= images:
            break
    for h in hooks:
        h.remove()
    return {i: torch.cat(xs) for i, xs in inputs.items()}, seen


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@torch.no_grad()
def eigen_error(run_dir: Path, images: int, ranks: dict[str, list[int]]) -> str:
    """Relative error ||MoE(x) - FFN(x)|| / ||FFN(x)|| over the patch tokens each MoE-replaced block's FFN sees."""
    import ermoe
    from ermoe.train import trainer as trainer_mod

    _, task, dense, _, _ = trainer_mod.load_run(run_dir)
    dense.eval()
    inputs, seen = _block_inputs(dense, task, images)
    lines = [f"run {run_dir}; {seen} test images; relative error of the upcycled ERMoE layer (8 experts) on the "
             "patch tokens each block's FFN sees", "", "| bases | R | " + " | ".join(f"block {i}" for i in BLOCKS)
             + " |", "|---|---|" + "---|" * len(BLOCKS)]
    for bases, rs in ranks.items():
        for r in rs:
            errors = []
            for i in BLOCKS:
                x = inputs[i][:, dense.num_prefix_tokens:].reshape(-1, inputs[i].shape[-1])
                want = dense.blocks[i].mlp(x)
                holder = torch.nn.Sequential()
                holder.ffn = copy.deepcopy(dense.blocks[i].mlp)
                ermoe.upcycle(holder, "ermoe", 8, bases=bases, rank=r)
                errors.append(_relative_error(holder.ffn(x), want))
            lines.append(f"| {bases} | {r} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")
    return "\n".join(lines)


@torch.no_grad()
def finetuned_error(dense_run: Path, tuned_run: Path, images: int) -> list[float]:
    """Per MoE block, the fine-tuned MoE layer's relative distance from the dense run's FFN, both applied to the
    tokens the fine-tuned model's block feeds its MoE (patch tokens)."""
    from ermoe.train import trainer as trainer_mod

    dense = trainer_mod.load_run(dense_run)[2].eval()
    _, task, tuned, _, _ = trainer_mod.load_run(tuned_run)
    tuned.eval()
    inputs, _ = _block_inputs(tuned, task, images)
    p = tuned.num_prefix_tokens
    return [_relative_error(tuned.blocks[i].mlp(inputs[i])[:, p:], dense.blocks[i].mlp(inputs[i])[:, p:])
            for i in BLOCKS]


def eigen_finetune(dense_run: Path, out: Path, images: int, ranks: dict[str, list[int]], epochs: int) -> str:
    """ERMoE upcycled from ``dense_run`` at each (bases, R), fine-tuned ``epochs``: test top-1 at step 0 and after,
    and each MoE layer's relative distance from the dense FFN after fine-tuning."""
    seed = _config([]).seed
    lines = [f"dense run {dense_run}; ERMoE (8 experts, top-1) upcycled at each rank R and fine-tuned {epochs} "
             f"epoch(s) with the main job's recipe; layer distance from the dense FFN on the first {images} test "
             "images' patch tokens", "",
             "| bases | R | step-0 test top-1 | test top-1 after | load CV after | " +
             " | ".join(f"block {i} distance after" for i in BLOCKS) + " |", "|---|---|---|---|---|" +
             "---|" * len(BLOCKS)]
    for bases, rs in ranks.items():
        for r in rs:
            up = [f"seed={seed}", "model.moe.router=ermoe", f"model.moe.router_kwargs.rank={r}",
                  f"model.upcycle_bases={bases}", f"model.upcycle_from={dense_run}", f"optim.epochs={epochs}"]
            start = step0_top1(up)
            name = f"finetune-{bases}-r{r}"
            m = _run(out, name, up)
            distance = finetuned_error(dense_run, out / name, images)
            lines.append(f"| {bases} | {r} | {start:.4f} | {m['test_top1']:.4f} | {_load_cv(m):.3f} | " +
                         " | ".join(f"{d:.3f}" for d in distance) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--eigen-error", type=Path, metavar="DENSE_RUN")
    parser.add_argument("--eigen-finetune", type=Path, metavar="DENSE_RUN",
                        help="ERMoE upcycled at each rank and fine-tuned --finetune-epochs (runs under --out)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/upcycling")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--stem", action="store_true", help="the frozen pretrained EfficientNet-Lite0 stem condition")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every run (smoke tests)")
    args = parser.parse_args()
    EXTRA.extend([*(STEM if args.stem else []), *args.override])
    if not (args.compare or args.eigen_error or args.eigen_finetune):
        parser.error("give --compare, --eigen-error DENSE_RUN and/or --eigen-finetune DENSE_RUN")
    if args.eigen_error:
        print(eigen_error(args.eigen_error, args.images, {"split": [4, 8, 12, 16, 20, 24],
                                                          "shared": [4, 8, 16, 24, 48, 96, 144, 191]}), flush=True)
    if args.eigen_finetune:
        print(eigen_finetune(args.eigen_finetune, args.out, args.images, {"split": [4, 8, 16, 24],
                                                                          "shared": [8, 24, 96, 191]},
                             args.finetune_epochs), flush=True)
    if args.compare:
        print(compare(args.out, args.seeds, args.finetune_epochs), flush=True)


if __name__ == "__main__":
    main()
