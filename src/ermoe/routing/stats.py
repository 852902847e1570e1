"""Load statistics of an expert assignment: pure functions of a vector of per-expert token counts."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_float(counts_E: Tensor) -> Tensor:
    # The statistics are host numbers: one copy to the host (a single sync for a device tensor), then CPU math
    counts = torch.as_tensor(counts_E).detach().to("cpu", torch.float64).reshape(-1)
    if counts.numel() == 0:
        raise ValueError("load statistics need at least one expert")
    if (counts < 0).any():
        raise ValueError("token counts must be non-negative")
    return counts


def load_cv(counts_E: Tensor) -> float:
    """Coefficient of variation ``std / mean`` (population std); 0 for a perfectly flat load."""
    c = _as_float(counts_E)
    mean = c.mean()
    return float(c.std(correction=0) / mean) if mean > 0 else 0.0


def max_over_mean(counts_E: Tensor) -> float:
    """Load of the busiest expert over the mean load (1 is flat; E means one expert takes everything)."""
    c = _as_float(counts_E)
    mean = c.mean()
    return float(c.max() / mean) if mean > 0 else 0.0


def normalized_entropy(counts_E: Tensor) -> float:
    """Entropy of the load distribution over ``log E``: 1 is flat, 0 is one expert (1 by convention when E=1)."""
    c = _as_float(counts_E)
    total = c.sum()
    if c.numel() == 1 or total == 0:
        return 1.0 if c.numel() == 1 else 0.0
    p = c / total
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum() / math.log(c.numel()))


def gini(counts_E: Tensor) -> float:
    """Gini coefficient of the load: 0 flat, ``1 - 1/E`` when one expert takes everything."""
    c = torch.sort(_as_float(counts_E)).values
    n, total = c.numel(), c.sum()
    if total == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    return float(2.0 * (i * c).sum() / (n * total) - (n + 1) / n)


def load_summary(counts_E: Tensor) -> dict[str, float]:
    """All four statistics in one dict."""
    return {"load_cv": load_cv(counts_E), "max_over_mean": max_over_mean(counts_E),
            "entropy": normalized_entropy(counts_E), "gini": gini(counts_E)}


def ep_rank_loads(counts_E: Tensor, ep_size: int) -> Tensor:
    """The assignments each rank of an expert-parallel deployment of ``ep_size`` ranks computes for these expert
    loads (float64, one per rank). ``ep_size <= E``: rank p holds experts ``[p E/P, (p+1) E/P)`` (as
    ``ermoe.distributed`` shards them) and computes their sum; ``ep_size > E``: each expert is replicated on
    ``P / E`` ranks that split its tokens evenly. Either way ``E`` and ``P`` must divide one another."""
    counts = torch.as_tensor(counts_E).detach().to(torch.float64).reshape(-1)
    num_experts = counts.numel()
    if not isinstance(ep_size, int) or ep_size < 1 or (num_experts % ep_size and ep_size % num_experts):
        raise ValueError(f"ep_size must be a positive int that divides or is divided by the {num_experts} experts, "
                         f"got {ep_size!r}")
    if ep_size <= num_experts:
        return counts.view(ep_size, num_experts // ep_size).sum(1)
    replicas = ep_size // num_experts
    return (counts / replicas).repeat_interleave(replicas)


def ep_straggler(counts_E: Tensor, ep_size: int) -> Tensor:
    """The busiest rank's assignments over the mean rank's (1 = no rank waits; a 0-dim float64 tensor, computed on
    the counts' device without a host sync): the factor by which load imbalance stretches the expert part of a step
    of an expert-parallel deployment, each rank waiting in the exchange for the slowest. 1 for an empty batch."""
    loads = ep_rank_loads(counts_E, ep_size)
    mean = loads.mean()
    return torch.where(mean > 0, loads.max() / mean.clamp_min(1e-300), torch.ones_like(mean))
