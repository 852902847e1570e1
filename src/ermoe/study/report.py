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
from .plan import LOAD_CV_MARGIN, Plan, make_plan
from .examples import BOOTSTRAP_DRAWS, collect_examples, sampling_variance
from .figures import accuracy_vs_cv_figure, heatmaps_figure, load_over_training_figure
from .stats import Test, holm, interval, load_claims, margin_p, mean_std, paired

PAPER_METHODS = ("ermoe", "emoe_parallel")
# The straggler column's legend, shared by every study's report.
EP_WAIT_NOTE = ("EP wait = per training step, the busiest expert's assignments over the mean on the global batch (the "
                "factor by which imbalance stretches the expert part of a step with one expert per rank, "
                "docs/distributed.md), averaged over the steps")
# (key, label, format, lower is better)
COLUMNS = [
    ("val_top1", "val top-1", ".4f"), ("test_top1", "test top-1", ".4f"), ("val_load_cv", "val CV", ".3f"),
    ("load_cv", "load CV", ".3f"),
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
    # the validation tokens' load (runs evaluated before it was recorded have none: NaN)
    out["val_load_cv"] = _layer_mean({"layers": metrics.get("val_layers", {})}, "load_cv")
    out.update(truth_probe_measures(metrics))
    for shots, value in metrics.get("fewshot", {}).items():
        out[f"fewshot_{shots}"] = value["mean"]
    for key, value in metrics.get("model_metrics", {}).items():
        out[f"model:{key}"] = float(value)
    return out


def truth_probe_measures(metrics: dict[str, Any]) -> dict[str, float]:
    """A run's linear probes of the ground truth (``truth_probe``, dense models only), per site: ``probe:<site>``
    its test balanced accuracy, ``probe_chance:<site>`` chance."""
    out = {}
    for site, r in (metrics.get("truth_probe") or {}).items():
        out[f"probe:{site}"], out[f"probe_chance:{site}"] = r["test_balanced_acc"], r["chance"]
    return out


def truth_probe_lines(table, method: str, what: str) -> list[str]:
    """The probe line of a positive control: per site of ``method``'s runs, the test balanced accuracy of a linear
    probe of ``what`` from the tokens there, against chance."""
    sites = [k[len("probe:"):] for k in table.get(method, {}) if k.startswith("probe:")]
    if not sites:
        return []
    runs = [v for v in table[method][f"probe:{sites[0]}"] if not math.isnan(v)]
    cells = [f"{site} {_cell(table[method][f'probe:{site}'], '.3f')} (chance "
             f"{mean_std(table[method][f'probe_chance:{site}'])[0]:.3f})" for site in sites]
    return [f"- A linear probe of {what} from the tokens each block's token-wise layer reads in `{method}` (logistic "
            f"regression, C chosen on validation; test balanced accuracy, mean ± std over {len(runs)} seeds): "
            + "; ".join(cells) + ". Well above chance: the ground truth is there for a router to follow; near it: "
            "no router can route by it there."]


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
    """method -> measure -> the values over seeds, in seed order, with the seeds themselves under ``seed``
    (``measures``: one run's numbers, default :func:`run_measures`)."""
    measures = measures or run_measures
    table: dict[str, dict[str, list[float]]] = {}
    for method, runs in results.items():
        per_seed = [{**measures(m), "seed": float(seed)} for seed, m in sorted(runs.items())]
        table[method] = {k: [r.get(k, float("nan")) for r in per_seed] for k in per_seed[0]}
    return table


def _cell(values: list[float] | None, spec: str) -> str:
    """Mean ± std over the seeds; where the measure is undefined in some seeds (an expert map with one expert has no
    AMI), over the others, with their number: "0.017 ± 0.039 (n 3/5)"."""
    if not values:
        return "-"
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    cell = format(m, spec) if len(values) < 2 or spec.endswith(",.0f") else f"{format(m, spec)} ± {format(s, spec)}"
    defined = sum(not math.isnan(v) for v in values)
    return cell if defined == len(values) else f"{cell} (n {defined}/{len(values)})"


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
    *load_claims(),
    ("3", "accuracy at least that of the balancing-loss baseline (test top-1 no lower than its by the pre-registered "
          "margin or more)", [Test("test_top1", "switch", "higher", parity=True)]),
    ("4", "more specialised (higher MI(expert; class)) and less homogeneous experts than Switch",
     [Test("mi_bits", "switch", "higher"), Test("homogeneity", "switch", "lower")]),
    ("5", "more stable routing than Switch: fewer probe tokens change experts between checkpoints, relative to what a "
          "memoryless router with the same loads would change (a router significantly less balanced than the no-loss "
          "softmax gate is not compared: collapse is not stability)", [Test("probe_changed_rel", "switch", "lower")]),
    ("6", "better few-shot features than Switch (1-, 5-, 10-shot linear probes on frozen features of data the "
          "backbone never saw)",
     [Test("fewshot_1", "switch", "higher"), Test("fewshot_5", "switch", "higher"),
      Test("fewshot_10", "switch", "higher")]),
]
STABILITY_FLOOR = ("load_cv", "softmax_noloss")  # claim 5 compares only routers not significantly less balanced

