"""The study: method definitions, verdicts from the numbers, few-shot probes, and `ermoe study --quick` end to end."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ermoe.analysis.fewshot import few_shot_probe
from ermoe.cli import main
from ermoe.data.images import DEBIAN_FASHION_MNIST
from ermoe.experts import matched_eigen_hidden_dim
from ermoe.models import create_model
from ermoe.study import DEFAULT_METHODS, METHODS, method_model, runner, verdicts
from ermoe.study.runner import load_study_config, run_config, run_study
from ermoe.study.examples import collect_examples
from ermoe.train import CheckpointError, ConfigError

pytest.importorskip("sklearn")


def test_methods_differ_in_routing_only():
    base = {"name": "vit_tiny", "embed_dim": 96, "depth": 4, "moe": {"num_experts": 8, "top_k": 1,
                                                                      "blocks": "every_other"}}
    a, b = method_model("ermoe_standardize", base), method_model("switch", base)
    assert {k: v for k, v in a.items() if k != "moe"} == {k: v for k, v in b.items() if k != "moe"}  # the same ViT
    assert a["moe"]["num_experts"] == b["moe"]["num_experts"] == 8 and a["moe"]["blocks"] == b["moe"]["blocks"]
    assert a["moe"]["router_kwargs"] == {"standardize": True} and b["moe"]["router_kwargs"] == {"balance_weight": 0.01}
    assert method_model("ermoe_pca", base)["moe_init"] == "pca"
    assert method_model("emoe_parallel", base)["moe"]["placement"] == "parallel"
    assert method_model("dense", base) == {"name": "vit_tiny", "embed_dim": 96, "depth": 4, "moe": None}
    # the whole-model baselines: the single-gated ViT on the same base ViT and experts, DeepMoE's CNN sized with it
    assert method_model("single_gate", base) == {"name": "single_gated_vit", "base": "vit_tiny", "embed_dim": 96,
                                                 "depth": 4, "num_experts": 8, "blocks": "every_other",
                                                 "kmeans_step": 0.33}
    assert method_model("deepmoe", base) == {"name": "deepmoe_cnn", "widths": [40, 80, 160]}
    assert method_model("deepmoe", {"embed_dim": 192})["widths"] == [80, 160, 320]
    with pytest.raises(ValueError, match="unknown study method"):
        method_model("nope", base)


def test_matched_eigen_width_by_hand():
    # budget 96*8 + (2*96*384 + 384 + 96) = 74976; bases 8*96*12 = 9216; left 74976 - 9216 - (12 + 96) = 65652;
    # 65652 / (12 + 1 + 96) = 602.3
    assert matched_eigen_hidden_dim(96, 384, 8, 12) == 602
    # top-2: 768 + 2*74208 = 149184; left 149184 - 9216 - 2*108 = 139752; / (2*109) = 641.1
    assert matched_eigen_hidden_dim(96, 384, 8, 12, top_k=2) == 641
    with pytest.raises(ValueError, match="lower the rank"):
        matched_eigen_hidden_dim(96, 8, 8, 12)


def test_matched_ermoe_uses_the_mlp_experts_active_parameters():
    base = {"embed_dim": 96, "moe": {"num_experts": 8, "top_k": 1, "blocks": "every_other"}}

    def active(method):
        moe = method_model(method, base)["moe"]
        return create_model("vit_tiny", num_classes=10, img_size=28, patch_size=7, in_chans=1, depth=4, embed_dim=96,
                            num_heads=3, moe=moe).active_parameters()

    switch = active("switch")
    assert abs(active("ermoe_matched") / switch - 1) < 0.005
    assert active("ermoe") < 0.92 * switch  # rank-12 experts of the FFN's width are smaller
    assert set(DEFAULT_METHODS) < set(METHODS)


def test_every_method_builds_a_valid_config():
    cfg = load_study_config(quick=True)
    for method in METHODS:
        for seed in cfg.seeds:
            train_cfg = run_config(cfg, method, seed)
            assert train_cfg.seed == seed and train_cfg.data.name == "fashion_mnist"


def _seeds(mean, spread=0.01, n=5):
    """n seed values around ``mean`` (deterministic, sample std = spread * 1.58...)."""
    return [mean + spread * k for k in (-2, -1, 0, 1, 2)][:n]


def _table(**cv):
    base = {"test_top1": _seeds(0.80), "mi_bits": _seeds(0.10), "homogeneity": _seeds(0.20),
            "probe_changed_rel": _seeds(0.30), "fewshot_5": _seeds(0.50)}
    return {name: {**base, "load_cv": _seeds(v, 0.01 * v)} for name, v in cv.items()}


def test_paired_test_matches_scipy_and_holm_by_hand():
    from scipy.stats import t, ttest_rel
    from ermoe.study.stats import holm, paired

    a, b = [0.81, 0.83, 0.80, 0.82], [0.78, 0.79, 0.775, 0.80]
    w = paired(a, b)
    ref = ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert w.p == pytest.approx(ref.pvalue) and (w.low, w.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert w.diff == pytest.approx((sum(a) - sum(b)) / 4) and w.n == 4 and w.dof == 3
    # the test set's own error adds in quadrature: d = (.03, .04, .025, .02), s_d^2 / n + 1e-4
    d = [0.03, 0.04, 0.025, 0.02]
    mean = sum(d) / 4
    seed_var = sum((x - mean) ** 2 for x in d) / 3 / 4
    v = paired(a, b, test_var=1e-4)
    assert v.se == pytest.approx((seed_var + 1e-4) ** 0.5) and v.test_se == pytest.approx(0.01)
    assert v.p == pytest.approx(2 * t.sf(mean / (seed_var + 1e-4) ** 0.5, 3))
    assert paired([1.0, 2.0], [0.5, 1.5]).p == 0.0 and paired([1.0, 1.0], [1.0, 1.0]).p == 1.0  # exact
    assert paired([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="pair them by seed"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])
    # Holm: sorted 0.01, 0.02, 0.04 -> 3*0.01, max(2*0.02, .03), max(1*0.04, .04); None stays out of the family
    assert holm([0.04, 0.01, None, 0.02]) == [pytest.approx(0.04), pytest.approx(0.03), None, pytest.approx(0.04)]
    assert holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1, monotone


def test_comparisons_pair_runs_by_seed():
    from ermoe.study.report import _seed_pairs

    table = {"ermoe": {"seed": [0.0, 1.0, 3.0], "load_cv": [0.1, 0.2, 0.4]},
             "switch": {"seed": [0.0, 1.0, 2.0, 3.0], "load_cv": [1.0, 2.0, 3.0, 4.0]}}
    assert _seed_pairs(table, "ermoe", "switch", "load_cv") == ([0.0, 1.0, 3.0], [0.1, 0.2, 0.4], [1.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="no seeds to pair them by"):
        _seed_pairs({"a": {"x": [1.0]}, "b": {"x": [1.0, 2.0]}}, "a", "b", "x")


def test_the_test_sets_own_error_by_bootstrap_against_a_slow_reference():
    import numpy as np
    from ermoe.routing.stats import load_cv
    from ermoe.study.examples import BOOTSTRAP_DRAWS, _example_load_cv, sampling_variance
    from ermoe.study.stats import bootstrap_weights

    rng = np.random.default_rng(1)
    n = 400
    runs = {m: {s: {"correct": rng.random(n) < p, "load/b1": rng.integers(0, 5, (n, 4))} for s in (0.0, 1.0, 2.0)}
            for m, p in (("ermoe", 0.8), ("switch", 0.75))}
    seeds = [0.0, 1.0, 2.0]
    top1 = {m: [float(runs[m][s]["correct"].mean()) for s in seeds] for m in runs}
    got = sampling_variance(runs, "ermoe", "switch", "test_top1", seeds, top1["ermoe"], top1["switch"], 1.0)
    w = bootstrap_weights(n, BOOTSTRAP_DRAWS)
    d = []
    for b in range(BOOTSTRAP_DRAWS):  # the slow way: every resample, every seed, in float64
        per_seed = [sum(w[b, i] * (float(runs["ermoe"][s]["correct"][i]) - float(runs["switch"][s]["correct"][i]))
                        for i in range(n)) / n for s in seeds]
        d.append(sum(per_seed) / len(seeds))
    assert got == pytest.approx(float(np.var(d, ddof=1)), rel=1e-9)
    # and it estimates the sampling variance of a mean difference: var over examples of the seed-averaged d, / n
    d_x = np.mean([runs["ermoe"][s]["correct"].astype(float) - runs["switch"][s]["correct"] for s in seeds], axis=0)
    assert got == pytest.approx(d_x.var() / n, rel=0.15)
    # the load statistic reproduces the run's load CV with every example once
    assert _example_load_cv(runs["ermoe"][0.0], np.ones((1, n)))[0] == pytest.approx(
        load_cv(torch.as_tensor(runs["ermoe"][0.0]["load/b1"].sum(0))))
    # RSUM: each image's rank and each caption's, captions weighed with their image
    from ermoe.analysis.retrieval import metrics_from_ranks
    from ermoe.study.examples import _example_rsum, examples_count
    owner = np.repeat(np.arange(50), 5)
    ranks = {"i2t_rank": rng.integers(1, 30, 50), "caption/t2i_rank": rng.integers(1, 30, 250), "caption/owner": owner}
    want = metrics_from_ranks(torch.as_tensor(ranks["i2t_rank"]), torch.as_tensor(ranks["caption/t2i_rank"]))
    assert _example_rsum(ranks, np.ones((1, 50)))[0] == pytest.approx(want["test_rsum"]) and examples_count(ranks) == 50
    twice = np.ones((1, 50))
    twice[0, 0] = 2.0  # image 0 drawn twice: its captions count twice too
    hits = lambda r, k: (r <= k).astype(float)  # noqa: E731
    by_hand = 100 * sum((hits(ranks["i2t_rank"], k) @ twice[0]) / 51 + (hits(ranks["caption/t2i_rank"], k)
                        @ twice[0][owner]) / 255 for k in (1, 5, 10))
    assert _example_rsum(ranks, twice)[0] == pytest.approx(by_hand)
    # a run whose recorded examples do not give back the compared value, or a missing run: the seeds alone
    wrong = [top1["ermoe"][0] + 0.01, *top1["ermoe"][1:]]
    assert sampling_variance(runs, "ermoe", "switch", "test_top1", seeds, wrong, top1["switch"], 1.0) is None
    assert sampling_variance(runs, "ermoe", "switch", "test_top1", [0.0, 5.0], top1["ermoe"][:2], top1["switch"][:2],
                          1.0) is None
    assert sampling_variance(runs, "ermoe", "switch", "mi_bits", seeds, [0.0] * 3, [0.0] * 3, 1.0) is None


def test_a_run_records_its_per_example_test_results(tmp_path):
    from ermoe.train import load_config, train
    from ermoe.train.run import Run

    cfg = load_config(None, {
        "out_dir": str(tmp_path), "run_name": "r", "progress": False, "tensorboard": False,
        "data": {"name": "digits", "train_limit": 256, "val_size": 100},
        "model": {"patch_size": 2, "depth": 2, "embed_dim": 16, "num_heads": 2,
                  "moe": {"router": "ermoe", "num_experts": 4, "blocks": [1]}},
        "optim": {"epochs": 1, "batch_size": 64, "warmup_steps": 2, "eval_batch_size": 128}})
    run = Run(train(cfg, quiet=True))
    metrics, arrays = run.read_metrics(), run.read_examples()
    assert "per_example" not in metrics and sorted(arrays) == ["correct", "load/blocks.1.mlp"]
    assert len(arrays["correct"]) == metrics["test_images"] and arrays["correct"].mean() == pytest.approx(
        metrics["test_top1"])
    loads = arrays["load/blocks.1.mlp"]
    assert loads.shape == (metrics["test_images"], 4) and (loads.sum(1) == 16).all()  # 4 x 4 patches an image
    assert loads.sum(0).tolist() == metrics["layers"]["blocks.1.mlp"]["tokens_per_expert"]
    import zipfile  # kept compressed: a study's records hold one file per run and split
    with zipfile.ZipFile(run.root / "test_examples.npz") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    # the validation images likewise (what the preset check resamples): they give back its validation measures
    import numpy as np
    from ermoe.study.examples import EXAMPLE_STATISTICS
    val = run.read_examples("val")
    assert sorted(val) == ["correct", "load/blocks.1.mlp"] and len(val["correct"]) == 100
    ones = np.ones((1, 100))
    assert EXAMPLE_STATISTICS["val_top1"](val, ones)[0] == pytest.approx(metrics["val_top1"], rel=1e-6)
    assert val["load/blocks.1.mlp"].sum(0).tolist() == metrics["val_layers"]["blocks.1.mlp"]["tokens_per_expert"]
    assert EXAMPLE_STATISTICS["val_load_cv"](val, ones)[0] == pytest.approx(
        metrics["val_layers"]["blocks.1.mlp"]["load_cv"], rel=1e-6)
    # a run evaluated before they were kept gets them from its final checkpoint, the very same arrays
    from ermoe.study.runner import record_validation_examples
    (run.root / "val_examples.npz").unlink()
    assert record_validation_examples(run.root)
    again = run.read_examples("val")
    assert all(np.array_equal(again[k], val[k]) for k in val) and sorted(again) == sorted(val)
    assert not record_validation_examples(run.root)  # already there: nothing to do
    # a checkpoint that does not give back the recorded measures: a warning, nothing written
    (run.root / "val_examples.npz").unlink()
    tampered = dict(metrics, val_top1=metrics["val_top1"] + 0.01)
    run.write_metrics(tampered)
    with pytest.warns(UserWarning, match="does not give back the validation measures"):
        assert not record_validation_examples(run.root)
    assert run.read_examples("val") is None
    for damaged in (b"not a zip", b"", b"PK\x03\x04 a zip cut short"):  # garbage, emptied, truncated
        (run.root / "test_examples.npz").write_bytes(damaged)
        with pytest.raises(CheckpointError, match="is corrupt"):
            run.read_examples()


def test_verdicts_follow_the_statistics():
    table = _table(ermoe=0.2, emoe_parallel=0.3, softmax_noloss=0.5, switch=0.4, vmoe=0.4)
    table["ermoe"]["mi_bits"] = _seeds(0.30)
    table["ermoe"]["homogeneity"] = _seeds(0.10)
    by_claim = {v["claim"]: v for v in verdicts(table)}
    # 1: both clearly below the softmax gate's CV (5 seeds, 2% spread): significant after Holm
    assert by_claim["1"]["per_method"] == {"ermoe": "supported", "emoe_parallel": "supported"}
    # 2 (parity with Switch, margin = Switch's seed std 0.0063): ERMoE is far below -> supported; EMoE's 0.3 too
    assert by_claim["2"]["per_method"]["ermoe"] == "supported"
    # 3: equal accuracy: the interval of the difference (0) lies within the margin (the baseline's seed std) -> yes
    assert by_claim["3"]["per_method"] == {"ermoe": "supported", "emoe_parallel": "supported"}
    # 4: ERMoE more specialised and less homogeneous; EMoE identical to Switch: no difference -> inconclusive
    assert by_claim["4"]["per_method"] == {"ermoe": "supported", "emoe_parallel": "inconclusive"}
    # 5: identical stability to Switch: inconclusive, not "not supported"
    assert by_claim["5"]["per_method"]["ermoe"] == "inconclusive"
    assert "Holm" in by_claim["4"]["evidence"][0] and "95% CI" in by_claim["4"]["evidence"][0]
    # an effect the seeds cannot settle is inconclusive: one seed of noise as big as the effect
    table = _table(ermoe=0.9, emoe_parallel=1.2, softmax_noloss=0.5, switch=0.4, vmoe=0.4, ermoe_standardize=0.3)
    table["ermoe"]["load_cv"] = [0.3, 0.9, 0.5, 0.7, 0.4]  # mean 0.56 vs 0.5, large spread
    one = verdicts(table)[0]
    assert one["per_method"] == {"ermoe": "inconclusive", "emoe_parallel": "contradicted"}
    assert one["variants"] == ["ermoe_standardize"]


def test_a_non_inferiority_p_is_its_test_against_the_margin():
    """margin_p(w, margin) < 0.05 exactly when the 95% interval lies above -margin (the rule the interval states),
    for differences on both sides of the margin and either orientation; by hand for one: diff -0.004, se 0.002
    (4 dof), margin 0.01: t = (-0.004 + 0.01) / 0.002 = 3, p = 2 * t.sf(3, 4) = 0.0399."""
    from scipy import stats as st

    from ermoe.study.stats import Paired, interval, margin_p

    w = Paired(diff=-0.004, se=0.002, low=0, high=0, p=0.1, dof=4.0, n=5, seed_se=0.002)
    assert margin_p(w, 0.01) == pytest.approx(2 * st.t.sf(3.0, 4)) == pytest.approx(0.0399, abs=1e-4)
    for diff in (-0.02, -0.0105, -0.0045, -0.004, 0.0, 0.01):
        w = Paired(diff=diff, se=0.002, low=0, high=0, p=0.1, dof=4.0, n=5, seed_se=0.002)
        low, high = interval(w, 0.95)
        assert (margin_p(w, 0.01) < 0.05) == (low > -0.01)
        assert (margin_p(w, 0.01, sign=-1.0) < 0.05) == (-high > -0.01)  # lower is better: -diff oriented


def test_paper_methods_and_variants_are_two_families_and_parity_ranks_by_its_margin_test():
    """Issue 41: a paper method's Holm correction runs over the paper methods' comparisons only (adding variants
    does not weaken it), the variants get their own; a non-inferiority row enters Holm with its p against the
    margin."""
    from ermoe.study.report import CLAIMS, _comparisons, default_plan, verdicts
    from ermoe.study.stats import holm, margin_p

    table = _table(ermoe=0.2, emoe_parallel=0.3, softmax_noloss=0.5, switch=0.4, vmoe=0.4)
    # MI a small, noisy gain (paired p 0.0054: Holm x 3 at its rank among 4 paper comparisons, x 15 among 16);
    # homogeneity clearly lower (an exact difference: p 0, ranked first)
    table["ermoe"]["mi_bits"] = [b + d for b, d in zip(_seeds(0.10), (0.005, 0.009, 0.003, 0.008, 0.005))]
    table["ermoe"]["homogeneity"] = _seeds(0.10)
    alone = {v["claim"]: v for v in verdicts(table)}["4"]
    # six variants exactly as good as Switch: 12 more comparisons, which in one family would multiply the paper
    # methods' p-values by up to 16 instead of 4
    variants = ("ermoe_standardize", "ermoe_pca", "ermoe_matched", "emoe_whiten", "emoe_standardize", "emoe_pca")
    crowded = {**table, **{m: dict(table["switch"], load_cv=_seeds(0.2, 0.002)) for m in variants}}
    with_variants = {v["claim"]: v for v in verdicts(crowded)}["4"]
    assert with_variants["variant_family"] == 12 and with_variants["family"] == alone["family"] == 4
    assert with_variants["per_method"] == alone["per_method"] and with_variants["evidence"] == alone["evidence"]
    assert alone["per_method"]["ermoe"] == "supported" and with_variants["variants"] == []
    plan = default_plan()
    tests = next(t for number, _, t in plan.claims(CLAIMS) if number == "4")
    one_family = _comparisons(crowded, ["ermoe", "emoe_parallel", *variants], "4", tests, plan)
    mi = next(r for r in one_family if r["method"] == "ermoe" and r["test"].measure == "mi_bits")
    assert mi["stat"].p == pytest.approx(0.0054, abs=2e-4) and mi["outcome"] == "inconclusive"  # (the old rule)
    # the non-inferiority rows of claim 3 are ranked by their margin test
    tests = next(t for number, _, t in plan.claims(CLAIMS) if number == "3")
    rows = _comparisons(table, ["ermoe", "emoe_parallel"], "3", tests, plan)
    wanted = [margin_p(r["stat"], plan.margin("test_top1").value, 1.0) for r in rows]
    assert [r["p_tested"] for r in rows] == pytest.approx(wanted)
    assert [r["p_holm"] for r in rows] == pytest.approx(holm(wanted))
    assert all(r["p_tested"] != r["stat"].p for r in rows)


def test_a_mean_over_fewer_seeds_than_ran_says_how_many():
    """Issue 41: a measure undefined in some seeds (AMI with one expert) averages the others and shows their
    number; a measure every seed defines shows none."""
    from ermoe.study.report import results_table

    table = {"switch": {"load_cv": [0.1, float("nan"), 0.3, float("nan"), 0.2], "test_top1": _seeds(0.8)}}
    row = results_table(table, columns=[("load_cv", "load CV", ".3f"), ("test_top1", "top-1", ".3f")]).splitlines()[2]
    assert row == "| `switch` | baseline | 0.200 ± 0.100 (n 3/5) | 0.800 ± 0.016 |"


def test_a_comparison_with_an_undefined_seed_is_said_to_be_untested():
    """A measure undefined in one seed (a one-expert map has no AMI) leaves its comparison out, and the evidence
    says so instead of the line vanishing; dropping that seed would drop exactly the run the measure fails on."""
    table = _table(ermoe=0.2, emoe_parallel=0.3, softmax_noloss=0.5, switch=0.4, vmoe=0.4)
    table["emoe_parallel"]["load_cv"] = [float("nan"), 0.31, 0.29, 0.30, 0.32]
    claim1 = verdicts(table)[0]
    assert claim1["per_method"] == {"ermoe": "supported", "emoe_parallel": "not measured"}
    assert claim1["family"] == 1
    assert claim1["evidence"][-1] == ("`emoe_parallel` load_cv vs `softmax_noloss`: not tested, undefined for "
                                      "`emoe_parallel` in seed 0")
    table["softmax_noloss"]["load_cv"][2:4] = [float("nan")] * 2
    assert verdicts(table)[0]["evidence"][-1].endswith("undefined for `emoe_parallel` in seed 0 and for "
                                                       "`softmax_noloss` in seeds 2, 3")
    table["emoe_parallel"]["load_cv"] = [float("nan")] * 5  # a measure that does not apply: nothing to say
    assert not any("not tested" in e for e in verdicts(table)[0]["evidence"] if "emoe_parallel" in e)
    assert not any("not tested" in e for e in verdicts(_table(ermoe=0.2, emoe_parallel=0.3, softmax_noloss=0.5,
                                                              switch=0.4, vmoe=0.4))[0]["evidence"])


def test_each_report_names_its_condition_and_the_other_command():
    from ermoe.study.report import STEM_STUDY, condition_line

    assert condition_line({"model": {"name": "vit_tiny"}}).startswith("from scratch") and STEM_STUDY in \
        condition_line({"model": {}})
    assert condition_line({"model": {"stem": "efficientnet_lite0"}}).startswith("frozen pretrained tokens")
    from pathlib import Path
    assert Path(__file__).parents[1].joinpath(STEM_STUDY.split("--config ")[1]).is_file()


def test_the_preset_check_reads_validation_data_only():
    from ermoe.study.report import preset_check

    table = _table(switch=0.4, ermoe_standardize=0.2, emoe_standardize=0.2, ermoe_pca=0.9)
    for name, cv in (("switch", 0.4), ("ermoe_standardize", 0.2), ("emoe_standardize", 0.2), ("ermoe_pca", 0.9)):
        table[name]["val_load_cv"] = [cv + 0.01 * k * cv for k in (1, -1, 0, 2, -2)]
        table[name]["val_top1"] = _seeds(0.85)
    table["ermoe_standardize"]["val_top1"] = _seeds(0.75)  # balanced but 10 points less accurate on validation
    checks = {c["method"]: c for c in preset_check(table)}
    assert checks["emoe_standardize"]["passes"] and checks["emoe_standardize"]["outcomes"] == ["supported"] * 2
    assert checks["ermoe_standardize"]["outcomes"] == ["supported", "contradicted"]
    assert checks["ermoe_pca"]["outcomes"][0] == "contradicted" and not checks["ermoe_pca"]["passes"]
    assert "switch" not in checks
    # one family: Holm's correction runs over every variant's tests together, the top-1 tests ranked by their p
    # against the margin (ermoe_standardize's exact 10-point deficit: p 0 against no difference, 1 against the margin)
    from ermoe.study.stats import holm
    rows = [r for c in checks.values() for r in c["rows"]]
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p_tested"] for r in rows]))
    deficit = checks["ermoe_standardize"]["rows"][1]
    assert deficit["stat"].p == 0.0 and deficit["p_tested"] == 1.0
    # replace everything the test split gave (test top-1, the test tokens' load) by garbage: nothing changes
    garbage = {name: {k: ([float("nan"), 7.0, -3.0, 1e9, 0.0] if not k.startswith("val_") else v)
                      for k, v in measures.items()} for name, measures in table.items()}
    again = {c["method"]: c for c in preset_check(garbage)}
    assert {m: (c["outcomes"], c["rows"][1]["interval"]) for m, c in again.items()} == \
        {m: (c["outcomes"], c["rows"][1]["interval"]) for m, c in checks.items()}


def test_the_preset_check_carries_the_validation_sets_own_error():
    """Two routers equally accurate on every seed's 400 validation images but right on different images: the seeds
    alone put the difference inside the margin; the validation images' bootstrap error does not."""
    import numpy as np
    from ermoe.study.examples import EXAMPLE_STATISTICS, sampling_variance
    from ermoe.study.report import preset_check

    rng = np.random.default_rng(0)
    n, seeds = 400, [0.0, 1.0, 2.0, 3.0, 4.0]

    def run(right: int, skew: int) -> dict[str, np.ndarray]:
        correct = np.zeros(n, bool)
        correct[rng.permutation(n)[:right]] = True
        loads = rng.integers(0, 8, (n, 4))
        loads[:, 0] += skew  # expert 0 busier
        return {"correct": correct, "load/b1": loads}

    examples = {"switch": {s: run(340, 2) for s in seeds},
                "emoe_standardize": {s: run(340 + d, 0) for s, d in zip(seeds, (-1, 0, 1, 0, -1))}}
    ones = np.ones((1, n))
    table = {m: {"seed": seeds,
                 "val_top1": [float(EXAMPLE_STATISTICS["val_top1"](runs[s], ones)[0]) for s in seeds],
                 "val_load_cv": [float(EXAMPLE_STATISTICS["val_load_cv"](runs[s], ones)[0]) for s in seeds]}
             for m, runs in examples.items()}
    alone, = preset_check(table)
    assert alone["passes"] and not any(r["test_error"] for r in alone["rows"])
    with_val, = preset_check(table, val_examples=examples)
    cv, acc = with_val["rows"]
    assert cv["test_error"] and acc["test_error"] and cv["outcome"] == "supported"
    var = sampling_variance(examples, "emoe_standardize", "switch", "val_top1", seeds, table["emoe_standardize"]
                            ["val_top1"], table["switch"]["val_top1"], 1.0)
    assert acc["stat"].test_se == pytest.approx(var ** 0.5) and acc["stat"].test_se > 0.005
    assert acc["outcome"] == "inconclusive" and not with_val["passes"]
    # the report's table says which error each comparison carries
    from ermoe.study.report import _se_text
    assert "val set" in _se_text(acc) and "seeds alone" in _se_text(alone["rows"][1])


