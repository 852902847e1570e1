"""Auxiliary losses and load statistics against values worked out by hand and against peer implementations."""

import math

import pytest
import torch

from ermoe.routing.losses import importance_loss, router_z_loss, switch_balancing_loss, vmoe_load_loss
from ermoe.routing.stats import (ep_rank_loads, ep_straggler, gini, load_cv, load_summary, max_over_mean,
                                 normalized_entropy)

PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)


def test_switch_balancing_loss_by_hand():
    # top-1 choices [0, 0, 1, 0]: f = [3/4, 1/4]; P = [(.9+.8+.3+.6)/4, (.1+.2+.7+.4)/4] = [.65, .35]
    # loss = E * sum f_i P_i = 2 * (.75*.65 + .25*.35) = 2 * (.4875 + .0875) = 1.15
    idx = PROBS.argmax(dim=-1, keepdim=True)
    assert switch_balancing_loss(PROBS, idx).item() == pytest.approx(1.15, abs=1e-12)


def test_switch_balancing_loss_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25, dtype=torch.float64)
    idx = torch.arange(8).remainder(4).unsqueeze(1)
    assert switch_balancing_loss(probs, idx).item() == pytest.approx(1.0)


def test_switch_balancing_loss_matches_hugging_face():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    logits = torch.randn(32, 8, dtype=torch.float64)
    for k in (1, 2):
        idx = torch.topk(logits.softmax(-1), k, dim=-1).indices
        ours = switch_balancing_loss(logits.softmax(-1), idx)
        theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=k)
        assert ours.item() == pytest.approx(float(theirs), rel=1e-6)  # theirs accumulates in float32


def test_router_z_loss_by_hand():
    # logsumexp([0, 0]) = log 2; logsumexp([log 3, 0]) = log 4; mean of squares
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_importance_loss_by_hand():
    # importance = [1.4, 0.6]; mean 1; population variance .16; cv^2 = .16
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    assert importance_loss(probs).item() == pytest.approx(0.16)


def test_vmoe_load_loss_against_scipy_reference():
    norm = pytest.importorskip("scipy.stats").norm
    torch.manual_seed(1)
    logits = torch.randn(16, 4, dtype=torch.float64)
    noisy = logits + 0.25 * torch.randn_like(logits)
    for k in (1, 2):
        threshold = torch.sort(noisy, dim=-1, descending=True).values[:, k - 1]
        p = 1.0 - norm.cdf(((threshold[:, None] - logits) / 0.25).numpy())
        p_mean = p.mean(axis=0)
        expected = (p_mean.std() / p_mean.mean()) ** 2
        assert vmoe_load_loss(logits, noisy, 0.25, k).item() == pytest.approx(expected, rel=1e-9)


def test_losses_of_empty_batch_are_zero_and_differentiable():
    logits = torch.zeros(0, 4, requires_grad=True)
    probs = logits.softmax(-1)
    idx = torch.zeros(0, 1, dtype=torch.long)
    total = switch_balancing_loss(probs, idx) + router_z_loss(logits) + importance_loss(probs)
    total = total + vmoe_load_loss(logits, logits, 0.25, 1)
    total.backward()
    assert total.item() == 0.0


def test_load_statistics_by_hand():
    flat = torch.tensor([2, 2, 2, 2])
    assert load_summary(flat) == {"load_cv": 0.0, "max_over_mean": 1.0, "entropy": 1.0, "gini": 0.0}
    # one expert takes all: mean 2, std sqrt((36 + 3*4)/4) = sqrt(12), cv = sqrt(12)/2 = sqrt(3)
    collapsed = torch.tensor([8, 0, 0, 0])
    assert load_cv(collapsed) == pytest.approx(math.sqrt(3))
    assert max_over_mean(collapsed) == pytest.approx(4.0)
    assert normalized_entropy(collapsed) == pytest.approx(0.0)
    assert gini(collapsed) == pytest.approx(0.75)  # 1 - 1/E
    # [1, 3]: p = [.25, .75], H = -(.25 ln .25 + .75 ln .75) / ln 2 = 0.811278...; gini = 2*(1*1+2*3)/(2*4) - 3/2 = .25
    assert normalized_entropy(torch.tensor([1, 3])) == pytest.approx(0.8112781244591328)
    assert gini(torch.tensor([1, 3])) == pytest.approx(0.25)


def test_load_statistics_reject_bad_counts():
    with pytest.raises(ValueError, match="non-negative"):
        load_cv(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="at least one expert"):
        gini(torch.tensor([]))


def test_expert_parallel_straggler_by_hand():
    counts = torch.tensor([6, 2, 0, 4])
    # 2 ranks, experts [0, 1] and [2, 3]: loads 8 and 4, mean 6 -> the busiest rank takes 8/6 of the mean
    assert ep_rank_loads(counts, 2).tolist() == [8.0, 4.0]
    assert float(ep_straggler(counts, 2)) == pytest.approx(4 / 3)
    # one expert per rank: max/mean = 6/3
    assert float(ep_straggler(counts, 4)) == pytest.approx(2.0)
    # 8 ranks: every expert on 2 ranks that split its tokens: [3, 3, 1, 1, 0, 0, 2, 2], still 3/1.5
    assert ep_rank_loads(counts, 8).tolist() == [3.0, 3.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0]
    assert float(ep_straggler(counts, 8)) == pytest.approx(2.0)
    assert float(ep_straggler(counts, 1)) == 1.0
    assert float(ep_straggler(torch.zeros(4, dtype=torch.long), 4)) == 1.0  # no token: nobody waits
    with pytest.raises(ValueError, match="divides or is divided by the 4 experts"):
        ep_rank_loads(counts, 3)
