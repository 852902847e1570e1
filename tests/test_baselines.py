"""The two whole-model baselines: the single-gated ViT (Royer et al. 2023) and the DeepMoE CNN (Wang et al. 2020)."""

import json

import pytest
import torch
import torch.nn.functional as F

from ermoe.analysis.diagnostics import evaluate_classifier
from ermoe.models import DeepMoECNN, ImageGateRouter, SingleGatedViT, create_model
from ermoe.train import ConfigError, load_checkpoint, load_config, train

pytest.importorskip("sklearn")


def single_gated(num_experts=4, **kwargs) -> SingleGatedViT:
    torch.manual_seed(0)
    return create_model("single_gated_vit", num_classes=5, img_size=16, patch_size=4, in_chans=1, depth=4,
                        embed_dim=32, num_heads=2, num_experts=num_experts, **{"kmeans_samples": 64, **kwargs})


def train_steps(model, x, steps, first=1):
    """``steps`` training forwards, each followed by the loop's ``after_step`` (no optimizer: weights stay)."""
    model.train()
    for step in range(first, first + steps):
        model(x)
        model.after_step(step)


def test_image_gate_sends_every_token_of_an_image_to_its_expert():
    router = ImageGateRouter(8, 3)
    logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    router.probs_BE = torch.softmax(logits, -1)
    out = router(torch.randn(2 * 5, 8))
    assert out.topk_idx_TK.view(2, 5).tolist() == [[1] * 5, [0] * 5]
    torch.testing.assert_close(out.gates_TK, torch.ones(10, 1))  # value 1: a copied expert computes the base FFN
    out.gates_TK.sum().backward()  # ... with the gradient of the chosen probability (Switch's gate)
    p = torch.softmax(logits.detach(), -1)
    expected = torch.stack([5 * p[0, 1] * (F.one_hot(torch.tensor(1), 3) - p[0]),
                            5 * p[1, 0] * (F.one_hot(torch.tensor(0), 3) - p[1])])
    torch.testing.assert_close(logits.grad, expected)
    with pytest.raises(RuntimeError, match="do not split"):
        router(torch.randn(7, 8))
    with pytest.raises(ValueError, match="top_k must be 1"):
        ImageGateRouter(8, 3, top_k=2)


def test_base_phase_then_kmeans_initialisation_in_after_step():
    model = single_gated(kmeans_step=3)
    expert_w1 = model.experts["1"].moe.experts.w1.detach().clone()
    x = torch.randn(16, 1, 16, 16)
    model.train()
    for step in range(1, 4):  # base-only phase: the output is the base branch's, the experts are untouched
        out = model(x)
        assert not model.experts_active
        torch.testing.assert_close(out, model._base_logits)
        torch.testing.assert_close(model.experts["1"].moe.experts.w1, expert_w1)  # forward changes no state
        model.after_step(step)  # after step 3: k-means on the features of steps 1-3 (the bank holds 64)
    assert model.experts_active and int(model.bank_filled) == 48
    for i in ("1", "3"):  # every expert is a copy of its block's base FFN
        w1 = model.experts[i].moe.experts.w1
        for e in range(w1.shape[0]):
            torch.testing.assert_close(w1[e], model.vit.blocks[int(i)].mlp.fc1.weight)
    # ... so right after the initialisation the expert branch computes the base branch and the ensemble is the base.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.log_softmax(model._base_logits, -1), atol=1e-5, rtol=1e-5)


def test_forward_alone_never_initialises_the_experts():
    model = single_gated(kmeans_step=1)
    model.train()
    for _ in range(3):
        model(torch.randn(8, 1, 16, 16))
    assert not model.experts_active and int(model.bank_filled) == 0


def test_fractional_kmeans_step_needs_the_run_length():
    model = single_gated(kmeans_step=0.5)
    with pytest.raises(RuntimeError, match="on_train_start"):
        train_steps(model, torch.randn(8, 1, 16, 16), 1)
    model.on_train_start(10)
    assert model.kmeans_step == 5


def test_kmeans_gate_is_the_nearest_centroid_rule():
    from sklearn.cluster import KMeans

    model = single_gated(num_experts=3)
    torch.manual_seed(1)
    centres = torch.randn(3, 32) * 4
    feats = torch.cat([c + 0.3 * torch.randn(40, 32) for c in centres])
    model.init_from_clusters(feats)
    km = KMeans(3, n_init=4, random_state=model.seed).fit(feats.double().numpy())
    probe = torch.cat([feats, torch.randn(50, 32) * 3])
    expected = torch.as_tensor(km.predict(probe.double().numpy()))
    assert torch.equal(model.gate(probe).argmax(-1), expected)


