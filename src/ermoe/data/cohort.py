"""A built-in ageing cohort (``data.name: brain_cohort``): T1-like volumes synthesised from the MNI152 template's
tissue maps (the ``nilearn`` wheel), aged by published atrophy rates, written as NIfTI + CSV and read back through
the same reader as real data (:mod:`ermoe.data.nifti`).

No brain MRI with ages can be installed here, so the main job and the tests need a cohort whose ground truth is
known. The ageing model (docs/brainage.md cites each rate), applied from age 20 to a subject's *biological* age:

- grey matter (GM) probability loss at 0.32 %/yr at 35 rising linearly to 0.55 %/yr at 70 (Schippling et al. 2017);
- hippocampus (two ellipsoids at MNI (+-26, -22, -14) mm): 0.85 %/yr GM loss instead (Fraser et al. 2015);
- white matter (WM) loss at 0.02 %/yr at 35 rising to 0.47 %/yr at 70, so it accelerates after 60 (Schippling);
- lateral ventricles expanded by a smooth radial deformation to a volume growing 1 %/yr at 40 rising to 5.6 %/yr at
  80 (Tang et al. 2001 measured 5.6 %/yr at 74-87), pushing the surrounding tissue outwards;
- lost tissue becomes cerebrospinal fluid (CSF); GM/WM T1 contrast narrows by 0.0015 per year (Salat et al. 2009).

Each subject: biological age = chronological age + N(0, ``bio_sd``) (the target is the chronological age, so a model
that read biological age perfectly would have MAE ``bio_sd * sqrt(2/pi)``: the floor); individual GM and WM volume
(+-4 %), a smooth random deformation (about 2 mm), a residual global scale (+-2 %); one of three sites (intensity
scale, contrast, noise level and bias-field strength); a multiplicative polynomial bias field; Rician noise;
skull-stripped; stored as int16 NIfTI in RAS or LAS orientation (the reader must reorient).

The generator also writes what it knows: ``age_map.nii.gz`` (the mean absolute intensity change per year of a
noise-free subject: where the age information is) and ``tissue.nii.gz`` (0 background, 1 CSF, 2 GM, 3 WM).

``ageing="heterogeneous"`` makes people age differently, in ways a model can only tell from the image: each subject
follows one of two patterns (``PATTERNS``: hippocampal-predominant atrophy, or ventricle- and white-matter-
predominant), men lose grey matter faster than women (``SEX_GM_RATE``), and the three sites' intensity, noise and
bias differ as before (a nuisance a model must ignore). The CSV records each subject's ``pattern``; the generator
writes each pattern's age map (``age_map_<pattern>.nii.gz``) and ``pattern_map.nii.gz`` (per voxel: 0 where the
patterns age alike, else 1 + the pattern that changes it most), the ground truth expert maps are scored against.
The default, ``homogeneous``, ages everyone alike (the cohort above, unchanged).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import cache_root, start_build
from .nifti import mni_grid

COHORT_VERSION = "2"  # bumped whenever the generator changes: cached cohorts are keyed by it
AGEING = ("homogeneous", "heterogeneous")
# Heterogeneous ageing: each pattern multiplies the base rates (hippocampal GM loss, ventricular growth, WM loss).
PATTERNS = {"hippocampal": {"hippocampus": 2.5, "ventricle": 0.5, "wm": 1.0},
            "ventricular": {"hippocampus": 0.5, "ventricle": 2.0, "wm": 1.5}}
SEX_GM_RATE = {"F": 0.85, "M": 1.15}  # cortical GM loss, faster in men (both patterns)
PATTERN_RATIO = 1.5  # pattern_map: a voxel belongs to a pattern where its age map exceeds the other's this much
HIPPOCAMPUS_MM = [(-26.0, -22.0, -14.0), (26.0, -22.0, -14.0)]
HIPPOCAMPUS_AXES_MM = (7.0, 18.0, 8.0)
# (intensity scale, contrast exponent, noise sd, bias-field strength) per site
SITES = [(1.0, 1.0, 0.02, 0.10), (0.9, 0.95, 0.035, 0.20), (1.1, 1.05, 0.025, 0.15)]


@dataclass(frozen=True)
class CohortSpec:
    size: int = 600
    seed: int = 0
    spacing: float = 4.0
    age_min: float = 20.0
    age_max: float = 85.0
    bio_sd: float = 2.0
    ageing: str = "homogeneous"
    pattern_strength: float = 1.0  # heterogeneous: each pattern's multipliers raised to this power

    def floor_mae(self) -> float:
        """The MAE of a model that knew every subject's biological age exactly."""
        return self.bio_sd * math.sqrt(2 / math.pi)


