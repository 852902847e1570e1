"""The layer benchmark runs end to end at a tiny size and reports the keys the docs and issue rely on."""

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_layer.py"


def test_moe_layer_benchmark_json(capsys):
    spec = importlib.util.spec_from_file_location("moe_layer_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--tokens", "64", "--dim", "16", "--hidden", "32", "--experts", "4", "--repeats", "1",
                           "--warmup", "0", "--threads", "1", "--json"])
    finally:
        torch.set_num_threads(threads)
    printed = json.loads(capsys.readouterr().out)
    assert printed == rows
    assert [r["router"] for r in rows] == ["emoe", "ermoe", "softmax_topk", "vmoe", "loss_free_bias", "cosine",
                                           "expert_choice"]
    for r in rows:
        assert {"router", "num_experts", "fwd_bwd_ratio", "fwd_ratio"} <= set(r)
        assert r["num_experts"] == 4 and r["fwd_bwd_ratio"] > 0 and r["fwd_ratio"] > 0
