"""Whole-model training throughput: each task's main-job model with its MoE layers against the dense model of the
same active size, trained for the same steps, interleaved (docs/performance.md).

The models are the shipped configs' (``configs/fmnist_ermoe_vit_tiny.yaml``: ViT-tiny with ERMoE in blocks 1 and 3;
``configs/brainage_ermoe.yaml``: SFCN with ERMoE over the cells of its 4th stage; ``configs/retrieval_ermoe.yaml``:
a dual encoder with ERMoE in every other block of both towers); the dense reference is the same config with
``moe: null`` where the experts replace an FFN of the same hidden size (ViT, both towers), and ``dense_ffn: true``
where the MoE is an extra block (SFCN: a dense FFN of the same active size in its place). Each training step is
the loop's own (``Trainer._train_step`` and ``_update``: the batch from the task's loader, forward, loss, backward,
clipping, AdamW, the routers' ``after_step``); logging and checkpoints are left out. The two models alternate in
chunks of ``--steps`` steps (the order flips every repeat, the first chunk of each is a warm-up), and the figure is
the median over repeats of the paired ratio of their step times, which cancels most of the machine's drift.

    python benchmarks/train_throughput.py                       # the three tasks, about 6 minutes on 2 cores
    python benchmarks/train_throughput.py --tasks classification --steps 20 --repeats 5
    python benchmarks/train_throughput.py --json benchmarks/results/train_throughput_cpu_2core.json
    python benchmarks/train_throughput.py --compile             # both models compiled (optim.compile=inductor)
    python benchmarks/train_throughput.py --tasks classification --profile   # where each model's step time goes

Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# task -> (config, overrides for a quick data set-up: the step does not depend on the dataset's size,
#          overrides that make the dense reference)
JOBS = {
    "classification": ("configs/fmnist_ermoe_vit_tiny.yaml", [], ["model.moe=null"]),
    "brain_age": ("configs/brainage_ermoe.yaml", ["data.cohort_size=300"], ["model.moe=null", "model.dense_ffn=true"]),
    "retrieval": ("configs/retrieval_ermoe.yaml", ["data.caption_set_size=2000"],
                  ["model.image.moe=null", "model.text.moe=null"]),
}


def build(task_name: str, dense: bool, out_dir: str, compile_model: bool, extra: list[str]):
    from ermoe.train import load_config
    from ermoe.train import trainer as trainer_mod
    from ermoe.train.run import Run

    config, quick, dense_overrides = JOBS[task_name]
    overrides = [f"out_dir={out_dir}", "progress=false", "tensorboard=false", "data.val_size=0", *quick,
                 *(dense_overrides if dense else []), *(["optim.compile=inductor"] if compile_model else []), *extra]
    if task_name == "retrieval":
        overrides.remove("data.val_size=0")  # the caption set has fixed splits
    cfg = load_config(ROOT / config, overrides)
    task, model, device = trainer_mod.setup(cfg)
    trainer = trainer_mod.Trainer(cfg, Run.new(cfg), task, model, device, quiet=True)
    batches = task.train_batches(0, trainer.position.total)
    return trainer, batches, cfg.optim.batch_size


def run_steps(trainer, batches, steps: int) -> float:
    """Seconds for ``steps`` training steps, each from waiting for its batch to the end of its update."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer._train_step(next(batches), epoch=0)
        trainer._update()
    sync()
    return time.perf_counter() - t0


def count_host_reads(trainer, batches) -> int:
    """Reads of device values by the host in one training step (``ermoe.host_traffic.HostTraffic``): each would
    stall a GPU's queue; on a CPU they cost little but are counted all the same, so a change that adds one shows in
    this benchmark's rows (the CPU's own are the loss check without a fused optimizer and the MoE layers' NaN scan)."""
    from ermoe.host_traffic import HostTraffic

    kind = "cpu" if trainer.device.type == "cpu" else trainer.device.type
    with HostTraffic(device=kind, strict=False) as traffic:
        run_steps(trainer, batches, 1)
    return traffic.host_reads


def measure(task_name: str, steps: int, repeats: int, compile_model: bool, extra: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        runs = {kind: build(task_name, kind == "dense", f"{tmp}/{kind}", compile_model, list(extra))
                for kind in ("dense", "moe")}
        t_build = time.perf_counter()
        for kind, (trainer, batches, _) in runs.items():  # warm-up (and compilation)
            run_steps(trainer, batches, max(3, steps // 2))
        warmup_s = time.perf_counter() - t_build
        host_reads = {kind: count_host_reads(trainer, batches) for kind, (trainer, batches, _) in runs.items()}
        ratios, times = [], {"dense": [], "moe": []}
        for r in range(repeats):
            order = ("dense", "moe") if r % 2 == 0 else ("moe", "dense")
            t = {kind: run_steps(runs[kind][0], runs[kind][1], steps) / steps for kind in order}
            ratios.append(t["moe"] / t["dense"])
            for kind in t:
                times[kind].append(t[kind])
        batch = runs["moe"][2]
        active = {kind: runs[kind][0].model.active_parameters() for kind in runs}
        for trainer, batches, _ in runs.values():
            batches.close()
            trainer.close()
    dense_s, moe_s = statistics.median(times["dense"]), statistics.median(times["moe"])
    ratio = statistics.median(ratios)
    return {"task": task_name, "batch": batch, "steps": steps, "repeats": repeats, "compile": compile_model,
            "dense_img_per_s": batch / dense_s, "moe_img_per_s": batch / moe_s, "throughput_ratio": 1 / ratio,
            "step_time_ratio": ratio, "ratios": ratios, "active_params_dense": active["dense"],
            "active_params_moe": active["moe"], "warmup_s": warmup_s,
            "host_reads_per_step_dense": host_reads["dense"], "host_reads_per_step_moe": host_reads["moe"]}


def profile_steps(task_name: str, steps: int, extra: list[str] = ()) -> None:
    """torch.profiler's table of ``steps`` training steps of each model (after 5 warm-up steps), by self time."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("moe", "dense"):
            trainer, batches, _ = build(task_name, kind == "dense", f"{tmp}/{kind}", False, list(extra))
            run_steps(trainer, batches, 5)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_steps(trainer, batches, steps)
            print(f"## {task_name}: {kind}, {steps} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
            batches.close()
            trainer.close()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--steps", type=int, default=10, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="compile both models (optim.compile=inductor); the "
                        "warm-up time in the JSON includes the compilation")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the machine here")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for both models (e.g. a smaller model or dataset)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of --steps steps of "
                        "each model instead of timing them")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        for name in args.tasks:
            profile_steps(name, args.steps, args.override)
        return []
    rows = []
    print("| task | batch | dense img/s | MoE img/s | MoE / dense throughput | active params dense / MoE | "
          "host reads / step dense / MoE |")
    print("|---|---|---|---|---|---|---|")
    for name in args.tasks:
        row = measure(name, args.steps, args.repeats, args.compile, args.override)
        rows.append(row)
        print(f"| {name} | {row['batch']} | {row['dense_img_per_s']:.1f} | {row['moe_img_per_s']:.1f} | "
              f"{row['throughput_ratio']:.2f} (paired ratios {min(row['ratios']):.2f}-{max(row['ratios']):.2f} in "
              f"step time) | {row['active_params_dense']:,} / {row['active_params_moe']:,} | "
              f"{row['host_reads_per_step_dense']} / {row['host_reads_per_step_moe']} |", flush=True)
    if args.json is not None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        args.json.write_text(json.dumps({"machine": {"device": device, "threads": torch.get_num_threads(),
                                                     "torch": torch.__version__, "python": sys.version.split()[0]},
                                         "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
