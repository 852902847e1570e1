"""The study's report: per-method mean and std over seeds, and a verdict for each of the papers' claims, written
from the numbers (never by hand)."""

from __future__ import annotations

import math
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .methods import METHODS

PAPER_METHODS = ("ermoe", "emoe_parallel")
# (key, label, format, lower is better)
COLUMNS = [
    ("test_top1", "top-1", ".4f"), ("load_cv", "load CV", ".3f"), ("max_over_mean", "max/mean", ".2f"),
    ("gini", "Gini", ".3f"), ("mi_bits", "MI bits", ".3f"), ("homogeneity", "homog.", ".3f"),
    ("probe_changed", "changed", ".3f"), ("fewshot_1", "1-shot", ".3f"), ("fewshot_5", "5-shot", ".3f"),
    ("fewshot_10", "10-shot", ".3f"), ("train_img_per_s", "img/s", ".0f"), ("params_total", "params", ",.0f"),
    ("params_active", "active", ",.0f"),
]


def _layer_mean(metrics: dict[str, Any], key: str) -> float:
    values = [s.get(key) for s in metrics.get("layers", {}).values()]
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def run_measures(metrics: dict[str, Any]) -> dict[str, float]:
    """One run's numbers: task metrics, and per-layer statistics averaged over the MoE layers."""
    out = {k: float(metrics[k]) if metrics.get(k) is not None else float("nan")
           for k in ("test_top1", "train_img_per_s", "params_total", "params_active")}
    for key in ("load_cv", "max_over_mean", "gini", "mi_bits", "homogeneity", "probe_changed"):
        out[key] = _layer_mean(metrics, key)
    for shots, value in metrics.get("fewshot", {}).items():
        out[f"fewshot_{shots}"] = value["mean"]
    for key, value in metrics.get("model_metrics", {}).items():
        out[f"model:{key}"] = float(value)
    return out


def model_metrics_lines(table: dict[str, dict[str, list[float]]]) -> list[str]:
    """Whole-model measures (``model_metrics`` of a run: DeepMoE's closed gates, the single-gated MoE's early
    exit), one line per method that has them."""
    lines = []
    for method, measures in table.items():
        cells = [f"{key[6:]} {_cell(values, '.3f')}" for key, values in measures.items() if key.startswith("model:")]
        if cells:
            lines.append(f"- `{method}`: " + "; ".join(cells))
    return lines


