"""The evaluation set's own sampling error of a study's comparisons: each run's per-example results
(``test_examples.npz``: one row per test example, caption-level arrays under ``caption/`` with their image in
``caption/owner``; ``val_examples.npz`` likewise for the validation images the preset check reads) give the compared
measure on bootstrap resamples of the examples, and the variance of the seed-averaged difference over those
resamples joins the seeds' in a paired test (:func:`ermoe.study.stats.paired`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .stats import bootstrap_weights, resampled_variance

BOOTSTRAP_DRAWS = 1000


# Each statistic: a run's per-example arrays and resample weights ``(draws, examples)`` -> the measure on each
# resample, ``(draws,)`` (None: the run did not record what it needs); with weights of ones, the run's own value.
def _weighted_mean(key: str) -> Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray | None]:
    def statistic(arrays: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray | None:
        return w @ arrays[key].astype(np.float64) / w.sum(1) if key in arrays else None
    return statistic


def _example_load_cv(arrays: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray | None:
    """The mean over the run's evenly routed layers of the load CV (population std over mean) of the resampled
    examples' expert counts."""
    layers = [k for k in arrays if k.startswith("load/")]
    if not layers:
        return None
    cvs = []
    for key in layers:
        c = w @ arrays[key].astype(np.float64)  # (draws, E)
        mean = c.mean(1)
        cvs.append(np.divide(c.std(1), mean, out=np.zeros_like(mean), where=mean > 0))
    return np.mean(cvs, axis=0)


def _example_rsum(arrays: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray | None:
    """RSUM over resampled test images: each image counts as often as it is drawn, its captions with it (the
    ranks stay those against the whole test set: the queries are resampled, the gallery is not)."""
    if not {"i2t_rank", "caption/t2i_rank", "caption/owner"} <= set(arrays):
        return None
    wc = w[:, arrays["caption/owner"]]  # (draws, captions): a caption weighs as its image
    total = 0.0
    for k in (1, 5, 10):
        total = total + w @ (arrays["i2t_rank"] <= k).astype(np.float64) / w.sum(1)
        total = total + (wc * (arrays["caption/t2i_rank"] <= k)).sum(1) / wc.sum(1)
    return 100 * total


# measure -> its statistic; a validation measure reads the runs' validation records (collect_examples(.., "val"))
EXAMPLE_STATISTICS = {"test_top1": _weighted_mean("correct"), "test_mae": _weighted_mean("abs_error"),
                      "load_cv": _example_load_cv, "test_rsum": _example_rsum,
                      "val_top1": _weighted_mean("correct"), "val_load_cv": _example_load_cv}


def examples_count(arrays: dict[str, np.ndarray]) -> int:
    """The test examples a run's per-example arrays hold (one row each; caption-level arrays, ``caption/*``, are
    indexed through ``caption/owner``)."""
    return len(next(v for k, v in arrays.items() if not k.startswith("caption/")))


def collect_examples(results, split: str = "test") -> dict[str, dict[float, dict[str, np.ndarray]]]:
    """method -> seed -> the per-example results of its run on ``split`` (``test``, ``val``; runs without the file
    are left out)."""
    from ..train.run import Run

    out: dict[str, dict[float, dict[str, np.ndarray]]] = {}
    for method, runs in results.items():
        for seed, metrics in runs.items():
            arrays = Run(Path(metrics["run"])).read_examples(split) if metrics.get("run") else None
            if arrays:
                out.setdefault(method, {})[float(seed)] = arrays
    return out


def sampling_variance(examples, method: str, baseline: str, measure: str, seeds: list[float], values: list[float],
                      base_values: list[float], scale: float) -> float | None:
    """The evaluation set's variance of the seed-averaged paired difference by bootstrap over its examples, when
    every paired run recorded its per-example results, they cover the same examples, and they give back the very
    values the report compares (else None: the comparison rests on the seeds alone)."""
    statistic = EXAMPLE_STATISTICS.get(measure)
    if statistic is None or not examples:
        return None
    runs = [(examples.get(method, {}).get(s), examples.get(baseline, {}).get(s)) for s in seeds]
    if any(a is None or b is None for a, b in runs):
        return None
    sizes = {examples_count(arrays) for pair in runs for arrays in pair}
    if len(sizes) != 1:
        return None
    n = sizes.pop()
    ones = np.ones((1, n))
    for (a, b), v, bv in zip(runs, values, base_values):
        own_a, own_b = statistic(a, ones), statistic(b, ones)
        if own_a is None or own_b is None or not (np.isclose(own_a[0], v, rtol=1e-6, atol=1e-9)
                                                  and np.isclose(scale * own_b[0], bv, rtol=1e-6, atol=1e-9)):
            return None
    w = bootstrap_weights(n, BOOTSTRAP_DRAWS)
    return resampled_variance([(statistic(a, w), statistic(b, w)) for a, b in runs], scale)