# "Ship what holds up" (issue 12): a loss-free eigen configuration becomes a named preset only if, on the
# validation split alone, it balances better than the balancing-loss baseline and is at least as accurate.
PRESET = ("preset", "a loss-free eigen variant balances better than the balancing-loss baseline on validation tokens "
                    "and is at least as accurate on validation images",
          [Test("val_load_cv", "switch", "lower"), Test("val_top1", "switch", "higher", parity=True)])

# The image study's pre-registration (its config may restate or change it; docs/study.md, "Fixed in advance").
IMAGE_MARGINS = {
    "test_top1": {"value": 0.01, "reason": "twice the binomial standard error of top-1 on the study's 5,000 test "
                                           "images at 85% (0.5 points): a smaller difference is below what the test "
                                           "set resolves"},
    "val_top1": {"value": 0.01, "reason": "the same for the 5,000 validation images"},
    "load_cv": LOAD_CV_MARGIN, "val_load_cv": {"value": LOAD_CV_MARGIN["value"],
                                               "reason": "as load_cv, on the validation tokens"},
}
IMAGE_BASELINES = {"1": "softmax_noloss", "2": "switch", "3": "switch", "4": "switch", "5": "switch", "6": "switch",
                   "preset": "switch"}


def _seed_pairs(table, method: str, baseline: str, measure: str, scale: float = 1.0
                ) -> tuple[list[float], list[float], list[float]]:
    """The seeds both ran, and the method's and the baseline's values of ``measure`` on them, paired by seed
    (``scale`` multiplies the baseline's)."""
    mine, theirs = table[method], table[baseline]
    if "seed" in mine and "seed" in theirs:
        by_seed = dict(zip(theirs["seed"], theirs[measure]))
        triples = [(s, v, by_seed[s]) for s, v in zip(mine["seed"], mine[measure]) if s in by_seed]
    else:  # a table built by hand: its lists are in the same seed order
        if len(mine[measure]) != len(theirs[measure]):
            raise ValueError(f"{method} and {baseline} have {len(mine[measure])} and {len(theirs[measure])} values "
                             f"of {measure} and no seeds to pair them by")
        triples = [(float(i), a, b) for i, (a, b) in enumerate(zip(mine[measure], theirs[measure]))]
    return [s for s, _, _ in triples], [a for _, a, _ in triples], [scale * b for _, _, b in triples]


def _both_measured(table, method: str, test: Test) -> bool:
    """Whether ``method`` and ``test``'s baseline (another method) both ran and recorded ``test``'s measure."""
    return (method != test.baseline and test.measure in table.get(method, {})
            and test.measure in table.get(test.baseline, {}))


