"""Vision transformers (timm's ``VisionTransformer``) with MoE layers injected into chosen blocks.

Placements (docs/method.md, "Placement"):

- ``replace``: the block's FFN is replaced by the MoE (ERMoE, Switch, V-MoE style).
- ``parallel``: the MoE runs beside the block's FFN on the same normalised input, its output added to the FFN's
  (the EMoE paper's description).
- ``post-block``: the MoE is applied to the block's output as a residual adapter, ``y <- y + MoE(y)`` (the public
  EMoE reference code).

Only patch tokens are routed; the class token (and any register tokens) bypass the MoE: in ``replace`` they get no
FFN update, in the other two they see only the dense path.

Registered models (``ermoe.list_models('vit')``): ``vit_tiny`` ... ``vit_huge`` built from scratch at any size, and
any timm ``VisionTransformer`` by name (``vit_base_patch16_224``; ``pretrained=True`` loads timm's weights).
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import VisionTransformer

from ..moe import MoE
from ..routing import check_router_kwargs, list_routers
from ..settings import FORBID_EXTRA
from .checkpointing import checkpoint_blocks
from .protocol import RoutedModel, TokenMoELayer
from .registry import TIMM_VIT, register_model
from .stems import STEMS, PretrainedStem, install_stem

PLACEMENTS = ("replace", "parallel", "post-block")
GlobalPool = Literal["avg", "token", "max", "avgmax", "map"]
Stem = Literal[STEMS]

# name -> (embed_dim, depth, num_heads), as in the ViT and DeiT papers.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}
# What a `moe.router` that is not a router may have meant.
_NOT_ROUTERS = {
    "dense": "for a model without MoE layers set moe to null (model.moe: null)",
    "single_gate": "the single-gated MoE is a whole model: model.name: single_gated_vit",
    "deepmoe": "DeepMoE is a whole model: model.name: deepmoe_cnn",
}


@dataclass
class MoESpec:
    """Which blocks get an MoE layer and how it is built. A model without MoE layers takes ``moe=None``.

    router: one of ``ermoe.list_routers()``.
    hidden_dim: expert hidden width; None: the block's FFN width for ``replace`` (same active size as the dense
        ViT with top-1), ``dim // 4`` for the adapter placements (the EMoE reference: 192 at 768).
    placement: None picks the router's paper: ``parallel`` for ``emoe``, ``replace`` otherwise.
    blocks: ``"all"``, ``"every_other"`` (blocks 1, 3, 5, ...: the last block included when depth is even),
        ``"last:N"``, or a list of block indices (negative ones count from the end).
    capacity_factor, learn_alpha, router_kwargs: as :class:`ermoe.MoE` takes them.
    """

    __pydantic_config__ = FORBID_EXTRA  # a key MoESpec has no field for is an error (ermoe.settings)

    router: str = "ermoe"
    num_experts: int = 8
    top_k: int = 1
    hidden_dim: int | None = None
    placement: str | None = None
    blocks: str | list[int] = "every_other"
    capacity_factor: float | None = None
    learn_alpha: bool | None = None
    router_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def resolved_placement(self) -> str:
        if self.placement is not None:
            return self.placement
        return "parallel" if self.router == "emoe" else "replace"

    def validate(self) -> None:
        if self.router not in list_routers(controls=True):
            hint = f" ({_NOT_ROUTERS[self.router]})" if self.router in _NOT_ROUTERS else ""
            raise ValueError(f"unknown router {self.router!r}{hint}; choose one of {list_routers(controls=True)}")
        check_router_kwargs(self.router, self.router_kwargs)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENTS}")
        if isinstance(self.blocks, str):
            last = self.blocks.startswith("last:") and self.blocks[5:].isdigit()
            if not (last or self.blocks in ("all", "every_other")):
                raise ValueError(f"blocks must be 'all', 'every_other', 'last:N' or a list of ints, got "
                                 f"{self.blocks!r}")


def select_blocks(blocks: str | Sequence[int], depth: int) -> list[int]:
    """Resolve a block selection to sorted, distinct block indices in ``[0, depth)``."""
    if isinstance(blocks, str):
        if blocks == "all":
            return list(range(depth))
        if blocks == "every_other":
            if depth < 2:  # blocks 1, 3, ...: none in a one-block model, and an MoE spec must place something
                raise ValueError(f"blocks 'every_other' selects blocks 1, 3, ...: none at depth {depth} (use 'all')")
            return list(range(1, depth, 2))
        if blocks.startswith("last:"):
            try:
                n = int(blocks[5:])
            except ValueError:
                raise ValueError(f"blocks 'last:N' needs an integer N, got {blocks!r}") from None
            if not 1 <= n <= depth:
                raise ValueError(f"blocks {blocks!r}: N must be in [1, depth={depth}]")
            return list(range(depth - n, depth))
        raise ValueError(f"blocks must be 'all', 'every_other', 'last:N' or a list of ints, got {blocks!r}")
    out = set()
    for i in blocks:
        if not isinstance(i, int) or isinstance(i, bool) or not -depth <= i < depth:
            raise ValueError(f"block index {i!r} out of range for depth {depth}")
        out.add(i % depth)
    if not out:
        raise ValueError("blocks is an empty list: an MoE spec must place at least one MoE layer (moe: null for none)")
    return sorted(out)


class PatchMoE(TokenMoELayer):
    """Applies an :class:`ermoe.MoE` to the patch tokens of ``(B, N, D)`` input; prefix tokens get zeros, or the
    dense FFN ``prefix_ffn`` (an upcycled block keeps its dense FFN for the class token: :func:`ermoe.upcycle`).

    For routers that score against a context (ERMoE ``score='context'``), the context is the attention output of
    the same block, which :func:`inject_moe` taps with a forward hook.
    """

    def __init__(self, moe: MoE, num_prefix_tokens: int, prefix_ffn: nn.Module | None = None) -> None:
        super().__init__()
        if prefix_ffn is not None and num_prefix_tokens == 0:
            raise ValueError("PatchMoE: a prefix FFN needs prefix tokens (num_prefix_tokens > 0)")
        self.moe = moe
        self.num_prefix_tokens = num_prefix_tokens
        self.prefix_ffn = prefix_ffn
        self._context: Tensor | None = None

    @property
    def uses_context(self) -> bool:
        return self.moe.router.accepts_context and getattr(self.moe.router, "score", None) == "context"

    def forward(self, x: Tensor) -> Tensor:
        p = self.num_prefix_tokens
        context = None
        if self.uses_context:
            if self._context is None or self._context.shape != x.shape:
                raise RuntimeError("context-scored MoE found no attention output of its block for this input")
            context = self._context[:, p:]
        y = self.moe(x[:, p:], context=context)
        self._context = None
        if p == 0:
            return y
        prefix = y.new_zeros(y.shape[0], p, y.shape[2]) if self.prefix_ffn is None else self.prefix_ffn(x[:, :p])
        return torch.cat([prefix, y], dim=1)


class ParallelMoE(nn.Module):
    """The block's dense FFN plus an MoE branch on the same input: ``mlp(x) + PatchMoE(x)``."""

    def __init__(self, mlp: nn.Module, branch: PatchMoE) -> None:
        super().__init__()
        self.mlp, self.branch = mlp, branch

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x) + self.branch(x)


