"""The task metrics against torchmetrics, the field's metric library (skipped where it is not installed): top-1/5
accuracy, MAE / RMSE / Pearson r, Recall@K. ermoe keeps its own implementations (a few lines each, float64, in
chunks for retrieval); these tests pin them to the peer's, and show where the peer counts differently: torchmetrics'
RetrievalRecall breaks ties by the items' order (whichever is listed first wins), ermoe counts a tie against the
positive (a collapsed model with equal embeddings scores no recall, whatever the order of the test set)."""

import numpy as np
import pytest
import torch

torchmetrics = pytest.importorskip("torchmetrics")


def test_top_k_accuracy_matches_torchmetrics():
    from ermoe.analysis.diagnostics import evaluate_classifier
    from ermoe.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=10, img_size=8, in_chans=1, patch_size=4, depth=2, embed_dim=32,
                         num_heads=2, moe={"router": "softmax_topk", "num_experts": 4, "blocks": "all"})
    batches = [((torch.randn(50, 1, 8, 8),), torch.randint(0, 10, (50,))) for _ in range(3)]
    ours = evaluate_classifier(model, batches, 10)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(*x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    for k in (1, 5):
        peer = torchmetrics.functional.accuracy(logits, labels, task="multiclass", num_classes=10, top_k=k,
                                                average="micro")
        assert ours[f"test_top{k}"] == pytest.approx(float(peer), abs=1e-6)  # the peer returns float32


def test_age_metrics_match_torchmetrics():
    from ermoe.tasks.brain_age import age_metrics

    rng = np.random.default_rng(0)
    age = rng.uniform(20, 80, 200)
    pred = age + rng.normal(0, 5, 200) + 0.1 * (age - 50)
    ours = age_metrics(pred, age)
    p, a = torch.from_numpy(pred), torch.from_numpy(age)
    assert ours["test_mae"] == pytest.approx(float(torchmetrics.functional.mean_absolute_error(p, a)), rel=1e-12)
    assert ours["test_rmse"] == pytest.approx(float(torchmetrics.functional.mean_squared_error(p, a, squared=False)),
                                              rel=1e-12)
    assert ours["test_r"] == pytest.approx(float(torchmetrics.functional.pearson_corrcoef(p, a)), rel=1e-9)


def _peer_recall(image, text, owner, k):
    """Text-to-image Recall@K by torchmetrics: each caption a query, its image the one relevant item."""
    sims = text.double() @ image.double().t()
    m, n = sims.shape
    target = torch.zeros(m, n, dtype=torch.bool)
    target[torch.arange(m), owner] = True
    indexes = torch.arange(m)[:, None].expand(m, n)
    return float(torchmetrics.retrieval.RetrievalRecall(top_k=k)(sims.flatten(), target.flatten(),
                                                                 indexes=indexes.flatten()))


def test_recall_at_k_matches_torchmetrics_without_ties_and_differs_on_ties():
    from ermoe.analysis.retrieval import retrieval_metrics

    torch.manual_seed(0)
    image, text = torch.randn(30, 8), torch.randn(90, 8)
    owner = torch.arange(90) % 30
    ours = retrieval_metrics(image, text, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert ours[f"test_t2i_r@{k}"] == pytest.approx(_peer_recall(image, text, owner, k), abs=1e-6)
    # a collapsed model: every similarity equal. torchmetrics ranks the first-listed image first, so the caption of
    # image 0 is a hit (recall@1 = 1/4, and another order of the test set would give another figure); ermoe counts
    # the tie against every positive (each ranks last: recall@1 0)
    same = torch.ones(4, 3)
    assert _peer_recall(same, same, torch.arange(4), 1) == 0.25
    assert retrieval_metrics(same, same, torch.arange(4), ks=(1,))["test_t2i_r@1"] == 0.0
