"""Brain age from T1 MRI volumes (docs/brainage.md): regression of the age at the scan with an L1 loss in years,
MAE / RMSE / Pearson r / brain-age gap with and without the usual age-bias correction, and where the experts work
in the brain (expert maps over the MNI grid, MI(expert; tissue), and on the built-in cohort a score against the
generator's ground-truth ageing map).

Two losses (``task_options.loss``): ``l1`` (default; the model predicts standardised age, ``(age - mean) / sd`` of
the training ages, so its head starts in range) and ``soft_bins`` (SFCN, Peng et al. 2021: the model predicts a
distribution over age bins of ``bin_width`` years covering the training ages with a margin, trained by KL divergence
to a Gaussian soft label of sd ``bin_sigma`` around the true age; the prediction is the distribution's mean). Every
metric is in years.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..analysis.brain_maps import draw_expert_maps
from ..analysis.diagnostics import (TEST_EXAMPLES, ExampleLoads, PerExample, RoutingCounts, entropy_bits, evaluating,
                                   mutual_information, probe_routing)
from ..data.cohort import PATTERNS
from ..data.nifti import VolumeStore
from ..data.volume_batches import VolumeBatches
from ..models.registry import model_parameters
from ..routing.oracle import routed_by
from ..routing.stats import load_summary
from ..settings import FORBID_EXTRA
from .base import Batch, Objective, Task, register_task

TISSUES = ("background", "csf", "gm", "wm")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r (torchmetrics, float64); NaN where it is undefined (fewer than 2 values, a constant side)."""
    from torchmetrics.functional import pearson_corrcoef

    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(pearson_corrcoef(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))


def age_metrics(pred: np.ndarray, age: np.ndarray, prefix: str = "test_") -> dict[str, float]:
    """MAE, RMSE (torchmetrics, float64), Pearson r of prediction and age, the mean brain-age gap (pred - age) and its
    correlation with age (the age bias)."""
    from torchmetrics.functional import mean_absolute_error, mean_squared_error

    p, a = (torch.as_tensor(v, dtype=torch.float64) for v in (pred, age))
    gap = pred - age
    return {f"{prefix}mae": float(mean_absolute_error(p, a)),
            f"{prefix}rmse": float(mean_squared_error(p, a, squared=False)),
            f"{prefix}r": pearson(pred, age), f"{prefix}gap_mean": float(gap.mean()),
            f"{prefix}gap_age_r": pearson(gap, age)}


def volume_routing_stats(idx_NK: Tensor, age: np.ndarray, num_experts: int) -> dict[str, Any]:
    """Routing of whole volumes (one token each, ``-1`` = a dropped choice): volumes per expert with the load
    statistics, each expert's mean age, and MI(expert; age tertile) in bits (do experts split the lifespan?)."""
    rows = torch.arange(idx_NK.shape[0]).unsqueeze(1).expand_as(idx_NK)
    keep = idx_NK >= 0
    experts, volumes = idx_NK[keep], rows[keep]
    per_expert = torch.bincount(experts, minlength=num_experts)
    tertile = torch.from_numpy(np.searchsorted(np.quantile(age, [1 / 3, 2 / 3]), age, side="right"))
    joint = torch.zeros(num_experts, 3, dtype=torch.long)
    joint.index_put_((experts, tertile[volumes]), torch.ones_like(experts), accumulate=True)
    ages = torch.from_numpy(age).double()
    mean_age = [float(ages[volumes[experts == e]].mean()) if per_expert[e] else None for e in range(num_experts)]
    return {"tokens_per_expert": per_expert.tolist(), **load_summary(per_expert), "expert_mean_age": mean_age,
            "expert_age_tertile_counts": joint.tolist(), "mi_age_tertile_bits": mutual_information(joint)}


def fit_age_bias(pred: np.ndarray, age: np.ndarray) -> tuple[float, float]:
    """The linear fit ``gap = a + b * age`` (Smith et al. 2019), made on held-out (validation) predictions."""
    b, a = np.polyfit(age, pred - age, 1)
    return float(a), float(b)


