"""EMoE's Eigen Router (Cheng et al., "EMoE: Eigenbasis-guided routing for Mixture-of-Experts"; docs/method.md,
section 1).

One shared learnable orthonormal basis U (D x R). For a token h:

    z = U^T h                                   coordinates in the basis
    e_j = z_j^2 / (sum_k z_k^2 + eps)           energy fraction on direction j            (EMoE eq. 1)
    s_k = sum_j gamma_j * pi_{j,k} * e_j + b_k  expert score                              (EMoE eq. 2)
    p = softmax(s / tau); top-k; gate = p of the chosen expert(s)
    L_ortho = lambda_ortho * ||U^T U - I||_F^2                                            (EMoE eq. 3)

The defaults are the paper's reading. Options from docs/method.md, section 7, each off by default: ``whiten``
(energies over
their running mean), ``standardize`` (per-expert score standardisation), ``learn_tau``/``tau``, ``pi_init_std``,
``pi_norm="none"``, ``reestimate_every`` (U re-set to the top-R principal directions of a running second moment)
and PCA initialisation through :meth:`init_from_features`.

Shape suffixes: T tokens, D model dim, E experts, K top-k, R basis rank.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..orthogonal import OrthoMode, OrthonormalBasis, pca_basis, top_eigenvectors
from .base import Router, RouterOutput, overflow_safe_scale, register_router, topk_gates, upcast
from .common import EnergyWhitener, ScoreStandardizer, Temperature
from .sync import at_least_one, global_count, global_sum, update_weight


@register_router
class EigenEnergyRouter(Router):
    name = "emoe"
    learn_alpha = True  # h <- h + alpha * sum_k p_k Expert_k(h), alpha learned (EMoE)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        rank: int | None = None,
        ortho: OrthoMode = "qr",
        ortho_weight: float = 1e-3,
        tau: float = 1.0,
        learn_tau: bool = False,
        pi_norm: Literal["softmax", "none"] = "softmax",
        pi_init_std: float = 1.0,
        gate: Literal["prob", "renormalized"] = "prob",
        whiten: bool = False,
        standardize: bool = False,
        reestimate_every: int = 0,
        stats_momentum: float = 0.1,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(dim, num_experts, top_k)
        rank = min(dim, 32) if rank is None else rank
        if pi_norm not in ("softmax", "none"):
            raise ValueError(f"pi_norm must be 'softmax' or 'none', got {pi_norm!r}")
        if gate not in ("prob", "renormalized"):
            raise ValueError(f"emoe gate must be 'prob' or 'renormalized', got {gate!r}")
        if ortho_weight < 0 or pi_init_std < 0:
            raise ValueError("ortho_weight and pi_init_std must be >= 0")
        if not isinstance(reestimate_every, int) or reestimate_every < 0:
            raise ValueError(f"reestimate_every must be an int >= 0, got {reestimate_every!r}")
        self.rank, self.ortho_weight, self.pi_norm, self.gate, self.eps = rank, ortho_weight, pi_norm, gate, eps
        self.basis = OrthonormalBasis(dim, rank, mode=ortho)
        self.gamma = nn.Parameter(torch.ones(rank))
        self.pi = nn.Parameter(torch.randn(rank, num_experts) * pi_init_std)
        self.bias = nn.Parameter(torch.zeros(num_experts))
        self.temperature = Temperature(tau, learn_tau)
        self.whitener = EnergyWhitener(rank, stats_momentum) if whiten else nn.Identity()
        self.standardizer = ScoreStandardizer(num_experts, stats_momentum) if standardize else nn.Identity()
        self.reestimate_every, self.stats_momentum = reestimate_every, stats_momentum
        if reestimate_every:
            self.register_buffer("second_moment", torch.zeros(dim, dim))
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._host_steps: int | None = None  # ``steps`` mirrored on the host, read once after construction or a load

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        u_DR = self.basis.matrix
        z_TR = x_TD.to(u_DR.dtype) @ u_DR
        z_TR = upcast(z_TR)
        sq_TR = (z_TR / overflow_safe_scale(z_TR)).pow(2)  # energy fractions are scale-free; huge z would overflow
        energy_TR = sq_TR / (sq_TR.sum(dim=-1, keepdim=True) + self.eps)
        energy_TR = self.whitener(energy_TR)
        pi_RE = upcast(self.pi)
        pi_RE = pi_RE.softmax(dim=-1) if self.pi_norm == "softmax" else pi_RE
        scores_TE = energy_TR @ (upcast(self.gamma).unsqueeze(-1) * pi_RE) + upcast(self.bias)
        probs_TE = self.temperature(self.standardizer(scores_TE)).softmax(dim=-1)
        topk_idx_TK, gates_TK = topk_gates(probs_TE, self.top_k, renormalize=self.gate == "renormalized")
        if self.reestimate_every and self.training:
            self._track_second_moment(x_TD)
        aux = {"ortho": self.ortho_weight * self.basis.penalty()} if self.ortho_weight else {}
        return RouterOutput(probs_TE=probs_TE, topk_idx_TK=topk_idx_TK, gates_TK=gates_TK, aux_losses=aux)

    @torch.no_grad()
    def _track_second_moment(self, x_TD: Tensor) -> None:
        x = x_TD.detach().to(self.second_moment.dtype)
        num = global_count(x.shape[0], self.sync_group, x.device)
        self.second_moment.lerp_(global_sum(x.T @ x, self.sync_group) / at_least_one(num),
                                 update_weight(self.stats_momentum, num, self.second_moment))

    @torch.no_grad()
    def init_from_features(self, features_ND: Tensor) -> None:
        """Set U to the top-R principal directions of the features (EMoE: basis recomputed with the ViT frozen)."""
        self.basis.set_(pca_basis(features_ND.reshape(-1, self.dim), self.rank))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = None

    @torch.no_grad()
    def after_step(self) -> None:
        self.basis.retract()
        if self.reestimate_every and self.training:
            self.steps += 1
            self._host_steps = int(self.steps) if self._host_steps is None else self._host_steps + 1
            if self._host_steps % self.reestimate_every == 0 and self.second_moment.abs().sum() > 0:
                new = top_eigenvectors(self.second_moment, self.rank)
                # Keep each direction's sign so routing does not flip with the eigen-solver's sign choice.
                old = self.basis.matrix.detach().to(new.dtype)
                new = new * torch.where((new * old).sum(0) < 0, -1.0, 1.0)
                self.basis.set_(new)
