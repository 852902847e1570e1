"""Auxiliary routing losses as pure functions (unweighted; routers apply their weights).

Each is a function of sums over the tokens; ``sync`` (a :class:`~ermoe.routing.sync.SyncGroup`) makes them sums over
every rank's tokens, so a data-parallel run computes the loss of the global batch (docs/distributed.md).

Shape suffixes: T tokens, E experts, K selections per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import count_per_expert
from .sync import SyncGroup, at_least_one, global_count, global_sum


def switch_balancing_loss(probs_TE: Tensor, topk_idx_TK: Tensor, sync: SyncGroup | None = None) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i``: selections of expert i per token (summed over the k choices, as Hugging Face's
    ``load_balancing_loss_func``; for top-1 the fraction of tokens sent to i). ``P_i``: mean router probability of
    expert i. Equals 1 under perfectly uniform routing with top-1.
    """
    num_experts = probs_TE.shape[1]
    num_tokens = at_least_one(global_count(probs_TE.shape[0], sync, probs_TE.device))  # 0 over no tokens
    counts_E = global_sum(count_per_expert(topk_idx_TK, num_experts), sync).to(probs_TE.dtype)
    mean_prob_E = global_sum(probs_TE.sum(dim=0), sync) / num_tokens
    return num_experts * torch.dot(counts_E / num_tokens, mean_prob_E)


def router_z_loss(logits_TE: Tensor, sync: SyncGroup | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    num_tokens = at_least_one(global_count(logits_TE.shape[0], sync, logits_TE.device))
    return global_sum(torch.logsumexp(logits_TE, dim=-1).pow(2).sum(), sync) / num_tokens


def _cv_squared(x_E: Tensor) -> Tensor:
    # Squared coefficient of variation with the population std (jnp.std), as V-MoE.
    mean = x_E.mean()
    return ((x_E - mean).pow(2).mean() / mean.pow(2).clamp_min(torch.finfo(x_E.dtype).tiny))


def importance_loss(probs_TE: Tensor, sync: SyncGroup | None = None) -> Tensor:
    """V-MoE importance loss: squared coefficient of variation of ``sum_t p_{t,i}`` over experts."""
    return _cv_squared(global_sum(probs_TE.sum(dim=0), sync))


def vmoe_load_loss(logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std: float, k: int,
                   sync: SyncGroup | None = None) -> Tensor:
    """V-MoE load loss (Riquelme et al. 2021, appendix A).

    For each token the threshold is its k-th largest noisy logit; ``p_{t,i} = P(logit_{t,i} + noise > threshold)``
    ``= 1 - Phi((threshold_t - logit_{t,i}) / noise_std)`` is differentiable in the logits (the threshold too,
    as in V-MoE's code). The loss is the
    squared coefficient of variation of ``sum_t p_{t,i}`` over experts.
    """
    num_tokens = at_least_one(global_count(logits_TE.shape[0], sync, logits_TE.device))
    threshold_T = torch.topk(noisy_logits_TE, k, dim=-1).values[:, -1:]
    z = (threshold_T - logits_TE) / noise_std
    prob_TE = 0.5 * torch.erfc(z / math.sqrt(2.0))  # 1 - Phi(z)
    return _cv_squared(global_sum(prob_TE.sum(dim=0), sync) / num_tokens)
