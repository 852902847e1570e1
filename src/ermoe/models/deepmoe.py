"""DeepMoE (Wang et al. 2020, "Deep Mixture of Experts via Shallow Embedding"): a CNN whose convolution channels
are the experts, gated per input.

A shallow embedding network maps the image to a latent vector ``e``; every gated convolution ``l`` scales its
output channels by ``g_l = ReLU(W_l e)`` (a channel whose gate is 0 is skipped for that image). The training loss is
the task's cross-entropy plus ``l1_weight * sum_l mean|g_l|`` (the sparsity penalty on the gates) plus
``embed_loss_weight`` times the cross-entropy of a linear classifier on ``e`` (the paper's embedding loss, which keeps
``e`` informative about the class).

The base network here is a small residual CNN sized for 28-32 px images: a strided stem, then three stages of
two gated 3x3 convolutions (the first of stages 2 and 3 strided), global average pooling and a linear head.
Our implementation multiplies by the gates rather than skipping zero channels, so the compute is that of the dense
CNN; the gate sparsity (share of zero gates) is what a skipping implementation would save.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing.base import RoutingInfo
from .protocol import RoutedModel, RoutingLayer
from .registry import register_model


class GatedConv(RoutingLayer):
    """conv3x3 -> BatchNorm -> scale each output channel by its gate ``g = ReLU(W e)`` -> ReLU (g >= 0, so this is
    the gated channel's ReLU output). Keeps the last eval forward's gates as a :class:`RoutingInfo` (channels are
    the experts, an image is routed to every channel with a non-zero gate) for the diagnostics. Channels of one
    convolution are not shardable experts: no straggler factor."""

    expert_parallel = False

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.gate = nn.Linear(embed_dim, out_channels)
        nn.init.constant_(self.gate.bias, 0.1)  # most gates start open
        self.num_experts = out_channels
        self.last_gates: Tensor | None = None
        self.last_routing: RoutingInfo | None = None

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        g_BC = F.relu(self.gate(e))
        self.last_gates = g_BC
        if not self.training:
            self.last_routing = _routing_info(g_BC.detach())
        return F.relu(self.bn(self.conv(x)) * g_BC[:, :, None, None].to(x.dtype))


def _routing_info(g_BC: Tensor) -> RoutingInfo:
    on = g_BC > 0
    channels = torch.arange(g_BC.shape[1], device=g_BC.device).expand_as(g_BC)
    per_channel = on.sum(0)
    probs = g_BC / g_BC.sum(1, keepdim=True).clamp_min(1e-12)
    return RoutingInfo(num_tokens=g_BC.shape[0], expert_idx=torch.where(on, channels, -1), gates=g_BC, probs=probs,
                       tokens_per_expert=per_channel, assigned_per_expert=per_channel, aux_losses={}, dropped=0,
                       assignments=int(on.sum()), choice="token")


class DeepMoECNN(RoutedModel):
    """The DeepMoE classifier. ``widths``: the channels of the three stages; ``embed_dim``: the size of ``e``."""

    def __init__(self, num_classes: int, in_chans: int = 1, widths: Sequence[int] = (32, 64, 128),
                 embed_dim: int = 32, l1_weight: float = 0.05, embed_loss_weight: float = 0.1) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {list(widths)}")
        if l1_weight < 0 or embed_loss_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got l1_weight={l1_weight}, "
                             f"embed_loss_weight={embed_loss_weight}")
        self.l1_weight, self.embed_loss_weight = l1_weight, embed_loss_weight
        self.num_classes = num_classes
        self.embed = nn.Sequential(  # the shallow embedding network
            nn.Conv2d(in_chans, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, embed_dim), nn.ReLU())
        self.embed_head = nn.Linear(embed_dim, num_classes)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for stage, width in enumerate(widths):
            layers.append(GatedConv(cin, width, embed_dim, stride=1 if stage == 0 else 2))
            layers.append(GatedConv(width, width, embed_dim))
            cin = width
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(widths[-1], num_classes)
        self._embedding: Tensor | None = None

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: Tensor) -> Tensor:
        """The globally pooled features of the gated CNN, ``(B, widths[-1])``."""
        e = self.embed(x)
        self._embedding = e
        h = self.stem(x)
        for i, layer in enumerate(self.layers):
            y = layer(h, e)
            h = y + h if i % 2 else y  # the second conv of a stage is residual
        return h.mean((2, 3))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def gate_penalty(self) -> Tensor:
        """sum over gated layers of the mean gate value (the L1 norm per channel and image; gates are >= 0)."""
        return sum(layer.last_gates.float().mean() for layer in self.layers)

    def training_loss(self, output: Tensor, target: Tensor, criterion) -> Tensor:
        """The criterion, plus ``l1_weight`` times the gate penalty, plus ``embed_loss_weight`` times the criterion
        of the embedding's own linear classifier (the paper's embedding loss)."""
        loss = criterion(output, target)
        if self.l1_weight:
            loss = loss + self.l1_weight * self.gate_penalty()
        if self.embed_loss_weight:
            loss = loss + self.embed_loss_weight * criterion(self.embed_head(self._embedding), target)
        return loss

    @torch.no_grad()
    def batch_metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Sums over the batch for the evaluation (divided by the image count there): per image, the share of its
        channel gates that are closed (zero) over all gated layers, and the channels it keeps open."""
        closed_B = sum((layer.last_gates == 0).float().sum(1) for layer in self.layers)
        channels = sum(layer.last_gates.shape[1] for layer in self.layers)
        return {"gate_sparsity": float((closed_B / channels).sum()), "open_channels": float((channels - closed_B).sum())}

    @torch.no_grad()
    def gate_sparsity(self) -> float:
        """Share of zero gates over the gated layers' channels in the last forward."""
        zeros = sum(int((layer.last_gates == 0).sum()) for layer in self.layers)
        total = sum(layer.last_gates.numel() for layer in self.layers)
        return zeros / max(total, 1)


@register_model("deepmoe_cnn", family="deepmoe_cnn",
                description="DeepMoE (Wang et al. 2020): a CNN whose conv channels are gated per image by ReLU(W e)")
def deepmoe_cnn(*, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, widths: list[int] = (32, 64, 128),
                embed_dim: int = 32, l1_weight: float = 0.05, embed_loss_weight: float = 0.1) -> DeepMoECNN:
    """The DeepMoE classifier: three stages of ``widths`` channels, an embedding of size ``embed_dim``, the L1 gate
    penalty ``l1_weight`` and the embedding loss ``embed_loss_weight``. Any ``img_size`` of at least 8 pixels (the
    CNN pools globally)."""
    if img_size < 8:
        raise ValueError(f"deepmoe_cnn needs images of at least 8 pixels, got img_size {img_size}")
    return DeepMoECNN(num_classes, in_chans, tuple(widths), embed_dim, l1_weight, embed_loss_weight)
