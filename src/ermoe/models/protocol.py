"""The contract between a model and the rest of ermoe: what the training loop, the tasks and the diagnostics may
call on a model, and nothing else.

Every model that :func:`ermoe.create_model` builds is a :class:`RoutedModel`:

    features = model.forward_features(x)              # what the head reads (tokens, a feature map, ...)
    out = model.forward_head(features)                # the prediction; pre_logits=True: the pooled features
    out = model(x)                                    # forward_head(forward_features(x))
    loss = model.training_loss(out, target, criterion) + model.aux_loss()
    model.after_step(step)                            # after each optimizer step: every update outside gradients
    model.routed_layers()                             # a read-only view of every routing layer
    model.batch_metrics(out, target)                  # whole-model measures (sums over the batch), default none

State that changes outside gradient descent (a basis retraction, a loss-free bias, a k-means initialisation)
changes in :meth:`RoutedModel.after_step`, never in ``forward``.

A layer that routes (an MoE over tokens, DeepMoE's gated convolution) subclasses :class:`RoutingLayer`, so the
diagnostics can find it; :meth:`RoutedModel.routed_layers` lists them as :class:`RoutedLayer` views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..moe import MoE
from ..moe import after_step as moe_after_step
from ..moe import aux_loss as moe_aux_loss
from ..moe import moe_layers
from ..routing import ROUTERS, Router
from ..routing.base import RoutingInfo, graph_free_state

Criterion = Callable[[Tensor, Tensor], Tensor]


class RoutingLayer(nn.Module):
    """Base of the layers that route, with what the diagnostics read of them.

    ``num_experts``: how many experts (or gated channels) it chooses among; ``last_routing``: the
    :class:`~ermoe.RoutingInfo` of its last forward (None before one); :meth:`token_moe`: the token-routing
    :class:`~ermoe.MoE` it applies, whose experts and router the expert-level diagnostics read;
    ``expert_parallel``: whether its experts are modules an expert-parallel deployment could place on ranks, so that
    its loads have a straggler factor (False for gated channels).
    """

    num_experts: int
    last_routing: RoutingInfo | None
    expert_parallel: bool = True

    def __getstate__(self) -> dict:
        return graph_free_state(self)  # per-forward tensors with a graph (gates kept for a loss) are not copied

    def token_moe(self) -> MoE | None:
        """The :class:`~ermoe.MoE` this layer routes tokens with; None for other routing (channel gates)."""
        return None

    def token_mask(self) -> Tensor | None:
        """For a layer whose MoE routes some positions of its ``(B, N, D)`` input (the text tower's real tokens):
        the ``(B, N)`` bool mask of the current forward, whose true positions, in row-major order, are the MoE's
        tokens. None: the MoE receives the ``(B, N, D)`` input itself."""
        return None


class TokenMoELayer(RoutingLayer):
    """A routing layer that applies one token :class:`~ermoe.MoE` (``self.moe``) to the tokens of its input (a ViT
    block's patch tokens, a 3D feature map's cells); its expert count and routing are the MoE's."""

    moe: MoE

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def last_routing(self) -> RoutingInfo | None:
        return self.moe.last_routing

    def token_moe(self) -> MoE:
        return self.moe


@dataclass(frozen=True)
class RoutedLayer:
    """A read-only view of one routing layer of a model: its qualified name, expert count and last routing."""

    name: str
    layer: RoutingLayer

    @property
    def num_experts(self) -> int:
        return self.layer.num_experts

    @property
    def last_routing(self) -> RoutingInfo | None:
        return self.layer.last_routing

    @property
    def moe(self) -> MoE | None:
        return self.layer.token_moe()


def router_has_data_init(router: str | type[Router] | Router) -> bool:
    """Whether a router (by name, class or instance) sets state from sample features (PCA bases)."""
    cls = ROUTERS[router] if isinstance(router, str) else router if isinstance(router, type) else type(router)
    return cls.init_from_features is not Router.init_from_features


class RoutedModel(nn.Module):
    """Base class of every ermoe model; the defaults fit a model whose routing lives in :class:`RoutingLayer`
    layers and whose loss is the task's criterion alone.

    Subclasses define :meth:`forward_features` and :meth:`forward_head` (timm's split; a timm model mixed in before
    this class brings its own). Whole-model baselines override :meth:`training_loss`, :meth:`batch_metrics`,
    :meth:`after_step` and :attr:`experts_active` where their method says so.
    """

    # Whether a training step can leave trainable parameters without a gradient (a phase in which a branch does not
    # run): data-parallel training then has DDP look for them every step (``find_unused_parameters``).
    may_skip_parameters: bool = False

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward_features")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward_head")

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def __getstate__(self) -> dict:
        return graph_free_state(self)  # per-forward caches with a graph (logits kept for a loss) are not copied

    def training_loss(self, output: Tensor, target: Tensor, criterion: Criterion) -> Tensor:
        """The loss to minimise, without the routers' auxiliary losses (:meth:`aux_loss`): the task's criterion,
        plus whatever terms the model's method adds (an early-exit branch, a gate sparsity penalty)."""
        return criterion(output, target)

    def aux_loss(self) -> Tensor:
        """The weighted auxiliary losses of every MoE layer's last forward (balancing, z-loss, orthogonality)."""
        return moe_aux_loss(self)

    @torch.no_grad()
    def batch_metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Whole-model measures of one evaluation batch, as sums over its examples (the evaluation divides by the
        example count). None by default."""
        return {}

    def routed_layers(self) -> list[RoutedLayer]:
        """Every routing layer, in module order, with its qualified name."""
        return [RoutedLayer(name, m) for name, m in self.named_modules() if isinstance(m, RoutingLayer)]

    @property
    def token_grid(self) -> dict[str, tuple[int, ...]]:
        """Per routing layer (by qualified name) whose tokens tile the input on a grid (a 3D feature map, volumetric
        patches), that grid; tokens are in row-major cell order. Expert maps over the input need it. None here."""
        return {}

    @property
    def token_sites(self) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
        """Where a routing layer reads its tokens, also in the dense counterpart of a routed model: per place (the
        routing layer's qualified name), the module whose input is the ``(B, N, C)`` tokens (the MoE, or the dense
        FFN in its place) and the grid they tile (what a linear probe of a ground truth reads,
        ``ermoe.analysis.token_probe``). None here."""
        return {}

    @property
    def token_sequence(self) -> dict[str, int]:
        """Per routing layer (by qualified name) whose tokens are the positions of a sequence of token ids among the
        model's inputs (a text tower), the index of that input in ``forward``'s arguments. None here."""
        return {}

    @property
    def experts_active(self) -> bool:
        """Whether the experts take part in training now (False during a base-only warm-up phase)."""
        return True

    def on_train_start(self, total_steps: int) -> None:
        """Called once by the training loop before the first step (and again on resume) with the run's length."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step; ``step`` counts the steps done. Default: every MoE layer's router
        update (basis retraction, loss-free bias, basis re-estimation)."""
        moe_after_step(self)

    def shard_units(self) -> list[nn.Module]:
        """The submodules FSDP2 shards as units of their own (``shard: fsdp``): each one's weights are gathered for
        its forward and freed after; the rest of the model is one unit. None by default (the whole model is one)."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of the model's blocks (ViT blocks, CNN stages) in backward instead of keeping
        them (``model.grad_checkpointing``; :mod:`ermoe.models.checkpointing`). A model without it says so."""
        raise NotImplementedError(f"model {type(self).__name__} has no activation checkpointing "
                                  "(model.grad_checkpointing)")

    def input_normalization(self, pretrained: bool) -> tuple[Sequence[float], Sequence[float]] | None:
        """Per-channel (mean, std) the model's inputs must be normalised with, when its weights dictate one (a
        pretrained backbone); None: the data's own statistics. ``pretrained``: whether the weights came from
        pretraining (a rebuilt skeleton cannot tell)."""
        return None

    def frozen_stem(self) -> nn.Module | None:
        """A frozen first stage whose output is a fixed function of each input (a pretrained stem), with
        ``frozen_features(x)`` and ``frozen_state()`` (the tensors those features depend on) methods; the model then also accepts that output in place of its input, so a task may
        compute it once per example and cache it. None by default."""
        return None

    def active_parameters(self) -> int:
        """Parameters one token uses: all, less the experts it is not routed to (top_k of num_experts per MoE)."""
        total = sum(p.numel() for p in self.parameters())
        for _, layer in moe_layers(self):
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            total -= round(expert_params * (1 - layer.top_k / layer.num_experts))
        return total

    @torch.no_grad()
    def init_routers_from_data(self, batches: Iterable[Sequence[Tensor]]) -> list[str]:
        """Data-dependent router initialisation (PCA bases) from the tokens each MoE layer sees on ``batches``
        (tuples of model inputs). Layers are done in order, each after a fresh pass in eval mode, so a layer sees
        the features that the already-initialised layers before it produce. Returns the names of the layers set;
        routers without data-dependent state are skipped."""
        batches = list(batches)
        was_training = self.training
        self.eval()
        done = []
        try:
            for view in self.routed_layers():
                moe = view.moe
                if moe is None or not router_has_data_init(moe.router):
                    continue
                seen: list[Tensor] = []
                handle = moe.register_forward_pre_hook(
                    lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()))
                try:
                    for inputs in batches:
                        self(*inputs)
                finally:
                    handle.remove()
                moe.init_from_features(torch.cat(seen).to(next(moe.parameters()).device))
                done.append(view.name)
        finally:
            self.train(was_training)
        return done
