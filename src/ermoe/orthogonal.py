"""Keeping a basis orthonormal, initialising it from data, and measuring how far it is from a subspace.

A basis is a tensor ``U`` of shape ``(*batch, D, r)`` with ``r <= D`` whose columns should stay orthonormal
(``U^T U = I_r``). Three ways to keep it so (docs/method.md, section 1), chosen per layer by ``mode``:

- ``"qr"``: a free parameter, pulled back onto the Stiefel manifold by a QR retraction after every optimizer step
  (:meth:`OrthonormalBasis.retract`, called through ``ermoe.after_step``). Column signs follow ``sign(diag R)`` so
  that a basis that is already orthonormal is left exactly as it is and the optimizer state stays consistent.
  Mutually orthogonal bases (``joint=True``) are retracted together by the polar factor instead: QR of the joint
  matrix would orthogonalise each basis against the ones before it, so expert 0 could take expert 1's directions but
  not the reverse; the polar factor is symmetric in the bases (and also leaves an orthonormal matrix as it is).
- ``"parametrization"``: PyTorch's ``torch.nn.utils.parametrizations.orthogonal``; always exactly orthonormal.
- ``"penalty"``: a free parameter kept near orthonormal only by ``L_ortho = ||U^T U - I||_F^2`` (EMoE eq. 3).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

OrthoMode = Literal["qr", "parametrization", "penalty"]
ORTHO_MODES: tuple[str, ...] = ("qr", "parametrization", "penalty")


def gram_residual(basis: Tensor) -> Tensor:
    """``U^T U - I`` for a basis of shape ``(*batch, D, r)``."""
    r = basis.shape[-1]
    eye = torch.eye(r, dtype=basis.dtype, device=basis.device)
    return basis.transpose(-2, -1) @ basis - eye


def orthogonality_penalty(basis: Tensor) -> Tensor:
    """``||U^T U - I||_F^2`` summed over any batch dimensions (EMoE eq. 3 without its weight)."""
    return gram_residual(basis).pow(2).sum()


def orthonormality_error(basis: Tensor) -> Tensor:
    """``||U^T U - I||_F`` of each matrix: a tensor of shape ``batch`` (0-dim for a single basis)."""
    return torch.linalg.matrix_norm(gram_residual(basis.detach()))


def qr_orthonormalize(basis: Tensor) -> Tensor:
    """The Q factor of ``U = QR`` with columns signed so that ``diag(R) >= 0`` (unique for full-rank U)."""
    q, r = torch.linalg.qr(basis)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


def polar_orthonormalize(basis: Tensor) -> Tensor:
    """The orthonormal polar factor ``U (U^T U)^{-1/2} = W V^T`` (from the SVD ``U = W S V^T``): the orthonormal
    matrix nearest ``U`` in Frobenius norm. Unlike QR it treats every column alike (a column permutation of ``U``
    permutes the result the same way), so no block of columns has priority over another."""
    w, _, vh = torch.linalg.svd(basis, full_matrices=False)
    return w @ vh


def pca_basis(features: Tensor, rank: int, center: bool = False) -> Tensor:
    """Top-``rank`` principal directions of ``features`` (N, D) as a (D, rank) orthonormal basis.

    ``center=False`` uses the second-moment matrix ``H^T H / N`` as the EMoE paper does (the energies are computed on
    uncentred tokens); ``center=True`` uses the covariance. Computed in float64; columns are ordered by decreasing
    eigenvalue and signed so that each column's largest-magnitude entry is positive (a deterministic choice).
    """
    if features.dim() != 2:
        raise ValueError(f"pca_basis expects features of shape (N, D), got {tuple(features.shape)}")
    n, d = features.shape
    if not 1 <= rank <= d:
        raise ValueError(f"pca_basis: rank must be in [1, {d}], got {rank}")
    if n == 0:
        raise ValueError("pca_basis: got 0 feature vectors")
    h = features.detach().to(torch.float64)
    if not torch.isfinite(h).all():
        raise ValueError("pca_basis: features contain NaN or inf")
    if center:
        h = h - h.mean(dim=0, keepdim=True)
    moment = h.T @ h / n
    return top_eigenvectors(moment, rank).to(features.dtype)


def top_eigenvectors(symmetric: Tensor, rank: int) -> Tensor:
    """Eigenvectors of the ``rank`` largest eigenvalues of a symmetric (D, D) matrix, as (D, rank), float64 inside."""
    evals, evecs = torch.linalg.eigh(symmetric.to(torch.float64))
    top = evecs[:, torch.argsort(evals, descending=True)[:rank]]
    pivot = top.abs().argmax(dim=0)
    sign = torch.sign(top[pivot, torch.arange(rank)])
    return (top * torch.where(sign == 0, torch.ones_like(sign), sign)).to(symmetric.dtype)


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``a`` (D, p) and ``b`` (D, q).

    Both are orthonormalised first, so any spanning set works. Returns ``min(p, q)`` angles; 0 means a shared
    direction, pi/2 an orthogonal one. Agrees with ``scipy.linalg.subspace_angles`` (which sorts descending).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"principal_angles expects (D, p) and (D, q), got {tuple(a.shape)} and {tuple(b.shape)}")
    qa = torch.linalg.qr(a.detach().to(torch.float64))[0]
    qb = torch.linalg.qr(b.detach().to(torch.float64))[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.sort(torch.arccos(cosines)).values


class OrthonormalBasis(nn.Module):
    """A learnable basis of shape ``(*batch, D, r)`` kept orthonormal by ``mode`` (see the module docstring).

    Initialised uniformly at random on the Stiefel manifold (QR of a Gaussian matrix), or set from data with
    :meth:`set_`. ``joint=True`` treats the batch as one ``(D, batch*r)`` matrix, so the bases of different
    batch entries are also mutually orthogonal (ERMoE's option: E experts split R^D into E subspaces).
    """

    def __init__(self, dim: int, rank: int, batch: tuple[int, ...] = (), mode: OrthoMode = "qr",
                 joint: bool = False) -> None:
        super().__init__()
        if mode not in ORTHO_MODES:
            raise ValueError(f"unknown orthogonality mode {mode!r}; expected one of {ORTHO_MODES}")
        groups = 1
        for b in batch:
            groups *= b
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= dim:
            raise ValueError(f"basis rank must be an int in [1, dim={dim}], got {rank!r}")
        if joint and groups * rank > dim:
            raise ValueError(
                f"mutually orthogonal bases need batch*rank <= dim, got {groups}*{rank}={groups * rank} > {dim}")
        self.dim, self.rank, self.batch, self.mode, self.joint = dim, rank, tuple(batch), mode, joint
        self.weight = nn.Parameter(torch.empty(*batch, dim, rank))
        self.reset_parameters()
        if mode == "parametrization":
            if joint:
                raise ValueError("joint (mutually orthogonal) bases support mode 'qr' or 'penalty', "
                                 "not 'parametrization'")
            parametrizations.orthogonal(self, "weight")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.set_(torch.randn(*self.batch, self.dim, self.rank))

    def no_weight_decay(self) -> set[str]:
        """The basis itself (decay would pull it off the Stiefel manifold every step), in any mode."""
        return {name for name, _ in self.named_parameters()}

    @property
    def matrix(self) -> Tensor:
        """The basis (with its autograd graph), shape ``(*batch, D, r)``."""
        return self.weight

    def _as_joint(self, u: Tensor) -> Tensor:
        # (*batch, D, r) -> (D, batch*r): column block i is the i-th basis.
        return u.reshape(-1, self.dim, self.rank).permute(1, 0, 2).reshape(self.dim, -1)

    def _from_joint(self, u: Tensor) -> Tensor:
        return u.reshape(self.dim, -1, self.rank).permute(1, 0, 2).reshape(*self.batch, self.dim, self.rank)

    def penalty(self) -> Tensor:
        """``||U^T U - I||_F^2``; with ``joint=True`` also the cross terms between the bases."""
        u = self.matrix
        return orthogonality_penalty(self._as_joint(u) if self.joint else u)

    def error(self) -> Tensor:
        """Largest ``||U^T U - I||_F`` over the batch (over the joint matrix when ``joint``), a 0-dim tensor."""
        u = self.matrix
        return orthonormality_error(self._as_joint(u) if self.joint else u).max()

    @torch.no_grad()
    def set_(self, value: Tensor) -> None:
        """Set the basis to the orthonormalised ``value`` (same shape), e.g. a PCA basis."""
        if tuple(value.shape) != (*self.batch, self.dim, self.rank):
            raise ValueError(f"basis of shape {(*self.batch, self.dim, self.rank)} expected, got {tuple(value.shape)}")
        q = self._orthonormalize(value.to(torch.float64))
        if parametrize.is_parametrized(self, "weight"):
            self.weight = q.to(self.parametrizations.weight.original.dtype)
        else:
            self.weight.copy_(q)

    @torch.no_grad()
    def retract(self) -> None:
        """QR retraction back to orthonormal columns (mode ``"qr"`` only; a no-op for the other modes)."""
        if self.mode != "qr":
            return
        u = self.weight
        u.copy_(self._orthonormalize(u))

    def _orthonormalize(self, u: Tensor) -> Tensor:
        """QR per basis; polar on the joint matrix of mutually orthogonal bases (symmetric in the bases)."""
        return self._from_joint(polar_orthonormalize(self._as_joint(u))) if self.joint else qr_orthonormalize(u)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, batch={self.batch}, mode={self.mode!r}, joint={self.joint}"
