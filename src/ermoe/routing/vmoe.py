"""V-MoE router (Riquelme et al. 2021): noisy top-k, importance and load losses, Batch Prioritized Routing.

In training, Gaussian noise of std ``noise_std / E`` is added to the logits and the gates are the softmax of the
noisy logits (as V-MoE's ``NoisyTopExpertsPerItemRouter``); in evaluation there is no noise. With BPR the tokens with
the highest gate fill each expert's capacity first (the layer applies the capacity; default factor 1.05).

Shape suffixes: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Router, RouterOutput, register_router, topk_gates, upcast
from .losses import importance_loss, vmoe_load_loss
from .softmax import linear_gate


@register_router
class VMoERouter(Router):
    name = "vmoe"
    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, noise_std: float = 1.0,
                 importance_weight: float = 0.005, load_weight: float = 0.005,
                 capacity_factor: float | None = 1.05, batch_prioritized: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__(dim, num_experts, top_k)
        if noise_std < 0 or importance_weight < 0 or load_weight < 0:
            raise ValueError("noise_std, importance_weight and load_weight must be >= 0")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
        self.noise_std, self.importance_weight, self.load_weight = noise_std, importance_weight, load_weight
        self.capacity_factor, self.batch_prioritized = capacity_factor, batch_prioritized
        self.gate = linear_gate(dim, num_experts, init_std)

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        logits_TE = upcast(self.gate(x_TD))
        probs_TE = logits_TE.softmax(dim=-1)
        aux = {}
        if self.importance_weight:
            aux["importance"] = self.importance_weight * importance_loss(probs_TE, self.sync_group)
        std = self.noise_std / self.num_experts
        if self.training and std > 0:
            noisy_TE = logits_TE + std * torch.randn_like(logits_TE)
            probs_TE = noisy_TE.softmax(dim=-1)
            if self.load_weight:
                aux["load"] = self.load_weight * vmoe_load_loss(logits_TE, noisy_TE, std, self.top_k, self.sync_group)
        topk_idx_TK, gates_TK = topk_gates(probs_TE, self.top_k)
        # BPR: priority is the token's largest gate, shared by its k selections.
        priority_TK = gates_TK[:, :1].detach().expand_as(gates_TK) if self.batch_prioritized else None
        return RouterOutput(probs_TE=probs_TE, topk_idx_TK=topk_idx_TK, gates_TK=gates_TK,
                            priority_TK=priority_TK, aux_losses=aux)