def test_the_validation_pass_reads_no_test_image(tmp_path):
    """The run's validation load (what the preset check reads) is unchanged when the test images are garbage."""
    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Fashion-MNIST")
    import contextlib
    from ermoe.train import load_config
    from ermoe.train import trainer as trainer_mod

    cfg = load_config(None, {"out_dir": str(tmp_path), "progress": False, "tensorboard": False,
                             "data": {"train_limit": 256, "test_limit": 128, "val_size": 128},
                             "model": {"embed_dim": 32, "num_heads": 2, "depth": 2,
                                       "moe": {"num_experts": 4, "blocks": "all"}}})
    task, model, _ = trainer_mod.setup(cfg)
    first = task.evaluate(model, contextlib.nullcontext)
    test = task.data.test
    test.images.copy_(torch.randint(0, 256, test.images.shape, dtype=test.images.dtype))
    second = task.evaluate(model, contextlib.nullcontext)
    assert second["val_layers"] == first["val_layers"] and second["val_top1"] == first["val_top1"]
    assert second["layers"] != first["layers"]  # the test tokens' routing did change
    assert set(first["val_layers"]) == set(first["layers"]) and "load_cv" in first["val_layers"]["blocks.0.mlp"]


@pytest.mark.parametrize("name", ["study_effnet_stem", "study_brainage", "study_brainage_heterogeneous",
                                  "study_retrieval", "study_preset_confirm", "study_preset_confirm_stem"])
