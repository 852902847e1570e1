"""Brain-age models over 3D volumes (docs/method.md, section 3): a plain 3D CNN in the SFCN style, the same CNN with
MoE layers over its feature-map cells, and a 3D ViT over volumetric patches with MoE layers (ERMoE-ba's backbone).

- ``sfcn3d``: Peng et al. 2021's fully convolutional network, scaled by ``channels``: per stage Conv3d 3^3 ->
  BatchNorm -> (max-pool 2) -> ReLU, the last stage without pooling and with a 1^3 conv; then global average pooling
  and a linear head with ``num_outputs`` outputs (1: age in standardised units; more: soft-label age bins).
  ``moe`` puts an MoE after the chosen stages (``moe_stages``): every cell of the ``(C, x, y, z)`` feature map is a
  token, and the layer adds ``MoE(LayerNorm(tokens))`` to the map (a residual token-wise FFN, as in a transformer
  block). ``dense_ffn=True`` puts a dense FFN of the same active size there instead: the fair dense reference.
- ``vit3d``: timm's ``VisionTransformer`` with a Conv3d patch embedding of ``patch_size``^3 voxels (the ERMoE-ba
  reference: 7^3 patches of the 2 mm grid, width 256, depth 4, 4 heads); MoE layers as in :mod:`ermoe.models.vit`.

Every model knows its token grid (``token_grid``), so expert maps can be drawn over the anatomy.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn
from timm.models.vision_transformer import VisionTransformer

from ..moe import MoE
from .checkpointing import checkpointed
from .protocol import RoutedModel, TokenMoELayer
from .registry import register_model
from .vit import GlobalPool, MoESpec, MoEViT, _check_choice, vit_model


def _over_cells(x: Tensor, norm: nn.Module, fn: nn.Module) -> Tensor:
    """``x + fn(norm(cells))`` for a ``(B, C, X, Y, Z)`` map whose cells (x-major order) are the tokens."""
    y = fn(norm(x.flatten(2).transpose(1, 2)))
    return x + y.transpose(1, 2).reshape(x.shape)


class CellMoE(TokenMoELayer):
    """An MoE over the cells of a 3D feature map: ``x + MoE(LayerNorm(cells))``, reshaped back."""

    def __init__(self, channels: int, moe: MoE) -> None:
        super().__init__()
        self.norm, self.moe = nn.LayerNorm(channels), moe

    def forward(self, x: Tensor) -> Tensor:
        return _over_cells(x, self.norm, self.moe)


class CellFFN(nn.Module):
    """The dense counterpart of :class:`CellMoE`: ``x + FFN(LayerNorm(cells))``."""

    def __init__(self, channels: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, channels))

    def forward(self, x: Tensor) -> Tensor:
        return _over_cells(x, self.norm, self.ffn)


class SFCN3d(RoutedModel):
    """The SFCN-style 3D CNN (module docstring); ``features(x)`` is the last stage's map, the head pools it."""

    def __init__(self, in_chans: int, volume_shape: Sequence[int], num_outputs: int, channels: Sequence[int],
                 moe: MoESpec | None, moe_stages: Sequence[int], dense_ffn: bool, dropout: float) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.cells = nn.ModuleDict()
        grid = list(volume_shape)
        prev = in_chans
        last = len(channels) - 1
        chosen = sorted({s % len(channels) for s in moe_stages}) if (moe is not None or dense_ffn) else []
        self.grids: dict[str, tuple[int, int, int]] = {}
        for i, out in enumerate(channels):
            kernel, pool = (1, False) if i == last else (3, True)
            layers: list[nn.Module] = [nn.Conv3d(prev, out, kernel, padding=kernel // 2), nn.BatchNorm3d(out)]
            if pool:
                layers.append(nn.MaxPool3d(2))
                grid = [g // 2 for g in grid]
            layers.append(nn.ReLU(inplace=True))
            self.stages.append(nn.Sequential(*layers))
            if i in chosen:
                hidden = (moe.hidden_dim if moe is not None and moe.hidden_dim else 4 * out)
                self.cells[str(i)] = CellFFN(out, hidden) if moe is None else CellMoE(out, MoE(
                    out, hidden, moe.num_experts, moe.router, moe.top_k, capacity_factor=moe.capacity_factor,
                    learn_alpha=moe.learn_alpha, router_kwargs=dict(moe.router_kwargs)))
                self.grids[str(i)] = tuple(grid)  # type: ignore[assignment]
            prev = out
        if min(grid) < 1:
            raise ValueError(f"volume_shape {tuple(volume_shape)} is too small for {len(channels) - 1} pooling stages")
        self.num_features = prev
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(prev, num_outputs)

    @property
    def token_grid(self) -> dict[str, tuple[int, int, int]]:
        """Each MoE layer's feature-map grid, by the layer's qualified name (cells are tokens in x-major order)."""
        return {f"cells.{k}": v for k, v in self.grids.items() if isinstance(self.cells[k], CellMoE)}

    @property
    def token_sites(self) -> dict[str, tuple[nn.Module, tuple[int, int, int]]]:
        """Each cell layer's token module (the MoE, or the dense FFN of ``dense_ffn``) and grid."""
        return {f"cells.{k}": (cell.moe if isinstance(cell, CellMoE) else cell.ffn, self.grids[k])
                for k, cell in self.cells.items()}

    checkpoint: bool = False  # activation checkpointing of the stages (set_grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each convolution stage and MoE (their BatchNorm statistics and routers' buffers restored after
        the recomputation: :mod:`ermoe.models.checkpointing`)."""
        self.checkpoint = enable

    def forward_features(self, x: Tensor) -> Tensor:
        run = checkpointed if self.checkpoint else (lambda module, t: module(t))
        for i, stage in enumerate(self.stages):
            x = run(stage, x)
            if str(i) in self.cells:
                x = run(self.cells[str(i)], x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3, 4))
        return x if pre_logits else self.head(self.head_drop(x))


def _moe_spec(moe: MoESpec | dict[str, Any] | None) -> MoESpec | None:
    return MoESpec(**moe) if isinstance(moe, dict) else moe


@register_model("sfcn3d", family="brain", description="SFCN-style 3D CNN; MoE over feature-map cells as an option")
def sfcn3d(*, in_chans: int = 1, volume_shape: tuple[int, int, int] = (46, 55, 46), num_outputs: int = 1,
           channels: list[int] | None = None, moe: MoESpec | dict[str, Any] | None = None,
           moe_stages: list[int] | None = None, dense_ffn: bool = False, dropout: float = 0.0) -> SFCN3d:
    """Peng et al. 2021's SFCN, channels ``[32, 64, 128, 256, 256, 64]`` in the paper (default here a CPU-sized
    ``[8, 16, 32, 64, 64]``). ``moe``: MoE layers over the feature-map cells after ``moe_stages`` (default: the third
    stage from the end, whose grid still resolves anatomy: 5 x 6 x 5 cells at 4 mm); ``dense_ffn``: a dense FFN there instead (no MoE), the same active size as top-1 experts."""
    channels = [8, 16, 32, 64, 64] if channels is None else channels
    if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"channels must be a non-empty list of positive ints, got {channels!r}")
    if len(volume_shape) != 3:
        raise ValueError(f"volume_shape must have 3 sizes, got {volume_shape!r}")
    if moe is not None and dense_ffn:
        raise ValueError("dense_ffn is the dense counterpart of moe: set one of them, not both")
    stages = [max(0, len(channels) - 3)] if moe_stages is None else moe_stages
    if moe_stages is not None and moe is None and not dense_ffn:
        raise ValueError("moe_stages places MoE (or dense_ffn) layers: set model.moe or dense_ffn")
    for s in stages:
        if not isinstance(s, int) or not -len(channels) <= s < len(channels):
            raise ValueError(f"moe_stages: {s!r} is not a stage index of {len(channels)} stages")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    spec = _moe_spec(moe)
    if spec is not None:
        spec.validate()
        if spec.placement is not None or spec.blocks != MoESpec.blocks:
            raise ValueError("moe.placement and moe.blocks apply to transformer blocks; the CNN's MoE is a residual "
                             "layer over feature-map cells after moe_stages (leave them unset)")
    return SFCN3d(in_chans, volume_shape, num_outputs, channels, spec, stages, dense_ffn, dropout)


class PatchEmbed3d(nn.Module):
    """Non-overlapping ``patch_size``^3 patches to tokens, ``(B, C, X, Y, Z) -> (B, N, D)``; voxels past the last
    whole patch are cropped (centred)."""

    def __init__(self, volume_shape: Sequence[int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.volume_shape = tuple(volume_shape)
        self.patch_size = patch_size
        self.grid_size = tuple(s // patch_size for s in volume_shape)
        if min(self.grid_size) < 1:
            raise ValueError(f"patch_size {patch_size} exceeds the volume {self.volume_shape}")
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) != self.volume_shape:
            raise ValueError(f"expected volumes of shape {self.volume_shape}, got {tuple(x.shape[2:])}")
        p, crop = self.patch_size, [(s - g * self.patch_size) // 2 for s, g in zip(self.volume_shape, self.grid_size)]
        x = x[:, :, crop[0]:crop[0] + self.grid_size[0] * p, crop[1]:crop[1] + self.grid_size[1] * p,
              crop[2]:crop[2] + self.grid_size[2] * p]
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT3d(MoEViT):
    """A :class:`MoEViT` over volumetric patches (the 3D patch embedding replaces timm's 2D one)."""

    @property
    def token_grid(self) -> dict[str, tuple[int, int, int]]:
        grid = self.patch_embed.grid_size
        return {view.name: grid for view in self.routed_layers()}


@register_model("vit3d", family="brain", description="3D ViT over volumetric patches (ERMoE-ba), MoE in chosen blocks")
def vit3d(*, in_chans: int = 1, volume_shape: tuple[int, int, int] = (91, 109, 91), num_outputs: int = 1,
          patch_size: int = 7, embed_dim: int = 256, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
          global_pool: GlobalPool = "avg", class_token: bool = True, drop_path_rate: float = 0.0,
          moe: MoESpec | dict[str, Any] | None = None) -> ViT3d:
    """The ERMoE-ba reference backbone (7^3 patches of the 2 mm grid = 13 x 15 x 13 tokens, width 256, depth 4,
    4 heads, class token) with MoE layers as ``moe``; ``global_pool='avg'`` pools the patch tokens."""
    _check_choice("global_pool", global_pool, GlobalPool)
    for key, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth),
                       ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    embed = PatchEmbed3d(volume_shape, patch_size, in_chans, embed_dim)
    # timm sizes the position embedding from the patch count: build it on a 1 x N "image" of 1-pixel patches, then
    # put the 3D embedding in place of the 2D one.
    vit = VisionTransformer(img_size=(1, embed.num_patches), patch_size=1, in_chans=in_chans, num_classes=num_outputs,
                            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                            global_pool=global_pool, class_token=class_token, drop_path_rate=drop_path_rate)
    vit.patch_embed = embed
    model = vit_model(vit, _moe_spec(moe), freeze_backbone=False)
    model.__class__ = ViT3d
    return model
