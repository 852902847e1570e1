"""Single-gated MoE (Royer et al. 2023, "Revisiting Single-gated Mixtures of Experts"), adapted to a ViT.

The paper's three ingredients, and how they map onto the study's ViT:

- **one gate per image**: a linear gate on the mean-pooled patch tokens of the shared trunk (the blocks before the
  first MoE block) picks one expert; every patch token of the image goes to that expert in every MoE block (the
  class token keeps the base FFN).
- **a base branch, early exit and ensemble member**: the dense ViT itself. The trunk is shared; from the first MoE
  block on, the base branch runs the dense blocks and its own head, the expert branch runs the same blocks with the
  chosen expert's FFN in the MoE blocks (attention and the other blocks are shared with the base). The prediction is
  the ensemble of the two (mean of probabilities); the base logits alone are the early exit
  (:meth:`SingleGatedViT.predict_early_exit`). Each image therefore computes the base branch and one expert: its
  active parameters are the dense model's plus one expert FFN per MoE block, and the blocks after the trunk run
  twice.
- **clustering-based initialisation**: the paper trains the base model first, clusters its features with k-means,
  initialises the gate from the clusters and the experts from the base model. Under the study's single budget this
  happens inside one run: for the first ``kmeans_step`` training steps only the base branch trains (the pooled trunk
  features of each step's images are kept, the latest ``kmeans_samples`` of them); after that step, in
  :meth:`SingleGatedViT.after_step`, the gate is set to the nearest-centroid rule of k-means on the kept features,
  every expert FFN becomes a copy of the base FFN of its block, the expert head a copy of the base head, and from
  then on the whole model trains jointly. No balancing loss.

The gate's weight on the chosen expert is ``1 + p - stop_grad(p)``: the value 1 (so a freshly copied expert computes
exactly the base FFN) with the gradient of the Switch gate ``p``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..moe import MoE
from ..routing.base import Router, RouterOutput
from ..routing.sync import SyncGroup, global_cat
from .protocol import RoutedModel
from .registry import create_model, register_model
from .vit import MoEViT, PatchMoE, select_blocks


class ImageGateRouter(Router):
    """Sends every token of an image to the expert the image's gate chose; ``probs_BE`` is set by the model."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__(dim, num_experts, top_k)
        if top_k != 1:
            raise ValueError("the single-gated MoE picks one expert per image: top_k must be 1")
        self.probs_BE: Tensor | None = None

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        probs_BE = self.probs_BE
        if probs_BE is None:
            raise RuntimeError("ImageGateRouter: the image gate has not run for this input")
        num_images, num_tokens = probs_BE.shape[0], x_TD.shape[0]
        if num_images == 0 or num_tokens % num_images:
            raise RuntimeError(f"ImageGateRouter: {num_tokens} tokens do not split over {num_images} images")
        per_image = num_tokens // num_images
        p_B1, idx_B1 = probs_BE.max(dim=-1, keepdim=True)
        gate_B1 = 1 + p_B1 - p_B1.detach()
        return RouterOutput(probs_TE=probs_BE.repeat_interleave(per_image, 0),
                            topk_idx_TK=idx_B1.repeat_interleave(per_image, 0),
                            gates_TK=gate_B1.repeat_interleave(per_image, 0))


def _expert_ffn(layer: nn.Module, base_mlp: nn.Module, h: Tensor) -> Tensor:
    """The chosen expert on the patch tokens; the prefix (class) tokens keep the base FFN, as in the base branch."""
    p = layer.num_prefix_tokens
    y = layer(h)
    if p == 0:
        return y
    return torch.cat([base_mlp(h[:, :p]), y[:, p:]], dim=1)