def test_single_gated_diagnostics_early_exit_and_features():
    model = single_gated(kmeans_step=1)
    x, y = torch.randn(12, 1, 16, 16), torch.randint(0, 5, (12,))
    train_steps(model, x, 1)
    result = evaluate_classifier(model, [((x,), y)], 5, probe=(x[:4],))
    assert set(result["layers"]) == {"experts.1", "experts.3"}
    layer = result["layers"]["experts.1"]
    assert sum(layer["tokens_per_expert"]) == 12 * 16
    # one decision per image: each expert's token count is a multiple of the 16 patch tokens
    assert all(n % 16 == 0 for n in layer["tokens_per_expert"])
    model.eval()
    with torch.no_grad():
        full = model(x)
        all_exit, exited = model.predict_early_exit(x, 0.0)
        assert exited.all()
        torch.testing.assert_close(all_exit, torch.log_softmax(model._base_logits, -1))
        none_exit, exited = model.predict_early_exit(x, 1.0)
        assert not exited.any()
        torch.testing.assert_close(none_exit, full, atol=1e-5, rtol=1e-5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (12, 64)
    with pytest.raises(ValueError, match="threshold"):
        model.predict_early_exit(x, 1.5)


def test_single_gated_early_exit_metrics_match_predict_early_exit():
    model = single_gated(kmeans_step=1)
    train_steps(model, torch.randn(8, 1, 16, 16), 1)  # the k-means step: the experts become active
    model.eval()
    torch.manual_seed(3)
    batches = [(torch.randn(10, 1, 16, 16), torch.randint(0, 5, (10,))) for _ in range(2)]
    with torch.no_grad():  # confident base predictions, so that some images exit at every threshold
        model.vit.head.weight.mul_(40)
    metrics = evaluate_classifier(model, [((x,), y) for x, y in batches], 5)["model_metrics"]
    with torch.no_grad():
        base_hits = sum(int((model.vit.head(model._base(model._trunk(x))).argmax(-1) == y).sum()) for x, y in batches)
        assert metrics["base_top1"] == pytest.approx(base_hits / 20)
        for t in model.EXIT_THRESHOLDS:
            outs = [model.predict_early_exit(x, t) for x, _ in batches]
            exited = sum(int(e.sum()) for _, e in outs)
            hits = sum(int((out.argmax(-1) == y).sum()) for (out, _), (_, y) in zip(outs, batches))
            assert metrics[f"exit_share@{t}"] == pytest.approx(exited / 20)
            assert metrics[f"exit_top1@{t}"] == pytest.approx(hits / 20)
    assert 0 < metrics["exit_share@0.5"] and metrics["exit_share@0.95"] <= metrics["exit_share@0.5"]


def test_single_gated_build_errors():
    for bad in (1.5, 0.0):
        with pytest.raises(ValueError, match="fraction"):
            create_model("single_gated_vit", depth=2, kmeans_step=bad)
    with pytest.raises(ValueError, match=">= 1"):
        create_model("single_gated_vit", depth=2, kmeans_step=0)
    # what an MoE layer takes does not apply to the single-gated model: named errors, never ignored
    for key, value in (("hidden_dim", 64), ("capacity_factor", 1.0), ("learn_alpha", True), ("top_k", 2),
                       ("router_kwargs", {}), ("moe", {"router": "ermoe"}), ("nope", 1)):
        with pytest.raises(ValueError, match=f"takes no argument '{key}'"):
            create_model("single_gated_vit", depth=2, **{key: value})
    model = create_model("single_gated_vit", depth=4, kmeans_step=0.5)
    model.on_train_start(10)
    assert model.kmeans_step == 5 and model.split == 1


def test_deepmoe_gates_channels_and_its_loss():
    torch.manual_seed(0)
    model = DeepMoECNN(num_classes=4, in_chans=1, widths=(8, 8, 8), embed_dim=6, l1_weight=0.5,
                       embed_loss_weight=0.25)
    first = model.layers[0]
    with torch.no_grad():  # close channel 2 of the first gated conv for every input
        first.gate.weight[2].zero_()
        first.gate.bias[2] = -1.0
    x, y = torch.randn(5, 1, 12, 12), torch.randint(0, 4, (5,))
    captured = {}
    first.register_forward_hook(lambda m, args, out: captured.setdefault("out", out))
    model.train()
    out = model(x)
    assert (captured["out"][:, 2] == 0).all() and (captured["out"][:, 0] != 0).any()
    e = model.embed(x)
    g = F.relu(first.gate(e))
    torch.testing.assert_close(first.last_gates, g)
    penalty = sum(F.relu(layer.gate(e)).mean() for layer in model.layers)
    expected = F.cross_entropy(out, y) + 0.5 * penalty + 0.25 * F.cross_entropy(model.embed_head(e), y)
    criterion = torch.nn.functional.cross_entropy
    torch.testing.assert_close(model.training_loss(out, y, criterion), expected)
    model.training_loss(out, y, criterion).backward()
    assert first.gate.weight.grad is not None and model.embed[0].weight.grad is not None
    assert 0 < model.gate_sparsity() < 1
    result = evaluate_classifier(model, [((x,), y)], 4, probe=(x,))
    stats = result["layers"]["layers.0"]
    assert stats["tokens_per_expert"][2] == 0
    assert sum(stats["tokens_per_expert"]) == int((first.last_gates > 0).sum())
    gates = torch.cat([layer.last_gates for layer in model.layers], dim=1)  # (images, every gated channel)
    closed = (gates == 0).float()
    torch.testing.assert_close(result["model_metrics"]["gate_sparsity"], float(closed.mean()))
    torch.testing.assert_close(result["model_metrics"]["open_channels"], float((1 - closed).sum(1).mean()))
    assert result["model_metrics"]["gate_sparsity"] == pytest.approx(model.gate_sparsity())
    assert [v.name for v in model.routed_layers()] == [f"layers.{i}" for i in range(6)]
    assert all(v.num_experts == 8 and v.moe is None for v in model.routed_layers())


def test_deepmoe_config_errors():
    with pytest.raises(ValueError, match="widths"):
        create_model("deepmoe_cnn", widths=[8, 8])
    for key, value in (("num_experts", 8), ("hidden_dim", 64), ("moe", {"router": "ermoe"}), ("patch_size", 4)):
        with pytest.raises(ValueError, match=f"takes no argument '{key}'"):
            create_model("deepmoe_cnn", **{key: value})
    with pytest.raises(ConfigError, match="model.num_experts does not apply to model 'deepmoe_cnn'"):
        load_config(None, {"model": {"name": "deepmoe_cnn", "num_experts": 8}})
    with pytest.raises(ConfigError, match="whole model: model.name: deepmoe_cnn"):
        load_config(None, {"model": {"moe": {"router": "deepmoe"}}})
    with pytest.raises(ConfigError, match="model.name: single_gated_vit"):
        load_config(None, {"model": {"moe": {"router": "single_gate"}}})


def tiny(tmp_path, max_steps=None, **model):
    return load_config(None, {
        "out_dir": str(tmp_path), "run_name": "run", "progress": False, "tensorboard": False, "log_every": 1,
        "probe_size": 32, "data": {"name": "digits", "train_limit": 640},
        "model": model, "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 3, "eval_batch_size": 128,
                                  "max_steps": max_steps}})