def _comparisons(table, methods: list[str], claim: str, tests: list[Test], plan: Plan | None = None,
                 examples=None) -> list[dict[str, Any]]:
    """Every (method, test) the study measured, by a paired test over seeds (with the test set's sampling error
    where the runs recorded per-example results: ``examples``, :func:`~ermoe.study.examples.collect_examples`);
    Holm-adjusted p over all of them (one family: call it once per family), each ranked by the test it states: a
    superiority comparison by its p against no difference, a non-inferiority one by its p against the margin
    (:func:`~ermoe.study.stats.margin_p`)."""
    rows = []
    for method in methods:
        for test in tests:
            if not _both_measured(table, method, test):
                continue
            seeds, values, base_values = _seed_pairs(table, method, test.baseline, test.measure, test.scale)
            test_var = sampling_variance(examples, method, test.baseline, test.measure, seeds, values,
                                         base_values, test.scale)
            result = paired(values, base_values, test_var=test_var or 0.0)
            if result is not None:
                rows.append({"method": method, "test": test, "baseline": test.baseline, "stat": result,
                             "values": values, "base_values": base_values, "test_error": test_var is not None})
    for row in rows:
        test = row["test"]
        row["p_tested"] = row["stat"].p
        if test.parity:
            if plan is None:
                raise ValueError(f"claim {claim}: a non-inferiority test of {test.measure} needs the study's plan "
                                 "(its pre-registered margin)")
            sign = 1.0 if test.better == "higher" else -1.0
            row["p_tested"] = margin_p(row["stat"], plan.margin(test.measure).value, sign)
    for row, adjusted in zip(rows, holm([r["p_tested"] for r in rows])):
        row["p_holm"] = adjusted
        row["outcome"], row["note"] = _outcome(table, claim, row, len(rows), plan)
    return rows


def oracle_lines(table, examples, how: str, reference: str, test: Test, unit: str, spec: str,
                 routing: list[tuple[str, str]], needed: tuple[float, str] | None = None,
                 control: str = "oracle") -> list[str]:
    """A positive control's findings: the oracle router (``how`` it routes) against ``reference`` by ``test``
    (paired over seeds with the test set's error), the size of the effect a claim needs beside it (``needed``: its
    value in ``unit`` and what it is), and the oracle's routing measures (``routing``: key, label): what experts
    that follow the ground truth score. Nothing when the study did not run the oracle."""
    if control not in table or reference not in table:
        return []
    lines = []
    rows = _comparisons(table, [control], "control", [test], examples=examples)
    if rows:
        r, w = rows[0], rows[0]["stat"]
        gain = w.diff if test.better == "higher" else -w.diff
        gain_low = w.low if test.better == "higher" else -w.high
        text = (f"- Oracle routing (`{control}`: {how}, the ground truth, also at test) against `{reference}`: "
                f"{test.measure} {format(mean_std(r['values'])[0], spec)} vs "
                f"{format(mean_std(r['base_values'])[0], spec)}, gain {format(gain, '+' + spec)} {unit} (se "
                f"{format(w.se, spec)}, 95% CI of the difference [{format(w.low, spec)}, {format(w.high, spec)}], "
                f"p {_fmt_p(w.p)})")
        if needed is not None:
            value, what = needed
            text += (f"; {what} is {format(value, spec)} {unit}: the oracle's gain is "
                     + ("clearly beyond it (the whole interval)" if gain_low > value else
                        "not clearly beyond it, so this testbed cannot show that effect through routing by the "
                        "ground truth"))
        lines.append(text + ".")
    measured = [(k, label) for k, label in routing if k in table[control]]
    if measured:
        lines.append("- What experts that follow the ground truth score on the routing measures (the oracle, mean ± "
                     "std over seeds): " + "; ".join(f"{label} {_cell(table[control][k], '.3f')}"
                                                     for k, label in measured) + ".")
    return lines


def _untested(table, methods: list[str], tests: list[Test]) -> list[str]:
    """The comparisons :func:`_comparisons` could not make although the measure applies to both sides: the seeds
    where the method's or the baseline's value is undefined (a map with one expert has no AMI). Dropping those
    seeds would drop the runs a measure fails on, so the comparison is left out and said so."""
    out = []
    for method in methods:
        for test in tests:
            if not _both_measured(table, method, test):
                continue
            seeds, values, base_values = _seed_pairs(table, method, test.baseline, test.measure)
            sides = [(m, [int(s) for s, x in zip(seeds, xs) if not math.isfinite(x)])
                     for m, xs in ((method, values), (test.baseline, base_values))]
            if len(seeds) < 2 or any(len(bad) == len(seeds) for _, bad in sides):  # does not apply (pattern maps
                continue                                                         # on a homogeneous cohort)
            undefined = [f"for `{m}` in seed{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
                         for m, bad in sides if bad]
            if undefined:
                out.append(f"`{method}` {test.measure} vs `{test.baseline}`: not tested, undefined "
                           f"{' and '.join(undefined)}")
    return out


