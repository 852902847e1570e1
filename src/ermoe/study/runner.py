"""``ermoe study``: every method x seed under one budget, resumable, then the generated report."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..train.config import ConfigError, _build, _merge, config_from_dict
from ..train.lock import RunLock
from ..train.run import METRICS_FILE, Run
from ..train.trainer import load_run, train
from .methods import DEFAULT_METHODS, METHODS, method_model


@dataclass
class StudyConfig:
    """What the study runs. ``train`` holds overrides of the training config shared by every run (the budget)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: str = "runs/study"
    report: str = "docs/results.md"
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    fewshot_draws: int = 5
    fewshot_train_pool: int = 3000  # training images the support sets are drawn from
    train: dict[str, Any] = field(default_factory=lambda: {
        "model": {"name": "vit_tiny", "embed_dim": 96, "num_heads": 3, "depth": 4, "patch_size": 7,
                  "moe": {"num_experts": 8, "top_k": 1, "blocks": "every_other"}},
        "data": {"name": "fashion_mnist", "train_limit": 20000, "test_limit": 5000},  # docs/method.md, section 7
        "optim": {"epochs": 3, "batch_size": 128, "lr": 1.0e-3, "warmup_steps": 100},
        "probe_size": 256, "probe_every": 39, "tensorboard": False, "progress": False, "keep_checkpoints": 1,
    })


QUICK = {
    "seeds": [0, 1],
    "out_dir": "runs/study-quick",
    "report": "runs/study-quick/results.md",
    "fewshot_shots": [1, 5],
    "fewshot_draws": 2,
    "fewshot_train_pool": 1000,
    "train": {"model": {"embed_dim": 32, "num_heads": 2, "depth": 2, "moe": {"num_experts": 4, "blocks": "all"}},
              "data": {"train_limit": 2048, "test_limit": 1000},
              "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 10}, "probe_size": 64, "probe_every": 8},
}


def load_study_config(path: str | Path | None = None, quick: bool = False,
                      overrides: dict[str, Any] | None = None) -> StudyConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"study config {path} not found")
        values = yaml.safe_load(path.read_text()) or {}
    base = StudyConfig()
    merged = _merge({"train": base.train}, values)
    if quick:
        merged = _merge(merged, QUICK)
    if overrides:
        merged = _merge(merged, overrides)
    cfg = _build(StudyConfig, merged)
    for name in cfg.methods:
        if name not in METHODS:
            raise ConfigError(f"study.methods: unknown method {name!r}; choose from {list(METHODS)}")
    if not cfg.seeds:
        raise ConfigError("study.seeds must name at least one seed")
    run_config(cfg, cfg.methods[0], cfg.seeds[0])  # validates the training overrides before anything runs
    return cfg


def run_config(cfg: StudyConfig, method: str, seed: int):
    """The training config of one run: the shared budget, the method's whole model section, the seed."""
    values = {**cfg.train, "model": method_model(method, cfg.train.get("model", {}))}
    values = _merge(values, {"seed": seed, "out_dir": str(Path(cfg.out_dir) / method), "run_name": f"seed{seed}"})
    return config_from_dict(values)


def run_dir(cfg: StudyConfig, method: str, seed: int) -> Path:
    return Path(cfg.out_dir) / method / f"seed{seed}"


def _finished(path: Path) -> dict[str, Any] | None:
    metrics_path = path / METRICS_FILE
    if not metrics_path.exists():
        return None
    metrics = json.loads(metrics_path.read_text())
    return metrics if "fewshot" in metrics else None


def add_fewshot(path: Path, cfg: StudyConfig) -> dict[str, Any]:
    """Few-shot linear probes on the frozen pooled features of a finished run; stored in its metrics.json."""
    with RunLock(path):
        return _add_fewshot(path, cfg)


def _add_fewshot(path: Path, cfg: StudyConfig) -> dict[str, Any]:
    from ..analysis.fewshot import extract_features, few_shot_probe

    train_cfg, task, model, _, _ = load_run(path)
    train_batches = list(task.eval_batches("train", limit=cfg.fewshot_train_pool))
    test_batches = list(task.eval_batches("test"))
    ftr = extract_features(model, (b.inputs for b in train_batches))
    fte = extract_features(model, (b.inputs for b in test_batches))
    ytr = torch.cat([b.target for b in train_batches]).cpu()
    yte = torch.cat([b.target for b in test_batches]).cpu()
    fewshot = {}
    for shots in cfg.fewshot_shots:
        mean, std = few_shot_probe(ftr, ytr, fte, yte, shots, cfg.fewshot_draws, seed=train_cfg.seed)
        fewshot[str(shots)] = {"mean": mean, "std": std}
    metrics = json.loads((path / METRICS_FILE).read_text())
    metrics["fewshot"] = fewshot
    Run(path).write_metrics(metrics)
    return metrics


def run_study(cfg: StudyConfig, log=print) -> dict[str, dict[int, dict[str, Any]]]:
    """Train every (method, seed) not finished yet (resuming interrupted ones), add few-shot probes, return metrics."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    total = len(cfg.methods) * len(cfg.seeds)
    done = 0
    for method in cfg.methods:
        for seed in cfg.seeds:
            done += 1
            path = run_dir(cfg, method, seed)
            metrics = _finished(path)
            t0 = time.perf_counter()
            if metrics is None:
                train_cfg = run_config(cfg, method, seed)
                if (path / METRICS_FILE).exists():
                    pass  # trained and evaluated; only the probes are missing
                elif (path / "checkpoints" / "latest").exists():
                    train(train_cfg, resume=path, quiet=True)
                else:
                    if path.exists():  # started but never checkpointed: nothing worth keeping
                        shutil.rmtree(path)
                    train(train_cfg, quiet=True)
                metrics = add_fewshot(path, cfg)
                # Time of this run as it ran, kept for the report: a run re-evaluated by `ermoe eval` keeps its
                # training time and adds the probes'; one resumed from a checkpoint counts its last part only.
                metrics["run_wall_s"] = metrics.get("run_wall_s", 0.0) + time.perf_counter() - t0
                Run(path).write_metrics(metrics)
                status = f"{metrics['run_wall_s']:.0f} s"
            else:
                status = "done before, skipped"
            log(f"[{done}/{total}] {method} seed {seed}: top-1 {metrics['test_top1']:.4f} ({status})")
            results.setdefault(method, {})[seed] = metrics
    return results