def losses(run):
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def test_single_gated_training_resumes_exactly_across_the_kmeans_step(tmp_path):
    def model():  # k-means after step 15 of 20, after the interruption at 13
        return {"name": "single_gated_vit", "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                "num_experts": 4, "blocks": "all", "kmeans_step": 0.75, "kmeans_samples": 256}

    full = train(tiny(tmp_path / "a", **model()), quiet=True)
    part = train(tiny(tmp_path / "b", max_steps=13, **model()), quiet=True)
    resumed = train(tiny(tmp_path / "b", **model()), resume=part, quiet=True)
    a, b = losses(full), losses(resumed)
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    wa, _ = load_checkpoint(full)
    wb, _ = load_checkpoint(resumed)
    assert bool(wa["experts_ready"]) and int(wa["bank_filled"]) == min(256, 15 * 64)  # the latest 256 of 15 steps
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5)
    metrics = json.loads((full / "metrics.json").read_text())
    assert set(metrics["layers"]) == {"experts.0", "experts.1"} and metrics["params_active"] < metrics["params_total"]


def test_deepmoe_trains_with_the_trainer(tmp_path):
    run = train(tiny(tmp_path, name="deepmoe_cnn", widths=[8, 16, 16]), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["layers"]) == 6 and metrics["test_images"] == 360
    assert metrics["params_active"] == metrics["params_total"]
    assert all(l["probe_changed"] is not None for l in metrics["layers"].values())