def _outcome(table, claim: str, row: dict[str, Any], family: int, plan: Plan | None) -> tuple[str, str]:
    """supported / contradicted / inconclusive for one comparison (the rule in docs/study.md)."""
    test, w = row["test"], row["stat"]
    sign = 1.0 if test.better == "higher" else -1.0  # orient: positive = the way the claim says
    if claim == "5":
        # collapse is not stability: a router whose load CV is significantly above the no-loss softmax gate's
        # (paired test over seeds, level ALPHA) is not compared
        floor_measure, floor_method = STABILITY_FLOOR
        if floor_method in table and row["method"] != floor_method and floor_measure in table[row["method"]]:
            gate = paired(*_seed_pairs(table, row["method"], floor_method, floor_measure)[1:])
            mine, floor = mean_std(table[row["method"]][floor_measure])[0], mean_std(table[floor_method][floor_measure])[0]
            if gate is not None and gate.diff > 0 and gate.p < ALPHA:
                return "inconclusive", (f"not compared: load CV {mine:.3g} significantly above `{floor_method}`'s "
                                        f"{floor:.3g} (paired p {_fmt_p(gate.p)})")
    if test.parity:
        # Non-inferiority: supported when the test against the margin survives Holm's correction (its p ranked in
        # the family, :func:`_comparisons`); contradicted when the simultaneous (Bonferroni) interval of the
        # oriented difference lies wholly beyond the margin.
        margin = plan.margin(test.measure).value
        level = 1 - ALPHA / family
        low, high = interval(w, level)
        low, high = (low, high) if sign > 0 else (-high, -low)
        row["interval"], row["margin"] = (low, high), margin
        note = (f"margin {margin:.3g} (pre-registered); p against the margin {_fmt_p(row['p_tested'])}; "
                f"{100 * level:.1f}% interval of the difference in the claim's direction [{low:.3g}, {high:.3g}]")
        if row["p_holm"] < ALPHA:
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
             methods=None, plan: Plan | None = None, examples=None) -> list[dict[str, Any]]:
    """For each claim: per paper method (read as written) supported / contradicted / inconclusive from paired tests
    over seeds with Holm's correction across the paper methods' comparisons of the claim (the confirmatory family,
    docs/study.md, "Verdicts"); the evidence; and the variants that pass the same rule in a family of their own
    (exploratory: they do not change the verdict). ``plan``: the baselines and margins fixed before the runs (:mod:`ermoe.study.plan`); ``examples``:
    the runs' per-example test results (:func:`collect_examples`), for the test set's share of each comparison's
    error. Defaults: the image study's claims, paper methods and method table, and its default plan."""
    claims, methods = claims or CLAIMS, methods or METHODS
    plan = plan or default_plan()
    out = []
    papers = [m for m in (paper_methods or PAPER_METHODS) if m in table]
    variants = [m for m, (role, _, _) in methods.items() if role == "variant" and m in table]
    for number, text, tests in plan.claims(claims):
        # two families, each with its own Holm: the paper methods' tests (confirmatory: the verdict) and the
        # variants' (exploratory: which variants pass the same rule; they do not change the verdict)
        rows = _comparisons(table, papers, number, tests, plan, examples)
        variant_rows = _comparisons(table, variants, number, tests, plan, examples)
        per_method = {m: _method_verdict([r["outcome"] for r in rows if r["method"] == m]) for m in papers}
        evidence = [_evidence(r) for r in rows] + _untested(table, papers, tests)
        passing = [m for m in variants
                   if _method_verdict([r["outcome"] for r in variant_rows if r["method"] == m]) == "supported"]
        verdict = ", ".join(f"`{m}` {v}" for m, v in per_method.items()) or "not measured"
        out.append({"claim": number, "text": text, "verdict": verdict, "per_method": per_method,
                    "evidence": evidence, "variants": passing, "family": len(rows),
                    "variant_family": len(variant_rows)})
    return out


def _evidence(r: dict[str, Any]) -> str:
    w, test = r["stat"], r["test"]
    mm, bm = mean_std(r["values"])[0], mean_std(r["base_values"])[0]
    scaled = f"{test.scale:g} x " if test.scale != 1.0 else ""
    error = (f"se {w.se:.3g} = seeds {w.seed_se:.3g} (+) test set {w.test_se:.3g}" if r["test_error"] else
             f"se {w.se:.3g} from the seeds alone")
    return (f"`{r['method']}` {test.measure} {mm:.4g} vs {scaled}`{r['baseline']}` {bm:.4g}: paired difference "
            f"{w.diff:+.3g} over {w.n} seeds, {error} (95% CI [{w.low:.3g}, {w.high:.3g}]), p {_fmt_p(w.p)}, Holm "
            f"{_fmt_p(r['p_holm'])}" + (f"; {r['note']}" if r["note"] else "") + f": **{r['outcome']}**")


