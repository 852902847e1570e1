"""The study: method definitions, verdicts from the numbers, few-shot probes, and `ermoe study --quick` end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ermoe.analysis.fewshot import few_shot_probe
from ermoe.cli import main
from ermoe.data.images import DEBIAN_FASHION_MNIST
from ermoe.experts import matched_eigen_hidden_dim
from ermoe.models import create_model
from ermoe.study import DEFAULT_METHODS, METHODS, method_model, verdicts
from ermoe.study.runner import load_study_config, run_config

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


def test_welch_matches_scipy_and_holm_by_hand():
    from scipy.stats import ttest_ind
    from ermoe.study.stats import holm, welch

    a, b = [0.81, 0.83, 0.80, 0.82], [0.78, 0.79, 0.775]
    w = welch(a, b)
    ref = ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert w.p == pytest.approx(ref.pvalue) and (w.low, w.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert w.diff == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert welch([1.0, 1.0], [1.0, 1.0]).p == 1.0 and welch([1.0], [2.0, 3.0]) is None
    # Holm: sorted 0.01, 0.02, 0.04 -> 3*0.01, max(2*0.02, .03), max(1*0.04, .04); None stays out of the family
    assert holm([0.04, 0.01, None, 0.02]) == [pytest.approx(0.04), pytest.approx(0.03), None, pytest.approx(0.04)]
    assert holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1, monotone


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


def test_each_report_names_its_condition_and_the_other_command():
    from ermoe.study.report import STEM_STUDY, condition_line

    assert condition_line({"model": {"name": "vit_tiny"}}).startswith("from scratch") and STEM_STUDY in \
        condition_line({"model": {}})
    assert condition_line({"model": {"stem": "efficientnet_lite0"}}).startswith("frozen pretrained tokens")
    from pathlib import Path
    assert Path(__file__).parents[1].joinpath(STEM_STUDY.split("--config ")[1]).is_file()


def test_the_preset_check_uses_validation_only():
    from ermoe.study.report import preset_check

    table = _table(switch=0.4, ermoe_standardize=0.2, emoe_standardize=0.2, ermoe_pca=0.9)
    for name in table:
        table[name]["val_top1"] = _seeds(0.85)
    table["ermoe_standardize"]["val_top1"] = _seeds(0.75)  # balanced but 10 points less accurate on validation
    table["emoe_standardize"]["test_top1"] = _seeds(0.10)  # a test split the check must not read
    checks = {c["method"]: c for c in preset_check(table)}
    assert checks["emoe_standardize"]["passes"] and checks["emoe_standardize"]["outcomes"] == ["supported"] * 2
    assert checks["ermoe_standardize"]["outcomes"] == ["supported", "contradicted"]
    assert checks["ermoe_pca"]["outcomes"][0] == "contradicted" and not checks["ermoe_pca"]["passes"]
    assert "switch" not in checks


def test_a_collapsed_router_never_passes_the_stability_claim():
    table = _table(ermoe=2.3, emoe_parallel=0.35, softmax_noloss=0.5, switch=0.4, vmoe=0.4)
    table["ermoe"]["probe_changed_rel"] = _seeds(0.05)  # barely changes: it sends almost every token to one expert
    table["emoe_parallel"]["probe_changed_rel"] = _seeds(0.10)
    five = {v["claim"]: v for v in verdicts(table)}["5"]
    assert five["per_method"] == {"ermoe": "inconclusive", "emoe_parallel": "supported"}
    assert any("not compared: load CV 2.3" in e for e in five["evidence"])



def test_ep_wait_section_tests_each_router_against_switch_by_hand():
    from scipy.stats import ttest_ind

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
    p = [ttest_ind(table[m]["train_ep_straggler"], table["switch"]["train_ep_straggler"], equal_var=False).pvalue
         for m in ("ermoe", "vmoe")]
    holm_ermoe, holm_vmoe = min(1.0, 2 * min(p)), max(min(1.0, 2 * min(p)), max(p))  # ermoe's p is the smaller
    assert p[0] < p[1]
    cells = rows["ermoe"].split(" | ")
    assert cells[2] == f"{(3.0 + 3.2 + 2.9) / (1.9 + 2.0 + 1.8):.2f}x" and cells[4] == f"{holm_ermoe:.3f}"
    assert cells[5].rstrip(" |") == ("higher" if holm_ermoe < 0.05 else "inconclusive") == "higher"
    assert rows["vmoe"].split(" | ")[4] == f"{holm_vmoe:.3f}" and rows["vmoe"].endswith("| inconclusive |")
    assert ep_wait_lines({"ermoe": table["ermoe"]}) == []  # no reference: no section
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


def test_study_quick_end_to_end_and_resumable(tmp_path, capsys):
    args = ["study", "--quick", f"--out_dir={tmp_path / 'runs'}", f"--report={tmp_path / 'results.md'}"]
    if not DEBIAN_FASHION_MNIST.exists():  # CI installs it; elsewhere fall back to digits (8x8: patch 2)
        args += ["--train.data.name=digits", "--train.model.patch_size=2", "--fewshot_transfer=in_domain"]
    assert main(args) == 0
    report = (tmp_path / "results.md").read_text()
    assert "do not edit by hand" in report and "ermoe study --quick" in report
    for method in DEFAULT_METHODS:
        assert f"| `{method}` |" in report
    assert report.count("Verdict:") == 6
    for fig in ("accuracy_vs_cv", "load_over_training", "heatmaps"):
        assert (tmp_path / "figures" / f"results_{fig}.png").stat().st_size > 1000
        assert f"figures/results_{fig}.png" in report
    capsys.readouterr()

    # An interrupted run (checkpoint, no metrics) resumes; finished ones are skipped.
    run = tmp_path / "runs" / "switch" / "seed0"
    (run / "metrics.json").unlink()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 * len(DEFAULT_METHODS) - 1
    assert "fewshot" in json.loads((run / "metrics.json").read_text())


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


def test_a_stale_run_is_never_reused(tmp_path, capsys):
    args = ["study", "--quick", "--methods=[switch]", "--seeds=[0]", "--train.data.name=digits",
            "--train.model.patch_size=2", "--fewshot_transfer=in_domain", f"--out_dir={tmp_path / 'runs'}",
            f"--report={tmp_path / 'results.md'}"]
    assert main(args) == 0
    run = tmp_path / "runs" / "switch" / "seed0"
    first = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    # the same study with another budget: the finished run is not this study's run
    assert main(args + ["--train.optim.epochs=1"]) == 1
    assert "optim.epochs 2 -> 1" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text()) == first  # refused: nothing touched
    assert main(args + ["--train.optim.epochs=1", "--stale=rerun"]) == 0
    (aside,) = [p for p in run.parent.iterdir() if p.name.startswith("seed0.stale-")]
    assert json.loads((aside / "metrics.json").read_text()) == first  # kept, not lost
    assert json.loads((run / "metrics.json").read_text())["step"] == first["step"] // 2


def test_claim7_compares_with_093_times_the_plain_cnn_by_hand():
    """Claim 7 ("MAE more than 7% lower"): the method's MAE against 0.93 x the plain CNN's, Welch + Holm."""
    from ermoe.study.brain import BRAIN_CLAIMS, BRAIN_METHODS, BRAIN_PAPER_METHODS
    from ermoe.study.stats import welch

    plain = [4.0, 4.02, 3.98]  # 0.93 x: mean 3.72
    table = {"plain": {"test_mae": plain}, "ermoe": {"test_mae": [3.50, 3.52, 3.48]},
             "emoe": {"test_mae": [3.90, 3.92, 3.88]}, "ermoe_standardize": {"test_mae": [3.80, 3.70, 3.72]}}
    (claim,) = [v for v in verdicts(table, BRAIN_CLAIMS, BRAIN_PAPER_METHODS, BRAIN_METHODS) if v["claim"] == "7"]
    # ERMoE 12.5% below: significantly under 0.93 x; EMoE 2.5% below: significantly above 0.93 x (gain < 7%)
    assert claim["per_method"] == {"ermoe": "supported", "emoe": "contradicted"}
    assert "vs 0.93 x `plain` 3.72: difference -0.22" in claim["evidence"][0]
    w = welch(table["ermoe"]["test_mae"], [0.93 * v for v in plain])  # the test is on the scaled values
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
        if name not in ("plain", "ermoe", "emoe", "ermoe_standardize", "emoe_standardize", "regional"):
            assert model.active_parameters() >= create_model("sfcn3d", volume_shape=(46, 55, 46),
                                                             channels=base["channels"]).active_parameters()
    assert brain_method_model("regional", base)["channels"] == base["channels"]
    with pytest.raises(ValueError, match="unknown brain-age study method"):
        brain_method_model("dense", base)
