"""The oracle router (a positive control): routing by the data's ground truth, by hand and through a layer; the
groups reaching every forward of training, evaluation, the probes and BatchNorm recalibration; named errors where
they are missing; and end to end, experts that specialise as far as the measures go."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch

import ermoe
from ermoe import MoE
from ermoe.routing import create_router, routed_by
from ermoe.routing.oracle import MissingGroupsError


def test_oracle_routes_each_token_to_its_examples_group_by_hand():
    router = create_router("oracle", 4, num_experts=3)
    router.groups_B = torch.tensor([1, 5])  # two examples of three tokens each: experts 1 and 5 mod 3 = 2
    out = router(torch.randn(6, 4))
    assert out.topk_idx_TK[:, 0].tolist() == [1, 1, 1, 2, 2, 2]
    assert out.gates_TK.tolist() == [[1.0]] * 6
    assert out.probs_TE.tolist() == [[0, 1, 0]] * 3 + [[0, 0, 1]] * 3
    assert out.aux_losses == {}


def test_oracle_layer_output_is_its_groups_expert_in_float64():
    torch.manual_seed(0)
    layer = MoE(4, 8, 3, router="oracle").double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with routed_by(layer, torch.tensor([2, 0])):
        y = layer(x)
    experts = layer.experts
    for b, e in enumerate([2, 0]):
        hidden = torch.nn.functional.gelu(x[b] @ experts.w1[e].T)
        assert torch.allclose(y[b], hidden @ experts.w2[e].T, atol=1e-12)


def test_forwards_without_groups_or_with_mismatched_groups_are_named_errors():
    layer = MoE(4, 8, 2, router="oracle")
    with pytest.raises(MissingGroupsError, match="ground-truth group.*routed_by"):
        layer(torch.randn(2, 3, 4))
    with routed_by(layer, torch.tensor([0, 1, 0, 1])), pytest.raises(ValueError, match=r"shape \(4,\) for 6 tokens"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="top_k must be 1"):
        create_router("oracle", 4, 2, top_k=2)


def test_routed_by_nests_restores_and_leaves_other_models_alone():
    layer = MoE(4, 8, 2, router="oracle")
    outer, inner = torch.tensor([0]), torch.tensor([1, 1])
    with routed_by(layer, outer):
        with routed_by(layer, inner):
            assert layer.router.groups_B is inner
        assert layer.router.groups_B is outer
    assert layer.router.groups_B is None
    dense = MoE(4, 8, 2, router="softmax_topk")
    with routed_by(dense, None):  # no oracle router: nothing to set, nothing required
        dense(torch.randn(3, 4))


def test_a_compiled_oracle_layer_routes_by_each_forwards_groups():
    """torch.compile (dynamo) must not bake one forward's groups into the graph: each call routes by its own."""
    torch.manual_seed(0)
    layer = MoE(4, 8, 2, router="oracle", validate=False)
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(2, 3, 4)
    for groups in ([0, 1], [1, 0], [1, 1]):
        with routed_by(layer, torch.tensor(groups)):
            torch.testing.assert_close(compiled(x), layer(x))
            assert layer.last_routing.expert_idx[:, 0].tolist() == [g for g in groups for _ in range(3)]


def test_the_oracle_is_a_control_not_a_listed_routing_method():
    assert "oracle" not in ermoe.list_routers()
    assert ermoe.list_routers(controls=True) == [*ermoe.list_routers(), "oracle"]