def test_every_committed_study_config_states_its_margins_and_every_claims_baseline(name):
    import yaml
    from ermoe.study.kinds import study_kind, study_plan

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    stated = yaml.safe_load(path.read_text())
    kind = study_kind((stated.get("train") or {}).get("task", "classification"))
    assert sorted(str(k) for k in stated["baselines"]) == sorted(number for number, _, _ in kind.claims)
    parity = {t.measure for _, _, tests in kind.claims for t in tests if t.parity}
    assert parity <= set(stated["margins"]) and all(m["reason"] for m in stated["margins"].values())
    assert study_plan(load_study_config(path)).margins.keys() == stated["margins"].keys()


def test_router_settings_fixed_in_the_study_config_reach_every_moe_layer_and_the_report():
    """study.router_kwargs (Switch's balancing coefficient chosen on validation loads): merged into the method's
    routers, the retrieval towers' both; printed with its reason among what was fixed before the runs; a method
    that needs it refuses to run without it; bad entries are named errors."""
    from ermoe.study.kinds import study_plan
    from ermoe.study.runner import run_config
    from ermoe.train import ConfigError

    chosen = {"switch_tuned": {"kwargs": {"balance_weight": 0.1}, "reason": "chosen on validation loads"}}
    brain = load_study_config("configs/study_brainage_heterogeneous.yaml",
                              overrides={"methods": ["switch_tuned", "switch"], "router_kwargs": chosen})
    assert run_config(brain, "switch_tuned", 0).model.args["moe"].router_kwargs == {"balance_weight": 0.1}
    assert run_config(brain, "switch", 0).model.args["moe"].router_kwargs == {"balance_weight": 0.01}
    lines = "\n".join(study_plan(brain).lines([]))
    assert "- `switch_tuned`'s router settings: balance_weight 0.1 (chosen on validation loads)" in lines
    retrieval = load_study_config("configs/study_retrieval.yaml", overrides={
        "methods": ["switch"], "router_kwargs": {"switch": {"kwargs": {"balance_weight": 0.3}, "reason": "r"}}})
    model = run_config(retrieval, "switch", 0).model.args
    assert model["image"]["moe"]["router_kwargs"] == model["text"]["moe"]["router_kwargs"] == {"balance_weight": 0.3}
    config = "configs/study_brainage_heterogeneous.yaml"
    for overrides, message in [
            ({"router_kwargs": {"plain": {"kwargs": {"x": 1}, "reason": "r"}}}, "plain has no MoE router"),
            ({"router_kwargs": {"switch": {"kwargs": {"x": 1}}}}, "expected {kwargs"),
            ({"router_kwargs": {"switch": {"kwargs": {"x": 1}, "reason": ""}}}, "must say how"),
            ({"router_kwargs": {"nope": {"kwargs": {}, "reason": "r"}}}, "not a method of this study's kind")]:
        with pytest.raises(ConfigError, match=message):
            load_study_config(config, overrides=overrides)
    with pytest.raises(ConfigError, match="take their router settings from the study config"):
        load_study_config("configs/study_brainage.yaml", overrides={"methods": ["switch_tuned"]})
    committed = load_study_config(config)  # the heterogeneous study fixed Switch's coefficient before its rerun
    assert committed.router_kwargs["switch_tuned"]["kwargs"] == {"balance_weight": 0.1}
    assert study_plan(committed).baselines["2"] == ("switch_tuned",)
    from ermoe.study.report import balancing_baseline  # the EP-wait table compares with claim 2's baseline
    assert balancing_baseline(study_plan(committed)) == "switch_tuned"
    assert balancing_baseline(study_plan(load_study_config("configs/study_brainage.yaml"))) == "switch"
    report = (Path(__file__).parents[1] / "docs" / "results_brainage_heterogeneous.md").read_text()
    assert "Each method against `switch_tuned` (a balancing loss" in report


