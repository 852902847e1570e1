"""Orthonormal bases: retraction, parametrization, penalty, PCA initialisation, principal angles."""

import math

import pytest
import torch

import ermoe
from ermoe.orthogonal import (OrthonormalBasis, orthogonality_penalty, orthonormality_error, pca_basis,
                              principal_angles, qr_orthonormalize)


def test_qr_orthonormalize_keeps_an_orthonormal_basis_exactly():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))[0]
    q = q * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # any signs: the retraction must keep them
    assert torch.allclose(qr_orthonormalize(q), q, atol=1e-12)


def test_qr_orthonormalize_batched():
    torch.manual_seed(0)
    u = torch.randn(3, 10, 4, dtype=torch.float64)
    q = qr_orthonormalize(u)
    assert orthonormality_error(q).max() < 1e-12
    for e in range(3):  # each batch entry spans the same space as before
        assert principal_angles(u[e], q[e]).max() < 1e-6


def test_penalty_by_hand():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # U^T U = diag(1, 4): residual diag(0, 3)
    assert orthogonality_penalty(u).item() == pytest.approx(9.0)
    assert orthonormality_error(u).item() == pytest.approx(3.0)


def test_principal_angles_by_hand():
    # span{e1, e2} vs span{e1, cos t e2 + sin t e3}: angles 0 and t
    t = 0.3
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.0, math.cos(t)], [0.0, math.sin(t)]], dtype=torch.float64)
    assert torch.allclose(principal_angles(a, b), torch.tensor([0.0, t], dtype=torch.float64), atol=1e-7)


def test_principal_angles_match_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    torch.manual_seed(3)
    a, b = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    theirs = sorted(linalg.subspace_angles(a.numpy(), b.numpy()))
    assert torch.allclose(principal_angles(a, b), torch.tensor(theirs, dtype=torch.float64), atol=1e-8)


def test_pca_basis_recovers_planted_directions():
    torch.manual_seed(0)
    d = 16
    directions = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    scales = torch.tensor([10.0, 5.0, 3.0] + [0.1] * (d - 3), dtype=torch.float64)
    features = (torch.randn(4000, d, dtype=torch.float64) * scales) @ directions.T
    basis = pca_basis(features, 3)
    assert orthonormality_error(basis) < 1e-10
    assert principal_angles(basis, directions[:, :3]).max() < 0.05
    # ordered by variance: the first column is the strongest direction
    assert abs(float(basis[:, 0] @ directions[:, 0])) > 0.99


def test_pca_basis_rejects_bad_input():
    with pytest.raises(ValueError, match="rank"):
        pca_basis(torch.randn(10, 4), 5)
    with pytest.raises(ValueError, match="NaN"):
        pca_basis(torch.full((10, 4), float("nan")), 2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        pca_basis(torch.randn(10), 2)


@pytest.mark.parametrize("mode", ["qr", "parametrization", "penalty"])
def test_basis_modes_start_orthonormal_and_train(mode):
    torch.manual_seed(0)
    basis = OrthonormalBasis(16, 4, batch=(3,), mode=mode)
    assert basis.error() < 1e-5
    target = torch.randn(3, 16, 4)
    loss = (basis.matrix - target).pow(2).sum() + basis.penalty()
    loss.backward()
    grads = [p.grad for p in basis.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_joint_bases_are_mutually_orthogonal():
    torch.manual_seed(0)
    basis = OrthonormalBasis(16, 4, batch=(4,), mode="qr", joint=True)
    u = basis.matrix.detach()
    cross = torch.einsum("adr,bds->abrs", u, u)
    eye = torch.eye(4).expand(4, 4, 4, 4) * torch.eye(4)[:, :, None, None]
    assert torch.allclose(cross, eye, atol=1e-5)
    with pytest.raises(ValueError, match="batch\\*rank <= dim"):
        OrthonormalBasis(16, 5, batch=(4,), joint=True)


@pytest.mark.parametrize("router,joint", [("emoe", False), ("ermoe", False), ("ermoe", True)])
def test_orthonormal_after_200_adamw_steps_with_retraction(router, joint):
    torch.manual_seed(0)
    kwargs = {"rank": 4, "ortho": "qr"}
    if joint:
        kwargs["mutually_orthogonal"] = True
    layer = ermoe.MoE(32, 16, 4, router=router, top_k=2, router_kwargs=kwargs)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x, target = torch.randn(64, 32), torch.randn(64, 32)
    drift = []
    for _ in range(200):
        loss = (layer(x) - target).pow(2).mean() + ermoe.aux_loss(layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        drift.append(float(layer.router.basis.error()))  # before the retraction: what the step did
        ermoe.after_step(layer)
        assert layer.router.basis.error() < 1e-5  # after it: orthonormal again
    assert max(drift) > 1e-3  # the optimizer does pull the basis off the manifold; the retraction is not idle


def test_joint_retraction_is_symmetric_in_the_experts():
    """QR of the joint matrix would let expert 0 take expert 1's directions but not the reverse; the polar
    retraction commutes with a permutation of the experts."""
    torch.manual_seed(0)
    basis = OrthonormalBasis(12, 3, batch=(3,), mode="qr", joint=True).double()
    with torch.no_grad():
        basis.weight.add_(0.2 * torch.randn_like(basis.weight))  # an optimizer step's worth of drift
    perm = [2, 0, 1]
    swapped = OrthonormalBasis(12, 3, batch=(3,), mode="qr", joint=True).double()
    with torch.no_grad():
        swapped.weight.copy_(basis.weight[perm])
    basis.retract()
    swapped.retract()
    torch.testing.assert_close(swapped.weight, basis.weight[perm], atol=1e-12, rtol=0)
    assert basis.error() < 1e-12
    # an orthonormal joint basis is left exactly as it is (optimizer state stays consistent)
    before = basis.weight.detach().clone()
    basis.retract()
    torch.testing.assert_close(basis.weight, before, atol=1e-12, rtol=0)


def test_penalty_mode_reduces_orthonormality_error():
    torch.manual_seed(0)
    basis = OrthonormalBasis(16, 4, mode="penalty")
    with torch.no_grad():
        basis.weight.add_(0.3 * torch.randn_like(basis.weight))
    before = float(basis.error())
    opt = torch.optim.SGD(basis.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        basis.penalty().backward()
        opt.step()
    assert float(basis.error()) < 0.1 * before


def test_set_works_with_parametrization():
    torch.manual_seed(0)
    basis = OrthonormalBasis(8, 2, mode="parametrization")
    target = torch.linalg.qr(torch.randn(8, 2))[0]
    basis.set_(target)
    assert principal_angles(basis.matrix.detach(), target).max() < 1e-3
