"""The task metrics and torchmetrics, the field's metric library. Top-1/5 accuracy, MAE, RMSE and Pearson r are
torchmetrics' (checked here against plain references: a hand count, numpy in float64). Recall@K is ermoe's own
(float64, in chunks), pinned to torchmetrics' where neither has ties, and the test shows where the peer counts
differently: torchmetrics' RetrievalRecall breaks ties by the items' order (whichever is listed first wins), ermoe
counts a tie against the positive (a collapsed model with equal embeddings scores no recall, whatever the order of
the test set)."""

import numpy as np
import pytest
import torch
import torchmetrics


def test_top_k_accuracy_and_loss_match_a_hand_count():
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
        hits = sum(int(label in row.tolist()) for row, label in zip(logits.topk(k, 1).indices, labels.tolist()))
        assert ours[f"test_top{k}"] == pytest.approx(hits / 150, abs=1e-6)  # torchmetrics returns float32
    loss = torch.nn.functional.cross_entropy(logits.double(), labels)
    assert ours["test_loss"] == pytest.approx(float(loss), rel=1e-5)
    # a top-5 with fewer than 5 classes: every label is in the top 3 of 3
    three = [((x,), y % 3) for (x,), y in batches]
    small = create_model("vit_tiny", num_classes=3, img_size=8, in_chans=1, patch_size=4, depth=1, embed_dim=16,
                         num_heads=2)
    assert evaluate_classifier(small, three, 3)["test_top5"] == 1.0


def test_age_metrics_match_numpy():
    from ermoe.tasks.brain_age import age_metrics

    rng = np.random.default_rng(0)
    age = rng.uniform(20, 80, 200)
    pred = age + rng.normal(0, 5, 200) + 0.1 * (age - 50)
    ours = age_metrics(pred, age)
    gap = pred - age
    assert ours["test_mae"] == pytest.approx(np.abs(gap).mean(), rel=1e-12)
    assert ours["test_rmse"] == pytest.approx(np.sqrt((gap ** 2).mean()), rel=1e-12)
    assert ours["test_r"] == pytest.approx(np.corrcoef(pred, age)[0, 1], rel=1e-9)
    assert ours["test_gap_age_r"] == pytest.approx(np.corrcoef(gap, age)[0, 1], rel=1e-9)
    assert np.isnan(age_metrics(np.full(5, 40.0), age[:5])["test_r"])  # a constant prediction: r undefined


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