def test_choose_balance_weight_reads_the_last_validation_probe(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("choose", Path(__file__).parents[1] / "benchmarks" /
                                                  "choose_balance_weight.py")
    choose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choose)
    records = [{"kind": "probe_load", "step": 5, "a": 0.9, "b": 0.7, "a/gini": 0.5},
               {"kind": "train", "step": 6, "loss": 1.0},
               {"kind": "probe_load", "step": 10, "a": 0.4, "b": 0.2, "a/max_over_mean": 1.5}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert choose.validation_load_cv(tmp_path) == pytest.approx(0.3)
    (tmp_path / "log.jsonl").write_text(json.dumps(records[1]) + "\n")
    with pytest.raises(ValueError, match="no probe_load record"):
        choose.validation_load_cv(tmp_path)


def test_margins_and_baselines_come_from_the_config():
    from ermoe.study.kinds import study_plan
    from ermoe.study.report import IMAGE_MARGINS, verdicts
    from ermoe.train import ConfigError

    table = _table(ermoe=0.2, emoe_parallel=0.3, softmax_noloss=0.5, switch=0.4, vmoe=0.4)
    table["ermoe"]["test_top1"] = [v - 0.005 for v in _seeds(0.80)]  # half a point below Switch on every seed
    plan = study_plan(load_study_config())
    three = {v["claim"]: v for v in verdicts(table, plan=plan)}["3"]
    assert three["per_method"]["ermoe"] == "supported" and "margin 0.01 (pre-registered)" in three["evidence"][0]
    strict = study_plan(load_study_config(overrides={"margins": {"test_top1": {"value": 0.002, "reason": "r"}}}))
    three = {v["claim"]: v for v in verdicts(table, plan=strict)}["3"]
    assert three["per_method"]["ermoe"] == "contradicted"  # the same numbers, a stricter margin fixed in advance
    # the baseline is the one named, never the better of two picked by their results
    vs_vmoe = study_plan(load_study_config(overrides={"baselines": {"3": "vmoe"}}))
    assert "vs `vmoe`" in {v["claim"]: v for v in verdicts(table, plan=vs_vmoe)}["3"]["evidence"][0]
    lines = "\n".join(plan.lines(verdicts.__globals__["CLAIMS"]))
    assert "claim 3: against `switch`" in lines and IMAGE_MARGINS["test_top1"]["reason"] in lines
    for overrides, message in [
            ({"margins": {"test_top1": {"value": 0.0, "reason": "r"}}}, "must be a positive number"),
            ({"margins": {"test_top1": {"value": 0.01}}}, "expected {value"),
            ({"margins": {"test_top1": {"value": 0.01, "reason": " "}}}, "must say why"),
            ({"baselines": {"3": "nonexistent"}}, "is not a method of this study"),
            ({"baselines": {"4": ["switch"]}}, "claim 4 has 2 comparison"),
            ({"baselines": {"9": "switch"}}, "no claim '9'")]:
        with pytest.raises(ConfigError, match=message):
            load_study_config(overrides=overrides)
    from ermoe.study.plan import make_plan
    with pytest.raises(ConfigError, match="need a margin fixed before the runs"):
        make_plan({}, {}, verdicts.__globals__["CLAIMS"], METHODS)


def test_a_collapsed_router_never_passes_the_stability_claim():
    table = _table(ermoe=2.3, emoe_parallel=0.35, softmax_noloss=0.5, switch=0.4, vmoe=0.4)
    table["ermoe"]["probe_changed_rel"] = _seeds(0.05)  # barely changes: it sends almost every token to one expert
    table["emoe_parallel"]["probe_changed_rel"] = _seeds(0.10)
    # a variant whose mean load CV is above the gate's but not significantly (paired test): compared
    table["ermoe_standardize"] = {**table["vmoe"], "load_cv": [0.45, 0.60, 0.50, 0.55, 0.52],
                                  "probe_changed_rel": _seeds(0.10)}
    five = {v["claim"]: v for v in verdicts(table)}["5"]
    assert five["per_method"] == {"ermoe": "inconclusive", "emoe_parallel": "supported"}
    assert any("not compared: load CV 2.3 significantly above" in e for e in five["evidence"])
    assert five["variants"] == ["ermoe_standardize"]



def test_ep_wait_section_tests_each_router_against_switch_by_hand():
    from scipy.stats import ttest_rel

    from ermoe.study.report import ep_wait_lines

    nan = float("nan")
    table = {"switch": {"train_ep_straggler": [1.9, 2.0, 1.8]},
             "ermoe": {"train_ep_straggler": [3.0, 3.2, 2.9]},        # clearly higher
             "vmoe": {"train_ep_straggler": [1.85, 2.1, 1.9]},        # the same within the seeds' spread
             "dense": {"train_ep_straggler": [nan, nan, nan]},        # no MoE layer: not compared
             "old": {"train_ep_straggler": [2.0, nan, 2.1]}}          # a run trained before it was measured
    lines = ep_wait_lines(table)
    rows = {line.split(" | ")[0].strip("| `"): line for line in lines if line.startswith("| `")}
    assert sorted(rows) == ["ermoe", "vmoe"]
    p = [ttest_rel(table[m]["train_ep_straggler"], table["switch"]["train_ep_straggler"]).pvalue
         for m in ("ermoe", "vmoe")]
    holm_ermoe, holm_vmoe = min(1.0, 2 * min(p)), max(min(1.0, 2 * min(p)), max(p))  # ermoe's p is the smaller
    assert p[0] < p[1]
    cells = rows["ermoe"].split(" | ")
    assert cells[2] == f"{(3.0 + 3.2 + 2.9) / (1.9 + 2.0 + 1.8):.2f}x" and cells[4] == f"{holm_ermoe:.3f}"
    assert cells[5].rstrip(" |") == ("higher" if holm_ermoe < 0.05 else "inconclusive") == "higher"
    assert rows["vmoe"].split(" | ")[4] == f"{holm_vmoe:.3f}" and rows["vmoe"].endswith("| inconclusive |")
    assert ep_wait_lines({"ermoe": table["ermoe"]}) == []  # no reference: no section
    assert ep_wait_lines({**table, "oracle": table["ermoe"]}) == lines  # a control joins no comparison, no family
    assert ep_wait_lines({"switch": table["switch"], "dense": table["dense"]}) == []

def test_few_shot_probe_separable_and_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    x = torch.nn.functional.one_hot(y, 4).double() * 5 + 0.1 * torch.randn(400, 4, generator=g, dtype=torch.float64)
    mean, std = few_shot_probe(x[:200], y[:200], x[200:], y[200:], shots=1, draws=3)
    assert mean == 1.0 and std == 0.0
    noise = torch.randn(400, 4, generator=g)
    mean, _ = few_shot_probe(noise[:200], y[:200], noise[200:], y[200:], shots=5, draws=3)
    assert mean < 0.45


def test_study_quick_end_to_end_and_resumable(tmp_path, capsys, monkeypatch):
    # on digits (8x8: patch 2) for one epoch: a quarter of the time of Fashion-MNIST's quick study here (the
    # transfer of the few-shot probes: test_fewshot_probes_transfer_to_a_dataset_the_backbone_never_saw)
    args = ["study", "--quick", f"--out_dir={tmp_path / 'runs'}", f"--report={tmp_path / 'results.md'}",
            "--train.data.name=digits", "--train.model.patch_size=2", "--fewshot_transfer=in_domain",
            "--train.optim.epochs=1"]
    assert main(args) == 0
    report = (tmp_path / "results.md").read_text()
    assert "do not edit by hand" in report and "ermoe study --quick" in report
    for method in DEFAULT_METHODS:
        assert f"| `{method}` |" in report
    assert report.count("Verdict:") == 6
    # the positive control opens the claims: the oracle against the dense ViT, its routing measures; no few-shot
    controls = report[report.index("## Positive controls"):report.index("## The papers' claims")]
    assert "Oracle routing (`oracle`" in controls and "against `dense`" in controls and "MI bits" in controls
    assert "A linear probe of the image's class" in controls and "blocks.1 " in controls
    assert "fewshot" not in json.loads((tmp_path / "runs" / "oracle" / "seed0" / "metrics.json").read_text())
    for fig in ("accuracy_vs_cv", "load_over_training", "heatmaps"):
        assert (tmp_path / "figures" / f"results_{fig}.png").stat().st_size > 1000
        assert f"figures/results_{fig}.png" in report
    capsys.readouterr()

    # An interrupted run (checkpoint, no metrics) resumes; finished ones are skipped. Its time counts its earlier
    # part's training too: with the study's clock stopped, that is all the report's wall time holds.
    run = tmp_path / "runs" / "switch" / "seed0"
    (run / "metrics.json").unlink()
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: 0.0, strftime=time.strftime))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 * len(DEFAULT_METHODS) - 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert "fewshot" in metrics and metrics["fewshot_transfer"] == "in_domain"
    earlier = metrics["segments"][0]["train_time_s"]
    assert len(metrics["segments"]) == 2 and earlier > 0 and metrics["run_wall_s"] == pytest.approx(earlier)


