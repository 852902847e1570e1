"""The study reports' figures, drawn from the runs' numbers: each method's quality against its load CV, the load
statistics over training (from each run's ``log.jsonl``), and each method's expert x class heatmap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .methods import METHODS
from .stats import mean_std


def accuracy_vs_cv_figure(table, path: Path, measure: str = "test_top1", label: str = "test top-1",
                          methods=None) -> Path:
    """``measure`` against load CV, one point per MoE method (mean ± std over seeds)."""
    methods = methods or METHODS
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, measures in table.items():
        cv, cv_s = mean_std(measures["load_cv"])
        if math.isnan(cv):  # no MoE layer
            continue
        acc, acc_s = mean_std(measures[measure])
        role = methods.get(method, ("-",))[0]
        marker = {"paper": "o", "variant": "^", "baseline": "s"}.get(role, "x")
        ax.errorbar(cv, acc, xerr=cv_s, yerr=acc_s, fmt=marker, capsize=2)
        ax.annotate(method, (cv, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("load CV (mean over MoE layers; lower = flatter)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against load balance (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LOAD_STATS = (("load_cv", "load CV"), ("max_over_mean", "max/mean"), ("gini", "Gini"))


def load_over_training(results, stat: str = "load_cv") -> dict[str, tuple[list[int], list[float]]]:
    """method -> (steps, probe-image load statistic ``stat`` averaged over routing layers and seeds) from each run's
    log.jsonl (``probe_load`` records: the CV under the layer's name, other statistics under ``layer/stat``)."""
    import json

    curves = {}
    for method, runs in results.items():
        per_step: dict[int, list[float]] = {}
        for metrics in runs.values():
            log = Path(metrics.get("run", "")) / "log.jsonl"
            if not log.exists():
                continue
            for line in log.read_text().splitlines():
                record = json.loads(line)
                if record.get("kind") != "probe_load":
                    continue
                values = [v for k, v in record.items() if k not in ("kind", "step")
                          and (k.endswith(f"/{stat}") if stat != "load_cv" else "/" not in k)]
                if values:
                    per_step.setdefault(record["step"], []).append(float(np.mean(values)))
        if per_step:
            steps = sorted(per_step)
            curves[method] = (steps, [float(np.mean(per_step[s])) for s in steps])
    return curves


def load_over_training_figure(results, path: Path, methods=None) -> Path | None:
    """The probe images' load statistics (``LOAD_STATS``) over training, one curve per method."""
    methods = methods or METHODS
    panels = [(label, load_over_training(results, stat)) for stat, label in LOAD_STATS]
    panels = [(label, curves) for label, curves in panels if curves]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (label, curves) in zip(axes[0], panels):
        for i, (method, (steps, values)) in enumerate(curves.items()):
            role = methods.get(method, ("-",))[0]
            ax.plot(steps, values, marker="o", markersize=2, label=method, color=plt.cm.tab20(i % 20),
                    linestyle={"paper": "-", "variant": "--", "baseline": ":"}.get(role, "-"))
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{label} on the probe images")
        ax.set_title(f"{label} over training (mean over routing layers and seeds)", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=1, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmaps_figure(results, path: Path) -> Path | None:
    """The last MoE layer's expert x class heatmap of every method (first seed), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for method, runs in results.items():
        metrics = runs[min(runs)]
        layers = metrics.get("layers", {})
        if layers:
            name = list(layers)[-1]
            per_class = np.maximum(np.asarray(metrics["class_images"], dtype=float), 1.0)
            panels.append((method, name, np.asarray(layers[name]["expert_class_counts"], float) / per_class))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (method, layer, counts) in zip(axes.flat, panels):
        ax.axis("on")
        ax.imshow(counts, aspect="auto", cmap="viridis")
        ax.set_title(f"{method}\n{layer}", fontsize=7)
        ax.set_xlabel("class", fontsize=6)
        ax.set_ylabel("expert", fontsize=6)
        ax.tick_params(labelsize=5)
    fig.suptitle("routed tokens per image, expert x class (first seed, last MoE layer)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