def test_oracle_vit_run_puts_every_class_on_its_expert(tmp_path):
    """A positive control of the measures: routed by the class, every test image's tokens sit on its class's expert,
    so MI(expert; class) is the experts' whole entropy and no probe token changes expert between checkpoints."""
    from ermoe.train import load_config, train

    cfg = load_config("configs/digits_quick.yaml", {
        "out_dir": str(tmp_path), "progress": False, "tensorboard": False, "probe_size": 32,
        "model": {"moe": {"router": "oracle", "num_experts": 4}}, "optim": {"epochs": 2},
        "checkpoint_every": 5, "bn_recalibration": 0})
    run = train(cfg, quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    for name, layer in metrics["layers"].items():
        counts = np.asarray(layer["expert_class_counts"])  # (experts, classes)
        for c in range(counts.shape[1]):
            assert counts[:, c].nonzero()[0].tolist() == [c % 4], (name, c)
        loads = counts.sum(1) / counts.sum()
        h_experts = -(loads * np.log2(loads)).sum()
        assert layer["mi_bits"] == pytest.approx(h_experts, rel=1e-6)
        assert layer["probe_changed"] == 0.0 and layer["probe_changed_chance"] > 0


def test_oracle_without_groups_in_the_data_is_a_named_error(tmp_path):
    from ermoe.train import load_config, train

    cfg = load_config(None, {
        "task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "probe_size": 4,
        "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": 8.0, "val_size": 4, "test_size": 4},
        "model": {"name": "sfcn3d", "channels": [4, 8, 8], "moe": {"router": "oracle", "num_experts": 2}},
        "optim": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 1}})
    pytest.importorskip("nibabel")
    with pytest.raises(MissingGroupsError, match="heterogeneous cohort"):
        train(cfg, quiet=True)


@pytest.mark.parametrize("memory_cap_gb", [2.0, 0.0])
def test_brain_batches_carry_each_subjects_pattern_and_the_oracle_follows_it(tmp_path, monkeypatch, memory_cap_gb):
    pytest.importorskip("nibabel")
    pytest.importorskip("nilearn")
    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))
    from ermoe.data.cohort import PATTERNS
    from ermoe.data.loader import StepBatchSampler
    from ermoe.train import create_task, load_config, train

    cfg = load_config(None, {
        "task": "brain_age", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "probe_size": 4, "bn_recalibration": 1,
        "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": 8.0, "val_size": 4, "test_size": 8,
                 "ageing": "heterogeneous", "memory_cap_gb": memory_cap_gb, "num_workers": 2 if not memory_cap_gb else 0},
        "model": {"name": "sfcn3d", "channels": [4, 8, 8], "moe": {"router": "oracle", "num_experts": 2}},
        "optim": {"epochs": 1, "batch_size": 8, "eval_batch_size": 3, "warmup_steps": 1}})
    task = create_task(cfg, torch.device("cpu"))
    task.load()
    with open(task.csv_path, newline="") as f:
        pattern = {row["subject"]: list(PATTERNS).index(row["pattern"]) for row in csv.DictReader(f)}
    keys = next(iter(StepBatchSampler(task.num_train, 8, task.setup.seed, 0, 1)))
    train_scans = task.stores["train"].scans
    first = next(task.train_batches(0, 1))
    assert first.groups.tolist() == [pattern[train_scans[k.index].subject] for k in keys]
    test_groups = torch.cat([b.groups for b in task.eval_batches("test")]).tolist()
    assert test_groups == [pattern[s.subject] for s in task.stores["test"].scans]

    run = train(cfg, quiet=True)
    layer = json.loads((run / "metrics.json").read_text())["layers"]["cells.0"]
    table = np.asarray(layer["expert_pattern_counts"])  # (experts, patterns) over the cells where patterns differ
    assert np.count_nonzero(table - np.diag(np.diag(table))) == 0 and table.sum() > 0
    if (table.diagonal() > 0).all():
        assert layer["pattern_subject_ami"] == pytest.approx(1.0)


def test_balanced_accuracy_and_probe_choice_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score

    from ermoe.analysis.token_probe import balanced_accuracy, linear_probe

    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    assert balanced_accuracy(y, pred) == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))

    rng = np.random.default_rng(0)

    def split(n, informative):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 6))
        if informative:
            x[:, 0] += 3.0 * (2 * y - 1)
        return x, y

    found = linear_probe(split(400, True), split(200, True), split(200, True))
    assert found["test_balanced_acc"] > 0.95 and found["chance"] == 0.5
    assert found["val_balanced_acc"][f"{found['c']:g}"] == max(found["val_balanced_acc"].values())
    blind = linear_probe(split(400, False), split(200, False), split(2000, False))
    assert abs(blind["test_balanced_acc"] - 0.5) < 0.05  # 2000 test tokens: chance within about 2 standard errors
    with pytest.raises(ValueError, match="two or more"):
        linear_probe((np.zeros((4, 2)), np.zeros(4, int)), split(4, True), split(4, True))


