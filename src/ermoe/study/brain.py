"""The brain-age study (claim 7, docs/brainage.md): the plain SFCN-style 3D CNN against the same CNN with an MoE over
its feature-map cells (ERMoE-ba, EMoE 3D, the balancing-loss baselines) at one budget, several seeds.

Every MoE method puts the same layer at the same place (a residual MoE over the cells after the third stage from
the end, 4 experts of width 4C, top-1), so the MoE rows differ in routing only. ``dense_ffn`` puts a dense FFN of the
same active size there: whether an MoE gain is the routing or merely one more token-wise layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..tasks.brain_age import PROBE_TRAIN_VOLUMES
from .methods import METHODS
from .plan import LOAD_CV_MARGIN
from .stats import Test, load_claims

# name -> (role, description, overrides of model.moe; "_no_moe": the plain CNN; "_dense_ffn": the dense reference)
BRAIN_METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "plain": ("reference", "SFCN-style 3D CNN, no MoE (the claim's baseline)", {"_no_moe": True}),
    "dense_ffn": ("reference", "the CNN + a dense FFN over the cells where the MoE goes (same active size)",
                  {"_dense_ffn": True}),
    "ermoe": ("paper", "ERMoE-ba: ERMoE over the feature-map cells (papers' reading)", {"router": "ermoe"}),
    "emoe": ("paper", "EMoE 3D: EMoE over the feature-map cells", {"router": "emoe"}),
    "ermoe_standardize": ("variant", "ERMoE + per-expert score standardisation",
                          {"router": "ermoe", "router_kwargs": {"standardize": True}}),
    "emoe_standardize": ("variant", "EMoE + per-expert score standardisation",
                         {"router": "emoe", "router_kwargs": {"standardize": True}}),
    # the baselines route as in the image study (the same rows)
    **{name: METHODS[name] for name in ("softmax_noloss", "switch", "switch_tuned", "vmoe", "loss_free_bias",
                                        "expert_choice")},
    # a positive control, not a method: each cell's token goes to its subject's ageing pattern's expert (the ground
    # truth claim 7a's subject AMI scores; heterogeneous cohort only)
    "oracle": ("control", "positive control: every cell of a volume on its subject's ageing pattern's expert "
               "(ground truth, also at test)", {"router": "oracle"}),
    "regional": ("paper", "ERMoE-ba's reference design as read here: GM, WM, CSF and one free SFCN expert, ERMoE "
                 "top-2 per volume with threshold 0.5 (regional_sfcn3d)",
                 {"_model": "regional_sfcn3d", "router": "ermoe", "top_k": 2, "router_kwargs": {"threshold": 0.5}}),
    # ermoe's design, not the reference's: the gate's volume tokens centred over the volumes, which `regional`'s
    # layer norm leaves one direction for every brain (benchmarks/regional_routing_at_init.py)
    "regional_bn": ("variant", "regional experts whose gate tokens are batch-normed over the volumes instead of "
                    "layer-normed (regional_sfcn3d gate_norm: batch)",
                    {"_model": "regional_sfcn3d", "router": "ermoe", "top_k": 2, "router_kwargs": {"threshold": 0.5},
                     "gate_norm": "batch"}),
}
BRAIN_DEFAULT_METHODS = ["plain", "dense_ffn", "ermoe", "emoe", "ermoe_standardize", "emoe_standardize",
                         "softmax_noloss", "switch"]

# The budget (docs/brainage.md, "The claim-7 study"): the main job's cohort and CNN (the cohort is generated once and
# shared), 15 epochs of 800 training volumes at 4 mm (half the main job's 30): about 7 minutes a run on a 2-core CPU.
BRAIN_TRAIN: dict[str, Any] = {
    "task": "brain_age",
    "model": {"name": "sfcn3d", "channels": [8, 16, 32, 64, 64], "moe": {"num_experts": 4, "top_k": 1}},
    "data": {"name": "brain_cohort", "cohort_size": 1000, "spacing": 4.0, "val_size": 100, "test_size": 100},
    "optim": {"epochs": 15, "batch_size": 16, "eval_batch_size": 25, "lr": 1.0e-3, "weight_decay": 1.0e-4,
              "warmup_steps": 50},
    "bn_recalibration": 10, "probe_size": 16, "probe_every": 25, "tensorboard": False, "progress": False,
    "keep_checkpoints": 1,
}
BRAIN_STUDY: dict[str, Any] = {
    "methods": BRAIN_DEFAULT_METHODS, "out_dir": "runs/study-brain", "report": "docs/results_brainage.md",
    "train": BRAIN_TRAIN, "margins": {"load_cv": LOAD_CV_MARGIN},
    "baselines": {"7": "plain", "7a": "switch", "1": "softmax_noloss", "2": "switch"}}
BRAIN_QUICK: dict[str, Any] = {
    "seeds": [0, 1],
    "out_dir": "runs/study-brain-quick",
    "report": "runs/study-brain-quick/results_brainage.md",
    "train": {"model": {"channels": [4, 8, 8]}, "data": {"cohort_size": 48, "spacing": 8.0, "val_size": 8,
                                                          "test_size": 8},
              "optim": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 2},
              "bn_recalibration": 2, "probe_size": 8, "probe_every": 2},
}

BRAIN_PAPER_METHODS = ("ermoe", "emoe", "regional")
# (key, label, format)
BRAIN_COLUMNS = [
    ("val_mae", "val MAE", ".2f"), ("test_mae", "test MAE", ".2f"), ("test_rmse", "RMSE", ".2f"),
    ("test_r", "r", ".3f"), ("test_corrected_mae", "MAE corr.", ".2f"), ("load_cv", "load CV", ".3f"),
    ("max_over_mean", "max/mean", ".2f"), ("train_ep_straggler", "EP wait", ".2f"),
    ("volume_load_cv", "vol. CV", ".3f"), ("mi_tissue_bits", "MI tissue", ".3f"),
    ("age_map_ami", "age AMI", ".3f"), ("pattern_map_ami", "pattern AMI", ".3f"),
    ("pattern_subject_ami", "subject AMI", ".3f"), ("homogeneity", "homog.", ".3f"),
    ("probe_changed_rel", "/chance", ".3f"), ("train_img_per_s", "vol/s", ".1f"), ("params_total", "params", ",.0f"),
    ("params_active", "active", ",.0f"),
]
BRAIN_MEASURES = ("val_mae", "test_mae", "test_rmse", "test_r", "test_corrected_mae", "test_mae_mean_predictor",
                  "train_img_per_s", "params_total", "params_active")
BRAIN_LAYER_MEASURES = ("load_cv", "max_over_mean", "train_ep_straggler", "gini", "mi_tissue_bits",
                        "age_expert_enrichment", "age_map_ami", "pattern_map_ami", "pattern_subject_ami",
                        "homogeneity", "probe_changed_rel")

CLAIM7_RATIO = 0.93  # "more than 7%" lower MAE than the plain 3D CNN (ERMoE abstract)
BRAIN_CLAIMS: list[tuple[str, str, list[Test]]] = [
    ("7", "brain-age MAE at least 7% below the plain 3D CNN's (ERMoE abstract: 'improves brain age prediction "
          "accuracy by more than 7%'; tested as MAE against 0.93 x the plain CNN's MAE)",
     [Test("test_mae", "plain", "lower", scale=CLAIM7_RATIO)]),
    ("7a", "anatomically interpretable experts: expert maps more tied to tissue (MI(expert; tissue)) and to the "
           "generator's age-sensitive regions (AMI of the expert map with them) than Switch's; on a cohort whose "
           "people age differently, also to the ageing patterns' regions (AMI with the pattern map) and to how each "
           "person ages (AMI of a token's expert with its subject's pattern)",
     [Test("mi_tissue_bits", "switch", "higher"), Test("age_map_ami", "switch", "higher"),
      Test("pattern_map_ami", "switch", "higher"), Test("pattern_subject_ami", "switch", "higher")]),
    *load_claims(),
]


def brain_method_model(name: str, base_model: dict[str, Any]) -> dict[str, Any]:
    """The whole model section of brain method ``name`` on the study's base (``sfcn3d``) model section."""
    if name not in BRAIN_METHODS:
        raise ValueError(f"unknown brain-age study method {name!r}; choose from {list(BRAIN_METHODS)}")
    spec = dict(BRAIN_METHODS[name][2])
    base_moe = base_model.get("moe") or {}
    cnn = {k: v for k, v in base_model.items() if k != "moe"}
    whole = spec.pop("_model", None)
    if whole is not None:  # a whole model (regional experts): the CNN's widths, its own routing
        return {"name": whole, "channels": cnn.get("channels", [8, 16, 32, 64, 64]), **spec}
    if spec.pop("_no_moe", False):
        return {**cnn, "moe": None}
    if spec.pop("_dense_ffn", False):
        if base_moe.get("hidden_dim"):
            raise ValueError("the brain study's dense_ffn row takes the CNN's default FFN width: leave "
                             "model.moe.hidden_dim unset")
        return {**cnn, "moe": None, "dense_ffn": True}
    return {**cnn, "moe": {**base_moe, "router_kwargs": {}, **spec}}