def test_fewshot_probes_transfer_to_a_dataset_the_backbone_never_saw(tmp_path):
    """study.fewshot_transfer: a digits backbone's pooled features of Fashion-MNIST (resized to its 8x8 input),
    probed with 1 and 5 labelled images per class from its training split, scored on its test split."""
    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Fashion-MNIST")
    from ermoe.study.runner import StudyConfig, add_fewshot
    from ermoe.train import load_config, train

    run = train(load_config(None, {"out_dir": str(tmp_path), "progress": False, "tensorboard": False,
                                   "probe_size": 16, "data": {"name": "digits", "train_limit": 256},
                                   "model": {"patch_size": 2, "depth": 1, "embed_dim": 16, "num_heads": 2,
                                             "moe": {"num_experts": 2, "blocks": "all"}},
                                   "optim": {"epochs": 1, "batch_size": 64}}), quiet=True)
    metrics = add_fewshot(run, StudyConfig(fewshot_shots=[1, 5], fewshot_draws=2, fewshot_train_pool=200,
                                           fewshot_transfer="fashion_mnist"))
    assert metrics["fewshot_transfer"] == "fashion_mnist" and set(metrics["fewshot"]) == {"1", "5"}
    assert json.loads((run / "metrics.json").read_text())["fewshot"] == metrics["fewshot"]
    # 10 classes: chance is 0.1; a 5-shot probe of any features that carry the images does better
    assert metrics["fewshot"]["5"]["mean"] > 0.2


