"""The retrieval dual encoder (docs/retrieval.md; docs/method.md, section 4): an image tower (any of the package's ViTs, with
any MoE placement and router, or the frozen pretrained stem), a text tower (:mod:`ermoe.models.text`, MoE FFNs with
any router), linear projections to a shared space followed by LayerNorm, L2-normalised embeddings, and a learnable
logit scale initialised to log(1/0.07) and clamped at log(100), as open_clip does.

``model(images, token_ids)`` returns ``(image_emb, text_emb, scale)``; the retrieval task's loss is the symmetric
InfoNCE over the batch (:func:`clip_loss`). ``encode_image`` / ``encode_text`` embed one side (the evaluation
embeds the test set in chunks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .protocol import RoutedModel, RoutingLayer
from .registry import create_model, register_model
from .text import text_tower

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def clip_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE: the mean of the image->text and text->image cross-entropies of ``scale * I T^T``, the
    i-th text being the i-th image's positive."""
    logits = scale * image_emb.float() @ text_emb.float().t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class DualEncoder(RoutedModel):
    """Image and text towers with projections into one normalised space (module docstring)."""

    def __init__(self, image: nn.Module, text: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.image, self.text = image, text
        self.image_proj = nn.Sequential(nn.Linear(image.num_features, embed_dim), nn.LayerNorm(embed_dim))
        self.text_proj = nn.Sequential(nn.Linear(text.width, embed_dim), nn.LayerNorm(embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    @property
    def image_grid(self) -> tuple[int, int]:
        """The image tower's token grid (rows, columns) in row-major order: for diagnostics over image locations."""
        rows, cols = self.image.patch_embed.grid_size  # timm's PatchEmbed and the pretrained stem both have it
        return int(rows), int(cols)

    @property
    def token_grid(self) -> dict[str, tuple[int, ...]]:
        """The image tower's routing layers' patch grids (under their names in this model)."""
        grids = self.image.token_grid if isinstance(self.image, RoutedModel) else {}
        return {f"image.{name}": grid for name, grid in grids.items()}

    @property
    def token_sites(self) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
        """Both towers' token-wise layers (``image.blocks.<i>``: the patch grid; ``text.blocks.<i>``: the caption
        positions)."""
        return {f"{tower}.{name}": site for tower in ("image", "text")
                for name, site in getattr(getattr(self, tower), "token_sites", {}).items()}

    @property
    def token_sequence(self) -> dict[str, int]:
        """The text tower's routing layers: their tokens are the caption ids' real positions (input 1)."""
        return {f"text.{name}": 1 for name, m in self.text.named_modules() if isinstance(m, RoutingLayer)}

    def encode_image(self, images: Tensor) -> Tensor:
        feats = self.image.forward_head(self.image.forward_features(images), pre_logits=True)
        return F.normalize(self.image_proj(feats), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        return F.normalize(self.text_proj(self.text(ids)), dim=-1)

    def scale(self) -> Tensor:
        """``exp(logit_scale)``, the logit scale clamped at log(100) (the clamp passes no gradient past it)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return self.encode_image(images), self.encode_text(ids), self.scale()

    def training_loss(self, output, target, criterion) -> Tensor:
        return criterion(output, target)

    def input_normalization(self, pretrained: bool):
        return self.image.input_normalization(pretrained)

    def frozen_stem(self) -> nn.Module | None:
        return None  # the retrieval task feeds images (a cached stem would need image-only batches)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Both towers' blocks."""
        self.image.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


@register_model("dual_encoder", family="retrieval",
                description="image tower (any ViT, any MoE) + text tower (MoE FFNs), CLIP-style shared space")
def dual_encoder(*, img_size: int = 64, in_chans: int = 1, vocab_size: int = 1000, context_length: int = 32,
                 pad_id: int = 0, image: dict[str, Any] | None = None, text: dict[str, Any] | None = None,
                 embed_dim: int = 256) -> DualEncoder:
    """``image``: the image tower's model section (a ViT by name with its settings; default ``vit_tiny`` at width
    96, depth 4, patch 8, no MoE); ``text``: the text tower's settings (width, depth, num_heads, mlp_ratio,
    positions, moe); ``embed_dim``: the shared space (256, as the papers' setting)."""
    image = {"name": "vit_tiny", "embed_dim": 96, "num_heads": 3, "depth": 4, "patch_size": 8} if image is None \
        else dict(image)
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
    name = image.pop("name", "vit_tiny")
    for key in ("num_classes", "img_size", "in_chans"):
        if key in image:
            raise ValueError(f"image.{key} is set by the dual encoder (from the data), not in its image section")
    tower = create_model(name, num_classes=0, img_size=img_size, in_chans=in_chans, **image)
    return DualEncoder(tower, text_tower(vocab_size, context_length, pad_id, **(text or {})), embed_dim)
