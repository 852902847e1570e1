"""Tables and figures from a run's ``metrics.json`` (no model needed: ``ermoe report`` redraws them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def layers_table(metrics: dict[str, Any]) -> list[str]:
    """Lines of a plain-text table of what the model and its routing layers did: whole-model measures, then per
    routing layer its load, specialisation, homogeneity, stability and basis geometry, then the legend."""
    lines = []
    if metrics.get("model_metrics"):
        lines.append("model: " + "   ".join(f"{k} {v:.4g}" for k, v in metrics["model_metrics"].items()))
    layers = metrics.get("layers", {})
    if layers:
        header = ["layer", "CV", "max/mean", "entropy", "Gini", "drop", "MI bits", "homog.", "changed", "/chance",
                  "angle"]
        rows = [header]
        for name, s in layers.items():
            rows.append([name, _fmt(s.get("load_cv")), _fmt(s.get("max_over_mean")), _fmt(s.get("entropy")),
                         _fmt(s.get("gini")), _fmt(s.get("drop_rate")), _fmt(s.get("mi_bits")),
                         _fmt(s.get("homogeneity")), _fmt(s.get("probe_changed")), _fmt(s.get("probe_changed_rel")),
                         _fmt(s.get("principal_angle_deg_mean"), ".1f")])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("CV, max/mean, entropy (normalised), Gini: load over test tokens; MI: I(expert; class); "
                     "homog.: mean pairwise cosine of expert outputs; changed: probe tokens whose experts changed "
                     "since the previous checkpoint, /chance: that over what a memoryless router with the same "
                     "loads would change (0 stable, 1 random; undefined when collapsed); angle: mean principal angle (deg) of the bases to the PCA "
                     "subspace of their inputs.")
    return lines


def draw_figures(metrics: dict[str, Any], fig_dir: str | Path) -> list[Path]:
    """The expert x class heatmap of every MoE layer (average routed tokens per image, EMoE Fig. 3) and the load
    per expert of every layer. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    classes = metrics.get("classes") or [str(i) for i in range(len(metrics["class_images"]))]
    per_class = np.maximum(np.asarray(metrics["class_images"], dtype=float), 1.0)
    written = []
    layers = metrics.get("layers", {})
    for name, s in layers.items():
        counts = np.asarray(s["expert_class_counts"], dtype=float) / per_class[None, :]
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(classes), 1.2 + 0.4 * counts.shape[0]))
        im = ax.imshow(counts, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(counts.shape[0]), [f"expert {e}" for e in range(counts.shape[0])], fontsize=8)
        ax.set_title(f"{name}: routed tokens per image (MI {s['mi_bits']:.2f} bits, CV {s['load_cv']:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        path = fig_dir / f"heatmap_{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written + draw_load(metrics, fig_dir)


def draw_load(metrics: dict[str, Any], fig_dir: str | Path) -> list[Path]:
    """``load.png``: each routing layer's share of test tokens per expert (nothing without routing layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    layers = metrics.get("layers", {})
    if layers:
        fig, ax = plt.subplots(figsize=(7, 3))
        for name, s in layers.items():
            load = np.asarray(s["tokens_per_expert"], dtype=float)
            ax.plot(range(len(load)), load / max(load.sum(), 1.0), marker="o", label=f"{name} (CV {s['load_cv']:.2f})")
        num_experts = len(next(iter(layers.values()))["tokens_per_expert"])
        ax.axhline(1.0 / num_experts, color="gray", linestyle="--", linewidth=1, label="uniform")
        ax.set_xlabel("expert")
        ax.set_ylabel("share of test tokens")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = fig_dir / "load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
