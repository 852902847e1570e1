"""Learned linear gates: Switch/GShard softmax top-k, and auxiliary-loss-free bias balancing.

Shape suffixes: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .base import Router, RouterOutput, register_router, tokens_per_expert, topk_gates, upcast
from .losses import router_z_loss, switch_balancing_loss
from .sync import global_sum


def linear_gate(dim: int, num_experts: int, std: float = 0.02) -> nn.Linear:
    """The router's ``x -> logits`` map: no bias, small normal init (as torchtitan; zeros would tie every expert)."""
    gate = nn.Linear(dim, num_experts, bias=False)
    nn.init.normal_(gate.weight, std=std)
    return gate


@register_router
class SoftmaxTopKRouter(Router):
    """Switch (Fedus et al. 2021) / GShard (Lepikhin et al. 2020): ``p = softmax(W x)``, top-k, gate = p.

    Auxiliary losses, each with its weight: ``balance_weight * E * sum_i f_i P_i`` (Switch eq. 4), ``z_loss_weight *``
    router z-loss (ST-MoE). ``jitter_eps``: multiplicative uniform noise ``U(1-eps, 1+eps)`` on the router input in
    training (Switch). ``renormalize``: gates renormalised over the k selected experts (GShard top-2).
    """
    name = "softmax_topk"

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, balance_weight: float = 0.01,
                 z_loss_weight: float = 0.0, jitter_eps: float = 0.0, renormalize: bool = False,
                 init_std: float = 0.02) -> None:
        super().__init__(dim, num_experts, top_k)
        for name, value in (("balance_weight", balance_weight), ("z_loss_weight", z_loss_weight),
                            ("jitter_eps", jitter_eps)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if jitter_eps >= 1:
            raise ValueError(f"jitter_eps must be < 1, got {jitter_eps!r}")
        self.balance_weight, self.z_loss_weight = balance_weight, z_loss_weight
        self.jitter_eps, self.renormalize = jitter_eps, renormalize
        self.gate = linear_gate(dim, num_experts, init_std)

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        if self.training and self.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits_TE = upcast(self.gate(x_TD))
        probs_TE = logits_TE.softmax(dim=-1)
        topk_idx_TK, gates_TK = topk_gates(probs_TE, self.top_k, self.renormalize)
        aux = {}
        if self.balance_weight:
            aux["balance"] = self.balance_weight * switch_balancing_loss(probs_TE, topk_idx_TK, self.sync_group)
        if self.z_loss_weight:
            aux["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE, self.sync_group)
        return RouterOutput(probs_TE=probs_TE, topk_idx_TK=topk_idx_TK, gates_TK=gates_TK, aux_losses=aux)


@register_router
class LossFreeBiasRouter(Router):
    """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3).

    Selection uses ``s_i + b_i``; gate weights use the unbiased ``s_i`` (softmax probabilities by default, or
    sigmoid scores as DeepSeek-V3, renormalised over the k selected). The bias is not learned by gradient: after each
    optimizer step, :meth:`after_step` applies ``b_i += update_rate * sign(mean load - load_i)`` with the loads
    counted over the training forwards since the last step. Evaluation neither counts loads nor moves the bias.
    """
    name = "loss_free_bias"

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, update_rate: float = 1e-3,
                 score_fn: Literal["softmax", "sigmoid"] = "softmax", renormalize: bool | None = None,
                 init_std: float = 0.02) -> None:
        super().__init__(dim, num_experts, top_k)
        if score_fn not in ("softmax", "sigmoid"):
            raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
        if update_rate < 0:
            raise ValueError(f"update_rate must be >= 0, got {update_rate!r}")
        self.update_rate, self.score_fn = update_rate, score_fn
        # DeepSeek-V3 renormalises sigmoid gates over the selected experts; with top-1 that would freeze the gate at 1.
        self.renormalize = (score_fn == "sigmoid" and top_k > 1) if renormalize is None else renormalize
        self.gate = linear_gate(dim, num_experts, init_std)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("load_since_step", torch.zeros(num_experts))

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        logits_TE = upcast(self.gate(x_TD))
        scores_TE = logits_TE.softmax(dim=-1) if self.score_fn == "softmax" else logits_TE.sigmoid()
        topk_idx_TK = torch.topk(scores_TE + self.expert_bias.to(scores_TE.dtype), self.top_k, dim=-1).indices
        gates_TK = scores_TE.gather(1, topk_idx_TK)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.training:
            with torch.no_grad():
                self.load_since_step += tokens_per_expert(topk_idx_TK, self.num_experts).to(self.load_since_step)
        probs_TE = scores_TE if self.score_fn == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        return RouterOutput(probs_TE=probs_TE, topk_idx_TK=topk_idx_TK, gates_TK=gates_TK)

    @torch.no_grad()
    def after_step(self) -> None:
        load = self.load_since_step
        if self.sync_group is not None:  # every rank moves the bias by the global batch's loads
            load.copy_(global_sum(load, self.sync_group))
        # No branch on the loads (a host read every step): with no load counted, sign(mean - load) is 0 throughout
        self.expert_bias += self.update_rate * torch.sign(load.mean() - load)
        load.zero_()
