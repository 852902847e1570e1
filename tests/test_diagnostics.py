"""Diagnostics against hand values and peer libraries."""

import math

import pytest
import torch

from ermoe.analysis import assignments, basis_geometry, changed_share, homogeneity, mutual_information
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
