"""Pieces shared by the eigen routers: temperature, running statistics for balancing without a loss.

Shape suffixes: T tokens, E experts, R basis rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sync import SyncGroup, at_least_one, global_count, global_sum, update_weight


class Temperature(nn.Module):
    """A softmax temperature ``tau``: fixed, or learned through ``log tau`` (so it stays positive)."""

    def __init__(self, init: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        if not (isinstance(init, (int, float)) and math.isfinite(init) and init > 0):
            raise ValueError(f"temperature must be a positive finite number, got {init!r}")
        self.learnable = learnable
        self.init = float(init)
        if learnable:
            self.log_tau = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self, logits: Tensor) -> Tensor:
        return logits / self.log_tau.exp() if self.learnable else logits / self.init

    @property
    def value(self) -> float:
        return float(self.log_tau.detach().exp()) if self.learnable else self.init

    def extra_repr(self) -> str:
        return f"tau={self.value:.4g}, learnable={self.learnable}"


class ScoreStandardizer(nn.Module):
    """Per-expert score standardisation (docs/method.md, section 7): BatchNorm over the expert axis without affine.

    Training with more than one token: batch mean and variance (gradients flow through them, as in BatchNorm), and
    the running statistics are updated; evaluation, or a single token: the running statistics. With a ``sync_group``
    the batch is every rank's tokens, as SyncBatchNorm.
    """

    sync_group: SyncGroup | None = None

    def __init__(self, num_experts: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"standardize momentum must be in (0, 1], got {momentum!r}")
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_experts))
        self.register_buffer("running_var", torch.ones(num_experts))

    def forward(self, scores_TE: Tensor) -> Tensor:
        if self.sync_group is not None:
            return self._synced(scores_TE)
        use_batch = self.training and scores_TE.shape[0] > 1
        out = F.batch_norm(scores_TE.to(self.running_mean.dtype), self.running_mean, self.running_var,
                           training=use_batch, momentum=self.momentum, eps=self.eps)
        return out.to(scores_TE.dtype)

    def _synced(self, scores_TE: Tensor) -> Tensor:
        x_TE = scores_TE.to(self.running_mean.dtype)
        if not self.training:
            return self._normalize(x_TE, self.running_mean, self.running_var).to(scores_TE.dtype)
        # The global token count stays on the device: the batch statistics are chosen by torch.where, not by a branch.
        num = global_count(x_TE.shape[0], self.sync_group, x_TE.device)
        use_batch = num > 1
        # Two passes (mean, then squared deviations), as numerically safe as F.batch_norm's own.
        mean_E = global_sum(x_TE.sum(dim=0), self.sync_group) / at_least_one(num)
        var_E = global_sum((x_TE - mean_E).pow(2).sum(dim=0), self.sync_group) / at_least_one(num)
        with torch.no_grad():
            weight = self.momentum * use_batch.to(x_TE.dtype)
            self.running_mean.lerp_(mean_E.detach(), weight)
            self.running_var.lerp_(var_E.detach() * num / (num - 1).clamp_min(1), weight)
        mean_E = torch.where(use_batch, mean_E, self.running_mean)
        var_E = torch.where(use_batch, var_E, self.running_var)
        return self._normalize(x_TE, mean_E, var_E).to(scores_TE.dtype)

    def _normalize(self, x_TE: Tensor, mean_E: Tensor, var_E: Tensor) -> Tensor:
        return (x_TE - mean_E) / (var_E + self.eps).sqrt()


class EnergyWhitener(nn.Module):
    """Divide each basis direction's energy by its mean energy (docs/method.md, section 7, "whitened energies").

    Every direction then has the same expected share (1), so no direction wins merely because it carries more of
    the features' variance. Batch means in training (the running mean is updated), running means in evaluation.
    With a ``sync_group`` the batch is every rank's tokens.
    """

    sync_group: SyncGroup | None = None

    def __init__(self, rank: int, momentum: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.full((rank,), 1.0 / rank))

    def forward(self, energy_TR: Tensor) -> Tensor:
        if not self.training:
            return energy_TR / (self.running_mean.to(energy_TR.dtype) + self.eps)
        # Over no tokens the output is empty whatever the mean; only the running mean must stay: a zero lerp weight
        # (under a group the count is a device tensor, and no branch reads it on the host).
        num = global_count(energy_TR.shape[0], self.sync_group, energy_TR.device)
        mean_R = global_sum(energy_TR.sum(dim=0), self.sync_group) / at_least_one(num)
        with torch.no_grad():
            self.running_mean.lerp_(mean_R.detach().to(self.running_mean.dtype),
                                    update_weight(self.momentum, num, self.running_mean))
        return energy_TR / (mean_R + self.eps)
