"""``ermoe explain`` (issue 25, part 3): each basis direction's top tokens, share and principal angle against hand-
built bases; the token table's example and position bookkeeping; the command on a ViT run and a brain-age run; the
angles logged at probe steps."""

from __future__ import annotations

import json

import pytest
import torch

import ermoe
from ermoe.analysis.explain import TokenRecorder, basis_directions, explain_layer
from ermoe.cli import main

pytest.importorskip("sklearn")


def _axes(dim: int, *columns: int) -> torch.Tensor:
    return torch.eye(dim, dtype=torch.float64)[:, list(columns)]


def test_ermoe_directions_share_and_angle_by_hand():
    router = ermoe.create_router("ermoe", 6, 2, rank=2)
    router.basis.set_(torch.stack([_axes(6, 0, 1), _axes(6, 2, 3)]))
    # Expert 0's tokens lie in span(e0, e1); expert 1's in span(e2, e4): e3 is orthogonal to what expert 1 gets.
    x = torch.tensor([[3.0, 1, 0, 0, 0, 0], [1, 2, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0],
                      [0, 0, 2, 0, 1, 0], [0, 0, 1, 0, -3, 0], [0, 0, -5, 0, 1, 0]], dtype=torch.float64)
    expert = torch.tensor([0, 0, 0, 1, 1, 1])
    layer = explain_layer("l", router, x, expert, torch.arange(6), torch.zeros(6, dtype=torch.long), 2, top=3)
    d = {(v.expert, v.index): v for v in layer.directions}
    assert layer.expert_share == [0.5, 0.5]
    # |x0| is the larger coordinate for tokens 0 and 2 of expert 0's three; token 2 has the largest |x0| (4).
    assert d[0, 0].share == pytest.approx(2 / 3) and d[0, 1].share == pytest.approx(1 / 3)
    assert d[0, 0].top_tokens == [2, 0, 1] and d[0, 0].top_coords[0] == pytest.approx(4.0)
    assert d[1, 0].top_tokens[0] == 5 and abs(d[1, 0].top_coords[0]) == pytest.approx(5.0)
    # e2 is in expert 1's PCA plane span(e2, e4), e3 is orthogonal to it; both of expert 0's lie in its plane.
    assert d[1, 0].angle_deg == pytest.approx(0.0, abs=1e-5) and d[1, 1].angle_deg == pytest.approx(90.0)
    assert d[0, 0].angle_deg == pytest.approx(0.0, abs=1e-5) and d[0, 1].angle_deg == pytest.approx(0.0, abs=1e-5)
    assert d[1, 1].share == 0.0  # no token of expert 1 has a coordinate on e3


def test_emoe_directions_are_grouped_under_the_expert_they_route_to():
    router = ermoe.create_router("emoe", 4, 2, rank=3)
    router.basis.set_(_axes(4, 0, 1, 2))
    with torch.no_grad():
        router.pi.copy_(torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]))
    x = torch.randn(10, 4, dtype=torch.float64)
    found = basis_directions(router, x)
    assert [(e, r) for e, r, _, _ in found] == [(0, 0), (0, 1), (1, 2)]
    torch.testing.assert_close(found[2][3], x[:, 2])


def test_token_table_places_every_token_in_its_example_and_grid_position():
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", num_classes=3, img_size=8, in_chans=1, patch_size=4, depth=1,
                               embed_dim=16, num_heads=2, moe={"router": "ermoe", "num_experts": 2, "blocks": "all",
                                                               "router_kwargs": {"rank": 4}}).eval()
    view = model.routed_layers()[0]
    recorder = TokenRecorder({view.name: view.layer})
    images = [torch.randn(3, 1, 8, 8), torch.randn(2, 1, 8, 8)]
    with torch.no_grad():
        for batch in images:
            model(batch)
    recorder.close()
    x, example, position = recorder.table(view.name)
    assert x.shape == (5 * 4, 16)
    assert example.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert position.tolist() == [0, 1, 2, 3] * 5


def _digits_run(tmp_path, router: str):
    from ermoe.train import load_config, train
    cfg = load_config(None, {
        "out_dir": str(tmp_path), "run_name": router, "progress": False, "tensorboard": False, "log_every": 5,
        "probe_size": 32, "probe_every": 3,
        "data": {"name": "digits", "train_limit": 320, "hflip": False, "crop_padding": 1, "val_size": 100},
        "model": {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                  "moe": {"router": router, "num_experts": 4, "blocks": [1], "placement": "replace"}},
        "optim": {"epochs": 1, "batch_size": 64, "warmup_steps": 2, "eval_batch_size": 128}})
    return train(cfg, quiet=True)


@pytest.mark.parametrize("router", ["ermoe", "emoe"])
def test_explain_a_vit_run_draws_patches_and_the_angles_over_training(tmp_path, capsys, router):
    run = _digits_run(tmp_path, router)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    geometry = [r for r in log if r["kind"] == "probe_geometry"]
    last = json.loads((run / "metrics.json").read_text())["step"]
    assert last > 3 and [r["step"] for r in geometry] == [3, last]  # a probe step, then the last step's checkpoint
    assert len(geometry[0]["blocks.1.mlp/experts"]) == (4 if router == "ermoe" else 1)
    assert main(["explain", str(run), "--examples", "50", "--directions", "2"]) == 0
    printed = capsys.readouterr().out
    assert "50 val examples" in printed and "blocks.1.mlp" in printed
    def refuse(constant):  # strict JSON: NaN and infinities are null (issue 42)
        raise AssertionError(f"explain.json holds {constant}")
    out = json.loads((run / "explain.json").read_text(), parse_constant=refuse)
    layer = out["layers"]["blocks.1.mlp"]
    from ermoe.train.trainer import load_run
    rank = load_run(run)[2].routed_layers()[0].moe.router.rank
    assert len(layer["directions"]) == (4 * rank if router == "ermoe" else rank)
    shares = {}
    for d in layer["directions"]:
        assert len(d["top_tokens"]) == 8
        shares[d["expert"]] = shares.get(d["expert"], 0.0) + (0.0 if d["share"] is None else d["share"])
    # within an expert with tokens the directions' shares add up to one (each token has one largest coordinate)
    for e, total in shares.items():
        if layer["expert_share"][e] > 0:
            assert total == pytest.approx(1.0)
    assert (run / "figures" / "explain_blocks_1_mlp.png").is_file() and (run / "figures" / "angles.png").is_file()


