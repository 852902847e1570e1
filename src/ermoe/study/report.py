"""The study's report: per-method mean and std over seeds, and a verdict for each of the papers' claims, written
from the numbers (never by hand)."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .methods import EXPLORATORY, METHODS
from .stats import Test, holm, welch

PAPER_METHODS = ("ermoe", "emoe_parallel")
# The straggler column's legend, shared by every study's report.
EP_WAIT_NOTE = ("EP wait = per training step, the busiest expert's assignments over the mean on the global batch (the "
                "factor by which imbalance stretches the expert part of a step with one expert per rank, "
                "docs/distributed.md), averaged over the steps")
# (key, label, format, lower is better)
COLUMNS = [
    ("val_top1", "val top-1", ".4f"), ("test_top1", "test top-1", ".4f"), ("load_cv", "load CV", ".3f"),
    ("max_over_mean", "max/mean", ".2f"), ("train_ep_straggler", "EP wait", ".2f"), ("gini", "Gini", ".3f"),
    ("mi_bits", "MI bits", ".3f"), ("homogeneity", "homog.", ".3f"), ("probe_changed", "changed", ".3f"),
    ("probe_changed_rel", "/chance", ".3f"), ("fewshot_1", "1-shot", ".3f"), ("fewshot_5", "5-shot", ".3f"),
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
           for k in ("val_top1", "test_top1", "train_img_per_s", "params_total", "params_active")}
    for key in ("load_cv", "max_over_mean", "train_ep_straggler", "gini", "mi_bits", "homogeneity", "probe_changed",
                "probe_changed_rel"):
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


def aggregate(results: dict[str, dict[int, dict[str, Any]]],
              measures: Callable[[dict[str, Any]], dict[str, float]] | None = None) -> dict[str, dict[str, list[float]]]:
    """method -> measure -> the values over seeds (``measures``: one run's numbers, default :func:`run_measures`)."""
    measures = measures or run_measures
    table: dict[str, dict[str, list[float]]] = {}
    for method, runs in results.items():
        per_seed = [measures(m) for _, m in sorted(runs.items())]
        table[method] = {k: [r.get(k, float("nan")) for r in per_seed] for k in per_seed[0]}
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _cell(values: list[float] | None, spec: str) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return format(m, spec) if len(values) < 2 or spec.endswith(",.0f") else f"{format(m, spec)} ± {format(s, spec)}"


def results_table(table: dict[str, dict[str, list[float]]], columns=None, methods=None,
                  exploratory: frozenset[str] | None = None) -> str:
    """Mean ± std over seeds per method (row) and measure (``columns``: key, label, format)."""
    columns, methods = columns or COLUMNS, methods or METHODS
    exploratory = EXPLORATORY if exploratory is None else exploratory
    header = "| method | role | " + " | ".join(label for _, label, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for method, measures in table.items():
        role = methods[method][0] if method in methods else "-"
        role += " (exploratory)" if method in exploratory else ""
        cells = [_cell(measures.get(key), spec) for key, _, spec in columns]
        lines.append(f"| `{method}` | {role} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ALPHA = 0.05


CLAIMS: list[tuple[str, str, list[Test]]] = [
    ("1", "flatter expert loads than a learned softmax gate without a balancing loss",
     [Test("load_cv", "softmax_noloss", "lower")]),
    ("2", "load balance comparable to a balancing loss (load CV no higher than Switch's, within twice Switch's "
          "seed-to-seed spread)", [Test("load_cv", "switch", "lower", parity=True)]),
    ("3", "accuracy at least that of the balancing-loss baselines (top-1 no lower than the better of Switch and "
          "V-MoE, within twice its seed-to-seed spread)", [Test("test_top1", "best_balanced", "higher", parity=True)]),
    ("4", "more specialised (higher MI(expert; class)) and less homogeneous experts than Switch",
     [Test("mi_bits", "switch", "higher"), Test("homogeneity", "switch", "lower")]),
    ("5", "more stable routing than Switch: fewer probe tokens change experts between checkpoints, relative to what a "
          "memoryless router with the same loads would change (a router less balanced than the no-loss softmax gate "
          "is not compared: collapse is not stability)", [Test("probe_changed_rel", "switch", "lower")]),
    ("6", "better few-shot features than Switch (1-, 5-, 10-shot linear probes on frozen features of data the "
          "backbone never saw)",
     [Test("fewshot_1", "switch", "higher"), Test("fewshot_5", "switch", "higher"),
      Test("fewshot_10", "switch", "higher")]),
]
STABILITY_FLOOR = ("load_cv", "softmax_noloss")  # claim 5 compares only routers at least this balanced


def _baseline(table, name: str, measure: str) -> tuple[str, list[float]] | None:
    if name == "best_balanced":
        options = [(n, table[n][measure]) for n in ("switch", "vmoe") if n in table and measure in table[n]]
        if not options:
            return None
        return max(options, key=lambda item: mean_std(item[1])[0])
    if name in table and measure in table[name]:
        return name, table[name][measure]
    return None


def _comparisons(table, methods: list[str], claim: str, tests: list[Test]) -> list[dict[str, Any]]:
    """Every (method, test) of one claim that the study measured, with Welch's test; Holm-adjusted p over them."""
    rows = []
    for method in methods:
        for test in tests:
            base = _baseline(table, test.baseline, test.measure)
            if base is None or test.measure not in table.get(method, {}):
                continue
            base_values = [test.scale * v for v in base[1]]
            result = welch(table[method][test.measure], base_values)
            if result is not None:
                rows.append({"method": method, "test": test, "baseline": base[0], "welch": result,
                             "values": table[method][test.measure], "base_values": base_values})
    for row, adjusted in zip(rows, holm([r["welch"].p for r in rows])):
        row["p_holm"] = adjusted
        row["outcome"], row["note"] = _outcome(table, claim, row, len(rows))
    return rows


def _outcome(table, claim: str, row: dict[str, Any], family: int) -> tuple[str, str]:
    """supported / contradicted / inconclusive for one comparison (the rule in docs/study.md)."""
    test, w = row["test"], row["welch"]
    sign = 1.0 if test.better == "higher" else -1.0  # orient: positive = the way the claim says
    if claim == "5":
        floor_measure, floor_method = STABILITY_FLOOR
        if floor_method in table and row["method"] != floor_method:
            mine, floor = mean_std(table[row["method"]][floor_measure])[0], mean_std(table[floor_method][floor_measure])[0]
            if mine > floor:
                return "inconclusive", f"not compared: load CV {mine:.3g} above `{floor_method}`'s {floor:.3g}"
    if test.parity:
        # Non-inferiority: the simultaneous (Bonferroni) interval of the oriented difference against the margin.
        from scipy import stats as sps
        margin = 2 * w.std_b
        level = 1 - ALPHA / family
        half = 0.0 if w.se == 0 else float(sps.t.ppf(0.5 + level / 2, w.dof)) * w.se
        low, high = w.diff - half, w.diff + half
        low, high = (low, high) if sign > 0 else (-high, -low)
        row["interval"], row["margin"] = (low, high), margin
        note = (f"margin {margin:.3g} (twice the baseline's seed std); {100 * level:.1f}% interval of the difference "
                f"in the claim's direction [{low:.3g}, {high:.3g}]")
        if low > -margin:
            return "supported", note
        if high < -margin:
            return "contradicted", note
        return "inconclusive", note
    oriented = sign * w.diff
    if row["p_holm"] < ALPHA:
        return ("supported" if oriented > 0 else "contradicted"), ""
    return "inconclusive", ""


def _method_verdict(outcomes: list[str]) -> str:
    if not outcomes:
        return "not measured"
    if "contradicted" in outcomes:
        return "contradicted"
    return "supported" if all(o == "supported" for o in outcomes) else "inconclusive"


def _fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def verdicts(table: dict[str, dict[str, list[float]]], claims=None, paper_methods=None,
             methods=None) -> list[dict[str, Any]]:
    """For each claim: per paper method (read as written) supported / contradicted / inconclusive from Welch's
    tests over seeds with Holm's correction across the claim's comparisons (docs/study.md, "Verdicts"); the
    evidence; and the variants that would pass under the same rule (their own family). Defaults: the image
    study's claims, paper methods and method table."""
    claims, methods = claims or CLAIMS, methods or METHODS
    out = []
    papers = [m for m in (paper_methods or PAPER_METHODS) if m in table]
    variants = [m for m, (role, _, _) in methods.items() if role == "variant" and m in table]
    for number, text, tests in claims:
        rows = _comparisons(table, papers, number, tests)
        per_method = {m: _method_verdict([r["outcome"] for r in rows if r["method"] == m]) for m in papers}
        evidence = []
        for r in rows:
            w, test = r["welch"], r["test"]
            mm, bm = mean_std(r["values"])[0], mean_std(r["base_values"])[0]
            scaled = f"{test.scale:g} x " if test.scale != 1.0 else ""
            evidence.append(
                f"`{r['method']}` {test.measure} {mm:.4g} vs {scaled}`{r['baseline']}` {bm:.4g}: difference {w.diff:+.3g} "
                f"(95% CI [{w.low:.3g}, {w.high:.3g}]), Welch p {_fmt_p(w.p)}, Holm {_fmt_p(r['p_holm'])}"
                + (f"; {r['note']}" if r["note"] else "") + f": **{r['outcome']}**")
        variant_rows = _comparisons(table, variants, number, tests)
        passing = [m for m in variants
                   if _method_verdict([r["outcome"] for r in variant_rows if r["method"] == m]) == "supported"]
        verdict = ", ".join(f"`{m}` {v}" for m, v in per_method.items()) or "not measured"
        out.append({"claim": number, "text": text, "verdict": verdict, "per_method": per_method,
                    "evidence": evidence, "variants": passing})
    return out


# "Ship what holds up" (issue 12): a loss-free eigen configuration becomes a named preset only if, on the
# validation split, it balances better than Switch and is at least as accurate (the same rules as claims 1-3).
PRESET_TESTS = [Test("load_cv", "switch", "lower"), Test("val_top1", "switch", "higher", parity=True)]


def preset_check(table: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """For every eigen variant in the table: load CV on the validation probe below Switch's (Welch, Holm over the
    two tests) and validation top-1 non-inferior to Switch's (margin twice Switch's seed std); test data unused."""
    out = []
    for method, (role, _, _) in METHODS.items():
        if role != "variant" or method not in table or "switch" not in table:
            continue
        rows = _comparisons(table, [method], "preset", PRESET_TESTS)
        if len(rows) == len(PRESET_TESTS):
            out.append({"method": method, "outcomes": [r["outcome"] for r in rows],
                        "passes": all(r["outcome"] == "supported" for r in rows), "rows": rows})
    return out


def _preset_lines(table) -> list[str]:
    checks = preset_check(table)
    if not checks:
        return []
    lines = ["## Which loss-free eigen configuration holds up (validation only)", "",
             "A variant passes when its load CV on the validation probe is below Switch's (Welch, Holm over the two "
             "tests, level 0.05) and its validation top-1 is at least Switch's within twice Switch's seed std "
             "(simultaneous interval); the test split plays no part. docs/study.md says how a passing variant "
             "becomes a named configuration.", "",
             "| variant | load CV vs Switch | val top-1 vs Switch (interval, margin) | passes |", "|---|---|---|---|"]
    for c in checks:
        cv, acc = c["rows"]
        lines.append(
            f"| `{c['method']}` | {cv['welch'].diff:+.3f} (Holm p {_fmt_p(cv['p_holm'])}): {cv['outcome']} | "
            f"{acc['welch'].diff:+.4f} ([{acc['interval'][0]:.4f}, {acc['interval'][1]:.4f}], margin "
            f"{acc['margin']:.4f}): {acc['outcome']} | {'yes' if c['passes'] else 'no'} |")
    return lines + [""]



def ep_wait_lines(table: dict[str, dict[str, list[float]]], reference: str = "switch") -> list[str]:
    """What each router's loads would cost an expert-parallel deployment: every method's EP wait against the
    balancing-loss baseline's (Welch's test, Holm's correction over the methods compared, level ALPHA). No lines when
    the reference or the measure is missing (runs trained before it was measured)."""
    key = "train_ep_straggler"

    def measured(method: str) -> bool:
        values = table.get(method, {}).get(key, [])
        return len(values) >= 2 and all(math.isfinite(v) for v in values)

    if not measured(reference):
        return []
    rows = [(m, welch(table[m][key], table[reference][key])) for m in table if m != reference and measured(m)]
    if not rows:
        return []
    adjusted = holm([w.p if w is not None else None for _, w in rows])
    ref_mean = mean_std(table[reference][key])[0]
    lines = ["## What the loads would cost expert parallelism", "",
             "With one expert per rank, every rank waits in the token exchange for the busiest one, so the expert "
             "part of each step takes EP wait times as long as with flat loads (docs/distributed.md, \"The "
             f"straggler factor\"). Each method against `{reference}` (a balancing loss, {mean_std(table[reference][key])[0]:.2f}): "
             f"Welch's test over seeds, Holm's correction over the {len(rows)} comparisons, level {ALPHA}.", "",
             f"| method | EP wait | expert part vs `{reference}` | difference (95% CI) | Holm p | EP wait is |",
             "|---|---|---|---|---|---|"]
    for (method, w), p in zip(rows, adjusted):
        mean = mean_std(table[method][key])[0]
        outcome = ("inconclusive" if p is None or p >= ALPHA else "lower" if w.diff < 0 else "higher")
        ci = f"{w.diff:+.2f} ([{w.low:+.2f}, {w.high:+.2f}])" if w is not None else "-"
        lines.append(f"| `{method}` | {_cell(table[method][key], '.2f')} | {mean / ref_mean:.2f}x | {ci} | "
                     f"{_fmt_p(p) if p is not None else '-'} | {outcome} |")
    return lines + [""]

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


STEM_STUDY = "ermoe study --config configs/study_effnet_stem.yaml"


def condition_line(train: dict[str, Any]) -> str:
    """Which of the study's two conditions a budget is (docs/study.md), and where the other one is reported."""
    stem = (train.get("model") or {}).get("stem")
    if stem:
        return (f"frozen pretrained tokens: the ViT's patch embedding is a frozen ImageNet `{stem}` stem; the "
                "from-scratch condition is `ermoe study` (docs/results.md)")
    return ("from scratch: every weight trained on the study's data; the frozen pretrained-token condition is "
            f"`{STEM_STUDY}` (docs/results_stem.md)")


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
    data = t.get("data", {})
    transfer = ("in-domain: support sets from the training images, queries from the validation split"
                if cfg.fewshot_transfer == "in_domain" else
                f"transfer to `{cfg.fewshot_transfer}`, which the backbones never saw (its training split gives the "
                "support sets, its test split the queries; images resized to the model's input)")
    lines = [
        "# Study results", "",
        f"Generated by `{command}` — do not edit by hand.", "",
        f"- Condition: {condition_line(t)}",
        f"- Machine: {machine_description()}",
        f"- Seeds: {cfg.seeds} (mean ± sample std over seeds; few-shot: {cfg.fewshot_draws} draws per seed)",
        f"- Splits: {data.get('val_size', 0)} training images held out for validation (drawn with split seed "
        f"{data.get('split_seed', 0)}, the same for every run; per-epoch evaluation and every choice use it); the "
        "test split is read once, at the end of each run",
        f"- Few-shot probes: {transfer}",
        f"- Wall time: {summed}; this invocation {wall_s / 60:.1f} min (finished runs are reused, not retrained)",
        f"- Budget, the same for every method: `{t}`",
        "", "## Results", "", results_table(table), "",
        "load CV, max/mean, Gini, MI (expert; class, bits), homogeneity (mean pairwise cosine of expert outputs), "
        "changed (probe tokens whose experts changed between the last two checkpoints, from the assignment each "
        "layer made) and /chance (changed over what a memoryless router with the same loads would change: 0 "
        "stable, 1 random, undefined when collapsed) are means over the MoE layers of each run; " + EP_WAIT_NOTE +
        " (runs trained before it was measured show -); few-shot: "
        "logistic-regression probes on frozen pooled features; active: parameters one token uses (top-1 of the "
        "experts). Rows marked exploratory were added after looking at an earlier study's test results: leads, "
        "not held-out evidence.", "",
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
        "with the baselines over seeds (docs/study.md, \"Verdicts\"): Welch's test per comparison, Holm's "
        f"correction across the comparisons of a claim, level {ALPHA}. A comparison is supported when the corrected "
        "p-value is below the level and the difference goes the claimed way, contradicted when it goes the other "
        "way, inconclusive otherwise; for the two 'at least as good' claims (2, 3), supported when the whole "
        "simultaneous (Bonferroni) interval of the difference lies above minus twice the baseline's seed-to-seed "
        "std (what reruns of the baseline itself vary by), contradicted when it lies below it. A method's verdict is contradicted if any of its comparisons is, "
        "supported if all are. Variants that would pass under the same rule (their own family) are listed but do "
        "not change the verdict.", "",
    ]
    for v in verdicts(table):
        lines.append(f"**Claim {v['claim']}: {v['text']}. Verdict: {v['verdict']}.**")
        lines.extend(f"- {e}" for e in v["evidence"])
        lines.append(f"- Variants that pass: {', '.join(f'`{m}`' for m in v['variants']) or 'none'}")
        lines.append("")
    lines.extend(_preset_lines(table))
    lines.extend(ep_wait_lines(table))
    if len(cfg.seeds) < 3:
        lines.append(f"With {len(cfg.seeds)} seed(s) no significance test is possible; treat every verdict as "
                     "provisional.")
    atomic_write(path, "\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class ClaimsReport:
    """How a task's study report reads (the brain-age and retrieval studies; the image study has its own,
    :func:`write_report`): its title, data line, seeds note, method table, columns and their notes, claims and the
    paper methods they test, the claims' introduction, the measure plotted against load CV, and one run's
    measures."""

    title: str
    data_line: Callable[[dict[str, Any]], str]  # from the first run's metrics
    seeds_note: str
    methods: dict[str, tuple[str, str, dict[str, Any]]]
    columns: list[tuple[str, str, str]]
    notes: str
    claims: list[tuple[str, str, list[Test]]]
    paper_methods: tuple[str, ...]
    claims_intro: str
    figure: tuple[str, str]  # (measure, axis label)
    measures: Callable[[dict[str, Any]], dict[str, float]]


def write_claims_report(cfg, results, path: str | Path, command: str, wall_s: float,
                        atomic_write: Callable[[Path, str], None], spec: ClaimsReport,
                        extra: Callable[[dict[str, dict[str, list[float]]]], list[str]] | None = None) -> Path:
    """A task study's report: the per-method table, figures, each claim's verdict with the study's rules, and the
    task's ``extra`` sections (lines from the aggregated table)."""
    path = Path(path)
    table = aggregate(results, spec.measures)
    fig_dir = path.parent / "figures"
    figures = [accuracy_vs_cv_figure(table, fig_dir / f"{path.stem}_{spec.figure[0]}_vs_cv.png", *spec.figure,
                                     spec.methods),
               load_over_training_figure(results, fig_dir / f"{path.stem}_load_over_training.png", spec.methods)]
    walls = [m.get("run_wall_s") for runs in results.values() for m in runs.values() if m.get("run_wall_s")]
    first = next(iter(next(iter(results.values())).values()))
    lines = [
        f"# {spec.title}", "",
        f"Generated by `{command}` — do not edit by hand.", "",
        f"- Data: {spec.data_line(first)}",
        f"- Machine: {machine_description()}",
        f"- Seeds: {cfg.seeds} (mean ± sample std over seeds; {spec.seeds_note})",
        f"- Wall time: {sum(walls) / 60:.1f} min summed over the {len(walls)} runs; this invocation "
        f"{wall_s / 60:.1f} min (finished runs are reused)",
        f"- Budget, the same for every method: `{cfg.train}`",
        "", "## Results", "", results_table(table, spec.columns, spec.methods, frozenset()), "", spec.notes, "",
        *[f"![{f.stem}]({f.relative_to(path.parent).as_posix()})\n" for f in figures if f is not None],
        "## The papers' claims", "", spec.claims_intro, "",
    ]
    for v in verdicts(table, spec.claims, spec.paper_methods, spec.methods):
        lines.append(f"**Claim {v['claim']}: {v['text']}. Verdict: {v['verdict']}.**")
        lines.extend(f"- {e}" for e in v["evidence"])
        lines.append(f"- Variants that pass: {', '.join(f'`{m}`' for m in v['variants']) or 'none'}")
        lines.append("")
    lines += extra(table) if extra is not None else []
    lines += ep_wait_lines(table)
    if len(cfg.seeds) < 3:
        lines.append(f"With {len(cfg.seeds)} seed(s) the tests have little power; treat every verdict as provisional.")
    atomic_write(path, "\n".join(lines) + "\n")
    return path