def test_recorded_tokens_are_the_normalised_cells_a_router_reads_in_float64():
    from ermoe.analysis.token_probe import record_tokens

    torch.manual_seed(0)
    for moe in (None, {"router": "oracle", "num_experts": 2}):
        model = ermoe.create_model("sfcn3d", volume_shape=(16, 16, 16), channels=[2, 3, 4], moe=moe,
                                   dense_ffn=moe is None).double()
        (name, (module, grid)), = model.token_sites.items()
        x = torch.randn(3, 1, 16, 16, 16, dtype=torch.float64)
        keep = np.zeros(int(np.prod(grid)), bool)
        keep[[0, 5, 7]] = True
        groups = torch.tensor([1, 0, 1])
        got_x, got_y = record_tokens(model, {name: (module, grid)}, [((x,), groups, groups)], keep={name: keep})[name]
        model.eval()
        h = x
        with torch.no_grad():
            for i, stage in enumerate(model.stages):
                h = stage(h)
                if str(i) in model.cells:
                    cells = model.cells[str(i)].norm(h.flatten(2).transpose(1, 2))
                    break
        assert np.allclose(got_x, cells[:, torch.from_numpy(keep)].reshape(-1, cells.shape[-1]).float().numpy())
        assert got_y.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    for wrong in (keep[:-1], keep.astype(np.int64)):  # a mask must name each grid token, as a boolean
        with pytest.raises(ValueError, match="keep mask has"):
            record_tokens(model, {name: (module, grid)}, [((x,), groups, groups)], keep={name: wrong})


def test_oracle_routes_each_token_by_its_own_group_and_each_tower_by_its_own():
    router = create_router("oracle", 4, num_experts=3)
    router.groups_B = torch.tensor([[4, 0, 2], [1, 1, 5]])  # one per token, (B, N): 4 % 3 = 1, 5 % 3 = 2
    assert router(torch.randn(6, 4)).topk_idx_TK[:, 0].tolist() == [1, 0, 2, 1, 1, 2]
    router.groups_B = torch.tensor([2, 0, 1, 1, 0])  # five real tokens of a padded batch, flattened
    assert router(torch.randn(5, 4)).topk_idx_TK[:, 0].tolist() == [2, 0, 1, 1, 0]
    router.groups_B = torch.tensor([0, -1, 1])
    with pytest.raises(ValueError, match="negative group"):
        router(torch.randn(3, 4))

    model = ermoe.create_model("dual_encoder", img_size=16, in_chans=1, vocab_size=30, context_length=6,
                               image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 2,
                                      "patch_size": 8, "moe": {"router": "oracle", "num_experts": 2}},
                               text={"width": 16, "depth": 2, "num_heads": 2,
                                     "moe": {"router": "oracle", "num_experts": 2}})
    routers = ermoe.routing.oracle.oracle_routers(torch.compile(model, backend="eager"))
    assert sorted(routers) == ["image.blocks.1.mlp.moe.router", "text.blocks.1.mlp.moe.router"]  # wrapper left out
    images, ids = torch.randn(2, 1, 16, 16), torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 0, 0, 0, 0]])
    groups = {"image": torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]), "text": torch.tensor([1, 0, 1, 0, 1])}
    with torch.no_grad(), routed_by(model, groups):
        model(images, ids)
    image, text = (v.layer.last_routing.expert_idx[:, 0].tolist() for v in model.routed_layers())
    assert image == [0, 1, 1, 0, 1, 1, 1, 1] and text == [1, 0, 1, 0, 1]
    with routed_by(model, {"image": groups["image"]}), pytest.raises(MissingGroupsError):
        model(images, ids)  # the text tower was given none


def test_word_classes_by_hand():
    from ermoe.data.captions import BACKGROUND as B
    from ermoe.data.captions import token_key, word_classes

    def classes(text):
        return word_classes(token_key(text))

    assert classes("a t-shirt to the left of a shirt") == [B, 0, 0, 0, B, B, B, B, B, 6]
    assert classes("two pairs of trousers and a top") == [B, 1, 1, 1, B, B, 0]
    assert classes("top left: a top; top right: a running shoe") == [B, B, B, B, 0, B, B, B, B, B, 7, 7]
    assert classes("a top on top and an ankle boot underneath") == [B, 0, B, B, B, B, 9, 9, B]
    assert classes("a bag alone in the top row, on the left") == [B, 8] + [B] * 9


