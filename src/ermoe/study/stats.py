"""The statistics behind the study's verdicts: a paired t-test over seeds (each method's run of seed s against the
baseline's run of seed s: same initial data order, same test set) whose standard error can also carry the test set's
own sampling error, and Holm's step-down correction for the several comparisons of a claim."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Paired:
    """``diff``: the mean over seeds of ``a_s - b_s``; ``se``: its standard error, from the seed-to-seed spread of
    the differences (``seed_se``) and the test set's sampling error (``test_se``, 0 when not given) added in
    quadrature; the confidence interval at ``level``, the two-sided p-value, the degrees of freedom (seeds - 1)
    and the number of seed pairs."""

    diff: float
    se: float
    low: float
    high: float
    p: float
    dof: float
    n: int
    seed_se: float
    test_se: float = 0.0


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95, test_var: float = 0.0) -> Paired | None:
    """Paired t-test of ``mean(a - b)`` (``a[i]`` and ``b[i]``: the same seed). ``test_var``: the variance of the
    mean difference that comes from which examples the test set holds (:func:`resampled_variance`), added to the
    seed part; the t quantile keeps the seeds' n - 1 degrees of freedom. None with fewer than 2 pairs or NaNs."""
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"paired: {len(x)} values against {len(y)}: pair them by seed first")
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    d = x - y
    n, diff = len(d), float(d.mean())
    seed_se = float(d.std(ddof=1)) / math.sqrt(n)
    test_se = math.sqrt(max(test_var, 0.0))
    se, dof = math.hypot(seed_se, test_se), float(n - 1)
    if se == 0.0:  # every pair differs by the same amount and no test-set error is given: the difference is exact
        return Paired(diff, 0.0, diff, diff, 1.0 if diff == 0 else 0.0, dof, n, 0.0, 0.0)
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return Paired(diff, se, diff - half, diff + half, p, dof, n, seed_se, test_se)


def interval(result: Paired, level: float) -> tuple[float, float]:
    """The confidence interval of ``result``'s difference at another ``level`` (a simultaneous, Bonferroni level)."""
    from scipy import stats

    if result.se == 0.0:
        return result.diff, result.diff
    half = float(stats.t.ppf(0.5 + level / 2, result.dof)) * result.se
    return result.diff - half, result.diff + half


def margin_p(result: Paired, margin: float, sign: float = 1.0) -> float:
    """The p-value of a non-inferiority test against ``margin``: H0 "the difference, oriented by ``sign`` (+1: higher
    is better), is ``-margin`` or worse", one-sided, doubled so that ``p < alpha`` exactly when the two-sided
    (1 - alpha) interval's lower end lies above ``-margin`` (the rule the interval states). What a family's
    correction ranks for a non-inferiority comparison (its p against 0 tests another hypothesis)."""
    from scipy import stats

    distance = sign * result.diff + margin
    if result.se == 0.0:
        return 0.0 if distance > 0 else 1.0
    return float(min(1.0, 2 * stats.t.sf(distance / result.se, result.dof)))


def bootstrap_weights(examples: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """``(draws, examples)`` resample counts: row b says how often each test example appears in bootstrap resample
    b (multinomial, each example equally likely). Fixed by ``seed``: every run and every comparison of a report is
    resampled the same way, so the runs stay paired at the example level too."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(examples, np.full(examples, 1.0 / examples), size=draws).astype(np.float64)


def resampled_variance(pairs: Sequence[tuple[np.ndarray, np.ndarray]], scale: float = 1.0) -> float:
    """The variance, over bootstrap resamples of the test examples, of the seed-averaged difference: ``pairs`` holds
    per seed the method's and the baseline's statistic on each resample (``(draws,)`` each, from the same
    :func:`bootstrap_weights`); ``scale`` multiplies the baseline's. The test set's part of a paired comparison's
    error (:func:`paired`'s ``test_var``)."""
    d = np.mean([a - scale * b for a, b in pairs], axis=0)
    return float(d.var(ddof=1))


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
    """One comparison of a claim: ``measure`` of the method against ``baseline`` (a method of the study; a study
    config may name another, :mod:`ermoe.study.plan`), ``better`` = which way the claim says the method differs.
    ``parity``: the claim is "at least as good" (non-inferiority) with the margin the study config fixed for the
    measure before it ran; otherwise it is "better" (superiority). ``scale``: the baseline's values are multiplied
    by it first (claim 7, "MAE more than 7% lower": the method's MAE against 0.93 x the baseline's)."""

    measure: str
    baseline: str
    better: str
    parity: bool = False
    scale: float = 1.0


def load_claims(where: str = "") -> list[tuple[str, str, list[Test]]]:
    """Claims 1 and 2, the same in every study (the routers' loads); ``where`` completes claim 1's text."""
    return [("1", f"flatter expert loads than a learned softmax gate without a balancing loss{where}",
             [Test("load_cv", "softmax_noloss", "lower")]),
            ("2", "load balance comparable to a balancing loss (load CV no higher than the balancing-loss baseline's "
                  "by the pre-registered margin or more)", [Test("load_cv", "switch", "lower", parity=True)])]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over the seeds where ``values`` is defined (NaN left out; std 0 for one value)."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