def default_plan() -> Plan:
    """The image study's pre-registration as the code states it (a study config may change it)."""
    return make_plan(IMAGE_MARGINS, IMAGE_BASELINES, [*CLAIMS, PRESET], METHODS)


def preset_check(table: dict[str, dict[str, list[float]]], plan: Plan | None = None,
                 val_examples=None) -> list[dict[str, Any]]:
    """For every eigen variant in the table, the preset rule on validation data only: load CV of the validation
    tokens below the baseline's (paired test) and validation top-1 non-inferior to the baseline's within the
    pre-registered margin; one family over every variant (Holm over the load tests and the top-1 tests against
    the margin; the Bonferroni level for the intervals shown). ``val_examples``: the runs' per-example validation results (:func:`collect_examples` with
    ``"val"``), for the validation set's own share of each comparison's error."""
    plan = plan or default_plan()
    (_, _, tests), = plan.claims([PRESET])
    variants = [m for m, (role, _, _) in METHODS.items() if role == "variant" and m in table]
    rows = _comparisons(table, variants, "preset", tests, plan, val_examples)
    out = []
    for method in variants:
        mine = [r for r in rows if r["method"] == method]
        if len(mine) == len(tests):
            out.append({"method": method, "outcomes": [r["outcome"] for r in mine],
                        "passes": all(r["outcome"] == "supported" for r in mine), "rows": mine})
    return out


def _preset_lines(table, plan: Plan, val_examples=None) -> list[str]:
    checks = preset_check(table, plan, val_examples)
    if not checks:
        return []
    (_, _, (cv_test, acc_test)), = plan.claims([PRESET])
    margin = plan.margin(acc_test.measure).value
    lines = ["## Which loss-free eigen configuration holds up (validation only)", "",
             f"A variant passes when the load CV of its validation tokens is below `{cv_test.baseline}`'s (paired "
             f"test over seeds) and its validation top-1 is at least `{acc_test.baseline}`'s within the "
             f"pre-registered margin of {margin:g} (its test against the margin); Holm's correction runs over all "
             f"{len(checks)} variants' tests together (the intervals shown at the Bonferroni level). As for the claims, the standard error "
             "of each difference carries the validation set's own sampling error where every paired run recorded "
             f"its per-example validation results (val_examples.npz; {BOOTSTRAP_DRAWS:,} bootstrap resamples of "
             "the validation images), else the seeds' alone (the se column says which). Only validation tokens "
             "and images are read: the test split plays no part. docs/study.md says how a passing variant becomes "
             "a named configuration.", "",
             "| variant | val load CV vs baseline | val top-1 vs baseline (interval, margin) | se of the top-1 "
             "difference | passes |", "|---|---|---|---|---|"]
    for c in checks:
        cv, acc = c["rows"]
        lines.append(
            f"| `{c['method']}` | {cv['stat'].diff:+.3f} (Holm p {_fmt_p(cv['p_holm'])}): {cv['outcome']} | "
            f"{acc['stat'].diff:+.4f} ([{acc['interval'][0]:.4f}, {acc['interval'][1]:.4f}], margin "
            f"{acc['margin']:.4f}): {acc['outcome']} | {_se_text(acc)} | {'yes' if c['passes'] else 'no'} |")
    return lines + [""]


def _se_text(row: dict[str, Any]) -> str:
    w = row["stat"]
    return (f"{w.se:.4f} = seeds {w.seed_se:.4f} (+) val set {w.test_se:.4f}" if row["test_error"] else
            f"{w.se:.4f}, seeds alone")


def balancing_baseline(plan) -> str:
    """Claim 2's balancing-loss baseline, fixed in the study config (``switch`` unless it names another): the
    reference of the EP-wait table."""
    return plan.baselines.get("2", ("switch",))[0]