def test_retrieval_batches_carry_the_item_classes_the_oracle_routes_by(tmp_path, monkeypatch):
    """On the built-in caption set each patch goes to the expert of the item class under it and each real token to
    that of the item class its word names, in training batches and in the evaluation's embeddings."""
    from ermoe.data.captions import BACKGROUND, token_key, word_classes

    task, model = _caption_task(tmp_path, monkeypatch, {
        "depth": 2, "patch_size": 16, "moe": {"router": "oracle", "num_experts": 4}},
        {"moe": {"router": "oracle", "num_experts": 4, "blocks": "all"}})
    batch = next(task.train_batches(0, 1))
    groups = task.oracle_groups(batch)
    items, captions = task.items["train"], task.splits["train"].captions
    texts = [c for caps in captions for c in caps]
    for b in range(len(batch)):  # which image and caption each row is: found by its pixels and ids
        i = next(i for i in range(len(items)) if torch.equal(task.batches._normalize(
            task.splits["train"].images[i:i + 1])[0], batch.inputs[0][b]))
        cells = torch.full((2, 2), BACKGROUND)
        for item in items[i]:
            cells[item["row"], item["col"]] = item["label"]
        assert groups["image"][b].tolist() == cells.repeat_interleave(2, 0).repeat_interleave(2, 1).flatten().tolist()
        real = batch.inputs[1][b][batch.inputs[1][b] != 0]
        text = next(t for t in texts if task.batches.tokenizer.encode(t).ids == real.tolist())
        assert batch.groups["text"][b][:len(real)].tolist() == word_classes(token_key(text))
        assert (batch.groups["text"][b][len(real):] == -1).all()
    assert torch.equal(groups["text"], batch.groups["text"][batch.inputs[1] != 0])
    with torch.no_grad(), routed_by(model, groups):
        model(*batch.inputs)
    image, text = (v.layer.last_routing.expert_idx[:, 0] for v in model.routed_layers())
    assert torch.equal(image, groups["image"].flatten() % 4) and torch.equal(text, groups["text"] % 4)
    images, texts_emb, _ = task.embed(model, "test", torch.no_grad)  # routed by the test split's truth
    assert len(images) == 40 and len(texts_emb) == 200


def test_probe_records_a_vits_patch_tokens_without_its_class_token_in_float64():
    """A ViT's token site is each block's FFN input: the class token left out, the patches row-major, each with its
    own label; a negative label (padding) drops its token. By hand through block 0 in float64."""
    from ermoe.analysis.token_probe import record_tokens

    torch.manual_seed(0)
    model = ermoe.create_model("dual_encoder", img_size=16, in_chans=1, vocab_size=30, context_length=6,
                               image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 2,
                                      "patch_size": 8},
                               text={"width": 16, "depth": 1, "num_heads": 2}).double().eval()
    assert sorted(model.token_sites) == ["image.blocks.0", "image.blocks.1", "text.blocks.0"]
    images = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 0, 0, 0, 0]])
    patch_labels = torch.tensor([[0, 1, 2, 3], [4, -1, 6, 7]])
    sites = {k: v for k, v in model.token_sites.items() if k.startswith("image.")}
    x_TC, y_T = record_tokens(model, sites, [((images, ids), patch_labels, None)])["image.blocks.0"]
    vit = model.image
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        block = vit.blocks[0]
        ffn_in = block.norm2(x + block.attn(block.norm1(x)))[:, vit.num_prefix_tokens:]
    keep = patch_labels >= 0
    assert np.allclose(x_TC, ffn_in[keep].float().numpy(), atol=1e-6)
    assert y_T.tolist() == [0, 1, 2, 3, 4, 6, 7]
    word_labels = torch.where(ids > 0, ids % 3, -1)
    (x_TC, y_T), = record_tokens(model, {"text.blocks.0": model.token_sites["text.blocks.0"]},
                                 [((images, ids), word_labels, None)]).values()
    assert x_TC.shape == (5, 16) and y_T.tolist() == [0, 1, 2, 0, 1]  # the five real tokens
    with pytest.raises(ValueError, match=r"labels of shape \(2, 3\)"):
        record_tokens(model, sites, [((images, ids), torch.zeros(2, 3, dtype=torch.long), None)])