def test_list_methods_follows_config_and_overrides(tmp_path, capsys):
    assert main(["study", "--list-methods"]) == 0
    assert capsys.readouterr().out.split() == DEFAULT_METHODS
    config = tmp_path / "study.yaml"
    config.write_text("methods: [ermoe, switch]\n")
    assert main(["study", "--config", str(config), "--list-methods"]) == 0
    assert capsys.readouterr().out.split() == ["ermoe", "switch"]
    assert main(["study", "--config", str(config), "--methods=[vmoe]", "--list-methods"]) == 0
    assert capsys.readouterr().out.split() == ["vmoe"]


def test_parallel_study_script(tmp_path):
    """benchmarks/study_parallel.sh: the study's methods split over workers, then one report with all of them."""
    script = Path(__file__).parents[1] / "benchmarks" / "study_parallel.sh"
    env = {**os.environ, "ERMOE": f"{sys.executable} -m ermoe.cli", "TMPDIR": str(tmp_path)}
    args = ["--quick", "--methods=[dense,switch,ermoe]", "--seeds=[0]", "--train.data.name=digits",
            "--train.model.patch_size=2", "--fewshot_transfer=in_domain", f"--out_dir={tmp_path / 'runs'}", f"--report={tmp_path / 'results.md'}"]
    done = subprocess.run(["bash", str(script), "2", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("done before, skipped") == 3  # the final pass reuses every worker's runs
    report = (tmp_path / "results.md").read_text()
    assert all(f"| `{m}` |" in report for m in ("dense", "switch", "ermoe"))
    assert "dense" in (tmp_path / "study_worker_0.log").read_text()
    assert "switch" in (tmp_path / "study_worker_1.log").read_text()


def test_study_config_errors(tmp_path):
    assert main(["study", "--methods=[ermoe,nope]"]) == 1
    assert main(["study", "--train.optim.lr=-1"]) == 1
    assert main(["study", "--seeds=[]"]) == 1
    for bad in ("train: [unclosed", "- a list"):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(ConfigError, match="bad.yaml"):
            load_study_config(tmp_path / "bad.yaml")


def test_a_study_config_reads_numbers_as_a_train_config_does(tmp_path):
    """``lr: 3e-4`` is a float in a train config (YAML 1.2) and was a string in a study config (PyYAML's YAML 1.1
    reader): one reader for both now."""
    (tmp_path / "study.yaml").write_text("train:\n  optim:\n    lr: 3e-4\n    weight_decay: 5e-2\n")
    cfg = load_study_config(tmp_path / "study.yaml")
    assert cfg.train["optim"]["lr"] == 3e-4 and cfg.train["optim"]["weight_decay"] == 0.05
    assert run_config(cfg, "ermoe", 0).optim.lr == 3e-4


def test_a_confirmation_study_marks_its_preregistered_methods_as_such(tmp_path):
    """A study whose config chose its methods before its runs (study.preregistered) does not label them exploratory,
    and says why; a name it does not run, or a task study (which labels nothing), is an error."""
    base = ["study", "--quick", "--seeds=[0]", "--train.data.name=digits", "--train.model.patch_size=2",
            "--fewshot_transfer=in_domain", f"--out_dir={tmp_path / 'runs'}",
            "--methods=[switch,ermoe_standardize_prob]"]
    assert main(base + [f"--report={tmp_path / 'plain.md'}"]) == 0
    plain = (tmp_path / "plain.md").read_text()
    assert "| `ermoe_standardize_prob` | variant (exploratory) |" in plain and "config pre-registered" not in plain
    assert main(base + ["--preregistered=[ermoe_standardize_prob]", f"--report={tmp_path / 'confirm.md'}"]) == 0
    confirm = (tmp_path / "confirm.md").read_text()  # the same runs, reused: only the label differs
    assert "| `ermoe_standardize_prob` | variant |" in confirm
    assert "the study config pre-registered `ermoe_standardize_prob`" in confirm
    assert main(base + ["--preregistered=[emoe_standardize]"]) == 1
    config = str(Path(__file__).parents[1] / "configs" / "study_retrieval.yaml")
    assert main(["study", "--config", config, "--preregistered=[ermoe]"]) == 1


def test_a_stale_run_is_never_reused(tmp_path, capsys):
    args = ["study", "--quick", "--methods=[switch]", "--seeds=[0]", "--train.data.name=digits",
            "--train.model.patch_size=2", "--fewshot_transfer=in_domain", f"--out_dir={tmp_path / 'runs'}",
            f"--report={tmp_path / 'results.md'}"]
    assert main(args) == 0
    run = tmp_path / "runs" / "switch" / "seed0"
    first = json.loads((run / "metrics.json").read_text())
    # a study's runs draw no figures of their own (its report draws its own); `ermoe report` draws them on demand
    assert not (run / "figures").exists() and run_config(load_study_config(quick=True), "switch", 0).figures is False
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert (run / "figures" / "load.png").stat().st_size > 1000 and "load.png" in capsys.readouterr().out
    # the study's directory copied elsewhere (records restored on another machine) is the same study, read from there
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "runs", elsewhere)
    capsys.readouterr()
    assert main([a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={elsewhere}"]) == 0
    assert "switch seed 0: " in (out := capsys.readouterr().out) and "done before, skipped" in out
    (elsewhere / "switch" / "seed0" / "test_examples.npz").write_bytes(b"")  # the copy's records, emptied
    overrides = {"methods": ["switch"], "seeds": [0], "out_dir": str(elsewhere), "fewshot_transfer": "in_domain",
                 "train": {"data": {"name": "digits"}, "model": {"patch_size": 2}}}
    results = run_study(load_study_config(quick=True, overrides=overrides), log=lambda line: None)
    assert results["switch"][0]["run"] == str(elsewhere / "switch" / "seed0")
    with pytest.raises(CheckpointError, match="elsewhere"):  # the copy's (emptied) records, not the original run's
        collect_examples(results)
    # the same study with another budget: the finished run is not this study's run
    assert main(args + ["--train.optim.epochs=1"]) == 1
    assert "optim.epochs 2 -> 1" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text()) == first  # refused: nothing touched
    assert main(args + ["--train.optim.epochs=1", "--stale=rerun"]) == 0
    (aside,) = [p for p in run.parent.iterdir() if p.name.startswith("seed0.stale-")]
    assert json.loads((aside / "metrics.json").read_text()) == first  # kept, not lost
    assert json.loads((run / "metrics.json").read_text())["step"] == first["step"] // 2


def test_committed_records_drawn_with_their_figures_are_still_the_studys_runs():
    """Runs made before studies left per-run figures out (``figures`` absent from their config: true) are reused;
    any other difference still makes a run stale."""
    import dataclasses

    from ermoe.study.runner import stale_reason

    root = Path(__file__).resolve().parents[1]
    study = load_study_config(root / "configs" / "study_retrieval.yaml")
    record = root / "docs" / "records" / "retrieval" / "switch" / "seed0"
    assert "figures" not in (record / "config.yaml").read_text()
    cfg = run_config(study, "switch", 0)
    assert cfg.figures is False and stale_reason(record, cfg) is None
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr / 2))
    assert "its config differs: optim.lr" in stale_reason(record, other)