def _linear_rate(age: np.ndarray, at: tuple[float, float], values: tuple[float, float], low: float,
                 high: float) -> np.ndarray:
    slope = (values[1] - values[0]) / (at[1] - at[0])
    return np.clip(values[0] + slope * (age - at[0]), low, high)


def retained(age: float, rate) -> float:
    """exp(-integral from 20 to ``age`` of ``rate(t)`` %/yr): the share of a volume left at ``age``."""
    if age <= 20:
        return 1.0
    t = np.linspace(20.0, age, 200)
    return float(np.exp(-np.trapezoid(rate(t), t) / 100.0))


def gm_rate(t):
    return _linear_rate(t, (35, 70), (0.32, 0.55), 0.1, 0.8)


def wm_rate(t):
    return _linear_rate(t, (35, 70), (0.02, 0.47), 0.0, 0.9)


def hippocampus_rate(t):
    return np.full_like(t, 0.85)


@dataclass(frozen=True)
class AgeingRates:
    """Multipliers of the base rates for one subject (1 everywhere: the homogeneous cohort)."""

    gm: float = 1.0
    hippocampus: float = 1.0
    wm: float = 1.0
    ventricle: float = 1.0

    @classmethod
    def of(cls, pattern: str, sex: str | None = None, strength: float = 1.0) -> "AgeingRates":
        """A subject of ``pattern`` (and ``sex``): the pattern's multipliers, each raised to ``strength`` (the
        patterns further apart above 1)."""
        return cls(gm=SEX_GM_RATE[sex] if sex is not None else 1.0,
                   **{k: v ** strength for k, v in PATTERNS[pattern].items()})


def _scaled(rate, factor: float):
    return rate if factor == 1.0 else (lambda t: factor * rate(t))


def ventricle_growth(t):
    return -_linear_rate(t, (40, 80), (1.0, 5.6), 0.5, 6.0)  # negative loss = growth