def aggregate(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """method -> measure -> the values over seeds."""
    table: dict[str, dict[str, list[float]]] = {}
    for method, runs in results.items():
        per_seed = [run_measures(m) for _, m in sorted(runs.items())]
        table[method] = {k: [r.get(k, float("nan")) for r in per_seed] for k in per_seed[0]}
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value (None with fewer than 3 seeds a side, or without scipy)."""
    if len(a) < 3 or len(b) < 3:
        return None
    try:
        from scipy.stats import ttest_ind
    except ImportError:
        return None
    if np.allclose(a, b) or (np.std(a) == 0 and np.std(b) == 0):
        return None  # identical or constant samples: no test to make
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = ttest_ind(a, b, equal_var=False).pvalue
    return None if math.isnan(p) else float(p)


def _cell(values: list[float] | None, spec: str) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return format(m, spec) if len(values) < 2 or spec.endswith(",.0f") else f"{format(m, spec)} ± {format(s, spec)}"


def results_table(table: dict[str, dict[str, list[float]]]) -> str:
    header = "| method | role | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for method, measures in table.items():
        role = METHODS[method][0] if method in METHODS else "-"
        cells = [_cell(measures.get(key), spec) for key, _, spec in COLUMNS]
        lines.append(f"| `{method}` | {role} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Each claim: a list of (measure, baseline, direction) tests that every paper method must pass; direction "<"
# means the method's mean must be below the baseline's (times the tolerance factor), ">" above.
CLAIMS: list[tuple[str, str, list[tuple[str, str, str, float]]]] = [
    ("1", "flatter expert loads than a learned softmax gate (no balancing loss)",
     [("load_cv", "softmax_noloss", "<", 1.0)]),
    ("2", "balance comparable to a balancing loss (load CV at most 1.25x Switch's)",
     [("load_cv", "switch", "<", 1.25)]),
    ("3", "accuracy at least as good as the balancing-loss baselines (within 0.5 points of the better of Switch "
          "and V-MoE)", [("test_top1", "best_balanced", ">", -0.005)]),
    ("4", "more specialised (higher MI(expert; class)) and less homogeneous experts than Switch",
     [("mi_bits", "switch", ">", 0.0), ("homogeneity", "switch", "<", 1.0)]),
    ("5", "more stable routing (fewer probe tokens change expert between checkpoints) than Switch",
     [("probe_changed", "switch", "<", 1.0)]),
    ("6", "better few-shot features (1-, 5-, 10-shot linear probes) than Switch",
     [("fewshot_1", "switch", ">", 0.0), ("fewshot_5", "switch", ">", 0.0), ("fewshot_10", "switch", ">", 0.0)]),
]


def _baseline(table, name: str, measure: str) -> tuple[str, list[float]] | None:
    if name == "best_balanced":
        options = [(n, table[n][measure]) for n in ("switch", "vmoe") if n in table and measure in table[n]]
        if not options:
            return None
        return max(options, key=lambda item: mean_std(item[1])[0])
    if name in table and measure in table[name]:
        return name, table[name][measure]
    return None


def _passes(method_values, base_values, direction: str, tol: float) -> bool | None:
    m, b = mean_std(method_values)[0], mean_std(base_values)[0]
    if math.isnan(m) or math.isnan(b):
        return None
    return m < b * tol if direction == "<" else m > b + tol


def verdicts(table: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """For each claim: 'supported' if every paper method passes all its tests, 'not supported' if none does,
    'mixed' otherwise; with the numbers, Welch p-values (3+ seeds) and the variants that would pass."""
    out = []
    for number, text, tests in CLAIMS:
        evidence, outcomes = [], []
        for method in [m for m in PAPER_METHODS if m in table]:
            passes = []
            for measure, base_name, direction, tol in tests:
                base = _baseline(table, base_name, measure)
                if base is None or measure not in table[method]:
                    continue  # not part of this study (e.g. a shot count it did not probe)
                bname, bvals = base
                passed = _passes(table[method][measure], bvals, direction, tol)
                p = welch_p(table[method][measure], bvals)
                mm, bm = mean_std(table[method][measure])[0], mean_std(bvals)[0]
                p_text = "" if p is None else f" (Welch p {'< 0.001' if p < 0.001 else f'= {p:.3f}'})"
                evidence.append(f"`{method}` {measure} {mm:.4g} vs `{bname}` {bm:.4g}" + p_text
                                + {True: " ✓", False: " ✗", None: " (not measured)"}[passed])
                passes.append(passed)
            outcomes.append(None if not passes or None in passes else all(passes))
        known = [o for o in outcomes if o is not None]
        if not known:
            verdict = "not measured"
        elif all(known) and len(known) == len(outcomes):
            verdict = "supported"
        elif not any(known):
            verdict = "not supported"
        else:
            verdict = "mixed"
        variants = [m for m, (role, _, _) in METHODS.items() if role == "variant" and m in table and all(
            (_baseline(table, b, meas) is not None and meas in table[m]
             and _passes(table[m][meas], _baseline(table, b, meas)[1], d, t))
            for meas, b, d, t in tests)]
        out.append({"claim": number, "text": text, "verdict": verdict, "evidence": evidence, "variants": variants})
    return out


def accuracy_vs_cv_figure(table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, measures in table.items():
        if method == "dense":
            continue
        cv, cv_s = mean_std(measures["load_cv"])
        acc, acc_s = mean_std(measures["test_top1"])
        role = METHODS.get(method, ("-",))[0]
        marker = {"paper": "o", "variant": "^", "baseline": "s"}.get(role, "x")
        ax.errorbar(cv, acc, xerr=cv_s, yerr=acc_s, fmt=marker, capsize=2)
        ax.annotate(method, (cv, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("load CV (mean over MoE layers; lower = flatter)")
    ax.set_ylabel("test top-1")
    ax.set_title("accuracy against load balance (mean ± std over seeds)", fontsize=9)
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


def load_over_training_figure(results, path: Path) -> Path | None:
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
            role = METHODS.get(method, ("-",))[0]
            ax.plot(steps, values, marker="o", markersize=2, label=method, color=plt.cm.tab20(i % 20),
                    linestyle={"paper": "-", "variant": "--", "baseline": ":"}.get(role, "-"))
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{label} on the probe images")
        ax.set_title(f"{label} over training (mean over routing layers and seeds)", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=1, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def machine_description() -> str:
    import torch
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def write_report(cfg, results, path: str | Path, command: str, wall_s: float,
                 atomic_write: Callable[[Path, str], None]) -> Path:
    path = Path(path)
    table = aggregate(results)
    fig_dir = path.parent / "figures"
    figure = accuracy_vs_cv_figure(table, fig_dir / f"{path.stem}_accuracy_vs_cv.png")
    extra_figures = [f for f in (load_over_training_figure(results, fig_dir / f"{path.stem}_load_over_training.png"),
                                 heatmaps_figure(results, fig_dir / f"{path.stem}_heatmaps.png")) if f is not None]
    t = cfg.train
    run_walls = [m.get("run_wall_s") for runs in results.values() for m in runs.values()]
    known = [w for w in run_walls if w is not None]
    summed = (f"{sum(known) / 60:.1f} min summed over the {len(known)} runs (each timed when it ran: training, "
              f"evaluation and probes)" if known else "not recorded")
    lines = [
        "# Study results", "",
        f"Generated by `{command}` — do not edit by hand.", "",
        f"- Machine: {machine_description()}",
        f"- Seeds: {cfg.seeds} (mean ± sample std over seeds; few-shot: {cfg.fewshot_draws} draws per seed)",
        f"- Wall time: {summed}; this invocation {wall_s / 60:.1f} min (finished runs are reused, not retrained)",
        f"- Budget, the same for every method: `{t}`",
        "", "## Results", "", results_table(table), "",
        "load CV, max/mean, Gini, MI (expert; class, bits), homogeneity (mean pairwise cosine of expert outputs) "
        "and changed (probe tokens that changed expert between the last two checkpoints) are means over the MoE "
        "layers of each run; few-shot: logistic-regression probes on frozen pooled features; active: parameters "
        "one token uses (top-1 of the experts).", "",
        "Two baselines are whole models and read these columns differently. `single_gate` routes whole images "
        "(every patch token of an image goes to the expert its gate chose), so its MI is an image-level MI, and "
        "its active parameters include the dense base branch that runs beside the expert. `deepmoe` is a CNN "
        "whose experts are conv channels: an image is routed to every channel with a non-zero gate, its load "
        "statistics are over channels, 'changed' tracks each probe image's strongest channel, homogeneity does "
        "not apply, and every parameter is active (gates multiply, zero channels are not skipped).", "",
        *(["Whole-model measures on the test images (`gate_sparsity`: share of an image's channel gates that are "
           "closed; `open_channels`: channels it keeps open, of all gated layers; `base_top1`: the base branch "
           "alone, every image exiting early; `exit_share@t`, `exit_top1@t`: images whose base branch is at least "
           "t confident, and the top-1 when they exit there and the rest use the ensemble):", "",
           *model_metrics_lines(table), ""] if model_metrics_lines(table) else []),
        f"![accuracy against load CV]({figure.relative_to(path.parent).as_posix()})", "",
        *[f"![{f.stem}]({f.relative_to(path.parent).as_posix()})\n" for f in extra_figures],
        "## The papers' claims", "",
        f"Verdicts compare the papers' methods read as written ({', '.join(f'`{m}`' for m in PAPER_METHODS)}) "
        "with the baselines; 'supported' needs every one of them to pass every test, 'not supported' none. "
        "Variants that would pass are listed but do not change the verdict. Welch p-values are per comparison, "
        "not corrected for the number of comparisons; with three seeds they are rough.", "",
    ]
    for v in verdicts(table):
        lines.append(f"**Claim {v['claim']}: {v['text']}. Verdict: {v['verdict']}.**")
        lines.extend(f"- {e}" for e in v["evidence"])
        lines.append(f"- Variants that pass: {', '.join(f'`{m}`' for m in v['variants']) or 'none'}")
        lines.append("")
    if len(cfg.seeds) < 3:
        lines.append(f"With {len(cfg.seeds)} seed(s) no significance test is possible; treat every verdict as "
                     "provisional.")
    atomic_write(path, "\n".join(lines) + "\n")
    return path