def ep_wait_lines(table: dict[str, dict[str, list[float]]], reference: str = "switch", methods=None) -> list[str]:
    """What each router's loads would cost an expert-parallel deployment: every method's EP wait against the
    balancing-loss baseline's (``reference``: the reports pass ``balancing_baseline(plan)``; paired test
    over seeds, Holm's correction over the methods compared, level ALPHA; a control of ``methods``' roles, the
    oracle, is no method and takes no part). No lines when the reference or the measure is missing (runs trained
    before it was measured)."""
    key = "train_ep_straggler"
    methods = METHODS if methods is None else methods

    def measured(method: str) -> bool:
        values = table.get(method, {}).get(key, [])
        control = method in methods and methods[method][0] == "control"
        return not control and len(values) >= 2 and all(math.isfinite(v) for v in values)

    if not measured(reference):
        return []
    rows = [(m, paired(*_seed_pairs(table, m, reference, key)[1:])) for m in table if m != reference and measured(m)]
    if not rows:
        return []
    adjusted = holm([w.p if w is not None else None for _, w in rows])
    ref_mean = mean_std(table[reference][key])[0]
    lines = ["## What the loads would cost expert parallelism", "",
             "With one expert per rank, every rank waits in the token exchange for the busiest one, so the expert "
             "part of each step takes EP wait times as long as with flat loads (docs/distributed.md, \"The "
             f"straggler factor\"). Each method against `{reference}` (a balancing loss, {ref_mean:.2f}): "
             f"paired test over seeds, Holm's correction over the {len(rows)} comparisons, level {ALPHA}.", "",
             f"| method | EP wait | expert part vs `{reference}` | difference (95% CI) | Holm p | EP wait is |",
             "|---|---|---|---|---|---|"]
    for (method, w), p in zip(rows, adjusted):
        mean = mean_std(table[method][key])[0]
        outcome = ("inconclusive" if p is None or p >= ALPHA else "lower" if w.diff < 0 else "higher")
        ci = f"{w.diff:+.2f} ([{w.low:+.2f}, {w.high:+.2f}])" if w is not None else "-"
        lines.append(f"| `{method}` | {_cell(table[method][key], '.2f')} | {mean / ref_mean:.2f}x | {ci} | "
                     f"{_fmt_p(p) if p is not None else '-'} | {outcome} |")
    return lines + [""]

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


VERDICT_RULE = (
    "per comparison a paired t-test over the seeds both ran (seed s of the method against seed s of the baseline: "
    "the same initial data order and test set), Holm's correction across the paper methods' comparisons of a claim "
    "(the confirmatory family; the variants' comparisons are a family of their own, exploratory), level "
    f"{ALPHA} (docs/study.md, \"Verdicts\"). Where every paired run recorded its per-example test "
    "results (test_examples.npz: top-1 correctness, absolute error, retrieval ranks, each example's expert loads), "
    "the test set's "
    "own sampling error joins the seeds' in the standard error: the variance of the seed-averaged difference over "
    f"{BOOTSTRAP_DRAWS:,} bootstrap resamples of the test examples, one resample shared by every run; other "
    "comparisons say they rest on the seeds alone. A comparison is supported when the corrected p-value "
    "is below the level and the difference goes the claimed way, contradicted when it goes the other way, "
    "inconclusive otherwise; an 'at least as good' comparison is ranked in the family by its test against the "
    "pre-registered margin (p < 0.05 exactly when the 95% interval lies above minus the margin) and supported when "
    "that test survives the correction, contradicted when the whole simultaneous (Bonferroni) interval of the "
    "difference lies below minus the margin. A method's verdict is contradicted if any of its comparisons is, supported if all are. Variants that "
    "pass are listed but do not change the verdict.")


def claim_lines(found: list[dict[str, Any]]) -> list[str]:
    """Each claim's verdict, its evidence, and the variants that pass."""
    lines = []
    for v in found:
        lines.append(f"**Claim {v['claim']}: {v['text']}. Verdict: {v['verdict']}.**")
        lines.extend(f"- {e}" for e in v["evidence"])
        lines.append(f"- Variants that pass: {', '.join(f'`{m}`' for m in v['variants']) or 'none'}")
        lines.append("")
    return lines


