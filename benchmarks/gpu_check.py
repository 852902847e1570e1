"""The project's one-call GPU check (issue 38): run it first whenever a GPU is at hand, fix what it finds, rerun.

Stages, each a subprocess with its own timeout, each writing its log to ``OUT/logs/`` and a line to
``OUT/summary.txt`` (printed at the end):

1. environment: torch, CUDA, the card, bf16, NCCL, grouped_mm;
2. tests: tests/test_cuda.py (forward/gradients against the CPU, every method trained on the GPU, no host sync in
   a training step), the fake-CUDA harness (tests/test_gpu_harness.py), the NCCL and fused-AdamW tests;
3. one bf16 ``ermoe train`` on a generated ImageFolder with 2 loader workers (pinned memory), EMA, gradient
   accumulation, activation checkpointing and checkpoints;
4. ``torchrun --nproc_per_node=1 -m ermoe train --distributed=true``: a real process group (NCCL) at world 1;
5. the layer table under bf16 autocast with float32 weights (as training runs) at 65,536 tokens, D 768, H 3072,
   E 8 and 64, every router against its dense module, eager and compiled (benchmarks/moe_layer.py);
6. whole-model throughput of the main job against its dense model, eager and compiled
   (benchmarks/train_throughput.py), with torch's graph-break and recompile log lines counted.

No downloads. About 5 minutes on one H100. ``--dry-run`` runs every stage on this CPU at toy sizes, with
``aot_eager`` for compilation and gloo for the process group (tests/test_benchmark.py runs it, so the script cannot
rot); its numbers mean nothing.

    python benchmarks/gpu_check.py --prep            # on the CPU machine, once: wheels the device image lacks
                                                      # (pydantic) into .whl/, Fashion-MNIST into runs/gpu/
    python benchmarks/gpu_check.py --out $OUT        # on the GPU machine (carry .whl and runs/gpu)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
DATA = ROOT / "runs" / "gpu" / "fashion-mnist"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PYDANTIC = ["pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types", "typing-inspection", "typing-extensions"]

ENVIRONMENT = """
import torch
line = ["torch", torch.__version__, "cuda", str(torch.version.cuda)]
if torch.cuda.is_available():
    line += [torch.cuda.get_device_name(), str(torch.cuda.get_device_capability()),
             "bf16", str(torch.cuda.is_bf16_supported()), "nccl", str(torch.cuda.nccl.version())]
else:
    line += ["no GPU"]
