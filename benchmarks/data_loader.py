"""How fast the streaming loaders feed a training step, and whether a run's start-up and memory grow with the
dataset (docs/data.md).

1. **Loader rates**: examples/s of each streaming loader at 0, 1 and 2 workers, after its first batch (the
   start-up is reported apart): 224-pixel JPEGs with DeiT's augmentation (RandomResizedCrop, RandAugment m9, random
   erasing, mixup/CutMix) from an ImageFolder; Karpathy image-caption pairs decoded from 224-pixel JPEGs; brain
   volumes at 2 mm read from the preprocessing cache. Beside each, the training step rate of the matching model on
   this machine (forward, loss, backward, AdamW): the ERMoE ViT-S/16 of configs/imagenet_ermoe_vit_s16.yaml, an
   ERMoE dual encoder at 224 pixels, the ERMoE SFCN of configs/brainage_ermoe.yaml at 2 mm. Also the time to build
   the brain cache at 0 and 2 workers.
2. **Scaling**: ``ermoe train`` on a generated ImageFolder of N and of 16N training images for the same few steps:
   wall time to the end and peak memory of the whole process tree (the trainer and its loader workers, proportional
   set size: pages shared between processes counted once). Targets (issue 23): memory <= 1.3x, time <= 1.5x.
3. **An ImageNet-sized tree** (``--parts tree``): 1,281,167 training and 50,000 validation files in 1,000 class
   folders (hard links to a few generated JPEGs: the directory entries of ImageNet at the cost of a few files);
   the time to list it and to the first training batch (DeiT augmentation, 2 workers), and the memory of the lists.

    python benchmarks/data_loader.py                          # everything (about 10 minutes on 2 cores)
    python benchmarks/data_loader.py --parts scaling --images 256
    python benchmarks/data_loader.py --json benchmarks/results/data_loader_cpu_2core.json
    python benchmarks/data_loader.py --parts tree

Images are smooth random fields (JPEG sizes near ImageNet's, ~40 KB at 500 x 375); run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking (low-frequency) RGB image: a coarse random field upsampled, plus mild noise."""
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)


def make_folder(root: Path, train: int, val: int, classes: int = 10, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            d = root / split / f"n{i % classes:08d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(smooth_image(rng, 375, 500)).save(d / f"{split}_{i:06d}.JPEG", quality=90)
    return root


def make_karpathy(folder: Path) -> Path:
    files = sorted((folder / "train").rglob("*.JPEG"))
    entries = [{"filepath": f.parent.name, "filename": f.name, "split": "test" if i % 8 == 7 else "train",
                "sentences": [{"raw": f"a photo of thing {i % 50} on a table"}, {"raw": f"picture {i} of a scene"}]}
               for i, f in enumerate(files)]
    path = folder / "dataset_karpathy.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def make_volumes(root: Path, n: int, spacing: float = 2.0) -> Path:
    """``n`` brain-like NIfTI volumes on the MNI grid at ``spacing`` mm and their CSV."""
    import nibabel as nib

    from ermoe.data.nifti import mni_grid

    shape, affine = mni_grid(spacing)
    world = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) @ affine[:3, :3].T + affine[:3, 3]
    radius = np.linalg.norm(world / np.array([70.0, 90.0, 70.0]), axis=-1)
    rng = np.random.default_rng(0)
    rows = ["path,age"]
    for i in range(n):
        data = ((radius < 1) * (1.0 + 0.2 * rng.standard_normal(shape))).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), root / f"s{i}.nii.gz")
        rows.append(f"s{i}.nii.gz,{20 + i % 60}")
    (root / "ages.csv").write_text("\n".join(rows) + "\n")
    return root / "ages.csv"


def rate(batches, count: int) -> dict[str, float]:
    """Seconds to the first batch, and examples/s over the next ``count`` batches."""
    t0 = time.perf_counter()
    it = iter(batches)
    first = next(it)
    t1 = time.perf_counter()
    seen = 0
    for _ in range(count):
        seen += len(next(it))
    t2 = time.perf_counter()
    return {"first_batch_s": t1 - t0, "examples_per_s": seen / (t2 - t1), "batch": len(first)}


def task_for(overrides: dict) -> object:
    from ermoe.train import create_task
    from ermoe.train import load_config

    task = create_task(load_config(None, overrides), torch.device("cpu"))
    task.load()
    return task