class Templates:
    """The MNI152 2009 tissue maps on the cohort's grid: GM, WM, CSF probabilities, brain mask, and the regions."""

    def __init__(self, spacing: float) -> None:
        import nibabel as nib
        from nilearn import datasets
        from nilearn.image import resample_img

        self.shape, self.affine = mni_grid(spacing)

        def on_grid(img, interpolation="linear"):
            out = resample_img(img, target_affine=self.affine, target_shape=self.shape, interpolation=interpolation,
                               force_resample=True, copy_header=True)
            return np.asarray(out.get_fdata(dtype=np.float32))

        # nilearn ships the probability maps as uint8 (0-255)
        gm = np.clip(on_grid(nib.load(datasets.GM_MNI152_FILE_PATH)) / 255.0, 0, 1)
        wm = np.clip(on_grid(nib.load(datasets.WM_MNI152_FILE_PATH)) / 255.0, 0, 1)
        mask = on_grid(datasets.load_mni152_brain_mask(resolution=1), "nearest") > 0.5
        from scipy import ndimage

        mask = ndimage.binary_fill_holes(mask | (gm + wm > 0.3))
        total = gm + wm
        over = total > 1
        gm[over], wm[over] = gm[over] / total[over], wm[over] / total[over]
        self.gm, self.wm = gm * mask, wm * mask
        self.csf = np.clip(mask - self.gm - self.wm, 0, 1).astype(np.float32)
        self.mask = mask.astype(np.float32)
        world = self.world_mm()
        self.hippocampus = np.zeros(self.shape, dtype=np.float32)
        for centre in HIPPOCAMPUS_MM:
            r2 = sum(((world[..., i] - centre[i]) / HIPPOCAMPUS_AXES_MM[i]) ** 2 for i in range(3))
            self.hippocampus = np.maximum(self.hippocampus, np.exp(-2.0 * r2)).astype(np.float32)
        self.hippocampus *= self.mask
        central = (np.abs(world[..., 0]) < 30) & (world[..., 1] > -45) & (world[..., 1] < 30) & \
                  (world[..., 2] > -5) & (world[..., 2] < 35)
        vent = central & (self.csf > 0.5)
        if vent.sum() < 1:
            raise RuntimeError("no ventricle voxels found in the MNI template at this spacing")
        self.ventricle_centre = world[vent].mean(0)
        self.ventricle_radius = float((3 * vent.sum() * spacing ** 3 / (4 * math.pi)) ** (1 / 3))

    def world_mm(self) -> np.ndarray:
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), -1).astype(np.float32)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def tissue_labels(self) -> np.ndarray:
        labels = np.argmax(np.stack([self.csf, self.gm, self.wm]), 0) + 1
        return (labels * (self.mask > 0)).astype(np.int16)


def _warp(volumes: np.ndarray, displacement_mm: np.ndarray, spacing: float) -> np.ndarray:
    """Sample ``(C, X, Y, Z)`` volumes at voxel position + displacement (mm, ``(X, Y, Z, 3)``), trilinearly."""
    shape = volumes.shape[1:]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    src = idx + displacement_mm / spacing
    norm = 2 * src / (np.array(shape, dtype=np.float32) - 1) - 1  # (X, Y, Z, 3) in x, y, z order
    grid = torch.from_numpy(norm[..., ::-1].copy())[None]  # grid_sample wants (W, H, D) = (z, y, x) order
    out = F.grid_sample(torch.from_numpy(volumes.astype(np.float32))[None], grid.float(), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[0].numpy()


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    coarse = torch.from_numpy(rng.normal(0, amplitude, (1, 3, 4, 5, 4)).astype(np.float32))
    fine = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]
    return fine.permute(1, 2, 3, 0).numpy()


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    terms = [*axes, *(a * a for a in axes), axes[0] * axes[1], axes[1] * axes[2], axes[0] * axes[2]]
    coeff = rng.normal(0, 1, len(terms)) / math.sqrt(len(terms))
    return np.exp(strength * sum(c * t for c, t in zip(coeff, terms))).astype(np.float32)


def aged_tissue(t: Templates, bio_age: float, world: np.ndarray, gm_scale: float = 1.0,
                wm_scale: float = 1.0, rates: AgeingRates = AgeingRates()) -> tuple[np.ndarray, np.ndarray]:
    """``(3, X, Y, Z)`` GM, WM, CSF probabilities of the template brain at ``bio_age`` (the ageing model, its rates
    multiplied by ``rates``), and the ventricular expansion as a displacement field (mm, ``(X, Y, Z, 3)``) to sample
    them through."""
    g = retained(bio_age, _scaled(gm_rate, rates.gm)) * gm_scale
    h = retained(bio_age, _scaled(hippocampus_rate, rates.hippocampus)) * gm_scale
    gm_factor = (1 - t.hippocampus) * g + t.hippocampus * h
    gm = np.clip(t.gm * gm_factor, 0, 1)
    wm = np.clip(t.wm * retained(bio_age, _scaled(wm_rate, rates.wm)) * wm_scale, 0, 1)
    csf = np.clip(t.mask - gm - wm, 0, 1)
    tissue = np.stack([gm, wm, csf]).astype(np.float32)
    # Ventricular expansion by k (linear; k^3 in volume): each point samples from a point pulled towards the
    # ventricle centre, so what lies there appears k times further out (radial, smooth, local).
    k = retained(bio_age, _scaled(ventricle_growth, rates.ventricle)) ** (1 / 3)
    offset = world - t.ventricle_centre
    dist2 = (offset ** 2).sum(-1, keepdims=True)
    shrink = 1 - (1 - 1 / k) * np.exp(-dist2 / (2 * (1.5 * t.ventricle_radius) ** 2))
    displacement = offset * shrink - offset
    return tissue, displacement.astype(np.float32)


