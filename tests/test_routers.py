"""Each router's scores, gates and losses against its formula, written out per token in float64."""

import math

import pytest
import torch

from ermoe.routing import create_router
from ermoe.routing.losses import importance_loss, switch_balancing_loss

D, E = 12, 4


def tokens(n=10, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, D, dtype=torch.float64)


def softmax(v):
    w = [math.exp(a - max(v)) for a in v]
    return [a / sum(w) for a in w]


def test_softmax_topk_gates_and_losses():
    router = create_router("softmax_topk", D, E, 2, balance_weight=0.1, z_loss_weight=0.01).double()
    x = tokens()
    out = router(x)
    w = router.gate.weight
    for t in range(x.shape[0]):
        p = softmax([float(x[t] @ w[e].detach()) for e in range(E)])
        top = sorted(range(E), key=lambda e: -p[e])[:2]
        assert out.topk_idx_TK[t].tolist() == top
        assert out.gates_TK[t].tolist() == pytest.approx([p[e] for e in top], rel=1e-12)
    logits = x @ w.T
    assert out.aux_losses["balance"].item() == pytest.approx(
        0.1 * switch_balancing_loss(logits.softmax(-1), out.topk_idx_TK).item())
    lse = [math.log(sum(math.exp(float(v)) for v in row)) for row in logits.detach()]
    assert out.aux_losses["z_loss"].item() == pytest.approx(0.01 * sum(v * v for v in lse) / len(lse))


def test_softmax_topk_renormalize_and_jitter_only_in_training():
    router = create_router("softmax_topk", D, E, 2, renormalize=True, jitter_eps=0.1).double()
    x = tokens()
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.gates_TK, b.gates_TK)
    assert torch.allclose(a.gates_TK.sum(-1), torch.ones(10, dtype=torch.float64))
    router.train()
    assert not torch.equal(router(x).probs_TE, a.probs_TE)


def test_emoe_scores_by_formula():
    router = create_router("emoe", D, E, 1, rank=5, tau=0.5, pi_norm="softmax").double()
    with torch.no_grad():
        router.gamma.copy_(torch.linspace(0.5, 1.5, 5))
        router.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    x = tokens()
    out = router(x)
    u = router.basis.matrix.detach()
    pi = router.pi.detach().softmax(dim=-1)
    gamma, bias = router.gamma.detach(), router.bias.detach()
    for t in range(x.shape[0]):
        z = [float(x[t] @ u[:, j]) for j in range(5)]
        energy = [zj * zj / (sum(v * v for v in z) + 1e-6) for zj in z]
        s = [sum(float(gamma[j]) * float(pi[j, k]) * energy[j] for j in range(5)) + float(bias[k])
             for k in range(E)]
        p = softmax([v / 0.5 for v in s])
        assert out.probs_TE[t].tolist() == pytest.approx(p, rel=1e-10)
        best = max(range(E), key=lambda k: p[k])
        assert out.topk_idx_TK[t, 0].item() == best
        assert out.gates_TK[t, 0].item() == pytest.approx(p[best], rel=1e-10)
    ortho = router.basis.penalty().item()
    assert out.aux_losses["ortho"].item() == pytest.approx(1e-3 * ortho)


def test_emoe_raw_pi_and_whitening():
    router = create_router("emoe", D, E, 1, rank=4, pi_norm="none", whiten=True).double()
    x = tokens(50)
    out = router(x)
    z = x @ router.basis.matrix.detach()
    energy = z.pow(2) / (z.pow(2).sum(-1, keepdim=True) + 1e-6)
    whitened = energy / (energy.mean(0) + 1e-6)  # training: batch mean
    s = whitened @ (router.gamma[:, None] * router.pi).detach() + router.bias.detach()
    assert torch.allclose(out.probs_TE, s.softmax(-1), atol=1e-12)
    # the running mean moved from 1/r towards the batch mean (momentum 0.1)
    expected_running = 0.9 * torch.full((4,), 0.25, dtype=torch.float64) + 0.1 * energy.mean(0)
    assert torch.allclose(router.whitener.running_mean, expected_running)
    router.eval()  # evaluation divides by the running mean
    out_eval = router(x)
    s_eval = (energy / (expected_running + 1e-6)) @ (router.gamma[:, None] * router.pi).detach()
    assert torch.allclose(out_eval.probs_TE, s_eval.softmax(-1), atol=1e-12)