def brain_run_measures(metrics: dict[str, Any]) -> dict[str, float]:
    """One brain-age run's numbers: the task's metrics, and per-layer statistics averaged over the MoE layers."""
    from .report import _layer_mean

    out = {k: float(metrics[k]) if metrics.get(k) is not None else float("nan") for k in BRAIN_MEASURES}
    layers = metrics.get("layers", {})
    cells = {n: s for n, s in layers.items() if "expert_age_tertile_counts" not in s}
    volumes = {n: s for n, s in layers.items() if n not in cells}
    for key in BRAIN_LAYER_MEASURES:  # over the layers that route cells
        out[key] = _layer_mean({"layers": cells}, key)
    # Routing whole volumes (regional experts) is a load over a batch of volumes, not over cells: its own column,
    # never compared with the cell routers' load CV.
    out["volume_load_cv"] = _layer_mean({"layers": volumes}, "load_cv")
    probes = [p["test_balanced_acc"] for p in (metrics.get("pattern_probe") or {}).values()]
    out["pattern_probe_acc"] = float(np.mean(probes)) if probes else float("nan")
    return out


def _control_lines(table, examples) -> list[str]:
    """Positive controls (docs/study.md, "Positive controls"): what routing by the subject's ageing pattern reaches
    on this testbed against the dense FFN, with claim 7's effect beside it, and whether the pattern is linearly
    readable where the router reads tokens (the pattern probe of the ``dense_ffn`` runs)."""
    from .report import oracle_lines
    from .stats import mean_std

    needed = (1 - CLAIM7_RATIO) * mean_std(table["plain"]["test_mae"])[0] if "plain" in table else None
    lines = oracle_lines(
        table, examples, "every cell of a volume on its subject's ageing pattern's expert", "dense_ffn",
        Test("test_mae", "dense_ffn", "lower"), "years", ".3f",
        [("pattern_subject_ami", "subject AMI (chance 0; following the patterns: 1)"),
         ("pattern_map_ami", "pattern AMI"), ("homogeneity", "homog."), ("probe_changed_rel", "/chance (chance 1)"),
         ("load_cv", "load CV")],
        needed=None if needed is None else (needed, f"claim 7's gain, {1 - CLAIM7_RATIO:.0%} of the plain CNN's MAE"))
    probes = [v for v in table.get("dense_ffn", {}).get("pattern_probe_acc", []) if not math.isnan(v)]
    if probes:
        m, sd = mean_std(probes)
        lines.append(f"- A linear probe of the subject's ageing pattern from the tokens the MoE layer reads (the dense "
                     f"FFN's input in `dense_ffn`, over the cells where the patterns differ; logistic regression "
                     f"fitted on {PROBE_TRAIN_VOLUMES} training volumes, C chosen on validation): test balanced "
                     f"accuracy {m:.3f} ± {sd:.3f} over {len(probes)} seeds (chance 0.5).")
    return ["## Positive controls (what this testbed can show)", "", *lines, ""] if lines else []


