"""Regional experts for brain age (ERMoE-ba's reference design, as ermoe reads it; docs/brainage.md, "Regional
experts").

The reference describes three regional experts (grey matter, white matter, CSF), each a regressor of its own
tissue-masked volume (T1 times the tissue map, z-scored inside it), one "free" expert, and a combiner that scores
every expert per volume and keeps the top two above a threshold of 0.5. Its code does not run (undefined region
masks); ermoe builds it from the package's parts:

- **experts**: E = len(regions) + free_experts SFCN trunks (:class:`~ermoe.models.brain.SFCN3d` without a head).
  Expert r < len(regions) reads ``P_r * (x - mu_r) / sigma_r``: the volume times the MNI152 tissue probability map
  ``P_r`` on the data's grid (the same maps the built-in cohort is made from; real data must be registered to MNI,
  as docs/brainage.md asks), z-scored with the ``P_r``-weighted mean and std of that volume. Free experts read the
  volume as it is.
- **router**: any router of the registry (default ``ermoe``, top-2) over one token per volume: the pooled features
  of a small gate CNN of its own, layer-normed as every routed token in ermoe (``gate_norm="layer"``), or
  batch-normed over the volumes (``"batch"``). Layer-normed, every brain's token points almost one way (mean
  pairwise cosine 0.999 at initialisation on the built-in cohort, ``benchmarks/regional_routing_at_init.py``), so
  every volume gets the same experts; batch norm centres the tokens over the volumes, which tells them apart. The
  threshold of the reference is ERMoE's ``threshold`` router option (a cosine: weaker second choices are dropped).
  Routers that set their own capacity (expert choice) do not apply.
- **combination**: one linear head on the gate-weighted sum of the chosen experts' pooled features. (The reference
  weights per-expert heads; with linear heads the two differ by a per-expert linear map before the head.)

Each volume runs the gate CNN and only its chosen experts: active parameters are the gate's plus ``top_k`` trunks.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..routing import ROUTERS, create_router
from ..routing.base import RoutingInfo, tokens_per_expert
from .brain import SFCN3d
from .protocol import RoutedModel, RoutingLayer
from .registry import register_model

REGIONS = ("gm", "wm", "csf")


class VolumeRouting(RoutingLayer):
    """A router over one token per volume; records the decision as :class:`~ermoe.RoutingInfo` for the
    diagnostics (threshold drops as ``-1``) and keeps its weighted auxiliary losses for the model's loss."""

    def __init__(self, dim: int, num_experts: int, router: str, top_k: int,
                 router_kwargs: dict[str, Any] | None) -> None:
        super().__init__()
        self.router = create_router(router, dim, num_experts, top_k, **(router_kwargs or {}))
        if not self.router.layer_capacity or self.router.capacity_factor is not None:
            raise ValueError(f"router {router!r} sets a capacity (it drops or picks volumes per expert); the regional "
                             "experts route every volume: choose a token-choice router without capacity (V-MoE: "
                             "router_kwargs capacity_factor: null)")
        self.num_experts = num_experts
        self.last_routing: RoutingInfo | None = None
        self._aux: Tensor | None = None

    def forward(self, emb_BD: Tensor) -> tuple[Tensor, Tensor]:
        """``(expert_idx_BK, gates_BK)``: the chosen experts (``-1`` where the router dropped a choice)."""
        route = self.router(emb_BD)
        idx_BK = route.topk_idx_TK
        if route.keep_TK is not None:
            idx_BK = idx_BK.masked_fill(~route.keep_TK, -1)
        counts = tokens_per_expert(idx_BK, self.num_experts)  # a scatter-add: no host sync
        self._aux = sum(route.aux_losses.values()) if route.aux_losses else None
        # only a router with a threshold drops choices: then the drop count is read (one sync), else it is 0
        dropped = int((idx_BK < 0).sum()) if route.keep_TK is not None else 0
        self.last_routing = RoutingInfo(
            num_tokens=emb_BD.shape[0], expert_idx=idx_BK.detach(), gates=route.gates_TK.detach(),
            probs=route.probs_TE.detach(), tokens_per_expert=counts.detach(), assigned_per_expert=counts.detach(),
            aux_losses={k: v.detach() for k, v in route.aux_losses.items()}, dropped=dropped,
            assignments=idx_BK.numel())
        return idx_BK, route.gates_TK

    def after_step(self) -> None:
        self.router.after_step()