def _ermoe_reference(x, u, t, k, context=None, eps=1e-6):
    """Eigenbasis Score per token and expert by the definition: ||U_e^T h|| / ||h|| (or the context cosine)."""
    scores = []
    for e in range(u.shape[0]):
        z = u[e].T @ x[t]
        if context is None:
            scores.append(float(z.norm() / (x[t].norm() + eps)))
        else:
            zc = u[e].T @ context[t]
            scores.append(float(z @ zc / (z.norm() * zc.norm() + eps)))
    return scores


@pytest.mark.parametrize("score", ["projection", "context"])
def test_ermoe_eigenbasis_score_and_renormalized_gates(score):
    router = create_router("ermoe", D, E, 2, rank=3, score=score, tau=0.2).double()
    x = tokens()
    context = tokens(seed=1) if score == "context" else None
    out = router(x, context)
    u = router.basis.matrix.detach()
    for t in range(x.shape[0]):
        s = _ermoe_reference(x, u, t, 2, context)
        p = softmax([v / 0.2 for v in s])
        assert out.probs_TE[t].tolist() == pytest.approx(p, rel=1e-9)
        top = sorted(range(E), key=lambda e: -p[e])[:2]
        assert out.topk_idx_TK[t].tolist() == top
        w = [(1 + s[e]) / 2 if context is not None else s[e] for e in top]
        assert out.gates_TK[t].tolist() == pytest.approx([v / sum(w) for v in w], rel=1e-9)
        # the expert inputs are the token's coordinates in the chosen experts' bases
        for j, e in enumerate(top):
            assert torch.allclose(out.expert_inputs_TKR[t, j], u[e].T @ x[t])
    if score == "projection":
        assert ((out.probs_TE >= 0) & (out.probs_TE <= 1)).all()


def test_ermoe_projection_score_is_cosine_to_the_subspace():
    # a token inside expert 0's span scores 1 there; a token orthogonal to it scores 0
    router = create_router("ermoe", D, E, 1, rank=3, mutually_orthogonal=True).double()
    router.basis.retract()  # orthonormal to float64 precision
    u = router.basis.matrix.detach()
    x = torch.stack([u[0] @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), u[1][:, 0]])
    out = router(x)
    scores = [_ermoe_reference(x, u, t, 1) for t in range(2)]
    assert scores[0][0] == pytest.approx(1.0, abs=1e-6) and scores[0][1] == pytest.approx(0.0, abs=1e-9)
    assert scores[1][1] == pytest.approx(1.0, abs=1e-6) and scores[1][0] == pytest.approx(0.0, abs=1e-9)
    assert out.topk_idx_TK[:, 0].tolist() == [0, 1]


def test_ermoe_gate_options_and_threshold():
    x = tokens()
    base = create_router("ermoe", D, E, 2, rank=3, tau=0.1).double()
    for gate in ("score", "prob"):
        router = create_router("ermoe", D, E, 2, rank=3, tau=0.1, gate=gate).double()
        router.load_state_dict(base.state_dict())
        out = router(x)
        u = router.basis.matrix.detach()
        s = torch.tensor([_ermoe_reference(x, u, t, 2) for t in range(10)], dtype=torch.float64)
        expected = s if gate == "score" else (s / 0.1).softmax(-1)
        assert torch.allclose(out.gates_TK, expected.gather(1, out.topk_idx_TK), atol=1e-9)
    router = create_router("ermoe", D, E, 2, rank=3, tau=0.1, threshold=0.5).double()
    router.load_state_dict(base.state_dict())
    out = router(x)
    sel = torch.tensor([_ermoe_reference(x, router.basis.matrix.detach(), t, 2) for t in range(10)],
                       dtype=torch.float64).gather(1, out.topk_idx_TK)
    assert out.keep_TK[:, 0].all()  # never drop every expert
    assert torch.equal(out.keep_TK[:, 1], sel[:, 1] >= 0.5)
    assert torch.allclose(out.gates_TK.sum(-1), torch.ones(10, dtype=torch.float64))
    assert (out.gates_TK[~out.keep_TK] == 0).all()


