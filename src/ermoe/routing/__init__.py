"""Routers by name. ``create_router(name, dim, num_experts, top_k, **kwargs)``; ``list_routers()``; a new router
class registers itself with ``@register_router`` (and a ``name``)."""

from __future__ import annotations

import typing
from typing import Any

from ..settings import check
from .base import ROUTERS, Router, RouterOutput, RoutingInfo, register_router
# Importing each router family registers its routers (@register_router), in this order
from .energy import EigenEnergyRouter
from .eigenbasis import EigenbasisRouter, default_eigen_rank
from .softmax import LossFreeBiasRouter, SoftmaxTopKRouter
from .vmoe import VMoERouter
from .cosine import CosineRouter
from .expert_choice import ExpertChoiceRouter
from .oracle import OracleRouter, routed_by


def list_routers(controls: bool = False) -> list[str]:
    """The routing methods ``ermoe.MoE(router=...)`` accepts by name; ``controls``: with the positive controls
    (``oracle``, which routes by the data's ground truth and runs only where that is given, ``routed_by``)."""
    return [name for name in ROUTERS if controls or not ROUTERS[name].control]


def check_router_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a keyword router ``name`` does not take, or a value of the wrong type."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known routers: {', '.join(ROUTERS)}")
    hints = typing.get_type_hints(ROUTERS[name].__init__)
    for key, value in kwargs.items():
        if key in ("dim", "num_experts", "top_k", "return") or key not in hints:
            raise ValueError(f"router {name!r} takes no keyword {key!r}; it takes: "
                             f"{', '.join(k for k in hints if k not in ('dim', 'num_experts', 'top_k', 'return'))}")
        check(value, hints[key], f"router {name!r}: {key}")  # strictly, as every setting (ermoe.settings)


def create_router(name: str, dim: int, num_experts: int, top_k: int = 1, **kwargs: Any) -> Router:
    """Build a router by name; unknown names, unknown keyword arguments and values of the wrong type raise
    ``ValueError``."""
    check_router_kwargs(name, kwargs)
    cls = ROUTERS[name]
    try:
        return cls(dim, num_experts, top_k, **kwargs)
    except TypeError as err:  # an unknown keyword: say which router rejected it
        raise ValueError(f"router {name!r}: {err}") from err


__all__ = ["ROUTERS", "Router", "RouterOutput", "RoutingInfo", "check_router_kwargs", "create_router", "list_routers",
           "register_router",
           "CosineRouter", "EigenbasisRouter", "EigenEnergyRouter", "ExpertChoiceRouter", "LossFreeBiasRouter", "OracleRouter",
           "SoftmaxTopKRouter", "VMoERouter", "default_eigen_rank", "routed_by"]
