"""The layer benchmark runs end to end at a tiny size and reports the keys the docs and issue rely on."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_layer.py"


def load_bench(name: str = "moe_layer"):
    """A benchmark script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH.parent / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # (a dataclass of the script looks its module up there)
    spec.loader.exec_module(bench)
    return bench


def run_moe_layer_bench(*argv: str) -> list[dict]:
    """benchmarks/moe_layer.py's main with ``argv``; torch's thread count restored after it."""
    threads = torch.get_num_threads()
    try:
        return load_bench().main(list(argv))
    finally:
        torch.set_num_threads(threads)


def test_moe_layer_benchmark_json(capsys):
    rows = run_moe_layer_bench("--tokens", "64", "--dim", "16", "--hidden", "32", "--experts", "4", "--repeats", "1",
                               "--warmup", "0", "--threads", "1", "--json")
    printed = json.loads(capsys.readouterr().out)
    assert printed == rows
    assert [r["router"] for r in rows] == ["emoe", "ermoe", "softmax_topk", "loss_free_bias", "vmoe", "cosine",
                                           "expert_choice"]
    for r in rows:
        assert {"router", "num_experts", "fwd_bwd_ratio", "fwd_ratio"} <= set(r)
        assert r["num_experts"] == 4 and r["fwd_bwd_ratio"] > 0 and r["fwd_ratio"] > 0


def test_moe_layer_benchmark_memory_only(capsys):
    """--memory --no-time: the peak of fwd+bwd per router (MemTracker), its working part and the ratio to dense."""
    rows = run_moe_layer_bench("--tokens", "4096", "--dim", "64", "--hidden", "128", "--experts", "4", "--routers",
                               "ermoe", "softmax_topk", "--threads", "1", "--memory", "--no-time")
    assert [r["router"] for r in rows] == ["ermoe", "softmax_topk"]
    for r in rows:
        assert r["peak_mib"] > r["work_mib"] > 0 and r["dense_peak_mib"] >= r["dense_work_mib"] > 0
        assert r["mem_ratio"] == pytest.approx(r["work_mib"] / r["dense_work_mib"], rel=0.01)
        assert r["fwd_bwd_ratio"] != r["fwd_bwd_ratio"]  # not timed: NaN
    # softmax_topk's experts hold 4x the dense module's parameters: the whole peak exceeds the dense one's
    assert rows[1]["peak_mib"] > rows[1]["dense_peak_mib"]


