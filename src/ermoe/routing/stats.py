"""Load statistics of an expert assignment: pure functions of a vector of per-expert token counts."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_float(counts_E: Tensor) -> Tensor:
    counts = torch.as_tensor(counts_E).detach().to(torch.float64).reshape(-1)
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
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2.0 * (i * c).sum() / (n * total) - (n + 1) / n)


def load_summary(counts_E: Tensor) -> dict[str, float]:
    """All four statistics in one dict."""
    return {"load_cv": load_cv(counts_E), "max_over_mean": max_over_mean(counts_E),
            "entropy": normalized_entropy(counts_E), "gini": gini(counts_E)}
