"""Cosine routing (X-MoE, Chi et al. 2022): routing in a low-dimensional space with normalised expert embeddings.

    s_i = cos(W x, e_i) / tau        W: D -> d_route, e_i: learned expert embeddings, tau learned (init 0.07)
    p = softmax(s); top-k; gate = p. X-MoE keeps the Switch balancing loss (``balance_weight``, 0 to switch off).

Shape suffixes: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Router, RouterOutput, register_router, topk_gates, upcast
from .common import Temperature
from .losses import switch_balancing_loss


@register_router
class CosineRouter(Router):
    name = "cosine"
    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, route_dim: int = 16, tau: float = 0.07,
                 learn_tau: bool = True, balance_weight: float = 0.01) -> None:
        super().__init__(dim, num_experts, top_k)
        if route_dim < 1:
            raise ValueError(f"route_dim must be >= 1, got {route_dim!r}")
        if balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {balance_weight!r}")
        self.balance_weight = balance_weight
        self.proj = nn.Linear(dim, route_dim, bias=False)
        self.expert_embed = nn.Parameter(torch.empty(num_experts, route_dim))
        nn.init.orthogonal_(self.expert_embed)
        self.temperature = Temperature(tau, learn_tau)

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        h_TR = F.normalize(upcast(self.proj(x_TD)), dim=-1)
        cos_TE = h_TR @ F.normalize(upcast(self.expert_embed), dim=-1).T
        probs_TE = self.temperature(cos_TE).softmax(dim=-1)
        topk_idx_TK, gates_TK = topk_gates(probs_TE, self.top_k)
        aux = {}
        if self.balance_weight:
            aux["balance"] = self.balance_weight * switch_balancing_loss(probs_TE, topk_idx_TK, self.sync_group)
        return RouterOutput(probs_TE=probs_TE, topk_idx_TK=topk_idx_TK, gates_TK=gates_TK, aux_losses=aux)