def write_report(cfg, results, path: str | Path, command: str, wall_s: float,
                 atomic_write: Callable[[Path, str], None]) -> Path:
    path = Path(path)
    plan = make_plan(cfg.margins, cfg.baselines, [*CLAIMS, PRESET], METHODS)
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
    preregistered = (f" (the study config pre-registered {', '.join(f'`{m}`' for m in cfg.preregistered)} on an "
                     "earlier study's validation data: not exploratory here)" if cfg.preregistered else "")
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
        "", "## Results", "", results_table(table, exploratory=EXPLORATORY - set(cfg.preregistered)), "",
        "val CV (the load CV of the validation tokens: what the preset check reads), "
        "load CV, max/mean, Gini, MI (expert; class, bits), homogeneity (mean pairwise cosine of expert outputs), "
        "changed (probe tokens whose experts changed between the last two checkpoints, from the assignment each "
        "layer made) and /chance (changed over what a memoryless router with the same loads would change: 0 "
        "stable, 1 random, undefined when collapsed) are means over the MoE layers of each run; " + EP_WAIT_NOTE +
        " (runs trained before it was measured show -); few-shot: "
        "logistic-regression probes on frozen pooled features; active: parameters one token uses (top-1 of the "
        "experts). Rows marked exploratory were added after looking at an earlier study's test results: leads, "
        "not held-out evidence" + preregistered + ".", "",
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
        *plan.lines([*CLAIMS, PRESET]),
        *_image_control_lines(table, collect_examples(results)),
        "## The papers' claims", "",
        f"Verdicts compare the papers' methods read as written ({', '.join(f'`{m}`' for m in PAPER_METHODS)}) "
        f"with the baselines named above: {VERDICT_RULE}", "",
    ]
    lines += claim_lines(verdicts(table, plan=plan, examples=collect_examples(results)))
    lines.extend(_preset_lines(table, plan, collect_examples(results, "val")))
    lines.extend(ep_wait_lines(table, balancing_baseline(plan)))
    if len(cfg.seeds) < 3:
        lines.append(f"With {len(cfg.seeds)} seed(s) no significance test is possible; treat every verdict as "
                     "provisional.")
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def _image_control_lines(table, examples) -> list[str]:
    """The image study's positive control: the oracle (each image's tokens on its class's expert) against the dense
    ViT, and what its experts score on the specialisation and stability measures."""
    lines = oracle_lines(table, examples, "every token of an image on its class's expert, class mod experts",
                         "dense", Test("test_top1", "dense", "higher"), "", ".4f",
                         [("mi_bits", "MI bits (chance 0; following the class: the experts' entropy, at most "
                                      "log2 of the experts)"),
                          ("homogeneity", "homog."), ("probe_changed_rel", "/chance (chance 1)"),
                          ("load_cv", "load CV")])
    if lines:
        lines.append("- Here the ground truth is the target itself: routing by the class hands the model its answer "
                     "(an expert can learn one class), so the oracle's top-1 is a ceiling with the label leaked, not "
                     "what routing by a feature of the image can buy. What the row shows is the instruments: the "
                     "specialisation and stability measures experts reach when they follow the class.")
    lines += truth_probe_lines(table, "dense", "the image's class")
    return ["## Positive controls (what this testbed can show)", "", *lines, ""] if lines else []


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
                        extra: Callable[[dict[str, dict[str, list[float]]], dict], list[str]] | None = None,
                        controls: Callable[[dict[str, dict[str, list[float]]], dict], list[str]] | None = None
                        ) -> Path:
    """A task study's report: the per-method table, figures, what the positive ``controls`` reached (before the
    claims they qualify), each claim's verdict with the study's rules, and the task's ``extra`` sections (each:
    lines from the aggregated table and the runs' per-example test records,
    :func:`~ermoe.study.examples.collect_examples`)."""
    path = Path(path)
    plan = make_plan(cfg.margins, cfg.baselines, spec.claims, spec.methods)
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
        *plan.lines(spec.claims),
    ]
    examples = collect_examples(results)
    lines += controls(table, examples) if controls is not None else []
    lines += ["## The papers' claims", "", f"{spec.claims_intro} The rule: {VERDICT_RULE}", ""]
    lines += claim_lines(verdicts(table, spec.claims, spec.paper_methods, spec.methods, plan, examples))
    lines += extra(table, examples) if extra is not None else []
    lines += ep_wait_lines(table, balancing_baseline(plan), methods=spec.methods)
    if len(cfg.seeds) < 3:
        lines.append(f"With {len(cfg.seeds)} seed(s) the tests have little power; treat every verdict as provisional.")
    atomic_write(path, "\n".join(lines) + "\n")
    return path
