"""ERMoE's Eigenbasis Score router (Cheng et al., "ERMoE: Eigen-reparameterized Mixture-of-Experts";
docs/method.md, section 2).

Each expert e owns an orthonormal basis U_e (D x R), and the expert computes in it: its first layer is U_e^T h
(see :class:`ermoe.experts.EigenExperts`, which receives these coordinates from the router, so they are computed once).

    score_e(h) = ||U_e^T h|| / (||h|| + eps)              projection cosine, in [0, 1]
    score_e(h) = cos(U_e^T h, U_e^T c)                    option score="context", c: the token's attention context
    p = softmax(score / tau); top-k by p; an optional threshold drops selections below it (never the top one);
    gate = the selected scores renormalised to sum to 1 (gate="renormalized", the paper's reading; context cosines
    are first mapped to [0, 1] by (1 + cos) / 2 so the weights stay non-negative), the raw score
    (gate="score"), or p (gate="prob").

Options from docs/method.md, section 7, each off by default: ``learn_tau``/``tau``, ``mutually_orthogonal``
(the E bases split
R^D), ``standardize`` (per-expert score standardisation) and PCA initialisation through :meth:`init_from_features`.

Shape suffixes: T tokens, D model dim, E experts, K top-k, R basis rank.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..orthogonal import OrthoMode, OrthonormalBasis, pca_basis
from .base import Router, RouterOutput, overflow_safe_scale, register_router, upcast
from .common import ScoreStandardizer, Temperature


def default_eigen_rank(dim: int, num_experts: int) -> int:
    """``min(32, dim // E)`` rounded down to a multiple of 4, at least 4, below dim (for ``dim <= 4``:
    ``max(1, dim // E)``). (The experts' grouped matmul pads a rank that is not a multiple of its alignment, 8 in
    bf16, with zeros: any rank takes the grouped path.)

    ``dim // E`` lets the E bases be mutually orthogonal; the cap of 32 bounds the router's projection (a D x E*R
    matmul that every token pays for), which keeps ERMoE's cost near a dense FFN's (docs/performance.md). A basis
    of the full dimension would give every token the same score for every expert (see EigenbasisRouter).
    """
    rank = max(4, min(32, dim // num_experts) // 4 * 4)
    return rank if rank < dim else max(1, min(dim - 1, dim // num_experts))


@register_router
class EigenbasisRouter(Router):
    name = "ermoe"
    accepts_context = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        rank: int | None = None,
        ortho: OrthoMode = "qr",
        ortho_weight: float = 1e-3,
        mutually_orthogonal: bool = False,
        score: Literal["projection", "context"] = "projection",
        tau: float = 1.0,
        learn_tau: bool = False,
        gate: Literal["renormalized", "score", "prob"] = "renormalized",
        threshold: float | None = None,
        standardize: bool = False,
        stats_momentum: float = 0.1,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(dim, num_experts, top_k)
        rank = default_eigen_rank(dim, num_experts) if rank is None else rank
        if not 1 <= rank < dim:
            # An orthonormal basis of all D directions keeps every token's norm (and every inner product): each
            # expert's Eigenbasis Score would be 1 (or the same cosine), and routing a tie.
            raise ValueError(f"ermoe rank must be in [1, dim) = [1, {dim}), got {rank}: a basis spanning the whole "
                             "token space gives every expert the same score")
        if score not in ("projection", "context"):
            raise ValueError(f"ermoe score must be 'projection' or 'context', got {score!r}")
        if gate not in ("renormalized", "score", "prob"):
            raise ValueError(f"ermoe gate must be 'renormalized', 'score' or 'prob', got {gate!r}")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise ValueError(f"ermoe threshold must be a cosine in [-1, 1] or None, got {threshold!r}")
        if threshold is not None and top_k == 1:
            # The threshold drops weak selections but never a token's first one: with one selection it does nothing.
            raise ValueError("ermoe threshold applies only with top_k > 1 (the top selection is never dropped)")
        if ortho_weight < 0:
            raise ValueError(f"ortho_weight must be >= 0, got {ortho_weight!r}")
        if learn_tau and gate != "prob":
            # tau only enters p; with score gates it changes the selection alone, which has no gradient.
            raise ValueError(f"ermoe learn_tau=True needs gate='prob' (tau gets no gradient with gate={gate!r})")
        self.rank, self.score, self.gate, self.threshold = rank, score, gate, threshold
        self.ortho_weight, self.eps = ortho_weight, eps
        self.expert_input_dim = rank
        self.basis = OrthonormalBasis(dim, rank, batch=(num_experts,), mode=ortho, joint=mutually_orthogonal)
        self.temperature = Temperature(tau, learn_tau)
        self.standardizer = ScoreStandardizer(num_experts, stats_momentum) if standardize else nn.Identity()

    def project(self, x_TD: Tensor) -> Tensor:
        """Coordinates of every token in every expert's basis, ``(T, E, R)``: one (D x E*R) matmul."""
        u_EDR = self.basis.matrix
        u_DX = u_EDR.permute(1, 0, 2).reshape(self.dim, self.num_experts * self.rank)
        return (x_TD.to(u_DX.dtype) @ u_DX).view(-1, self.num_experts, self.rank)

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        z_TER = self.project(x_TD)
        if self.score == "context":
            if context_TD is None:
                raise ValueError("ermoe router with score='context' needs a context tensor: layer(x, context=c)")
            zc_TER = upcast(self.project(context_TD))
            zf_TER = upcast(z_TER)
            scores_TE = (zf_TER * zc_TER).sum(-1) / (zf_TER.norm(dim=-1) * zc_TER.norm(dim=-1) + self.eps)
        else:
            s_T1 = overflow_safe_scale(upcast(x_TD))  # 1 unless a token is huge: then its norms would overflow
            scores_TE = ((upcast(z_TER) / s_T1.unsqueeze(-1)).norm(dim=-1)
                         / ((upcast(x_TD) / s_T1).norm(dim=-1, keepdim=True) + self.eps))
        probs_TE = self.temperature(self.standardizer(scores_TE)).softmax(dim=-1)
        topk_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1).indices
        sel_scores_TK = scores_TE.gather(1, topk_idx_TK)
        keep_TK = None
        if self.threshold is not None:
            keep_TK = sel_scores_TK >= self.threshold
            keep_TK[:, 0] = True  # never drop every expert of a token
        gates_TK = self._gates(sel_scores_TK, probs_TE.gather(1, topk_idx_TK), keep_TK)
        expert_inputs_TKR = z_TER.gather(1, topk_idx_TK.unsqueeze(-1).expand(-1, -1, self.rank))
        aux = {"ortho": self.ortho_weight * self.basis.penalty()} if self.ortho_weight else {}
        return RouterOutput(probs_TE=probs_TE, topk_idx_TK=topk_idx_TK, gates_TK=gates_TK, keep_TK=keep_TK,
                            expert_inputs_TKR=expert_inputs_TKR, aux_losses=aux)

    def _gates(self, sel_scores_TK: Tensor, sel_probs_TK: Tensor, keep_TK: Tensor | None) -> Tensor:
        if self.gate == "prob":
            return sel_probs_TK
        if self.gate == "score":
            return sel_scores_TK
        # Renormalised scores. Context cosines live in [-1, 1]: mapped to [0, 1] by (1 + cos) / 2 first.
        w_TK = (1.0 + sel_scores_TK) / 2.0 if self.score == "context" else sel_scores_TK
        if keep_TK is not None:
            w_TK = w_TK * keep_TK
        return w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(self.eps)

    @torch.no_grad()
    def init_from_features(self, features_ND: Tensor) -> None:
        """Give the experts the top E*R principal directions of the features, dealt round-robin.

        Expert e gets directions e, e+E, e+2E, ... so that every expert starts with a similar share of the variance
        (contiguous blocks would hand expert 0 the dominant directions and with them most tokens). Needs E*R <= D.
        """
        total = self.num_experts * self.rank
        if total > self.dim:
            raise ValueError(f"PCA initialisation of ERMoE bases needs num_experts*rank <= dim, "
                             f"got {self.num_experts}*{self.rank}={total} > {self.dim}")
        top_DX = pca_basis(features_ND.reshape(-1, self.dim), total)
        u_EDR = top_DX.view(self.dim, self.rank, self.num_experts).permute(2, 0, 1)
        self.basis.set_(u_EDR.contiguous())

    def after_step(self) -> None:
        self.basis.retract()