def test_probe_lines_by_hand():
    from ermoe.study.report import truth_probe_lines, truth_probe_measures

    metrics = {"truth_probe": {"blocks.0": {"test_balanced_acc": 0.5, "chance": 0.1},
                               "blocks.1": {"test_balanced_acc": 0.75, "chance": 0.1}}}
    assert truth_probe_measures(metrics) == {"probe:blocks.0": 0.5, "probe_chance:blocks.0": 0.1,
                                             "probe:blocks.1": 0.75, "probe_chance:blocks.1": 0.1}
    table = {"dense": {"probe:blocks.0": [0.5, 0.7], "probe_chance:blocks.0": [0.1, 0.1],
                       "probe:blocks.1": [0.75, 0.75], "probe_chance:blocks.1": [0.1, 0.1]}}
    (line,) = truth_probe_lines(table, "dense", "the class")
    assert "mean ± std over 2 seeds): blocks.0 0.600 ± 0.141 (chance 0.100); blocks.1 0.750 ± 0.000" in line
    assert truth_probe_lines(table, "switch", "the class") == [] and truth_probe_measures({}) == {}


def test_probe_fits_at_most_its_token_budget_drawn_in_order():
    from ermoe.analysis.token_probe import _at_most

    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    assert _at_most((x, y), 0, n=20)[1].tolist() == list(range(10))
    xs, ys = _at_most((x, y), 0, n=4)
    assert len(ys) == 4 and (np.diff(ys) > 0).all() and (xs[:, 0] == 2 * ys).all()  # rows kept with their labels
    assert _at_most((x, y), 0, n=4)[1].tolist() == ys.tolist() != _at_most((x, y), 1, n=4)[1].tolist()


def test_without_scikit_learn_the_probe_is_left_out_with_a_warning(monkeypatch):
    import importlib.util

    from ermoe.analysis.token_probe import can_probe

    assert can_probe()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.warns(UserWarning, match="needs scikit-learn"):
        assert not can_probe()


def test_a_token_grid_that_does_not_split_the_canvas_leaves_item_labels_out_with_a_warning(tmp_path, monkeypatch):
    """A 1 x 1 patch grid on the 64-pixel canvas (one 64-pixel patch) straddles its 2 x 2 cells: the evaluation embeds
    and probes the text tower with a warning, without item labels for the patches; the oracle, which needs them, is
    a named error."""
    pytest.importorskip("sklearn")
    task, model = _caption_task(tmp_path, monkeypatch, {"depth": 1, "patch_size": 64}, {})
    assert task.image_grid == (1, 1) and not task.patches_split_cells()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, texts, _ = task.embed(model, "test", torch.no_grad)
        found = task.item_probe(model, torch.no_grad)["truth_probe"]
        task.embed(model, "val", torch.no_grad)
    said = [str(w.message) for w in caught if "does not split" in str(w.message)]
    assert len(said) == 1 and "1 x 1 token grid does not split" in said[0]  # once for the prepared model
    assert len(images) == 40 and len(texts) == 200
    assert found and all(name.startswith("text.") for name in found)
    with pytest.raises(ValueError, match="a patch would straddle two items"):
        task.patch_classes(task.batches.truth["test"][0][:2])


def _caption_task(tmp_path, monkeypatch, image: dict, text: dict):
    """The built-in caption set (64 canvases, 40 test ones) and a tiny dual encoder with these tower settings,
    prepared: ``(task, model)``."""
    from ermoe.data.images import DEBIAN_FASHION_MNIST
    from ermoe.train import create_task, load_config
    from ermoe.train.trainer import build_model

    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, {
        "task": "retrieval", "out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False,
        "data": {"name": "fashion_captions", "caption_set_size": 64, "test_limit": 40},
        "task_options": {"vocab_size": 60},
        "model": {"name": "dual_encoder", "image": {"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, **image},
                  "text": {"width": 16, "depth": 1, "num_heads": 2, **text}},
        "optim": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "warmup_steps": 1}})
    task = create_task(cfg, torch.device("cpu"))
    task.load()
    model = build_model(cfg, task, quiet=True)
    task.prepare(model)
    return task, model