def test_ermoe_learnable_temperature_and_standardize():
    router = create_router("ermoe", D, E, 1, rank=3, tau=0.1, learn_tau=True, gate="prob",
                           standardize=True).double()
    x = tokens(40)
    out = router(x)
    u = router.basis.matrix.detach()
    s = torch.tensor([_ermoe_reference(x, u, t, 1) for t in range(40)], dtype=torch.float64)
    standardized = (s - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(out.probs_TE, (standardized / 0.1).softmax(-1), atol=1e-9)
    assert isinstance(router.temperature.log_tau, torch.nn.Parameter)


def test_cosine_router_by_formula():
    router = create_router("cosine", D, E, 1, route_dim=5, tau=0.5, learn_tau=False).double()
    x = tokens()
    out = router(x)
    h = x @ router.proj.weight.detach().T
    emb = router.expert_embed.detach()
    for t in range(10):
        cos = [float(h[t] @ emb[e] / (h[t].norm() * emb[e].norm())) for e in range(E)]
        assert out.probs_TE[t].tolist() == pytest.approx(softmax([c / 0.5 for c in cos]), rel=1e-9)
    assert "balance" in out.aux_losses


def test_vmoe_noise_only_in_training_and_losses():
    router = create_router("vmoe", D, E, 2).double()
    x = tokens(32)
    router.eval()
    clean = router(x)
    logits = x @ router.gate.weight.detach().T
    assert torch.allclose(clean.probs_TE, logits.softmax(-1))
    assert torch.equal(router(x).topk_idx_TK, clean.topk_idx_TK)
    assert "load" not in clean.aux_losses
    assert clean.aux_losses["importance"].item() == pytest.approx(0.005 * importance_loss(logits.softmax(-1)).item())
    # BPR priority: each token's largest gate
    assert torch.equal(clean.priority_TK[:, 0], clean.gates_TK[:, 0])
    router.train()
    torch.manual_seed(5)
    noisy = router(x)
    assert not torch.allclose(noisy.probs_TE, clean.probs_TE)
    assert "load" in noisy.aux_losses and noisy.aux_losses["load"].requires_grad
    # noise std is 1/E: the noisy logits stay within a few std of the clean ones
    noisy_logits = noisy.probs_TE.log()
    shift = (noisy_logits - noisy_logits.mean(-1, keepdim=True)) - (logits - logits.mean(-1, keepdim=True))
    assert shift.std().item() == pytest.approx(1.0 / E, rel=0.35)


def test_loss_free_bias_selection_and_update():
    router = create_router("loss_free_bias", D, E, 1, update_rate=0.1).double()
    x = tokens(40)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    out = router(x)
    assert (out.topk_idx_TK == 1).all()  # the bias decides the selection ...
    probs = (x @ router.gate.weight.detach().T).softmax(-1)
    assert torch.allclose(out.gates_TK[:, 0], probs[:, 1])  # ... but not the gate
    router.after_step()  # expert 1 overloaded: its bias falls by gamma, the others rise
    assert torch.allclose(router.expert_bias, torch.tensor([0.1, 4.9, 0.1, 0.1], dtype=torch.float64))
    router.eval()
    router(x)
    router.after_step()  # evaluation counts no load: no update
    assert torch.allclose(router.expert_bias, torch.tensor([0.1, 4.9, 0.1, 0.1], dtype=torch.float64))


def test_expert_choice_each_expert_takes_its_top_tokens():
    router = create_router("expert_choice", D, E, 1, capacity_factor=1.0).double()
    x = tokens(10)
    out = router(x)
    probs = (x @ router.gate.weight.detach().T).softmax(-1)
    capacity = math.ceil(10 / E)
    assert out.token_idx_EC.shape == (E, capacity)
    for e in range(E):
        best = sorted(range(10), key=lambda t: -float(probs[t, e]))[:capacity]
        assert sorted(out.token_idx_EC[e].tolist()) == sorted(best)
        assert torch.allclose(out.gates_EC[e], probs[out.token_idx_EC[e], e])