def _block_forward(block: nn.Module, x: Tensor, mlp: nn.Module) -> Tensor:
    """A timm ``Block`` with its FFN swapped for ``mlp`` (the same residual, layer scale and drop path)."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    return x + block.drop_path2(block.ls2(mlp(block.norm2(x))))


class SingleGatedViT(RoutedModel):
    """A dense timm ViT (the base model) plus ``num_experts`` copies of the FFNs of ``moe_blocks``, one per image.

    Args:
        vit: a dense timm ``VisionTransformer`` (the base branch; its head is the early exit).
        moe_blocks: indices of the blocks whose FFN has experts; the trunk is every block before the first of them.
        num_experts: E.
        kmeans_step: base-only training steps before the k-means initialisation (at least 1: k-means clusters the
            features those steps saw); a float in (0, 1) is a fraction of the run, resolved by
            :meth:`on_train_start`.
        kmeans_samples: pooled trunk features kept (from the latest training images) for k-means.
        base_loss_weight: weight of the base branch's own loss (it stays a good early exit).
        seed: k-means seed.

    Under data parallelism the feature bank keeps every rank's features of each step (in rank order, as one process
    would: ``sync_group``, set by ``ermoe.distributed.sync_routing``), so every rank clusters the same features and
    the replicas stay identical; DDP looks for the gate and heads that get no gradient in the base-only phase.
    """

    may_skip_parameters = True  # the gate, the experts and the expert head before the k-means initialisation
    sync_group: SyncGroup | None = None

    def __init__(self, vit: nn.Module, moe_blocks: Sequence[int], num_experts: int, *, kmeans_step: int | float = 1,
                 kmeans_samples: int = 2048, base_loss_weight: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        depth = len(vit.blocks)
        moe_blocks = sorted(set(moe_blocks))
        if not moe_blocks or not all(0 <= i < depth for i in moe_blocks):
            raise ValueError(f"moe_blocks must name blocks in [0, {depth}), got {list(moe_blocks)}")
        if num_experts < 2:
            raise ValueError(f"the single-gated MoE needs at least 2 experts, got {num_experts}")
        if isinstance(kmeans_step, float) and not 0.0 < kmeans_step < 1.0:
            raise ValueError(f"kmeans_step: a float is a fraction of the run in (0, 1), got {kmeans_step}")
        if isinstance(kmeans_step, int) and kmeans_step < 1:
            raise ValueError(f"kmeans_step must be >= 1 (k-means needs the features of a training step), got "
                             f"{kmeans_step}")
        if kmeans_samples < num_experts:
            raise ValueError(f"kmeans_samples must be >= num_experts ({num_experts}), got {kmeans_samples}")
        self.vit = vit
        self.split = moe_blocks[0]
        self.moe_blocks = moe_blocks
        self.num_experts = num_experts
        self.kmeans_step, self.kmeans_samples = kmeans_step, kmeans_samples
        self.base_loss_weight, self.seed = base_loss_weight, seed
        dim, npt = vit.embed_dim, vit.num_prefix_tokens
        self.gate = nn.Linear(dim, num_experts)
        experts = {}
        for i in moe_blocks:
            hidden = vit.blocks[i].mlp.fc1.out_features
            experts[str(i)] = PatchMoE(MoE(dim, hidden, num_experts, ImageGateRouter(dim, num_experts),
                                           expert_bias=True, learn_alpha=False), npt)
        self.experts = nn.ModuleDict(experts)
        self.expert_head = nn.Linear(vit.head.in_features, vit.head.out_features)
        self.register_buffer("experts_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("feature_bank", torch.zeros(kmeans_samples, dim))
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))
        self._base_logits: Tensor | None = None
        self._pooled: Tensor | None = None  # the last training batch's pooled trunk features, for the bank
        # Host copies of the two phase buffers, read every step: reading the device buffers would sync a GPU
        self._ready, self._filled = False, 0
        self.register_load_state_dict_post_hook(lambda module, _: module._read_phase())

    def _read_phase(self) -> None:
        self._ready, self._filled = bool(self.experts_ready), int(self.bank_filled)

    @property
    def experts_active(self) -> bool:
        return self._ready

    def input_normalization(self, pretrained: bool):
        return self.vit.input_normalization(pretrained)

    def frozen_stem(self) -> nn.Module | None:
        return self.vit.frozen_stem()

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def _trunk(self, x: Tensor) -> Tensor:
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        for block in v.blocks[:self.split]:
            x = block(x)
        return x

    def _pre_logits(self, x: Tensor) -> Tensor:
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)

    def _pool(self, x: Tensor) -> Tensor:
        return x[:, self.vit.num_prefix_tokens:].mean(1)

    def _base(self, x: Tensor) -> Tensor:
        """The base branch's pre-logit features."""
        for block in self.vit.blocks[self.split:]:
            x = block(x)
        return self._pre_logits(x)

    def _expert_branch(self, x: Tensor, probs_BE: Tensor) -> Tensor:
        """The expert branch's pre-logit features."""
        for i, block in enumerate(self.vit.blocks):
            if i < self.split:
                continue
            if str(i) in self.experts:
                layer = self.experts[str(i)]
                layer.moe.router.probs_BE = probs_BE
                x = _block_forward(block, x, partial(_expert_ffn, layer, block.mlp))
            else:
                x = block(x)
        return self._pre_logits(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The pre-logit features of the base and expert branches side by side, ``(B, 2 * width)`` (what the
        ensemble's two heads read). In the base-only training phase the expert branch does not run and the base
        features stand in for it; in evaluation it runs (its routing is recorded for the diagnostics)."""
        h = self._trunk(x)
        pooled = self._pool(h)
        base = self._base(h)
        if self.training and not self._ready:
            self._pooled = pooled.detach().float()
            return torch.cat([base, base], dim=-1)
        probs_BE = torch.softmax(self.gate(pooled).float(), dim=-1)
        return torch.cat([base, self._expert_branch(h, probs_BE)], dim=-1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The ensemble's log-probabilities (the base logits alone before the experts exist); the base logits are
        kept for :meth:`training_loss` and :meth:`batch_metrics`."""
        if pre_logits:
            return x
        base, expert = x.chunk(2, dim=-1)
        base_logits = self.vit.head(base)
        self._base_logits = base_logits
        if not self._ready:
            return base_logits
        return ensemble(base_logits, self.expert_head(expert))

    def training_loss(self, output: Tensor, target: Tensor, criterion) -> Tensor:
        """The criterion on the ensemble plus ``base_loss_weight`` times the criterion on the base branch."""
        loss = criterion(output, target)
        if self._ready and self._base_logits is not None and self.base_loss_weight:
            loss = loss + self.base_loss_weight * criterion(self._base_logits, target)
        return loss

    def on_train_start(self, total_steps: int) -> None:
        if isinstance(self.kmeans_step, float):
            self.kmeans_step = max(1, int(self.kmeans_step * total_steps))

    def after_step(self, step: int) -> None:
        """Keep the step's pooled trunk features; once ``kmeans_step`` steps are done, the k-means initialisation."""
        super().after_step(step)
        if self._ready:
            return
        if isinstance(self.kmeans_step, float):
            raise RuntimeError("kmeans_step is a fraction of the run: call on_train_start(total_steps) first, or give "
                               "it as a number of steps")
        if self._pooled is not None:
            self._remember(global_cat(self._pooled, self.sync_group))
            self._pooled = None
        if step >= self.kmeans_step:
            self.init_from_clusters()

    EXIT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)

    @torch.no_grad()
    def batch_metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Sums over the batch for the evaluation (divided by the image count there): the base branch's top-1 (every
        image exits early) and, per confidence threshold, the images that would exit and the top-1 with early exit
        (exited images keep the base prediction, the rest the ensemble: what ``predict_early_exit`` returns)."""
        base = self._base_logits.float()
        confident, base_pred = torch.softmax(base, -1).max(-1)
        sums = {"base_top1": float((base_pred == target).sum())}
        ensemble_pred = output.argmax(-1)
        for t in self.EXIT_THRESHOLDS:
            exited = confident >= t
            pred = torch.where(exited, base_pred, ensemble_pred)
            sums[f"exit_share@{t}"] = float(exited.sum())
            sums[f"exit_top1@{t}"] = float((pred == target).sum())
        return sums

    @torch.no_grad()
    def predict_early_exit(self, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """Log-probabilities with early exit: images whose base branch is at least ``threshold`` confident keep the
        base prediction and skip the experts. Returns ``(log_probs, exited)``."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        h = self._trunk(x)
        out = torch.log_softmax(self.vit.head(self._base(h)).float(), dim=-1)
        exited = out.exp().amax(-1) >= threshold
        rest = ~exited
        if self._ready and rest.any():
            hr = h[rest]
            probs_BE = torch.softmax(self.gate(self._pool(hr)).float(), dim=-1)
            out[rest] = ensemble(out[rest], self.expert_head(self._expert_branch(hr, probs_BE)))
        return out, exited

    @torch.no_grad()
    def _remember(self, pooled_BD: Tensor) -> None:
        n = self.kmeans_samples
        b = min(len(pooled_BD), n)
        self.feature_bank.copy_(torch.cat([self.feature_bank[b:], pooled_BD[-b:].to(self.feature_bank)]))
        self._filled = min(n, self._filled + b)
        self.bank_filled.fill_(self._filled)

    @torch.no_grad()
    def init_from_clusters(self, features: Tensor | None = None) -> None:
        """k-means on pooled trunk features (default: the remembered ones) sets the gate to the nearest-centroid
        rule; experts and the expert head start as copies of the base model's FFNs and head."""
        from sklearn.cluster import KMeans

        if features is None:
            features = self.feature_bank[self.kmeans_samples - self._filled:]
        if len(features) < self.num_experts:
            raise RuntimeError(f"k-means needs at least {self.num_experts} features, has {len(features)}")
        km = KMeans(self.num_experts, n_init=4, random_state=self.seed).fit(features.double().cpu().numpy())
        c = torch.as_tensor(km.cluster_centers_, dtype=torch.float64)
        # argmin ||x - c||^2 = argmax (2 x.c - ||c||^2): a linear gate; scaled so its logits have unit spread.
        w, b = 2 * c, -(c * c).sum(1)
        spread = (features.double().cpu() @ w.T + b).std(dim=1).mean().clamp_min(1e-6)
        self.gate.weight.copy_(w / spread)
        self.gate.bias.copy_(b / spread)
        for i, layer in self.experts.items():
            mlp = self.vit.blocks[int(i)].mlp
            experts = layer.moe.experts
            experts.w1.copy_(mlp.fc1.weight.expand_as(experts.w1))
            experts.b1.copy_(mlp.fc1.bias.expand_as(experts.b1))
            experts.w2.copy_(mlp.fc2.weight.expand_as(experts.w2))
            experts.b2.copy_(mlp.fc2.bias.expand_as(experts.b2))
        self.expert_head.load_state_dict(self.vit.head.state_dict())
        self.experts_ready.fill_(True)
        self._ready = True