def test_explain_refuses_a_run_without_eigen_routers_and_bad_counts(tmp_path, capsys):
    run = _digits_run(tmp_path, "softmax_topk")
    assert main(["explain", str(run)]) == 1
    assert "no ERMoE or EMoE layer" in capsys.readouterr().err
    assert main(["explain", str(run), "--examples", "0"]) == 1
    assert "examples must be a positive integer, got 0" in capsys.readouterr().err


def test_explain_a_brain_age_run_draws_locations(tmp_path, monkeypatch):
    pytest.importorskip("nilearn")
    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))
    from ermoe.train import load_config, train
    from ermoe.train.explain import explain
    cfg = load_config(None, {
        "task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "probe_size": 4, "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": 8.0, "val_size": 4,
                                  "test_size": 4},
        "model": {"name": "sfcn3d", "channels": [4, 8, 8], "moe": {"router": "ermoe", "num_experts": 2}},
        "optim": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1}})
    run = train(cfg, quiet=True)
    out = explain(run, quiet=True)
    assert out["split"] == "val" and out["examples"] == 4
    assert (run / "figures" / "explain_cells_0.png").is_file()
    layer = out["layers"]["cells.0"]
    assert {d["expert"] for d in layer["directions"]} == {0, 1}


def test_text_tower_tokens_are_placed_at_their_caption_positions_across_batches():
    from ermoe.models.text import text_tower
    torch.manual_seed(0)
    tower = text_tower(20, 6, 0, width=8, depth=1, num_heads=2,
                       moe={"router": "ermoe", "num_experts": 2, "blocks": "all", "router_kwargs": {"rank": 2}}).eval()
    layer = tower.moe_layers[0]
    recorder = TokenRecorder({"text": layer})
    seen = []  # the padded (B, L, D) input of the layer, to check each recorded row against
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    batches = [torch.tensor([[3, 4, 5, 0, 0, 0], [7, 0, 0, 0, 0, 0]]), torch.tensor([[9, 8, 0, 0, 0, 0]])]
    with torch.no_grad():
        for ids in batches:
            tower(ids)
    handle.remove()
    recorder.close()
    x, example, position = recorder.table("text")
    assert example.tolist() == [0, 0, 0, 1, 2, 2] and position.tolist() == [0, 1, 2, 0, 0, 1]
    torch.testing.assert_close(x, torch.cat(seen)[example, position])


def test_a_token_is_shown_in_its_caption_context():
    from ermoe.analysis.explain import token_in_context
    words = ["[PAD]", "[UNK]", "a", "bag", "left", "of", "shoe"]
    ids = torch.tensor([[2, 3, 5, 2, 6, 0, 0], [6, 0, 0, 0, 0, 0, 0]])
    assert token_in_context(ids, words, 0, 1, context=1) == "a [bag] of"
    assert token_in_context(ids, words, 0, 4, context=3) == "bag of a [shoe]"  # padding ends the caption
    assert token_in_context(ids, words, 1, 0, context=0) == "[shoe]"


def test_explain_a_dual_encoder_run_draws_image_patches_and_text_words(tmp_path, monkeypatch):
    from ermoe.data.images import DEBIAN_FASHION_MNIST
    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    pytest.importorskip("tokenizers")
    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))
    from ermoe.train import load_config, train
    from ermoe.train.explain import explain
    moe = {"router": "ermoe", "num_experts": 2, "blocks": "all", "router_kwargs": {"rank": 2}}
    cfg = load_config(None, {
        "task": "retrieval", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "probe_size": 8, "data": {"name": "fashion_captions", "caption_set_size": 64},
        "model": {"name": "dual_encoder", "image": {"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 1,
                                                    "patch_size": 16, "moe": moe},
                  "text": {"width": 16, "depth": 1, "num_heads": 2, "moe": moe}},
        "task_options": {"vocab_size": 60},
        "optim": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "warmup_steps": 1}})
    run = train(cfg, quiet=True)
    out = explain(run, examples=16, quiet=True)
    assert out["split"] == "val" and out["examples"] == 16
    assert (run / "figures" / "explain_image_blocks_0_mlp.png").is_file()
    assert (run / "figures" / "explain_text_blocks_0_mlp.png").is_file()
    text = out["layers"]["text.blocks.0.mlp"]
    words = [w for d in text["directions"] for w in d["top_words"]]
    assert len(text["directions"]) == 2 * 2 and len(words) == 4 * 8
    # every top token is a routed word of a caption: never the padding the text MoE does not route
    assert all(w.startswith("[") and w.endswith("]") and w != "[[PAD]]" for w in words)
    assert "top_words" not in out["layers"]["image.blocks.0.mlp"]["directions"][0]