def _data_line(first: dict[str, Any]) -> str:
    cohort = first.get("cohort")
    how = ("everyone ageing alike" if cohort and cohort.get("ageing", "homogeneous") == "homogeneous" else
           "people ageing differently: two ageing patterns (hippocampal- or ventricle-predominant) and faster grey-"
           "matter loss in men, told only by the image" + (
               f", the patterns' rate multipliers raised to the power {cohort['pattern_strength']:g}"
               if cohort and cohort.get("pattern_strength") else ""))
    where = (f"the built-in ageing cohort ({cohort['size']} synthetic T1 volumes from the MNI152 template, aged by "
             f"published atrophy rates, {how}, docs/brainage.md; biological-age sd {cohort['bio_sd']:g} years, so no "
             f"model can beat a test MAE of about {cohort['floor_mae']:.2f})" if cohort else
             f"`{first.get('dataset', 'nifti_csv')}`")
    return (f"{where}, {first.get('test_scans', '?')} test volumes at {first.get('spacing', '?')} mm; predicting the "
            f"training mean age gives a test MAE of {first.get('test_mae_mean_predictor', float('nan')):.2f}")


ROUTING_OUTCOME = {"supported": "the MoE is more accurate", "contradicted": "the dense FFN is more accurate",
                   "inconclusive": "no significant difference"}