def test_brain_models_benchmark_both_families(capsys):
    """benchmarks/brain_models.py at a tiny size: every model of each family, ratios against the dense model."""
    import pytest

    pytest.importorskip("nilearn")
    bench = load_bench("brain_models")
    cnn = bench.main(["--spacing", "8", "--batch", "2", "--channels", "4", "8", "8", "--repeats", "1",
                      "--routers", "ermoe", "--json"])
    assert [r["model"] for r in cnn] == ["dense_ffn", "plain", "ermoe", "regional"]
    assert cnn[0]["ratio"] == 1.0 and all(r["ratio"] > 0 and r["active_params"] > 0 for r in cnn)
    assert cnn[3]["active_params"] > cnn[1]["active_params"]  # the gate CNN and two trunks
    vit = bench.main(["--family", "vit3d", "--spacing", "8", "--batch", "1", "--repeats", "1", "--routers", "ermoe",
                      "--json"])
    assert [r["model"] for r in vit] == ["dense_ffn", "ermoe"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == vit


def test_retrieval_towers_benchmark(capsys):
    bench = load_bench("retrieval_towers")
    rows = bench.main(["--batch", "8", "--repeats", "1", "--routers", "ermoe", "expert_choice", "--json"])
    assert [(r["tower"], r["router"]) for r in rows] == [(t, r) for t in ("image", "text")
                                                          for r in ("dense", "ermoe", "expert_choice")]
    assert all(r["ratio"] > 0 and r["per_s"] > 0 for r in rows)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rows


def test_distributed_scaling_benchmark():
    """benchmarks/distributed_scaling.py at a tiny size on 1 and 2 gloo processes (as a script: spawned ranks import
    their function from the script run as __main__)."""
    import subprocess
    done = subprocess.run([sys.executable, str(BENCH.parent / "distributed_scaling.py"), "--worlds", "1", "2",
                           "--dim", "16", "--hidden", "32", "--experts", "4", "--tokens", "64", "32", "--steps", "2",
                           "--warmup", "0", "--repeats", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)["rows"]
    assert [(r["world"], r["tokens"]) for r in rows] == [(1, 64), (1, 32), (2, 64), (2, 32)]
    for r in rows:
        assert len(r["loads"]) == 2  # the global loads of each measured step: every rank's tokens, top-1
        assert all(sum(step) == r["world"] * r["tokens"] for step in r["loads"])
        busiest = [max(c[0] + c[1], c[2] + c[3]) / (r["world"] * r["tokens"] / 2) for c in r["loads"]]
        assert r["straggler"] == pytest.approx(1.0 if r["world"] == 1 else sum(busiest) / 2)
        assert r["straggler_at_E"] == pytest.approx(sum(max(c) / (r["world"] * r["tokens"] / 4)
                                                        for c in r["loads"]) / 2)
        assert (r["exchange_share"] == 0.0) == (r["world"] == 1)  # one process exchanges nothing
        # counts, rows out, outputs back; backward: the gradients of both exchanges (each timed once)
        assert r["exchanges_per_step"] == (0 if r["world"] == 1 else 5)
        assert r["tokens_per_s"] > 0 and r["moe_over_dense"] > 0


def test_data_loader_benchmark_at_a_tiny_size(tmp_path):
    """benchmarks/data_loader.py end to end at a tiny size: every loader at each worker count beside its model's
    step rate, and the scaling ratios recomputed from its own rows."""
    pytest.importorskip("nilearn")
    pytest.importorskip("PIL")
    spec = importlib.util.spec_from_file_location("data_bench", BENCH.parent / "data_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--images", "48", "--batch", "8", "--batches", "2", "--steps", "2", "--model-batch", "2",
                             "--volumes", "8", "--brain-batch", "2", "--img-size", "32", "--spacing", "8",
                             "--brain-channels", "4", "8", "8", "--workers", "0", "1", "--json", str(out),
                             "--parts", "rates", "scaling", "tree", "--tree-files", "3000", "--tree-val-files", "1000"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    loaders = [(r["loader"], r.get("workers")) for r in result["rates"]]
    for name in ("imagefolder 32 px, DeiT augmentation", "karpathy pairs, 32 px JPEGs",
                 "brain volumes 8 mm from the cache, shift + flip"):
        assert (name, 0) in loaders and (name, 1) in loaders, name
    assert ("brain cache build, 8 mm", 1) in loaders
    assert sum(r["loader"].startswith("model: ") for r in result["rates"]) == 3
    small, large, ratios = result["scaling"]
    assert (small["train_images"], large["train_images"]) == (48, 768)
    assert ratios["memory_ratio"] == pytest.approx(large["peak_pss_mb"] / small["peak_pss_mb"])
    assert ratios["time_ratio"] == pytest.approx(large["wall_s"] / small["wall_s"])
    assert small["peak_pss_mb"] > 100  # the process tree's memory was read (a trainer holds torch: > 100 MB)
    tree = result["tree"]
    assert (tree["train_files"], tree["val_files"], tree["classes"], tree["first_batch"]) == (3000, 1000, 1000, 8)


def test_train_throughput_benchmark_at_a_tiny_size(tmp_path, capsys):
    """benchmarks/train_throughput.py end to end: the MoE model and its dense reference trained in turns through the
    loop's own steps (here the main job's ViT on digits, smaller)."""
    pytest.importorskip("sklearn")
    bench = load_bench("train_throughput")
    rows = bench.main(["--tasks", "classification", "--steps", "1", "--repeats", "2", "--json",
                       str(tmp_path / "out.json"), "--override", "data.name=digits", "model.patch_size=2",
                       "model.embed_dim=32", "model.num_heads=2", "optim.batch_size=32"])
    (row,) = rows
    assert row["task"] == "classification" and row["batch"] == 32 and len(row["ratios"]) == 2
    assert row["throughput_ratio"] == pytest.approx(1 / row["step_time_ratio"])
    assert row["active_params_moe"] != row["active_params_dense"]  # the dense reference is another model
    # the host-read counter: on the CPU at least the loss and gradient-norm checks of a non-fused optimizer
    assert row["host_reads_per_step_dense"] >= 2 and row["host_reads_per_step_moe"] >= 2
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == rows
    assert "| classification | 32 |" in capsys.readouterr().out


def test_gpu_check_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --dry-run: every stage of the GPU check (tests, a bf16 run with loader workers, torchrun
    with a process group at world 1, the layer table and the throughput, eager and compiled) on this CPU at toy
    sizes, so that the script is ready when a GPU is at hand."""
    import subprocess

    script = BENCH.parent / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    stages = [line.split(":")[0].removeprefix("STAGE ") for line in summary.splitlines() if line.startswith("STAGE")]
    assert stages == ["environment", "tests", "imagefolder_data", "train_bf16_workers", "torchrun_world1",
                      "layer_table_eager", "layer_table_compiled", "train_throughput_eager",
                      "train_throughput_compiled"]
    assert "failed: none" in summary and "ema True" in summary
    rows = json.loads((tmp_path / "layer_table_compiled.json").read_text())
    assert {r["router"] for r in rows} == {"ermoe", "softmax_topk"} and {r["amp"] for r in rows} == {"bf16"}
    assert json.loads((tmp_path / "train_throughput_eager.json").read_text())["rows"][0]["task"] == "classification"


def test_layer_costs_benchmark_at_a_tiny_size(monkeypatch, capsys):
    """benchmarks/layer_costs.py (the figures behind the layer table's explanations) end to end, tiny: the A/B of
    the folded bias does take both paths, and every part prints its line."""
    bench = load_bench("layer_costs")
    monkeypatch.setattr(bench, "TOKENS", 64)
    monkeypatch.setattr(bench, "DIM", 32)
    monkeypatch.setattr(bench, "HIDDEN", 64)
    from ermoe import experts as experts_mod

    folds = []
    rule = experts_mod.fold_first_bias
    monkeypatch.setattr(experts_mod, "fold_first_bias", lambda *shape: folds.append(rule(*shape)) or folds[-1])
    threads = torch.get_num_threads()
    try:
        bench.main(["--experts", "4", "--pairs", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert True in folds  # the folded path ran (the table path is the benchmark's own stand-in)
    for line in ("fold ermoe E=4: folded / table", "score E=4 R=8 projection", "score E=4 R=8 scaled_norms",
                 "memory ermoe E=4 at the peak (MiB): param", "## profile ermoe E=4"):
        assert line in out, out


def test_study_families_regrades_a_report_from_its_evidence_lines(capsys):
    """benchmarks/study_families.py: from a report written under the two-family rule it recomputes the report's own
    Holm p-values (the brain report regenerated from its records: claim 7's three paper methods, claim 2's against
    switch_tuned) and verdicts; from the
    from-scratch report as it was written under one family (kept in tests/fixtures: its runs were retrained since),
    EMoE's claim 4 moves (docs/study.md, "Families split")."""
    bench = load_bench("study_families")
    docs = BENCH.parent.parent / "docs"
    claims = {claim: (printed, rows) for claim, printed, rows in bench.parse(docs / "results_brainage_heterogeneous.md")}
    for claim, holm in (("7", [0.958, 0.888, 0.197]), ("2", [1.0, 1.0])):
        printed, rows = claims[claim]
        verdict, adjusted = bench.regrade(rows)
        assert adjusted == pytest.approx(holm, abs=0.002)  # from 3 significant figures
        # regional routes volumes, not cells: no rows in claim 2, so "not measured" and nothing to regrade
        assert ", ".join(f"`{m}` {v}" for m, v in verdict.items()) == printed.removesuffix(", `regional` not measured")
    assert bench.main([str(Path(__file__).parent / "fixtures" / "results_one_family.md")]) == 0
    out = capsys.readouterr().out
    assert ("claim 4: `ermoe` contradicted, `emoe_parallel` contradicted (MOVED from: `ermoe` contradicted, "
            "`emoe_parallel` inconclusive)") in out
    assert "claim 3: `ermoe` inconclusive, `emoe_parallel` inconclusive (unchanged)" in out


def test_regional_routing_at_init_summarises_the_volume_router_by_hand():
    """benchmarks/regional_routing_at_init.py: identical gate tokens get one first choice; the cosines by hand."""
    from ermoe.models.regional import RegionalSFCN

    bench = load_bench("regional_routing_at_init")
    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert bench.mean_pairwise_cosine(unit) == pytest.approx((0 + 2 * 2 ** -0.5) / 3)
    torch.manual_seed(0)
    tissue = torch.rand(3, 12, 12, 12)
    model = RegionalSFCN(1, (12, 12, 12), 1, [4, 8], tissue, 1, "ermoe", 2, {"threshold": 0.99}, [4, 8], 0.0).eval()
    same = torch.randn(1, 8).expand(6, 8)
    found = bench.routing_summary(model, same)
    summary = (found["volumes"], found["top_first_share"], found["distinct_first"], found["distinct_pairs"])
    assert summary == (6, 1, 1, 1)
    assert found["second_dropped"] == 1.0  # a threshold of 0.99: no second cosine is that high
    assert found["token_cosine"] == pytest.approx(1.0)
    apart = bench.routing_summary(model, torch.eye(8)[:6] * 3)
    # six orthogonal tokens: cosine 0; centred over them, each pair's cosine is -1/(6-1)
    assert apart["token_cosine"] == pytest.approx(0.0, abs=1e-12) and apart["centred_cosine"] == pytest.approx(-0.2)
