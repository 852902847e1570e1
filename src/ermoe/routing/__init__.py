"""Routers by name. ``create_router(name, dim, num_experts, top_k, **kwargs)``; ``list_routers()``."""

from __future__ import annotations

from typing import Any

from .base import Router, RouterOutput, RoutingInfo
from .cosine import CosineRouter
from .eigenbasis import EigenbasisRouter, default_eigen_rank
from .energy import EigenEnergyRouter
from .expert_choice import ExpertChoiceRouter
from .softmax import LossFreeBiasRouter, SoftmaxTopKRouter
from .vmoe import VMoERouter

ROUTERS: dict[str, type[Router]] = {
    "emoe": EigenEnergyRouter,
    "ermoe": EigenbasisRouter,
    "softmax_topk": SoftmaxTopKRouter,
    "vmoe": VMoERouter,
    "loss_free_bias": LossFreeBiasRouter,
    "cosine": CosineRouter,
    "expert_choice": ExpertChoiceRouter,
}


def list_routers() -> list[str]:
    """The names accepted by ``ermoe.MoE(router=...)``."""
    return list(ROUTERS)


def create_router(name: str, dim: int, num_experts: int, top_k: int = 1, **kwargs: Any) -> Router:
    """Build a router by name; unknown names and unknown keyword arguments raise ``ValueError``."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known routers: {', '.join(ROUTERS)}")
    cls = ROUTERS[name]
    try:
        return cls(dim, num_experts, top_k, **kwargs)
    except TypeError as err:  # an unknown keyword: say which router rejected it
        raise ValueError(f"router {name!r}: {err}") from err


__all__ = ["ROUTERS", "Router", "RouterOutput", "RoutingInfo", "create_router", "list_routers",
           "CosineRouter", "EigenbasisRouter", "EigenEnergyRouter", "ExpertChoiceRouter", "LossFreeBiasRouter",
           "SoftmaxTopKRouter", "VMoERouter", "default_eigen_rank"]