def t1_intensity(tissue: np.ndarray, bio_age: float) -> np.ndarray:
    gm, wm, csf = tissue
    c_gm = 0.60 + 0.0015 * (bio_age - 20)
    return (c_gm * gm + 1.0 * wm + 0.12 * csf).astype(np.float32)


def synthesise(t: Templates, world: np.ndarray, bio_age: float, rng: np.random.Generator | None = None,
               site: int = 0, rates: AgeingRates = AgeingRates()) -> np.ndarray:
    """One T1-like volume (skull-stripped). ``rng=None``: the noise-free template subject (no individual anatomy,
    bias or noise) of site 0."""
    spacing = float(t.affine[0, 0])
    gm_scale = wm_scale = 1.0
    if rng is not None:
        gm_scale, wm_scale = 1 + rng.normal(0, 0.04), 1 + rng.normal(0, 0.04)
    tissue, displacement = aged_tissue(t, bio_age, world, gm_scale, wm_scale, rates)
    stack = np.concatenate([tissue, t.mask[None]])
    if rng is not None:
        centre = world.reshape(-1, 3).mean(0)
        scale = 1 + rng.normal(0, 0.02)
        displacement = displacement + (world - centre) * (1 / scale - 1) + _smooth_field(rng, t.shape, 2.0)
    warped = _warp(stack, displacement, spacing)
    mask = warped[3] > 0.5
    vol = t1_intensity(warped[:3], bio_age)
    if rng is not None:
        scale_i, gamma, noise, bias = SITES[site]
        vol = scale_i * np.power(np.clip(vol, 0, None), gamma) * _bias_field(rng, t.shape, bias)
        vol = np.abs(vol + rng.normal(0, noise, vol.shape) + 1j * rng.normal(0, noise, vol.shape))
    return (vol * mask).astype(np.float32)


def age_sensitivity_map(t: Templates, world: np.ndarray, spec: CohortSpec,
                        rates: AgeingRates = AgeingRates()) -> np.ndarray:
    """Mean absolute T1 intensity change per year of the noise-free subject over the cohort's age range."""
    ages = np.linspace(spec.age_min, spec.age_max, 8)
    vols = [synthesise(t, world, float(a), rates=rates) for a in ages]
    return np.mean([np.abs(b - a) / (ages[1] - ages[0]) for a, b in zip(vols, vols[1:])], 0).astype(np.float32)