line += ["grouped_mm", str(hasattr(torch.nn.functional, "grouped_mm"))]
print(" ".join(line))
"""

IMAGE_TREE = """
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng, root, n = np.random.default_rng(0), Path(sys.argv[1]), int(sys.argv[2])
for split, count in (("train", n), ("val", n // 3)):
    for c in range(4):
        folder = root / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = (rng.random((40, 40, 3)) * 64 + 48 * c).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
"""


class Check:
    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.summary = out / "summary.txt"
        self.summary.write_text("")
        self.t0 = time.monotonic()
        self.failed: list[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), self.env.get("PYTHONPATH")) if p)

    def note(self, text: str) -> None:
        with self.summary.open("a") as f:
            f.write(text.rstrip() + "\n")

    def stage(self, name: str, cmd: list[str], timeout_s: float, env: dict | None = None, tail: int = 3) -> str:
        """Run ``cmd``; its output to logs/NAME.log, its last ``tail`` lines and its exit status to the summary."""
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
            output, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as err:
            output, rc = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), 124
        log.write_text(output)
        lines = [line for line in output.splitlines() if line.strip()]
        for line in lines[-tail:]:
            self.note(f"  {line}")
        status = "ok" if rc == 0 else f"FAILED rc={rc}" + (" (timed out)" if rc == 124 else "")
        self.note(f"STAGE {name}: {status} ({time.monotonic() - start:.0f} s; {time.monotonic() - self.t0:.0f} s "
                  "in all)")
        if rc:
            self.failed.append(name)
        return output


def compile_events(log: str) -> str:
    """Graph breaks (with their sites) and recompilations in a TORCH_LOGS=graph_breaks,recompiles log. Both models
    of the throughput benchmark compile in one process: the second's first compilation reads as a recompilation."""
    sites: dict[str, int] = {}
    for line in log.splitlines():
        if "Graph break" in line and "user code at" in line:
            site = line.split("user code at", 1)[1].strip().rsplit("/", 1)[-1]
            sites[site] = sites.get(site, 0) + 1
    listed = ", ".join(f"{site} x{n}" for site, n in sorted(sites.items())) or "none"
    return f"graph breaks: {sum(sites.values())} ({listed}); recompilations: {log.count('Recompiling function')}"


def install_wheels(check: Check) -> None:
    """The device image lacks pydantic: install the carried wheels into a private folder on the path."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return
    target = Path("/tmp/gpu_check_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                    "--target", str(target), *map(str, wheels)], check=False)
    check.env["PYTHONPATH"] += os.pathsep + str(target)


def prep() -> None:
    """On a machine with PyPI: the wheels into .whl/ and Fashion-MNIST into runs/gpu/ (both git-ignored)."""
    WHEELS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(WHEELS),
                    *PYDANTIC], check=True)
    if FASHION_MNIST.is_dir() and not DATA.is_dir():
        shutil.copytree(FASHION_MNIST, DATA)
    print(f"ready: {WHEELS} ({len(list(WHEELS.glob('*.whl')))} wheels), {DATA} ({'present' if DATA.is_dir() else 'MISSING: the throughput stages will fail'})")


def run(out: Path, dry_run: bool) -> int:
    check = Check(out, dry_run)
    py = sys.executable
    install_wheels(check)
    device, small = ("cpu", True) if dry_run else ("cuda", False)  # small: toy sizes
    check.stage("environment", [py, "-c", ENVIRONMENT], 60, tail=1)

    tests = ["tests/test_gpu_harness.py"]
    if small:
        tests += ["-k", "ermoe and 96"]
    else:
        tests += ["tests/test_cuda.py", "tests/test_levers.py", "-k", "cuda or fused or nccl or gpu or harness"]
    check.stage("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests],
                60 if small else 150)

    tree = out / "imagefolder"
    check.stage("imagefolder_data", [py, "-c", IMAGE_TREE, str(tree), "12" if small else "48"], 60, tail=0)
    runs = out / "runs"
    base = [f"--out_dir={runs}", "--progress=false", "--tensorboard=false", "--log_every=1", "--probe_size=16",
            f"--device={device}"]
    vit = ["--model.patch_size=4", "--model.depth=2", "--model.embed_dim=32" if small else "--model.embed_dim=64",
           "--model.num_heads=2", "--model.moe.num_experts=4", "--model.moe.blocks=all"]
    check.stage("train_bf16_workers", [
        py, "-m", "ermoe", "train", *base, "--run_name=imagefolder_bf16", "--data.name=imagefolder",
        f"--data.data_dir={tree}", "--data.img_size=32", "--data.num_workers=2", *vit,
        "--model.grad_checkpointing=true", "--optim.amp=bf16", "--optim.epochs=2", "--optim.batch_size=16",
        "--optim.accum_steps=2", "--optim.ema=0.99", "--optim.warmup_steps=1", "--optim.eval_batch_size=32"],
        120 if small else 90)
    metrics = runs / "imagefolder_bf16" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        check.note(f"  metrics: step {m.get('step')} test_loss {m.get('test_loss')} ema {bool(m.get('ema'))}")

    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ermoe", "train",
                *base, "--run_name=torchrun_world1", "--distributed=true", "--data.name=digits",
                "--data.train_limit=256", "--data.hflip=false", "--model.patch_size=2", "--model.depth=2",
                "--model.embed_dim=32", "--model.num_heads=2", "--model.moe.num_experts=4",
                "--model.moe.blocks=all", "--optim.epochs=1", "--optim.batch_size=64", "--optim.warmup_steps=1"]
    output = check.stage("torchrun_world1", torchrun, 120 if small else 90, env={"NCCL_DEBUG": "INFO"})
    check.note(f"  NCCL INFO lines: {output.count('NCCL INFO')} (0 on a CPU: gloo)")

    layer = [py, "benchmarks/moe_layer.py", "--device", device, "--amp", "--json"]
    layer += (["--tokens", "256", "--dim", "64", "--hidden", "128", "--experts", "4", "--repeats", "1",
               "--warmup", "1", "--routers", "ermoe", "softmax_topk"] if small else
              ["--tokens", "65536", "--dim", "768", "--hidden", "3072", "--experts", "8", "64", "--repeats", "5",
               "--warmup", "2", "--threads", "8"])
    for compiled in (None, "aot_eager" if small else "inductor"):
        name = "layer_table_" + ("eager" if compiled is None else "compiled")
        output = check.stage(name, layer + (["--compile", compiled] if compiled else []), 90 if small else 150,
                             tail=20)
        (out / f"{name}.json").write_text(output.strip().splitlines()[-1] if output.strip() else "[]")

    throughput = [py, "benchmarks/train_throughput.py", "--tasks", "classification"]
    if small:  # digits, which ship with scikit-learn (the Fashion-MNIST copy of --prep is for the device)
        throughput += ["--steps", "1", "--repeats", "1"]
        overrides = ["data.name=digits", "data.val_size=0", "model.patch_size=2", "model.depth=2",
                     "model.embed_dim=32", "model.num_heads=2", "optim.batch_size=32", "device=cpu"]
    else:
        throughput += ["--steps", "10", "--repeats", "3"]
        overrides = [f"data.data_dir={DATA}"] if DATA.is_dir() else []
    for compiled in (False, True):
        name = "train_throughput_" + ("compiled" if compiled else "eager")
        extra = overrides + (["optim.compile=aot_eager"] if compiled and small else [])
        cmd = throughput + (["--compile"] if compiled and not small else []) + \
            ["--json", str(out / f"{name}.json"), "--override", *extra]
        output = check.stage(name, cmd, 120 if small else (120 if not compiled else 200),
                             env={"TORCH_LOGS": "graph_breaks,recompiles"} if compiled else None)
        if compiled:
            check.note("  " + compile_events(output))
    check.note(f"TOTAL {time.monotonic() - check.t0:.0f} s; failed: {', '.join(check.failed) or 'none'}")
    print(check.summary.read_text())
    return 1 if check.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu/check")))
    parser.add_argument("--dry-run", action="store_true", help="every stage on this CPU at toy sizes")
    parser.add_argument("--prep", action="store_true", help="fetch what the device image lacks (no check)")
    args = parser.parse_args(argv)
    if args.prep:
        prep()
        return 0
    return run(args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
