"""The oracle router (a positive control): routing by the data's ground truth, by hand and through a layer; the
groups reaching every forward of training, evaluation, the probes and BatchNorm recalibration; named errors where
they are missing; and end to end, experts that specialise as far as the measures go."""

import csv
import json

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
        got_x, got_y = record_tokens(model, {name: module}, [((x,), torch.tensor([1, 0, 1]))], keep_N=keep)[name]
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