class RegionalSFCN(RoutedModel):
    """Regional and free SFCN experts chosen per volume (module docstring)."""

    def __init__(self, in_chans: int, volume_shape: Sequence[int], num_outputs: int, channels: Sequence[int],
                 tissue_RXYZ: Tensor, free_experts: int, router: str, top_k: int,
                 router_kwargs: dict[str, Any] | None, gate_channels: Sequence[int], dropout: float,
                 gate_norm: str = "layer") -> None:
        super().__init__()
        self.num_regions = tissue_RXYZ.shape[0]
        num_experts = self.num_regions + free_experts
        self.register_buffer("tissue", tissue_RXYZ.float(), persistent=False)  # fixed by the grid: rebuilt, not saved
        trunk = dict(in_chans=in_chans, volume_shape=volume_shape, num_outputs=1, moe=None, moe_stages=[],
                     dense_ffn=False, dropout=0.0)
        self.experts = nn.ModuleList(SFCN3d(channels=channels, **trunk) for _ in range(num_experts))
        for expert in self.experts:
            expert.head = nn.Identity()  # trunks only: the model has one head
        self.gate_net = SFCN3d(channels=gate_channels, **trunk)
        self.gate_net.head = nn.Identity()
        # pooled ReLU features all point one way: a layer norm centres each token's features, a batch norm each
        # feature over the volumes (module docstring)
        self.gate_norm = (nn.LayerNorm if gate_norm == "layer" else nn.BatchNorm1d)(gate_channels[-1])
        self.routing = VolumeRouting(gate_channels[-1], num_experts, router, top_k, router_kwargs)
        self.num_features = channels[-1]
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(channels[-1], num_outputs)

    def expert_input(self, x: Tensor, expert: int) -> Tensor:
        """What expert ``expert`` reads: a tissue-masked, z-scored volume for a regional expert, else ``x``."""
        if expert >= self.num_regions:
            return x
        p = self.tissue[expert]
        w = p / p.sum().clamp_min(1e-6)
        mu = (x * w).sum(dim=(2, 3, 4), keepdim=True)
        sd = (((x - mu) ** 2) * w).sum(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6).sqrt()
        return p * (x - mu) / sd

    def forward_features(self, x: Tensor) -> Tensor:
        """The gate-weighted sum of the chosen experts' pooled features, ``(B, C)``."""
        if self.training and x.shape[0] < 2 and isinstance(self.gate_norm, nn.BatchNorm1d):
            raise ValueError("regional_sfcn3d(gate_norm='batch') normalises the gate over the batch's volumes: a "
                             f"training batch needs at least 2 volumes, got {x.shape[0]} (use a larger "
                             "optim.batch_size, or gate_norm='layer')")
        emb = self.gate_norm(self.gate_net.forward_features(x).mean(dim=(2, 3, 4)))
        idx_BK, gates_BK = self.routing(emb)
        out = x.new_zeros(x.shape[0], self.num_features)
        for e, expert in enumerate(self.experts):
            # whole volumes per expert: a data-dependent batch size, so one host read per expert (inherent here)
            rows, slot = (idx_BK == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            feats = expert.forward_features(self.expert_input(x[rows], e)).mean(dim=(2, 3, 4))
            out = out.index_add(0, rows, gates_BK[rows, slot].unsqueeze(1).to(feats.dtype) * feats)
        return out

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(self.head_drop(x))

    def aux_loss(self) -> Tensor:
        aux = self.routing._aux
        return aux if aux is not None else self.head.weight.new_zeros(())

    def after_step(self, step: int) -> None:
        self.routing.after_step()

    def active_parameters(self) -> int:
        """The gate CNN, the router, the head and ``top_k`` expert trunks."""
        trunk = sum(p.numel() for p in self.experts[0].parameters())
        return sum(p.numel() for p in self.parameters()) - trunk * (len(self.experts) - self.routing.router.top_k)


def mni_tissue_maps(spacing: float, regions: Sequence[str]) -> Tensor:
    """The MNI152 tissue probability maps (``gm``, ``wm``, ``csf``) on the grid of ``spacing`` mm, ``(R, X, Y, Z)``."""
    from ..data.cohort import Templates

    t = Templates(spacing)
    return torch.from_numpy(np.stack([getattr(t, r) for r in regions])).float()


@register_model("regional_sfcn3d", family="brain",
                description="regional experts (GM, WM, CSF) + free experts, routed per volume (ERMoE-ba reference)")
def regional_sfcn3d(*, in_chans: int = 1, volume_shape: tuple[int, int, int] = (46, 55, 46), num_outputs: int = 1,
                    spacing: float = 4.0, channels: list[int] | None = None, regions: list[str] | None = None,
                    free_experts: int = 1, router: str = "ermoe", top_k: int = 2,
                    router_kwargs: dict[str, Any] | None = None, gate_channels: list[int] | None = None,
                    dropout: float = 0.0, gate_norm: str = "layer") -> RegionalSFCN:
    """``regions`` (default GM, WM, CSF) + ``free_experts`` SFCN trunks of ``channels``, ``top_k`` of them chosen
    per volume by ``router`` over a gate CNN of ``gate_channels`` (default the first three widths); ``spacing``
    (set from the data) places the MNI tissue maps on the volume's grid; ``gate_norm`` (``layer`` or ``batch``)
    normalises the gate's tokens per volume or over the volumes."""
    channels = [8, 16, 32, 64, 64] if channels is None else channels
    gate_channels = channels[:3] if gate_channels is None else gate_channels
    regions = list(REGIONS) if regions is None else regions
    for key, value in (("channels", channels), ("gate_channels", gate_channels)):
        if not value or any(not isinstance(c, int) or c < 1 for c in value):
            raise ValueError(f"{key} must be a non-empty list of positive ints, got {value!r}")
    bad = [r for r in regions if r not in REGIONS]
    if bad or len(set(regions)) != len(regions):
        raise ValueError(f"regions must be distinct names from {list(REGIONS)}, got {regions!r}")
    if not isinstance(free_experts, int) or free_experts < 0 or len(regions) + free_experts < 2:
        raise ValueError(f"free_experts must be an int >= 0 with at least 2 experts in all, got {free_experts!r} "
                         f"with {len(regions)} regions")
    if not isinstance(top_k, int) or not 1 <= top_k <= len(regions) + free_experts:
        raise ValueError(f"top_k must be in [1, {len(regions) + free_experts}], got {top_k!r}")
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose from {sorted(ROUTERS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if gate_norm not in ("layer", "batch"):
        raise ValueError(f"gate_norm must be 'layer' or 'batch', got {gate_norm!r}")
    tissue = mni_tissue_maps(spacing, regions) if regions else torch.zeros(0, *volume_shape)
    if tuple(tissue.shape[1:]) != tuple(volume_shape):
        raise ValueError(f"the MNI grid at {spacing} mm is {tuple(tissue.shape[1:])}, the volumes are "
                         f"{tuple(volume_shape)}: spacing must be the data's (data.spacing)")
    return RegionalSFCN(in_chans, volume_shape, num_outputs, channels, tissue, free_experts, router, top_k,
                        router_kwargs, gate_channels, dropout, gate_norm)
