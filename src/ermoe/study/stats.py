"""The statistics behind the study's verdicts: Welch's t-test with its confidence interval for a difference of
means over seeds, and Holm's step-down correction for the several comparisons of one claim."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Welch:
    """``diff = mean(a) - mean(b)``, its standard error, its confidence interval at ``level``, the two-sided
    p-value, the degrees of freedom (Welch-Satterthwaite), and the sample standard deviations."""

    diff: float
    se: float
    low: float
    high: float
    p: float
    dof: float
    std_a: float
    std_b: float


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Welch | None:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)`` (None with fewer than 2 values a side or NaNs)."""
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff, se = float(x.mean() - y.mean()), math.sqrt(va + vb)
    std_a, std_b = float(x.std(ddof=1)), float(y.std(ddof=1))
    if se == 0.0:  # both samples constant: the difference is exact
        return Welch(diff, 0.0, diff, diff, 1.0 if diff == 0 else 0.0, float("inf"), std_a, std_b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return Welch(diff, se, diff - half, diff + half, p, dof, std_a, std_b)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error control); None entries are left out of the family
    and stay None."""
    known = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(known)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Test:
    """One comparison of a claim: ``measure`` of the method against ``baseline`` (a method, or ``best_balanced``:
    the better of Switch and V-MoE on that measure), ``better`` = which way the claim says the method differs.
    ``parity``: the claim is "at least as good" (non-inferiority) with a margin of two standard deviations of the
    baseline's own seed-to-seed spread (a smaller difference is within what reruns of the baseline itself vary
    by); otherwise it is "better" (superiority). ``scale``: the baseline's values are multiplied by it first (claim
    7, "MAE more than 7% lower": the method's MAE against 0.93 x the baseline's)."""

    measure: str
    baseline: str
    better: str
    parity: bool = False
    scale: float = 1.0