def _routing_lines(table, examples) -> list[str]:
    """Is it the routing? Every MoE row's test MAE against the dense FFN of the same active size (paired over seeds,
    with the test volumes' sampling error where the runs recorded their per-volume errors)."""
    from .report import _comparisons, _fmt_p
    from .stats import mean_std

    moe = [m for m in table if m in BRAIN_METHODS and BRAIN_METHODS[m][0] not in ("reference", "control")]
    rows = _comparisons(table, moe, "routing", [Test("test_mae", "dense_ffn", "lower")], examples=examples)
    if not rows:
        return []
    lines = ["## Is it the routing? (against the dense FFN of the same active size)", "",
             "Each MoE row's test MAE against `dense_ffn` (the same CNN with a dense token-wise FFN where the "
             "MoE goes): paired test over seeds (se: the seeds' and, where every run recorded its per-volume "
             "errors, the test volumes' bootstrap error), Holm's correction over these rows. Not a claim of the papers; it says "
             "whether a difference from the plain CNN comes from routing or from the extra layer.", ""]
    for r in rows:
        w = r["stat"]
        lines.append(f"- `{r['method']}` {mean_std(r['values'])[0]:.3f} vs {mean_std(r['base_values'])[0]:.3f}: "
                     f"difference {w.diff:+.3f} years, se {w.se:.3f}{'' if r['test_error'] else ' from the seeds alone'} "
                     f"(95% CI [{w.low:.3f}, {w.high:.3f}]), Holm p "
                     f"{_fmt_p(r['p_holm'])}: {ROUTING_OUTCOME[r['outcome']]}")
    return lines + [""]


def write_brain_report(cfg, results, path, command: str, wall_s: float, atomic_write) -> Path:
    """docs/results_brainage.md: the per-method table, claim 7 and the balance claims with the study's verdict
    rules, and whether an MoE gain is the routing (against the dense FFN of the same active size)."""
    from .report import EP_WAIT_NOTE, ClaimsReport, write_claims_report

    spec = ClaimsReport(
        title="Brain-age study results (claim 7)", data_line=_data_line,
        seeds_note="the seed sets the weights and the batch order, the cohort and its split are the same for every run",
        methods=BRAIN_METHODS, columns=BRAIN_COLUMNS,
        notes="MAE, RMSE and r on the test volumes (read once, at the end of each run); MAE corr.: after the "
              "age-bias correction fitted on the validation volumes (docs/brainage.md, \"Metrics\"). Routing columns "
              "are means over the MoE layers that route feature-map cells: load CV and max/mean of the test tokens, MI "
              "tissue = MI(expert; tissue class of the cell) in bits; age AMI = adjusted mutual information of the "
              "expert map (each brain cell's majority expert) with the generator's age-sensitive cells (0 = what "
              "chance and the experts' sizes give, 1 = the same partition); pattern AMI = the same with the pattern "
              "map (which ageing pattern changes each cell; heterogeneous cohort only); subject AMI = AMI of a "
              "token's expert with its subject's ageing pattern, over the cells where the patterns differ (an AMI is "
              "undefined where every cell's majority falls on one expert: its cell then averages the other seeds "
              "and says how many, n defined/run); "
              "homog. = mean pairwise cosine of expert outputs, /chance = probe tokens whose experts changed between "
              "the last two checkpoints over what a memoryless router with the same loads would change; vol. CV: the "
              "load CV of the regional experts, which route whole volumes; " + EP_WAIT_NOTE + ". vol/s: training "
              "volumes per second.",
        claims=BRAIN_CLAIMS, paper_methods=BRAIN_PAPER_METHODS,
        claims_intro="The papers' methods read as written (`ermoe`, `emoe`, and the regional experts `regional` "
                     "when the study runs them) against the baselines named above. Claim 7 compares the method's "
                     f"test MAE with {CLAIM7_RATIO:g} x the plain CNN's: supported when significantly below it, "
                     "contradicted when significantly above it (the gain is then significantly less than 7%).",
        figure=("test_mae", "test MAE (years)"), measures=brain_run_measures)
    return write_claims_report(cfg, results, path, command, wall_s, atomic_write, spec, _routing_lines,
                               controls=_control_lines)