class PostBlockMoE(nn.Module):
    """A block followed by a residual MoE adapter on its output: ``y = block(x); y + PatchMoE(y)``."""

    def __init__(self, block: nn.Module, branch: PatchMoE) -> None:
        super().__init__()
        self.block, self.branch = block, branch

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return y + self.branch(y)


def block_token_sites(blocks: nn.ModuleList, grid: tuple[int, ...]) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Per transformer block (``blocks.<i>``), the module whose input is the tokens a routing layer there reads (the
    FFN or the MoE in its place; a post-block MoE's branch) and the grid the last of them tile."""
    return {f"blocks.{i}": (block.branch if isinstance(block, PostBlockMoE) else block.mlp, grid)
            for i, block in enumerate(blocks)}


def _tap_context(attn: nn.Module, target: PatchMoE) -> None:
    def hook(_module, _inputs, output):
        target._context = output
    attn.register_forward_hook(hook)


def inject_moe(model: VisionTransformer, spec: MoESpec) -> list[int]:
    """Put MoE layers into ``model.blocks`` (a timm ViT) in place; returns the chosen block indices."""
    spec.validate()
    blocks = model.blocks
    depth = len(blocks)
    dim = model.embed_dim
    placement = spec.resolved_placement()
    chosen = select_blocks(spec.blocks, depth)
    for i in chosen:
        block = blocks[i]
        ffn_hidden = block.mlp.fc1.out_features
        hidden = spec.hidden_dim or (ffn_hidden if placement == "replace" else max(1, dim // 4))
        moe = MoE(dim, hidden, spec.num_experts, spec.router, spec.top_k, capacity_factor=spec.capacity_factor,
                  learn_alpha=spec.learn_alpha, router_kwargs=dict(spec.router_kwargs))
        branch = PatchMoE(moe, model.num_prefix_tokens)
        if branch.uses_context:
            _tap_context(block.attn, branch)
        if placement == "replace":
            block.mlp = branch
        elif placement == "parallel":
            block.mlp = ParallelMoE(block.mlp, branch)
        else:
            blocks[i] = PostBlockMoE(block, branch)
    _warn_dead_moe(model, chosen)
    return chosen


def _warn_dead_moe(model: nn.Module, chosen: list[int]) -> None:
    # docs/method.md, "Patch-only routing in the last block": with a class-token head, the last block's patch
    # outputs never reach the loss.
    depth = len(model.blocks)
    if depth - 1 in chosen and getattr(model, "global_pool", None) == "token" and model.num_prefix_tokens > 0:
        warnings.warn("the MoE layer in the last block routes patch tokens only, but the head reads the class token "
                      "(global_pool='token'): that MoE layer gets no gradient. Use global_pool='avg' or leave the "
                      "last block dense.", stacklevel=3)


class MoEViT(VisionTransformer, RoutedModel):
    """timm's ``VisionTransformer`` with MoE layers in chosen blocks; timm's ``forward_features``/``forward_head``.

    Built by :func:`vit_model` from a timm ``VisionTransformer``: timm builds every named ViT as that class (no
    subclass can be passed to its builders), so the built instance is re-classed to this subclass, which adds
    methods only (no state of its own).
    """

    def shard_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def frozen_stem(self) -> PretrainedStem | None:
        return self.patch_embed if isinstance(self.patch_embed, PretrainedStem) else None

    @property
    def token_grid(self) -> dict[str, tuple[int, ...]]:
        """Each routing layer's patch grid (rows, columns; patch tokens in row-major order, the prefix tokens left
        out): what ``ermoe explain`` places patches by."""
        grid = tuple(int(g) for g in self.patch_embed.grid_size)
        return {view.name: grid for view in self.routed_layers()}

    @property
    def token_sites(self) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
        """Every block's token-wise layer (its FFN, the MoE in its place or beside it, a post-block MoE), by
        ``blocks.<i>``, with the patch grid: the prefix tokens come first in its input, the patches row-major."""
        return block_token_sites(self.blocks, tuple(int(g) for g in self.patch_embed.grid_size))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each block (:class:`ermoe.models.checkpointing.Blocks`, which restores the blocks' buffers
        after recomputation); timm's own path (``checkpoint_seq``) stays off."""
        self.grad_checkpointing = False
        checkpoint_blocks(self.blocks, enable)

    def input_normalization(self, pretrained: bool):
        if isinstance(self.patch_embed, PretrainedStem):
            stem = self.patch_embed
            return [stem.input_mean] * stem.in_chans, [stem.input_std] * stem.in_chans
        cfg = getattr(self, "pretrained_cfg", None)  # timm sets it on every model it builds by name
        if not pretrained or not cfg or "mean" not in cfg:
            return None  # a ViT ermoe built (from scratch, or from an ermoe run's weights): the data's statistics
        return list(cfg["mean"]), list(cfg["std"])


def vit_model(vit: VisionTransformer, moe: MoESpec | dict[str, Any] | None, freeze_backbone: bool) -> MoEViT:
    """A timm ViT with MoE layers (``moe=None``: none, the dense ViT); ``freeze_backbone``: the papers' recipe,
    every parameter frozen except the MoE layers and the classification head."""
    if type(vit) is not VisionTransformer:
        raise ValueError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    vit.__class__ = MoEViT
    if moe is not None:
        inject_moe(vit, MoESpec(**moe) if isinstance(moe, dict) else moe)
    if freeze_backbone:
        vit.requires_grad_(False)
        for view in vit.routed_layers():
            view.layer.requires_grad_(True)
        vit.get_classifier().requires_grad_(True)
    return vit


def _check_choice(key: str, value: Any, choices: Any) -> None:
    allowed = [a for arm in typing.get_args(choices) or (choices,) for a in (typing.get_args(arm) or (arm,))]
    allowed = [None if a is type(None) else a for a in allowed]
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


def _size_builder(size: str) -> Callable[..., MoEViT]:
    dim0, depth0, heads0 = VIT_SIZES[size]

    def build(*, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3, patch_size: int = 16,
              depth: int | None = None, embed_dim: int | None = None, num_heads: int | None = None,
              mlp_ratio: float = 4.0, global_pool: GlobalPool = "avg", class_token: bool = True,
              drop_path_rate: float = 0.0, moe: MoESpec | dict[str, Any] | None = None,
              freeze_backbone: bool = False, stem: Stem | None = None, stem_weights: str | None = None) -> MoEViT:
        _check_choice("global_pool", global_pool, GlobalPool)
        _check_choice("stem", stem, Stem | None)
        for key, value in (("patch_size", patch_size), ("depth", depth), ("embed_dim", embed_dim),
                           ("num_heads", num_heads)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if not mlp_ratio > 0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"mlp_ratio must be > 0 and drop_path_rate in [0, 1), got {mlp_ratio}, {drop_path_rate}")
        dim, heads = embed_dim or dim0, num_heads or heads0
        if dim % heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {heads}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if stem_weights is not None and stem is None:
            raise ValueError("stem_weights is the weight file of a stem: it needs stem (e.g. efficientnet_lite0)")
        vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                                embed_dim=dim, depth=depth0 if depth is None else depth, num_heads=heads,
                                mlp_ratio=mlp_ratio, global_pool=global_pool, class_token=class_token, drop_path_rate=drop_path_rate)
        if stem is not None:
            install_stem(vit, stem, img_size, patch_size, in_chans, stem_weights)
        return vit_model(vit, moe, freeze_backbone)

    build.__name__ = build.__qualname__ = size
    build.__doc__ = (f"ViT {size[4:]} (width {dim0}, depth {depth0}, {heads0} heads unless overridden), built from "
                     "scratch, with MoE layers as ``moe`` (a :class:`MoESpec` or its dict; None: the dense ViT). "
                     "``global_pool='avg'`` (the default) pools patch tokens, so a patch-only MoE in the last block "
                     "gets gradient. ``stem='efficientnet_lite0'`` replaces the patch embedding by a frozen "
                     "ImageNet EfficientNet-Lite0 (:mod:`ermoe.models.stems`; ``stem_weights``: its .pth file).")
    return build


for _size in VIT_SIZES:
    register_model(_size, family="vit", description=f"ViT-{_size[4:]} from scratch, any size, MoE in chosen blocks")(
        _size_builder(_size))


@register_model(TIMM_VIT, family="vit", description="any timm VisionTransformer by name, MoE in chosen blocks")
def timm_vit(name: str, *, num_classes: int = 1000, img_size: int | None = None, in_chans: int | None = None,
             global_pool: GlobalPool = "avg", drop_path_rate: float = 0.0,
             moe: MoESpec | dict[str, Any] | None = None, pretrained: bool = False,
             freeze_backbone: bool = False) -> MoEViT:
    """timm's architecture ``name`` (its sizes are fixed by the name); ``pretrained=True`` loads timm's weights
    (from its cache or the Hugging Face Hub). ``freeze_backbone=True`` with pretrained weights is the papers'
    recipe: only the MoE layers and the head train."""
    import timm

    _check_choice("global_pool", global_pool, GlobalPool)
    kwargs = {"img_size": img_size, "in_chans": in_chans}
    vit = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, global_pool=global_pool,
                            drop_path_rate=drop_path_rate, **{k: v for k, v in kwargs.items() if v is not None})
    if type(vit) is not VisionTransformer:
        raise ValueError(f"timm model {name!r} is a {type(vit).__name__}, not a VisionTransformer")
    return vit_model(vit, moe, freeze_backbone)