def pattern_map(maps: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Per voxel 0 where the patterns' age maps are alike (or the voxel is outside the brain, or unchanged), else
    1 + the index (in ``PATTERNS`` order) of the pattern whose map exceeds every other's ``PATTERN_RATIO`` times."""
    stack = np.stack([maps[name] for name in PATTERNS])
    top = stack.argmax(0)
    best = stack.max(0)
    second = np.sort(stack, 0)[-2]
    active = (mask > 0) & (best > np.quantile(best[mask > 0], 0.5)) & (best > PATTERN_RATIO * second)
    return np.where(active, top + 1, 0).astype(np.int16)


def cohort_dir(spec: CohortSpec) -> Path:
    fields = asdict(spec)
    if spec.ageing == "homogeneous":  # the key of the cohorts built before there were patterns
        del fields["ageing"]
    if spec.pattern_strength == 1.0:  # the key of the cohorts built before the strength was a setting
        del fields["pattern_strength"]
    key = hashlib.sha256(json.dumps({**fields, "v": COHORT_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root()
    return root / "brain_cohort" / key


def build_cohort(spec: CohortSpec, log=None) -> Path:
    """The cohort's ``participants.csv`` (generated on first use under ``$ERMOE_CACHE_DIR/brain_cohort``; the CSV is
    written last, so a half-built cohort is rebuilt, never read)."""
    import nibabel as nib

    if spec.size < 3:
        raise ValueError(f"data.cohort_size must be at least 3, got {spec.size}")
    if not 0 <= spec.age_min < spec.age_max:
        raise ValueError(f"cohort ages need 0 <= age_min < age_max, got {spec.age_min}, {spec.age_max}")
    if spec.ageing not in AGEING:
        raise ValueError(f"data.ageing must be one of {AGEING}, got {spec.ageing!r}")
    if not spec.pattern_strength > 0 or (spec.pattern_strength != 1.0 and spec.ageing != "heterogeneous"):
        raise ValueError(f"pattern_strength {spec.pattern_strength!r}: > 0, and not 1 for a heterogeneous cohort only")
    root = cohort_dir(spec)
    csv_path = root / "participants.csv"
    if start_build(root, csv_path.name) is not None:
        return csv_path
    t = Templates(spec.spacing)
    world = t.world_mm()
    rng = np.random.default_rng(spec.seed)
    ras = t.affine
    las = ras.copy()
    las[0, 0], las[0, 3] = -ras[0, 0], ras[0, 3] + ras[0, 0] * (t.shape[0] - 1)
    rows = []
    for i in range(spec.size):
        age = float(rng.uniform(spec.age_min, spec.age_max))
        bio = age + float(rng.normal(0, spec.bio_sd))
        site, sex = int(rng.integers(len(SITES))), ("F", "M")[int(rng.integers(2))]
        pattern = list(PATTERNS)[int(rng.integers(len(PATTERNS)))] if spec.ageing == "heterogeneous" else None
        rates = AgeingRates.of(pattern, sex, spec.pattern_strength) if pattern else AgeingRates()
        vol = synthesise(t, world, bio, rng, site, rates)
        affine = ras
        if rng.random() < 0.5:  # stored left-right flipped, as FSL's radiological MNI files are
            vol, affine = vol[::-1].copy(), las
        img = nib.Nifti1Image(vol, affine)
        img.set_data_dtype(np.int16)
        name = f"sub-{i:04d}"
        nib.save(img, root / "images" / f"{name}.nii.gz")
        rows.append({"subject": name, "path": f"images/{name}.nii.gz", "age": f"{age:.3f}", "sex": sex,
                     "site": f"site{site}", "biological_age": f"{bio:.3f}",
                     **({"pattern": pattern} if pattern else {})})
        if log is not None and (i + 1) % 100 == 0:
            log(f"brain cohort: {i + 1}/{spec.size} subjects")
    if spec.ageing == "heterogeneous":
        maps = {name: age_sensitivity_map(t, world, spec, AgeingRates.of(name, strength=spec.pattern_strength))
                for name in PATTERNS}
        for name, m in maps.items():
            nib.save(nib.Nifti1Image(m, ras), root / f"age_map_{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.mean(list(maps.values()), 0).astype(np.float32), ras), root / "age_map.nii.gz")
        nib.save(nib.Nifti1Image(pattern_map(maps, t.mask), ras), root / "pattern_map.nii.gz")
    else:
        nib.save(nib.Nifti1Image(age_sensitivity_map(t, world, spec), ras), root / "age_map.nii.gz")
    nib.save(nib.Nifti1Image(t.tissue_labels(), ras), root / "tissue.nii.gz")
    (root / "cohort.json").write_text(json.dumps({**asdict(spec), "version": COHORT_VERSION,
                                                  "floor_mae": spec.floor_mae()}, indent=2))
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".csv.tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path
