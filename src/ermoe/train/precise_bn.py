"""BatchNorm statistics recomputed from training batches ("precise BN"; Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", section 3).

BatchNorm's running averages trail the weights: with a fast-moving network (Adam at 1e-3, a few hundred steps) the
exponential average mixes statistics of many past networks, and evaluation-mode outputs drift far from what the
same weights give with batch statistics. On the brain-age CNN the validation MAE after each epoch swung between 3
and 25 years while the training MAE fell smoothly; recomputing the statistics with the current weights removed the
swings (docs/brainage.md, "Evaluation and BatchNorm"). ``TrainConfig.bn_recalibration`` turns this on: before every
checkpoint, so that checkpoints, routing probes and evaluations all see the recomputed statistics.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..distributed import GlobalBatchNorm
from ..routing.oracle import routed_by


def trainable_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose statistics training updates (in training mode and tracking running stats); a
    frozen pretrained stem kept in eval mode is not among them."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[Tensor, ...]],
                          layers: list[nn.modules.batchnorm._BatchNorm] | None = None,
                          groups: Sequence[Tensor | None] | None = None) -> int:
    """Replace the running mean and variance of ``layers`` (default: :func:`trainable_batchnorms`) by the equal-weight
    average of their batch statistics over ``batches`` (each the model's positional inputs), computed with the
    current weights. Everything else runs in eval mode, so routers, dropout and noise behave as at evaluation and no
    routing state (loss-free biases, standardisation statistics) moves. The statistics are this process's: a
    BatchNorm synced over a distributed job (``ermoe.distributed.GlobalBatchNorm``) is not synced here, since every
    rank recalibrates on the same batches. Restores each module's mode, momentum and sync; returns the number of
    batches used. ``groups``: each batch's examples' ground-truth groups, for an oracle router
    (``ermoe.routing.oracle``)."""
    layers = trainable_batchnorms(model) if layers is None else layers
    batches = list(batches)
    if not batches:
        raise ValueError("recalibrate_batchnorm needs at least one batch")
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in layers]
    synced = [m for m in layers if isinstance(m, GlobalBatchNorm)]
    syncs = [m.sync_group for m in synced]
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
            m.train()
        for m in synced:
            m.sync_group = None
        for inputs, batch_groups in zip(batches, groups if groups is not None else [None] * len(batches)):
            with routed_by(model, batch_groups):
                model(*inputs)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, sync in zip(synced, syncs):
            m.sync_group = sync
        for m, mode in modes.items():
            m.training = mode
    return len(batches)
