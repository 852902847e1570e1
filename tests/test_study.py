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


def _table(**cv):
    base = {"test_top1": [0.8, 0.81, 0.79], "mi_bits": [0.1, 0.11, 0.09], "homogeneity": [0.2, 0.21, 0.19],
            "probe_changed": [0.1, 0.11, 0.09], "fewshot_5": [0.5, 0.51, 0.49]}
    table = {name: {**base, "load_cv": [v, v * 1.05, v * 0.95]} for name, v in cv.items()}
    return table


def test_verdicts_follow_the_numbers():
    table = _table(ermoe=0.2, emoe_parallel=0.3, softmax_noloss=0.5, switch=0.4, vmoe=0.4)
    table["ermoe"]["mi_bits"] = [0.3, 0.31, 0.29]
    table["ermoe"]["homogeneity"] = [0.1] * 3
    by_claim = {v["claim"]: v for v in verdicts(table)}
    assert by_claim["1"]["verdict"] == "supported"  # both below the softmax gate's CV
    assert by_claim["2"]["verdict"] == "supported"  # 0.3 <= 1.25 * 0.4
    assert by_claim["3"]["verdict"] == "supported"  # equal accuracy is within 0.5 points
    assert by_claim["4"]["verdict"] == "mixed"  # ERMoE passes, EMoE does not
    assert by_claim["5"]["verdict"] == "not supported"  # equal is not fewer
    assert "Welch p" in by_claim["4"]["evidence"][0]
    table = _table(ermoe=0.9, emoe_parallel=1.2, softmax_noloss=0.5, switch=0.4, vmoe=0.4, ermoe_standardize=0.3)
    one = verdicts(table)[0]
    assert one["verdict"] == "not supported" and one["variants"] == ["ermoe_standardize"]


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
        args += ["--train.data.name=digits", "--train.model.patch_size=2"]
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
            "--train.model.patch_size=2", f"--out_dir={tmp_path / 'runs'}", f"--report={tmp_path / 'results.md'}"]
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
