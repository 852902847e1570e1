"""Diagnostics against hand values and peer libraries."""

import math

import pytest
import torch

from ermoe.analysis import (assignment_matrix, assignments, basis_geometry, chance_changed_share, changed_share,
                            homogeneity, mutual_information, probe_load, probe_routing)
from ermoe.analysis.report import draw_figures
from ermoe.tasks import ImageClassification
from ermoe.orthogonal import pca_basis
from ermoe.routing import create_router
from ermoe.routing.base import RoutingInfo


def test_mutual_information_hand_values():
    assert mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)  # expert = class: 1 bit
    assert mutual_information(torch.tensor([[3, 3], [3, 3]])) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.tensor([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 4]])) == \
        pytest.approx(2.0)


def test_mutual_information_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    experts = torch.randint(0, 6, (2000,), generator=g)
    classes = (experts + torch.randint(0, 3, (2000,), generator=g)) % 5
    joint = torch.zeros(6, 5, dtype=torch.long)
    joint.index_put_((experts, classes), torch.ones(2000, dtype=torch.long), accumulate=True)
    ref = metrics.mutual_info_score(experts.numpy(), classes.numpy()) / math.log(2)
    assert mutual_information(joint) == pytest.approx(ref, rel=1e-9)


def test_homogeneity():
    y = torch.randn(1, 50, 8)
    assert homogeneity(y.expand(3, -1, -1)) == pytest.approx(1.0)
    assert homogeneity(torch.cat([y, -y])) == pytest.approx(-1.0)
    a = torch.zeros(2, 4, 3)
    a[0, :, 0] = 1
    a[1, :, 1] = 1
    assert homogeneity(a) == pytest.approx(0.0)


def test_changed_share():
    assert changed_share(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError):
        changed_share(torch.zeros(3), torch.zeros(4))
    # sets of experts (top-2, expert choice): a token changed if any of its experts did
    a = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert changed_share(a, b) == pytest.approx(1 / 3)


def test_chance_changed_share_by_hand():
    one_hot = lambda idx, e: torch.nn.functional.one_hot(torch.tensor(idx), e).bool()
    # loads 1/2, 1/2: two random tokens differ with probability 1 - (1/4 + 1/4) = 1/2
    assert chance_changed_share(one_hot([0, 1, 0, 1], 2)) == pytest.approx(0.5)
    # uniform over 4 experts: 1 - 4/16 = 3/4; collapse onto one expert: 0 (stability relative to it is undefined)
    assert chance_changed_share(one_hot([0, 1, 2, 3], 4)) == pytest.approx(0.75)
    assert chance_changed_share(one_hot([2, 2, 2, 2], 4)) == 0.0
    # sets: {0,1} twice, {2} twice -> 1 - (1/4 + 1/4)
    sets = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert chance_changed_share(sets) == pytest.approx(0.5)


def test_probe_load_and_stability_follow_the_real_assignment_of_loss_free_bias():
    """The loss-free bias selects top-k of s + b while probs stay unbiased: argmax(probs) is not the routing."""
    from ermoe.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=3, img_size=8, patch_size=2, in_chans=1, depth=1, embed_dim=16,
                         num_heads=2, moe=dict(router="loss_free_bias", num_experts=4, blocks="all"))
    moe = model.routed_layers()[0].moe
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # a large bias: expert 2 takes every token
    x = (torch.randn(6, 1, 8, 8),)
    load = probe_load(model, x)["blocks.0.mlp"]
    info = moe.last_routing
    assert torch.equal(load, info.tokens_per_expert.cpu()) and load.tolist() == [0, 0, 96, 0]
    argmax_load = torch.bincount(info.probs.argmax(-1), minlength=4)
    assert not torch.equal(load, argmax_load)  # what the old probe counted
    probed = probe_routing(model, x)["blocks.0.mlp"]
    assert probed["probe_assignment"][:, 2].all() and probed["probe_assignment"].sum() == 96
    assert chance_changed_share(probed["probe_assignment"]) == 0.0  # collapsed: nothing to be stable against


def test_assignment_matrix_of_expert_choice():
    info = _info(torch.tensor([[2, 3], [0, 2]]), "expert")
    assert assignment_matrix(info, 2).tolist() == [[False, True], [False, False], [True, True], [True, False]]


def _info(expert_idx, choice):
    return RoutingInfo(num_tokens=4, expert_idx=expert_idx, gates=expert_idx.float(), probs=torch.zeros(4, 2),
                       tokens_per_expert=torch.zeros(2), assigned_per_expert=torch.zeros(2), aux_losses={},
                       dropped=0, assignments=4, choice=choice)


def test_assignments_token_and_expert_choice():
    tokens, experts = assignments(_info(torch.tensor([[1], [0], [-1], [1]]), "token"))
    assert tokens.tolist() == [0, 1, 3] and experts.tolist() == [1, 0, 1]
    tokens, experts = assignments(_info(torch.tensor([[2, 3], [0, 2]]), "expert"))
    assert sorted(zip(tokens.tolist(), experts.tolist())) == [(0, 1), (2, 0), (2, 1), (3, 0)]