def test_claim7_compares_with_093_times_the_plain_cnn_by_hand():
    """Claim 7 ("MAE more than 7% lower"): the method's MAE against 0.93 x the plain CNN's, paired by seed + Holm."""
    from ermoe.study.brain import BRAIN_CLAIMS, BRAIN_METHODS, BRAIN_PAPER_METHODS
    from ermoe.study.kinds import study_plan
    from ermoe.study.stats import paired

    plain = [4.0, 4.02, 3.98]  # 0.93 x: mean 3.72
    table = {"plain": {"test_mae": plain}, "ermoe": {"test_mae": [3.50, 3.55, 3.46]},
             "emoe": {"test_mae": [3.90, 3.92, 3.88]}, "ermoe_standardize": {"test_mae": [3.80, 3.70, 3.72]}}
    plan = study_plan(load_study_config("configs/study_brainage.yaml"))
    (claim,) = [v for v in verdicts(table, BRAIN_CLAIMS, BRAIN_PAPER_METHODS, BRAIN_METHODS, plan)
                if v["claim"] == "7"]
    # ERMoE 12.5% below: significantly under 0.93 x; EMoE 2.5% below: significantly above 0.93 x (gain < 7%)
    assert claim["per_method"] == {"ermoe": "supported", "emoe": "contradicted"}
    assert "vs 0.93 x `plain` 3.72: paired difference -0.217 over 3 seeds" in claim["evidence"][0]
    w = paired(table["ermoe"]["test_mae"], [0.93 * v for v in plain])  # on the scaled values, by seed
    assert f"95% CI [{w.low:.3g}, {w.high:.3g}]" in claim["evidence"][0]
    assert claim["variants"] == []  # 3.74 vs 3.72: within noise, inconclusive