def ensemble(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Log of the mean of two softmax distributions (a proper mixture; cross-entropy on it is its NLL)."""
    stacked = torch.stack([torch.log_softmax(logits_a.float(), -1), torch.log_softmax(logits_b.float(), -1)])
    return torch.logsumexp(stacked, 0) - math.log(2)


def _base_model(args: dict) -> str:
    return args.get("base", "vit_tiny")


@register_model("single_gated_vit", family="single_gated_vit", extends=_base_model, excludes=("moe",),
                description="single-gated MoE (Royer et al. 2023): one gate per image, dense base branch as early "
                            "exit and ensemble member, k-means gate initialisation")
def single_gated_vit(*, base: str = "vit_tiny", num_experts: int = 8, blocks: str | list[int] = "every_other",
                     kmeans_step: int | float = 0.33, kmeans_samples: int = 2048, base_loss_weight: float = 1.0,
                     seed: int | None = None, freeze_backbone: bool = False, **base_args: Any) -> SingleGatedViT:
    """The single-gated MoE on a dense ViT ``base`` (a registered ViT size or a timm ViT name, built with
    ``base_args``: its sizes, ``pretrained``, ...). Experts copy the FFNs of ``blocks``; ``kmeans_step``: base-only
    steps before the k-means initialisation (a float in (0, 1): that fraction of the run); ``seed``: k-means seed
    (None: from torch's seed). ``freeze_backbone=True``: the base stays as pretrained, the gate, experts and heads
    train."""
    vit = create_model(base, **base_args)
    if not isinstance(vit, MoEViT):
        raise ValueError(f"single_gated_vit: base must be a ViT (a registered ViT size or timm ViT name), got {base!r}")
    model = SingleGatedViT(vit, select_blocks(blocks, len(vit.blocks)), num_experts, kmeans_step=kmeans_step,
                           kmeans_samples=kmeans_samples, base_loss_weight=base_loss_weight,
                           seed=torch.initial_seed() % 2**31 if seed is None else seed)
    if freeze_backbone:  # the papers' recipe: the pretrained base stays, the gate, experts and heads train
        model.requires_grad_(False)
        for module in (model.gate, model.experts, model.expert_head, vit.get_classifier()):
            module.requires_grad_(True)
    return model
