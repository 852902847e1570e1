"""The layers whose routing the diagnostics read, whatever model they sit in."""

from __future__ import annotations

from torch import nn

from ..routing.base import RoutingInfo
from .deepmoe import GatedConv
from .vit import PatchMoE


def routed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every routing layer with its qualified name: :class:`PatchMoE` (token routing, ViTs and the single-gated
    ViT) and DeepMoE's :class:`GatedConv` (channels as experts)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (PatchMoE, GatedConv))]


def num_experts(layer: nn.Module) -> int:
    return layer.moe.num_experts if isinstance(layer, PatchMoE) else layer.num_experts


def last_routing(layer: nn.Module) -> RoutingInfo | None:
    return layer.moe.last_routing if isinstance(layer, PatchMoE) else layer.last_routing
