"""What every router returns, what a layer keeps of it, and the base class.

Shape suffixes: T tokens, D model dim, E experts, K experts per token (top-k), C tokens per expert (expert choice),
R basis rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..registry import Registry
from .sync import SyncGroup


@dataclass
class RouterOutput:
    """A routing decision for T tokens. Tensors keep their autograd graph (gates, aux losses).

    Token choice (every router but expert choice): ``topk_idx_TK`` and ``gates_TK``; ``keep_TK`` may mark selections
    the router itself drops (ERMoE's score threshold); ``priority_TK`` orders tokens when capacity runs out (V-MoE's
    Batch Prioritized Routing), else token order is used. ``expert_inputs_TKR`` replaces the token as the input of the
    chosen expert (ERMoE: the token's coordinates in that expert's basis, already computed for the score).

    Expert choice: ``token_idx_EC`` and ``gates_EC`` (each expert's chosen tokens and their weights).
    """

    probs_TE: Tensor
    topk_idx_TK: Tensor | None = None
    gates_TK: Tensor | None = None
    keep_TK: Tensor | None = None
    priority_TK: Tensor | None = None
    expert_inputs_TKR: Tensor | None = None
    token_idx_EC: Tensor | None = None
    gates_EC: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)

    @property
    def expert_choice(self) -> bool:
        return self.token_idx_EC is not None


@dataclass
class RoutingInfo:
    """Detached facts about a layer's last forward, for logging and analysis (``MoE.last_routing``).

    ``expert_idx`` is ``(T, K)`` for token-choice routers (``-1`` where a selection was dropped) and, for expert
    choice, the ``(E, C)`` token indices each expert took. ``tokens_per_expert`` counts the assignments each expert
    computed (after drops); ``assigned_per_expert`` counts what the router asked for (before capacity drops).
    """

    num_tokens: int
    expert_idx: Tensor
    gates: Tensor
    probs: Tensor
    tokens_per_expert: Tensor
    assigned_per_expert: Tensor
    aux_losses: dict[str, Tensor]
    dropped: int
    assignments: int
    choice: Literal["token", "expert"] = "token"

    @property
    def drop_rate(self) -> float:
        return self.dropped / self.assignments if self.assignments else 0.0


class Router(nn.Module):
    """Base class: ``forward(x_TD, context_TD=None) -> RouterOutput``.

    Subclasses set ``num_experts`` and ``top_k``; a router that models and configs find by name has a ``name`` and the
    decorator :func:`register_router`; ``capacity_factor`` is the router's default for the layer (None:
    dropless); ``layer_capacity=False`` marks a router that sets its own capacity (expert choice), so the layer's
    ``capacity_factor`` does not apply to it; ``learn_alpha`` is whether its paper scales the layer's output by a
    learned alpha (EMoE). State that changes outside gradient descent changes in :meth:`after_step`, which the trainer
    calls after ``optimizer.step()`` through ``ermoe.after_step(model)``.
    """

    name: str  # the name configs give (``moe.router``), for a registered router
    num_experts: int
    top_k: int
    capacity_factor: float | None = None
    layer_capacity: bool = True
    learn_alpha: bool = False
    accepts_context: bool = False
    # A positive control rather than a routing method (the oracle): not in ``list_routers()`` unless asked for.
    control: bool = False
    # Experts operate on the router's per-expert projections instead of the token (ERMoE).
    expert_input_dim: int | None = None
    # Data-parallel group over which batch statistics and auxiliary losses are summed (ermoe.routing.sync).
    sync_group: SyncGroup | None = None

    def __init__(self, dim: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k

    def __getstate__(self) -> dict:
        return graph_free_state(self)

    def after_step(self) -> None:
        """Called after each optimizer step; default: nothing to do."""

    def init_from_features(self, features_ND: Tensor) -> None:
        """Initialise from sample input features (e.g. PCA bases); routers without data-dependent state refuse."""
        raise NotImplementedError(f"{type(self).__name__} has no data-dependent initialisation")

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:  # pragma: no cover
        raise NotImplementedError


ROUTERS: Registry[type[Router]] = Registry("router")


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: ``MoE(router=cls.name)``, every model's ``moe.router`` and ``ermoe.list_routers()`` know the
    router from then on (a name registered twice is an error)."""
    return ROUTERS.register(cls)


def graph_free_state(module: nn.Module) -> dict:
    """``module.__dict__`` without the per-forward tensors that hold an autograd graph (an auxiliary loss, gates
    kept for a loss term): what ``copy.deepcopy`` and ``pickle`` see, so an EMA copy or a best-model snapshot of a
    trained module works. The copy simply has not run a forward yet."""
    return {k: None if isinstance(v, Tensor) and v.grad_fn is not None else v for k, v in module.__dict__.items()}


def overflow_safe_scale(x_TD: Tensor) -> Tensor:
    """Per token, a power of two ``s`` (shape ``(T, 1)``) such that the squares of ``x / s`` cannot overflow: 1 for
    every token whose largest entry is below 2**50, so ordinary inputs are computed exactly as written; dividing by a
    power of two is exact. For scale-invariant quantities (cosines, energy fractions) of huge finite tokens."""
    amax_T1 = x_TD.abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(amax_T1)
    return torch.ldexp(torch.ones_like(amax_T1), (exponent - 50).clamp_min(0))


def upcast(x: Tensor) -> Tensor:
    """Half-precision routing math (e.g. under autocast) in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def topk_gates(probs_TE: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k experts of each token and their gate weights (the probabilities, renormalised over the k if asked)."""
    gates_TK, idx_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize:
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates_TK.dtype).tiny)
    return idx_TK, gates_TK


def count_per_expert(idx: Tensor, num_experts: int) -> Tensor:
    """How many entries of ``idx`` (any shape, values in [0, num_experts)) name each expert.

    A scatter-add rather than ``bincount``, which reads the largest index back to the host (a GPU sync).
    """
    flat = idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


def tokens_per_expert(idx: Tensor, num_experts: int) -> Tensor:
    """How many selections each expert received (``idx`` any shape, entries < 0 ignored)."""
    flat = idx.reshape(-1)
    return count_per_expert(torch.where(flat >= 0, flat, num_experts), num_experts + 1)[:num_experts]