def correct_age_bias(pred: np.ndarray, age: np.ndarray, fit: tuple[float, float]) -> np.ndarray:
    a, b = fit
    return pred - (a + b * age)


def cell_labels(label_map: np.ndarray, grid: tuple[int, int, int], num_labels: int) -> np.ndarray:
    """The majority label of the voxels each token cell covers (cells tile the volume)."""
    one_hot = F.one_hot(torch.from_numpy(label_map.astype(np.int64)), num_labels).permute(3, 0, 1, 2).float()
    shares = F.adaptive_avg_pool3d(one_hot[None], grid)[0]
    return shares.argmax(0).flatten().numpy()


def cell_means(value_map: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    return F.adaptive_avg_pool3d(torch.from_numpy(value_map.astype(np.float32))[None, None], grid).flatten().numpy()


def expert_anatomy(counts_EN: np.ndarray, tissue_N: np.ndarray, age_map_N: np.ndarray | None) -> dict[str, Any]:
    """What the experts cover: MI(expert; tissue class of the token's cell) in bits and over H(tissue); with a
    ground-truth ageing map, MI(expert; age-sensitive cell) where the sensitive cells are the top quarter of brain
    cells by the map, the largest enrichment of one expert in them (its share of sensitive tokens over the overall
    share; blind to expert size and chance) and ``age_map_ami``: the AMI between the expert map and the
    sensitive cells (:func:`map_agreement`)."""
    counts = torch.from_numpy(counts_EN.astype(np.int64))
    by_tissue = torch.zeros(counts.shape[0], len(TISSUES), dtype=torch.long)
    by_tissue.index_add_(1, torch.from_numpy(tissue_N.astype(np.int64)), counts)
    mi = mutual_information(by_tissue)
    h = entropy_bits(by_tissue.sum(0))
    out: dict[str, Any] = {"mi_tissue_bits": mi, "mi_tissue_over_entropy": mi / h if h > 0 else float("nan"),
                           "expert_tissue_counts": by_tissue.tolist()}
    if age_map_N is not None:
        brain = tissue_N > 0
        threshold = np.quantile(age_map_N[brain], 0.75) if brain.any() else np.inf
        sensitive = torch.from_numpy((brain & (age_map_N >= threshold)).astype(np.int64))
        joint = torch.zeros(counts.shape[0], 2, dtype=torch.long)
        joint.index_add_(1, sensitive, counts)
        share = joint[:, 1].double() / joint.sum(1).clamp_min(1)
        overall = joint[:, 1].sum().double() / joint.sum().clamp_min(1)
        h_age = entropy_bits(joint.sum(0))
        mi_age = mutual_information(joint)
        out.update(mi_age_bits=mi_age, mi_age_over_entropy=mi_age / h_age if h_age > 0 else float("nan"),
                   age_expert_enrichment=float((share / overall).max()) if overall > 0 else float("nan"),
                   expert_age_counts=joint.tolist(),
                   age_map_ami=map_agreement(counts_EN, sensitive.numpy(), brain))
    return out


def _ami(contingency: np.ndarray) -> float:
    """Adjusted mutual information (scikit-learn's, arithmetic normalisation) of a ``(rows, columns)`` table of
    counts: 0 for what chance and the row and column sizes alone give, 1 for a perfect match; NaN with one row or
    column (nothing to tell apart)."""
    from sklearn.metrics import adjusted_mutual_info_score

    table = np.asarray(contingency, dtype=np.int64)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return float("nan")
    rows, cols = np.nonzero(table)
    weights = table[rows, cols]
    return float(adjusted_mutual_info_score(np.repeat(rows, weights), np.repeat(cols, weights)))


def pattern_routing(counts_EPN: np.ndarray, pattern_cells_N: np.ndarray, brain_N: np.ndarray) -> dict[str, Any]:
    """On a heterogeneous cohort (``counts_EPN``: tokens per expert, subject pattern and cell, flattened as
    ``(E, P * N)``): ``pattern_map_ami``, the AMI between the expert map and the ground-truth pattern map (which
    pattern ages each cell, 0 where they age alike); ``pattern_subject_ami``, the AMI between a token's expert and
    its subject's pattern over the cells where the patterns differ (does routing follow how the person ages?), with
    the ``(E, P)`` table it comes from."""
    counts = np.asarray(counts_EPN).reshape(counts_EPN.shape[0], -1, len(pattern_cells_N))
    where = pattern_cells_N > 0
    by_subject = counts[:, :, where].sum(2)
    return {"pattern_map_ami": map_agreement(counts.sum(1), pattern_cells_N, brain_N),
            "pattern_subject_ami": _ami(by_subject), "expert_pattern_counts": by_subject.tolist()}


def map_agreement(counts_EN: np.ndarray, truth_N: np.ndarray, brain_N: np.ndarray) -> float:
    """AMI between the expert map (each brain cell's majority expert) and a ground-truth label map over the same
    brain cells (each cell counted once): chance-corrected and size-aware, unlike an enrichment of one expert."""
    counts = np.asarray(counts_EN)
    routed = brain_N & (counts.sum(0) > 0)
    majority = counts[:, routed].argmax(0)
    truth = np.asarray(truth_N)[routed].astype(np.int64)
    table = np.zeros((counts.shape[0], int(truth.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(table, (majority, truth), 1)
    return _ami(table)


PROBE_TRAIN_VOLUMES = 200  # training volumes the pattern probe fits on (BrainAge.pattern_probe)


@dataclass
class BrainAgeOptions:
    __pydantic_config__ = FORBID_EXTRA
    loss: Literal["l1", "soft_bins"] = "l1"
    bin_width: float = 1.0  # years (SFCN: 1)
    bin_sigma: float = 1.0  # sd of the Gaussian soft label, years (SFCN: 1)

    def __post_init__(self) -> None:
        if self.loss == "l1" and (self.bin_width, self.bin_sigma) != (1.0, 1.0):
            raise ValueError("task_options.bin_width and bin_sigma apply to loss soft_bins only")
        if not (self.bin_width > 0 and self.bin_sigma > 0):
            raise ValueError(f"task_options.bin_width and bin_sigma must be > 0, got {self.bin_width}, "
                             f"{self.bin_sigma}")


def age_bins(ages: np.ndarray, width: float, margin: float) -> np.ndarray:
    """Bin centres every ``width`` years from below the youngest to above the oldest age, ``margin`` years out."""
    low = math.floor((float(ages.min()) - margin) / width) * width
    high = math.ceil((float(ages.max()) + margin) / width) * width
    return np.arange(low, high + width / 2, width, dtype=np.float32)


def soft_labels(age: Tensor, centres: Tensor, sigma: float) -> Tensor:
    """``(B, bins)``: a Gaussian of sd ``sigma`` around each age, evaluated at the bin centres and normalised."""
    logits = -0.5 * ((centres[None, :] - age[:, None].float()) / sigma) ** 2
    return torch.softmax(logits, dim=1)


class AgeObjective(Objective):
    """Age in years from the model's output: ``l1`` (the output is the standardised age, ``(age - mean) / sd`` of
    the training ages) or ``soft_bins`` (SFCN: the output is a distribution over age bins ``centres``, trained by KL
    divergence to a Gaussian soft label of sd ``sigma``; the prediction is its mean). Logs the absolute errors."""

    def __init__(self, age_mean: float, age_sd: float, centres: Tensor | None = None, sigma: float = 1.0) -> None:
        self.age_mean, self.age_sd, self.centres, self.sigma = age_mean, age_sd, centres, sigma

    def years(self, output: Tensor) -> Tensor:
        if self.centres is not None:
            return torch.softmax(output.float(), dim=1) @ self.centres
        return self.age_mean + self.age_sd * output[:, 0].float()

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.centres is not None:
            labels = soft_labels(target, self.centres, self.sigma)
            return F.kl_div(torch.log_softmax(output.float(), dim=1), labels, reduction="batchmean")
        return F.l1_loss(self.years(output), target.float())

    def batch_stats(self, output: Tensor, batch: Batch) -> dict[str, Tensor]:
        return {"mae": (self.years(output) - batch.target).abs().sum()}


@register_task
class BrainAge(Task):
    name = "brain_age"
    Options = BrainAgeOptions
    options: BrainAgeOptions
    datasets = ("brain_cohort", "nifti_csv")
    model_data_args = ("in_chans", "volume_shape", "num_outputs", "spacing")

    def load(self) -> None:
        try:
            import nibabel  # noqa: F401
            import nilearn  # noqa: F401
        except ImportError as err:
            raise ImportError(f"brain age reads NIfTI with nibabel and nilearn ({err}): pip install -e '.[brain]'") \
                from None
        d = self.setup.data
        # the CSV of scans (the built-in cohort generates its own once) and, for the built-in cohort, its ground truth
        self.csv_path, self.cohort_info = d.scans_csv()
        self.batches = VolumeBatches(self.csv_path, d, self.sampling)
        self.batches.groups = self._read_patterns()
        ages = self.batches.ages("train")
        self.age_mean, self.age_sd = float(ages.mean()), float(ages.std()) or 1.0
        self.shape = self.batches.shape
        self.centres = None
        if self.options.loss == "soft_bins":  # a margin of 3 sd: the labels of the oldest and youngest fit
            bins = age_bins(ages, self.options.bin_width, 3 * self.options.bin_sigma)
            self.centres = torch.from_numpy(bins).to(self.device)
        self.objective = AgeObjective(self.age_mean, self.age_sd, self.centres, self.options.bin_sigma)

    @property
    def stores(self) -> dict[str, VolumeStore]:
        return self.batches.stores

    def model_args(self) -> dict[str, Any]:
        args = {**self.batches.model_args(), "num_outputs": 1 if self.centres is None else len(self.centres)}
        if "spacing" in model_parameters(self.setup.model_name):  # a model that places MNI maps on the grid
            args["spacing"] = self.setup.data.spacing
        return args

    def years(self, output: Tensor) -> Tensor:
        return self.objective.years(output)

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, autocast: Callable[[], Any],
                on_batch: Callable[[Batch], None] | None = None) -> np.ndarray:
        preds = []
        with evaluating(model):
            for batch in self.eval_batches(split):
                with autocast(), routed_by(model, batch.groups):
                    preds.append(self.years(model(*batch.inputs)).cpu())
                if on_batch is not None:
                    on_batch(batch)
        return torch.cat(preds).numpy()

    def evaluate(self, model: nn.Module, autocast: Callable[[], Any], probe: Batch | None = None) -> dict[str, Any]:
        layers = model.routed_layers()
        grids = model.token_grid
        # a token's label: its cell of the layer's token grid (mapped to tissue and the ageing map below)
        counts = RoutingCounts(layers, {v.name: int(np.prod(grids[v.name])) for v in layers if v.name in grids})
        per_volume: dict[str, list[Tensor]] = {v.name: [] for v in layers if v.name not in grids}
        cell_loads = ExampleLoads([v for v in layers if v.name in grids])  # each test volume's cells per expert
        patterns = self.test_patterns()  # heterogeneous cohort: each test subject's ageing pattern
        by_pattern = None if patterns is None else RoutingCounts(
            [v for v in layers if v.name in grids],
            {v.name: int(np.prod(grids[v.name])) * len(PATTERNS) for v in layers if v.name in grids})
        seen = 0

        def count(batch: Batch) -> None:
            nonlocal seen
            for view in layers:
                if view.name in per_volume:  # one token per volume (regional experts): its experts
                    per_volume[view.name].append(view.last_routing.expert_idx.cpu())
            counts.add(lambda info, tokens: tokens % (info.num_tokens // len(batch)))
            cell_loads.add(len(batch))
            if by_pattern is not None:  # label: pattern * cells + cell
                def label(info, tokens, offset=seen):
                    per = info.num_tokens // len(batch)
                    return torch.from_numpy(patterns[offset + (tokens // per).numpy()]) * per + tokens % per
                by_pattern.add(label)
            seen += len(batch)

        test_age = self.stores["test"].ages if "test" in self.stores else None
        if test_age is None:
            raise ValueError("no test split to evaluate: set data.test_size (or a split column in the CSV)")
        pred = self.predict(model, "test", autocast, on_batch=count)
        metrics: dict[str, Any] = {"dataset": self.setup.data.name, "test_scans": len(pred),
                                   **age_metrics(pred, test_age),
                                   "test_mae_mean_predictor": float(np.abs(test_age - self.age_mean).mean()),
                                   "age_mean": self.age_mean, "age_sd": self.age_sd, "spacing": self.setup.data.spacing,
                                   "volume_shape": list(self.shape)}
        if "val" in self.stores:
            val_pred = self.predict(model, "val", autocast)
            fit = fit_age_bias(val_pred, self.stores["val"].ages)
            metrics.update(age_metrics(val_pred, self.stores["val"].ages, "val_"))
            metrics["age_bias_fit"] = {"intercept": fit[0], "slope": fit[1]}
            metrics.update(age_metrics(correct_age_bias(pred, test_age, fit), test_age, "test_corrected_"))
        if self.cohort_info is not None:
            metrics["cohort"] = self.cohort_info
        # in float64, as the MAE is computed: the study's bootstrap checks that these give it back exactly
        metrics[TEST_EXAMPLES] = {"abs_error": np.abs(pred.astype(np.float64) - test_age.astype(np.float64)),
                                  **cell_loads.arrays()}
        metrics["layers"] = self._layer_metrics(model, counts, grids, probe, autocast, by_pattern)
        probed = self.pattern_probe(model, autocast)
        if probed:
            metrics["pattern_probe"] = probed
        experts = {v.name: v.num_experts for v in layers}
        for name, idx in per_volume.items():
            if idx:
                metrics["layers"][name] = {**volume_routing_stats(torch.cat(idx), test_age, experts[name]),
                                           **metrics["layers"].get(name, {})}
        return metrics

    def pattern_probe(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, Any]:
        """A positive control of claim 7a on a heterogeneous cohort: per cell layer (its MoE, or the dense FFN in its
        place), a linear probe of the subject's ageing pattern from the tokens there, over the cells where the
        patterns differ (those subject AMI scores): fitted on the first ``PROBE_TRAIN_VOLUMES`` training volumes
        (unaugmented), C chosen on the validation volumes, read on the test volumes
        (:func:`ermoe.analysis.token_probe.probe_ground_truth`). Empty without patterns, a validation split, a cell
        layer or scikit-learn (warned)."""
        sites = model.token_sites
        if self.batches.groups is None or not sites or "val" not in self.stores or "test" not in self.stores:
            return {}
        from ..analysis.token_probe import can_probe, probe_ground_truth

        if not can_probe():
            return {}
        import nibabel as nib

        pattern_map = np.asarray(nib.load(Path(self.cohort_info["dir"]) / "pattern_map.nii.gz").dataobj)
        keep = {name: cell_labels(pattern_map, tuple(grid), len(PATTERNS) + 1) > 0 for name, (_, grid) in sites.items()}
        sites = {name: site for name, site in sites.items() if keep[name].any()}
        if not sites:
            return {}

        def batches(split: str):
            limit = PROBE_TRAIN_VOLUMES if split == "train" else None
            return ((b.inputs, b.groups, b.groups) for b in self.eval_batches(split, limit=limit))

        found = probe_ground_truth(model, sites, batches, autocast, self.setup.seed, keep)
        return {name: {**result, "cells": int(keep[name].sum())} for name, result in found.items()}

    def test_patterns(self) -> np.ndarray | None:
        """Each test subject's ageing pattern (index into the cohort's patterns) on a heterogeneous cohort, else
        None."""
        return None if self.batches.groups is None else self.batches.groups["test"]

    def _read_patterns(self) -> dict[str, np.ndarray] | None:
        """Every split's scans' ageing patterns (index into ``PATTERNS``) on a heterogeneous cohort: the data's
        ground-truth groups (``Batch.groups``, the oracle router's); None on any other data."""
        if not self.cohort_info or self.cohort_info.get("ageing") != "heterogeneous":
            return None
        import csv

        with open(self.csv_path, newline="") as f:
            pattern = {row["subject"]: row["pattern"] for row in csv.DictReader(f)}
        return {split: np.array([list(PATTERNS).index(pattern[s.subject]) for s in store.scans], dtype=np.int64)
                for split, store in self.stores.items()}

    def _layer_metrics(self, model, counts, grids, probe, autocast, by_pattern=None) -> dict[str, Any]:
        tissue = age_map = pattern_map = None
        if counts:
            import nibabel as nib

            root = Path(self.cohort_info["dir"]) if self.cohort_info else None
            tissue_img = root / "tissue.nii.gz" if root else None
            if tissue_img is not None and tissue_img.is_file():
                tissue = np.asarray(nib.load(tissue_img).dataobj).astype(np.int64)
                age_map = np.asarray(nib.load(root / "age_map.nii.gz").get_fdata(dtype=np.float32))
                if (root / "pattern_map.nii.gz").is_file():
                    pattern_map = np.asarray(nib.load(root / "pattern_map.nii.gz").dataobj).astype(np.int64)
            else:
                from ..data.cohort import Templates

                tissue = Templates(self.setup.data.spacing).tissue_labels().astype(np.int64)
        probe_stats = {}
        if probe is not None:
            with routed_by(model, probe.groups):
                probe_stats = probe_routing(model, probe.inputs, ctx=autocast)
        out: dict[str, Any] = {}
        for name in counts:
            grid = tuple(grids[name])
            c = counts[name].counts.numpy()
            stats: dict[str, Any] = {**counts[name].load(), "token_grid": list(grid),
                                     "expert_cell_counts": c.tolist()}
            tissue_cells = cell_labels(tissue, grid, len(TISSUES))
            stats.update(expert_anatomy(c, tissue_cells, None if age_map is None else cell_means(age_map, grid)))
            if pattern_map is not None and by_pattern is not None:
                stats.update(pattern_routing(by_pattern[name].counts.numpy(), cell_labels(
                    pattern_map, grid, len(PATTERNS) + 1), tissue_cells > 0))
            stats.update(probe_stats.get(name, {}))
            out[name] = stats
        for name, stats in probe_stats.items():  # layers without a grid (volume routing): the probe's measures
            out.setdefault(name, stats)
        return out

    def measures(self) -> dict[str, Any]:
        """The mean absolute error in years (the headline; the test split's other measures need every prediction
        at once: :meth:`evaluate`)."""
        return {"mae": PerExample(lambda out, age: (self.years(out) - age).abs())}

    @staticmethod
    def results_table(metrics: dict[str, Any]) -> str:
        lines = [f"test MAE {metrics['test_mae']:.2f} y   RMSE {metrics['test_rmse']:.2f}   r {metrics['test_r']:.3f}   "
                 f"gap {metrics['test_gap_mean']:+.2f} (r with age {metrics['test_gap_age_r']:+.2f})   "
                 f"({metrics['test_scans']} test scans; predicting the mean age: MAE "
                 f"{metrics['test_mae_mean_predictor']:.2f})"]
        if "test_corrected_mae" in metrics:
            lines.append(f"age-bias corrected (fit on validation): MAE {metrics['test_corrected_mae']:.2f}   "
                         f"gap r with age {metrics['test_corrected_gap_age_r']:+.2f}")
        if "cohort" in metrics:
            lines.append(f"built-in cohort: floor MAE {metrics['cohort']['floor_mae']:.2f} (biological-age sd "
                         f"{metrics['cohort']['bio_sd']})")
        for name, s in metrics.get("layers", {}).items():
            line = (f"{name}: load CV {s['load_cv']:.3f}   max/mean {s['max_over_mean']:.2f}   MI(expert; tissue) "
                    f"{s['mi_tissue_bits']:.3f} bits")
            if "mi_age_bits" in s:
                line += f"   MI(expert; age-sensitive) {s['mi_age_bits']:.3f} bits, enrichment " \
                        f"{s['age_expert_enrichment']:.2f}"
            lines.append(line)
        return "\n".join(lines)

    @staticmethod
    def draw_figures(metrics: dict[str, Any], fig_dir: Path) -> list[Path]:
        return draw_expert_maps(metrics, fig_dir)