def test_basis_geometry_zero_angle_when_basis_is_the_pca_subspace():
    torch.manual_seed(0)
    x = torch.randn(500, 16) * torch.linspace(3, 0.1, 16)
    router = create_router("emoe", 16, 4, rank=4)
    router.basis.set_(pca_basis(x, 4))
    geo = basis_geometry(router, x, torch.zeros(500, dtype=torch.long))
    assert geo["principal_angle_deg_mean"] < 1e-3 and geo["ortho_error"] < 1e-5
    router2 = create_router("ermoe", 16, 2, rank=4)
    geo2 = basis_geometry(router2, x, torch.tensor([0] * 500))
    assert len(geo2["principal_angle_deg"]) == 2 and math.isnan(geo2["principal_angle_deg"][1])
    assert basis_geometry(create_router("softmax_topk", 16, 4), x, torch.zeros(500)) is None


def test_table_and_figures(tmp_path):
    metrics = {"test_top1": 0.9, "test_top5": 0.99, "test_loss": 0.3, "test_images": 10, "class_images": [5, 5],
               "classes": ["a", "b"], "layers": {"blocks.1.mlp": {
                   "tokens_per_expert": [6, 4], "load_cv": 0.2, "max_over_mean": 1.2, "entropy": 0.97, "gini": 0.1,
                   "drop_rate": 0.0, "expert_class_counts": [[5, 1], [0, 4]], "mi_bits": 0.5, "homogeneity": 0.1,
                   "probe_changed": None, "principal_angle_deg_mean": float("nan")}}}
    table = ImageClassification.results_table(metrics)
    assert "0.9000" in table and "blocks.1.mlp" in table and "0.200" in table
    files = draw_figures(metrics, tmp_path)
    assert [f.name for f in files] == ["heatmap_blocks_1_mlp.png", "load.png"]
    assert all(f.stat().st_size > 1000 for f in files)


def test_expert_label_counts_by_hand():
    """The one routing accumulator every task's diagnostics start from: (expert, label) counts of the tokens a
    layer computed, the label a function of the token's index; drops skipped, expert choice unrolled."""
    from ermoe.analysis.diagnostics import ExpertLabelCounts

    acc = ExpertLabelCounts(num_experts=2, num_labels=3)
    # token choice: tokens 0..3 -> experts 1, 0, dropped, 1; labels by token // 2 (two tokens per image): 0, 0, 1, 1
    info = _info(torch.tensor([[1], [0], [-1], [1]]), "token")
    info.dropped = 1
    acc.add(info, lambda t: t // 2)
    assert acc.counts.tolist() == [[1, 0, 0], [1, 1, 0]]
    # expert choice: expert 0 took tokens 2, 3; expert 1 took 0, 2; labels 2 for every token
    acc.add(_info(torch.tensor([[2, 3], [0, 2]]), "expert"), lambda t: torch.full_like(t, 2))
    assert acc.counts.tolist() == [[1, 0, 2], [1, 1, 2]]
    load = acc.load()
    assert load["tokens_per_expert"] == [3, 4] and load["drop_rate"] == pytest.approx(1 / 8)
    no_labels = ExpertLabelCounts(2)
    no_labels.add(info)  # load only
    assert no_labels.counts.tolist() == [[1], [2]]


def test_routing_counts_by_layer_with_example_labels_by_hand():
    """RoutingCounts: one ExpertLabelCounts per named layer; example_labels gives a token its example's label
    (tokens of example i at [i n, (i + 1) n)); a layer not named is not counted."""
    from types import SimpleNamespace

    from ermoe.analysis.diagnostics import RoutingCounts, example_labels

    a = SimpleNamespace(name="a", num_experts=2, last_routing=_info(torch.tensor([[1], [0], [-1], [1]]), "token"))
    b = SimpleNamespace(name="b", num_experts=2, last_routing=_info(torch.tensor([[0], [0], [1], [1]]), "token"))
    skipped = SimpleNamespace(name="c", num_experts=2, last_routing=None)
    counts = RoutingCounts([a, b, skipped], {"a": 3, "b": 3})
    counts.add(example_labels(torch.tensor([2, 0])))  # 4 tokens, 2 examples: tokens 0, 1 -> label 2; 2, 3 -> 0
    assert list(counts) == ["a", "b"] and len(counts) == 2
    assert counts["a"].counts.tolist() == [[0, 0, 1], [1, 0, 1]]
    assert counts["b"].counts.tolist() == [[0, 0, 2], [2, 0, 0]]
    counts.add(lambda info, t: t % 3, layers=["b"])  # labels 0, 1, 2, 0
    assert counts["b"].counts.tolist() == [[1, 1, 2], [3, 0, 1]] and counts["a"].counts.sum() == 3
    stats = counts.stats("b", "class")
    assert stats["expert_class_counts"] == [[1, 1, 2], [3, 0, 1]] and stats["tokens_per_expert"] == [4, 4]
    assert stats["mi_bits"] == pytest.approx(mutual_information(torch.tensor([[1, 1, 2], [3, 0, 1]])))


def test_evaluating_restores_the_mode_even_after_an_error():
    from ermoe.analysis.diagnostics import evaluating

    model = torch.nn.Linear(2, 2)
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(RuntimeError):
            with evaluating(model):
                assert not model.training
                raise RuntimeError("boom")
        assert model.training is mode