def step_rate(model: torch.nn.Module, inputs: tuple, loss_fn, steps: int = 3) -> float:
    """Training examples/s of ``model`` on ``inputs`` (median step after one warm-up)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn(model(*inputs)) + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return len(inputs[0]) / sorted(times[1:])[len(times[1:]) // 2]


def loader_rates(work: Path, args: argparse.Namespace) -> list[dict]:
    import ermoe
    from ermoe.data.folder import ImageAugment, ImageFolderData
    from ermoe.data.nifti import build_cache, read_csv

    rows = []
    folder = make_folder(work / "rates", args.images, 16)
    batch, count = args.batch, args.batches
    for w in args.workers:
        data = ImageFolderData(folder, args.img_size, augment=ImageAugment(), num_workers=w)
        r = rate((x for x, _ in data.train_batches(0, batch, 0, count + 1, 0, 1, torch.device("cpu"))), count)
        rows.append({"loader": f"imagefolder {args.img_size} px, DeiT augmentation", "workers": w, **r})
        print(rows[-1], flush=True)
    vit = ermoe.create_model("vit_small", num_classes=1000, img_size=args.img_size, moe={"router": "ermoe", "num_experts": 8,
                                                                 "blocks": "every_other"})
    labels = torch.randint(0, 1000, (args.model_batch,))
    step = step_rate(vit, (torch.randn(args.model_batch, 3, args.img_size, args.img_size),),
                     lambda out: torch.nn.functional.cross_entropy(out, labels))
    rows.append({"loader": "model: ERMoE ViT-S/16 training step", "examples_per_s": step, "batch": args.model_batch})
    print(rows[-1], flush=True)

    karpathy = make_karpathy(folder)
    for w in args.workers:
        task = task_for({"task": "retrieval", "data": {"name": "karpathy", "json": str(karpathy),
                                                        "image_root": str(folder / "train"), "img_size": args.img_size,
                                                        "memory_cap_gb": 0.0, "num_workers": w},
                         "model": {"name": "dual_encoder"}, "optim": {"batch_size": batch},
                         "task_options": {"vocab_size": 200}})
        r = rate(task.train_batches(0, count + 1), count)
        rows.append({"loader": f"karpathy pairs, {args.img_size} px JPEGs", "workers": w, **r})
        print(rows[-1], flush=True)
    dual = ermoe.create_model("dual_encoder", img_size=args.img_size, in_chans=3, vocab_size=200, context_length=32,
                              image={"name": "vit_tiny", "patch_size": 16, "depth": 4,
                                     "moe": {"router": "ermoe", "num_experts": 4, "blocks": "every_other"}},
                              text={"moe": {"router": "ermoe", "num_experts": 4, "blocks": "every_other"}})
    from ermoe.models.dual import clip_loss
    step = step_rate(dual, (torch.randn(args.model_batch, 3, args.img_size, args.img_size),
                            torch.randint(1, 200, (args.model_batch, 32))), lambda out: clip_loss(*out))
    rows.append({"loader": "model: ERMoE dual encoder (ViT-tiny/16 + text) step", "examples_per_s": step,
                 "batch": args.model_batch})
    print(rows[-1], flush=True)

    brain = work / "brain"
    brain.mkdir()
    csv = make_volumes(brain, args.volumes, args.spacing)
    scans = read_csv(csv)
    import nilearn.image  # noqa: F401 - imported before the clock starts (seconds, once per process)
    for w in (0, max(args.workers)):
        os.environ["ERMOE_CACHE_DIR"] = str(work / f"cache{w}")
        t0 = time.perf_counter()
        build_cache([s.path for s in scans], args.spacing, w)
        rows.append({"loader": f"brain cache build, {args.spacing:g} mm", "workers": w,
                     "examples_per_s": len(scans) / (time.perf_counter() - t0)})
        print(rows[-1], flush=True)
    for w in args.workers:
        task = task_for({"task": "brain_age", "data": {"name": "nifti_csv", "csv": str(csv), "spacing": args.spacing,
                                                        "memory_cap_gb": 0.0, "num_workers": w, "crop_padding": 2,
                                                        "hflip": True},
                         "model": {"name": "sfcn3d"}, "optim": {"batch_size": args.brain_batch}})
        r = rate(task.train_batches(0, count + 1), min(count, args.volumes // args.brain_batch - 1))
        rows.append({"loader": f"brain volumes {args.spacing:g} mm from the cache, shift + flip", "workers": w, **r})
        print(rows[-1], flush=True)
    from ermoe.data.nifti import mni_grid
    shape, _ = mni_grid(args.spacing)
    cnn = ermoe.create_model("sfcn3d", volume_shape=shape, channels=args.brain_channels,
                             moe={"router": "ermoe", "num_experts": 4})
    ages = torch.rand(args.brain_batch) * 60 + 20
    step = step_rate(cnn, (torch.randn(args.brain_batch, 1, *shape),), lambda out: (out[:, 0] - ages).abs().mean())
    rows.append({"loader": f"model: ERMoE SFCN step at {args.spacing:g} mm", "examples_per_s": step, "batch": args.brain_batch})
    print(rows[-1], flush=True)
    return rows


def tree_pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants (shared pages divided among their users), in kB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                children = Path(f"/proc/{p}/task/{t.name}/children").read_text().split()
                todo.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def run_measured(cmd: list[str], env: dict) -> dict[str, float]:
    """Wall time of ``cmd`` and the peak proportional set size of its process tree (polled every 50 ms)."""
    peak = [0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_kb(proc.pid))
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}")
    return {"wall_s": wall, "peak_pss_mb": peak[0] / 1024}


def scaling(work: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for factor in (1, 16):
        n = args.images * factor
        folder = make_folder(work / f"scale{factor}", n, 64, seed=factor)
        cmd = [sys.executable, "-m", "ermoe", "train", "--data.name=imagefolder", f"--data.data_dir={folder}",
               f"--data.img_size={args.img_size}", f"--data.num_workers={max(args.workers)}", "--data.augment={}",
               "--model.patch_size=16", "--model.depth=2", f"--optim.batch_size={args.batch}",
               f"--optim.max_steps={args.steps}", "--optim.eval_batch_size=64", "--probe_size=32",
               f"--out_dir={work / 'runs'}", f"--run_name=scale{factor}", "--progress=false", "--tensorboard=false",
               "--checkpoint_every=0"]
        r = run_measured(cmd, dict(os.environ))
        rows.append({"train_images": n, "steps": args.steps, **r})
        print(rows[-1], flush=True)
    small, large = rows
    rows.append({"memory_ratio": large["peak_pss_mb"] / small["peak_pss_mb"],
                 "time_ratio": large["wall_s"] / small["wall_s"]})
    print(rows[-1], flush=True)
    return rows


def imagenet_tree(work: Path, args: argparse.Namespace) -> dict:
    """Time to list an ImageNet-sized ImageFolder and to its first training batch; memory of the file lists."""
    import resource

    from PIL import Image

    from ermoe.data.folder import ImageAugment, ImageFolderData

    rng = np.random.default_rng(0)
    sources = []
    for i in range(64):  # ext4 allows 65,000 links to one file
        path = work / f"source{i}.JPEG"
        Image.fromarray(smooth_image(rng, 375, 500)).save(path, quality=90)
        sources.append(path)
    root = work / "imagenet"
    t0 = time.perf_counter()
    for split, n in (("train", args.tree_files), ("val", args.tree_val_files)):
        for c in range(1000):
            (root / split / f"n{c:08d}").mkdir(parents=True)
        for i in range(n):
            os.link(sources[i % len(sources)], root / split / f"n{i % 1000:08d}" / f"{split}_{i:08d}.JPEG")
    made = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    data = ImageFolderData(root, args.img_size, augment=ImageAugment(), num_workers=max(args.workers))
    listed = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = next(iter(data.train_batches(0, args.batch, 0, 1, 0, 1, torch.device("cpu"))))
    to_first = time.perf_counter() - t0
    row = {"train_files": len(data), "val_files": data.split_size("test"), "classes": data.num_classes,
           "tree_made_s": made, "list_s": listed, "to_first_batch_s": to_first, "first_batch": len(first[0]),
           "lists_peak_rss_growth_mb": (rss1 - rss0) / 1024}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["rates", "scaling"], choices=["rates", "scaling", "tree"])
    parser.add_argument("--tree-files", type=int, default=1_281_167, help="training files of the ImageNet-sized tree")
    parser.add_argument("--tree-val-files", type=int, default=50_000)
    parser.add_argument("--images", type=int, default=256, help="training images (scaling: N, and 16N)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6, help="timed batches after the first")
    parser.add_argument("--steps", type=int, default=10, help="training steps of each scaling run")
    parser.add_argument("--model-batch", type=int, default=16)
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--brain-batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--brain-channels", type=int, nargs="+", default=[8, 16, 32, 64, 64],
                        help="the SFCN's stage widths (configs/brainage_ermoe.yaml's by default)")
    parser.add_argument("--spacing", type=float, default=2.0, help="brain volumes' grid (mm)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}", "threads": torch.get_num_threads(), "args": vars(args)}
    cache = os.environ.get("ERMOE_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["ERMOE_CACHE_DIR"] = str(work / "cache")  # generated data only: nothing cached outside
        try:
            if "rates" in args.parts:
                result["rates"] = loader_rates(work, args)
            if "scaling" in args.parts:
                result["scaling"] = scaling(work, args)
            if "tree" in args.parts:
                result["tree"] = imagenet_tree(work, args)
        finally:
            if cache is None:
                os.environ.pop("ERMOE_CACHE_DIR", None)
            else:
                os.environ["ERMOE_CACHE_DIR"] = cache
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