def test_brain_methods_differ_in_routing_only():
    from ermoe.study.brain import BRAIN_METHODS, BRAIN_TRAIN, brain_method_model

    base = BRAIN_TRAIN["model"]
    plain, dense = brain_method_model("plain", base), brain_method_model("dense_ffn", base)
    assert plain["moe"] is None and "dense_ffn" not in plain and dense["dense_ffn"] is True and dense["moe"] is None
    ermoe = brain_method_model("ermoe_standardize", base)
    assert ermoe["moe"] == {"num_experts": 4, "top_k": 1, "router": "ermoe", "router_kwargs": {"standardize": True}}
    assert brain_method_model("switch", base)["channels"] == base["channels"]
    for name in BRAIN_METHODS:  # every row builds; the MoE rows and the dense FFN have the same active size
        section = brain_method_model(name, base)
        model = create_model(section.pop("name"), volume_shape=(46, 55, 46), **section)
        if name not in ("plain", "ermoe", "emoe", "ermoe_standardize", "emoe_standardize", "regional", "regional_bn"):
            assert model.active_parameters() >= create_model("sfcn3d", volume_shape=(46, 55, 46),
                                                             channels=base["channels"]).active_parameters()
    assert brain_method_model("regional", base)["channels"] == base["channels"]
    assert brain_method_model("regional_bn", base)["gate_norm"] == "batch" and "gate_norm" not in \
        brain_method_model("regional", base)  # the committed regional runs' config stays as it was
    with pytest.raises(ValueError, match="unknown brain-age study method"):
        brain_method_model("dense", base)


def test_the_brain_routing_section_carries_the_test_volumes_error():
    """'Is it the routing?' compares with dense_ffn through the same paired test as the claims: with every run's
    per-volume errors the se grows by the bootstrap's share; without them it says it rests on the seeds alone."""
    import numpy as np

    from ermoe.study.brain import _routing_lines

    rng = np.random.default_rng(0)
    examples = {m: {float(s): {"abs_error": rng.gamma(2.0, 1.5 + 0.1 * (m == "ermoe"), 100)} for s in range(3)}
                for m in ("ermoe", "dense_ffn")}
    table = {m: {"test_mae": [float(examples[m][float(s)]["abs_error"].mean()) for s in range(3)]}
             for m in ("ermoe", "dense_ffn")}
    with_error, = [line for line in _routing_lines(table, examples) if line.startswith("- `ermoe`")]
    seeds_only, = [line for line in _routing_lines(table, {}) if line.startswith("- `ermoe`")]
    assert "from the seeds alone" in seeds_only and "from the seeds alone" not in with_error
    se = {k: float(line.split(", se ")[1].split()[0]) for k, line in (("with", with_error), ("seeds", seeds_only))}
    assert se["with"] > se["seeds"]


def test_the_retrieval_report_states_each_rows_active_size_against_dense():
    from ermoe.study.retrieval import _active_lines, _data_line

    table = {"dense": {"params_active": [1000.0, 1000.0]}, "ermoe": {"params_active": [930.0, 930.0]},
             "switch": {"params_active": [1000.0, 1000.0]}}
    text = "\n".join(_active_lines(table, {}))
    assert "`ermoe` 930 (-7.0%)" in text and "`switch` 1,000 (+0.0%)" in text
    assert _active_lines({"ermoe": table["ermoe"]}, {}) == []
    line = _data_line({"dataset": "fashion_captions", "test_images": 1000, "test_captions": 5000,
                       "chance_i2t_r@1": 0.001, "chance_t2i_r@1": 0.001, "test_caption_text_shared": 0.0,
                       "test_caption_order_decides": 0.656, "test_caption_bag_unique": 0.344})
    assert "0.0% are another test image's word for word, 65.6% have another image's words" in line
