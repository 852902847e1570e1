"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    p = softmax(W x) over experts;  expert e takes the C tokens with the largest p_{t,e};  gate = p_{t,e}
    C = ceil(top_k * capacity_factor * T / E)   (top_k: the average experts per token)

Balanced by construction, no auxiliary loss; a token may be taken by several experts or by none.

Shape suffixes: T tokens, D model dim, E experts, C tokens per expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Router, RouterOutput, register_router, upcast
from .softmax import linear_gate


@register_router
class ExpertChoiceRouter(Router):
    name = "expert_choice"
    layer_capacity = False  # its capacity is its own keyword capacity_factor, above

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, capacity_factor: float = 1.0,
                 init_std: float = 0.02) -> None:
        super().__init__(dim, num_experts, top_k)
        if capacity_factor <= 0:
            raise ValueError(f"expert_choice capacity_factor must be > 0, got {capacity_factor!r}")
        self.choice_capacity_factor = capacity_factor
        self.gate = linear_gate(dim, num_experts, init_std)

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(self.top_k * self.choice_capacity_factor * num_tokens / self.num_experts))

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        probs_TE = upcast(self.gate(x_TD)).softmax(dim=-1)
        gates_EC, token_idx_EC = torch.topk(probs_TE.T, self.capacity(x_TD.shape[0]), dim=-1)
        return RouterOutput(probs_TE=probs_TE, token_idx_EC=token_idx_EC, gates_EC=gates_EC)
