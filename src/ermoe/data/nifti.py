"""T1 brain MRI with ages from a CSV of NIfTI files (``data.name: nifti_csv``), preprocessed the field's way and
cached on disk.

The CSV has a ``path`` column (a NIfTI file, relative to the CSV or absolute) and an ``age`` column (years); optional
``subject`` (default: the file name), ``sex``, ``site`` and ``split`` (train / val / test). Images are expected the
way SFCN and TSAN take them: skull-stripped and linearly registered to MNI152 (docs/brainage.md).

Preprocessing, per image (:func:`preprocess`):

1. nibabel reads the file (a missing, corrupt, 4D or empty image is a named error);
2. nilearn's ``resample_img`` (trilinear, as FSL FLIRT in SFCN's and TSAN's pipelines) maps it onto the RAS MNI
   grid at ``spacing`` mm (:func:`mni_grid`; 91 x 109 x 91 at 2 mm). Resampling through the image's own affine onto
   that grid reorients to RAS, resamples to the isotropic spacing and crops or pads to the MNI field of view in one
   interpolation (three separate steps would interpolate twice and crop around the array centre, which is not the
   MNI centre for an asymmetric field of view);
3. intensities are z-scored inside the brain (the non-zero voxels of a skull-stripped image; MONAI's
   ``NormalizeIntensity(nonzero=True)``), zero outside.

The result is cached as float16 ``.npy`` under ``$ERMOE_CACHE_DIR/brain`` (default ``~/.cache/ermoe``), keyed by the
file's path, size and modification time and the preprocessing settings, so later epochs and runs read no NIfTI.
Missing cache files are made by ``workers`` processes in parallel (:func:`build_cache`). A split whose volumes fit
the in-memory cap (``data.memory_cap_gb``) is held in memory; a larger one is read from the cache per example, in
the data loader's workers (:class:`VolumeDataset`).

Training augmentation (a random shift of up to ``shift`` voxels per axis, a left-right flip) is drawn per volume
from the random stream of ``(seed, step, volume)`` (:mod:`ermoe.data.loader`): the same for any world size, any
number of workers and either storage.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import cache_root
from .loader import ExampleKey, example_seed

PREPROCESS_VERSION = "1"
# The MNI152 field of view in RAS millimetres (FSL's 2 mm template: 91 x 109 x 91 voxels).
MNI_ORIGIN = (-90.0, -126.0, -72.0)
MNI_EXTENT = (180.0, 216.0, 180.0)
SPLITS = ("train", "val", "test")


class BrainDataError(ValueError):
    """A brain-age input that cannot be used: the message names the file, row or column."""


@dataclass(frozen=True)
class Scan:
    """One row of the CSV: an image file, the age at the scan (years), and what else the CSV says of it."""

    path: Path
    age: float
    subject: str
    sex: str | None = None
    site: str | None = None
    split: str | None = None


@dataclass
class Cohort:
    """Scans split by subject: every scan of a subject lies in one split."""

    train: list[Scan]
    val: list[Scan] = field(default_factory=list)
    test: list[Scan] = field(default_factory=list)

    def split(self, name: str) -> list[Scan]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def mni_grid(spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """The RAS MNI grid at an isotropic ``spacing`` (mm): its shape and its voxel-to-world affine."""
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise BrainDataError(f"spacing must be a positive number of millimetres, got {spacing!r}")
    shape = tuple(int(round(e / spacing)) + 1 for e in MNI_EXTENT)
    affine = np.diag([float(spacing)] * 3 + [1.0])
    affine[:3, 3] = MNI_ORIGIN
    return shape, affine  # type: ignore[return-value]


def read_csv(csv_path: str | Path) -> list[Scan]:
    """The scans a CSV lists, checked: required columns, numeric non-negative ages, existing files, known splits."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"brain-age CSV {csv_path} does not exist")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "age") if c not in columns]
        if missing:
            raise BrainDataError(f"{csv_path}: missing column(s) {missing}; it has {columns} (needs path and age)")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise BrainDataError(f"{csv_path}: no rows")
    scans = []
    for line, row in enumerate(rows, start=2):
        try:
            age = float(row["age"])
        except ValueError:
            raise BrainDataError(f"{csv_path}, line {line}: age {row['age']!r} is not a number") from None
        if not math.isfinite(age) or age < 0:
            raise BrainDataError(f"{csv_path}, line {line}: age {row['age']!r} must be a finite number >= 0")
        if not row["path"]:
            raise BrainDataError(f"{csv_path}, line {line}: empty path")
        path = Path(row["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        if not path.is_file():
            raise FileNotFoundError(f"{csv_path}, line {line}: image {path} does not exist")
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise BrainDataError(f"{csv_path}, line {line}: split {split!r} must be one of {SPLITS}")
        subject = row.get("subject") or path.name.split(".")[0]
        scans.append(Scan(path, age, subject, row.get("sex") or None, row.get("site") or None, split))
    _refuse_repeated_files(csv_path, scans)
    return scans


def _refuse_repeated_files(csv_path: Path, scans: Sequence[Scan]) -> None:
    """One file on two rows (however its path is written: resolved, links followed) would be scored twice, or sit
    in two splits under two subject IDs (leakage): an error naming the first ones and their lines."""
    lines: dict[Path, list[int]] = {}
    for line, scan in enumerate(scans, start=2):
        lines.setdefault(scan.path.resolve(), []).append(line)
    repeated = [(path, at) for path, at in lines.items() if len(at) > 1]
    if repeated:
        shown = "; ".join(f"{path} on lines {', '.join(map(str, at))}" for path, at in repeated[:3])
        more = f" (and {len(repeated) - 3} more)" if len(repeated) > 3 else ""
        raise BrainDataError(f"{csv_path}: {len(repeated)} image file(s) listed more than once: {shown}{more}. A "
                             "scan listed twice is trained or scored twice, or sits in two splits (leakage): list "
                             "each file once")


def split_cohort(scans: Sequence[Scan], val_size: int = 0, test_size: int = 0, seed: int = 0) -> Cohort:
    """Split by subject. With a ``split`` column the CSV decides (and ``val_size``/``test_size`` must be 0); else
    ``val_size`` and ``test_size`` subjects are drawn by ``seed``, the rest train."""
    given = [s.split is not None for s in scans]
    if any(given):
        if not all(given):
            raise BrainDataError("the CSV's split column is empty on some rows: fill it on every row or drop it")
        if val_size or test_size:
            raise BrainDataError("the CSV has a split column: data.val_size / data.test_size do not apply")
        where: dict[str, str] = {}
        for s in scans:
            if where.setdefault(s.subject, s.split) != s.split:  # type: ignore[arg-type]
                raise BrainDataError(f"subject {s.subject!r} appears in splits {where[s.subject]!r} and {s.split!r}: "
                                     "a subject's scans must share one split (no leakage)")
        cohort = Cohort(*([s for s in scans if s.split == name] for name in SPLITS))
    else:
        subjects = sorted({s.subject for s in scans})
        if val_size + test_size >= len(subjects):
            raise BrainDataError(f"val_size {val_size} + test_size {test_size} leave no training subject of "
                                 f"{len(subjects)}")
        order = np.random.default_rng(seed).permutation(len(subjects))
        val = {subjects[i] for i in order[:val_size]}
        test = {subjects[i] for i in order[val_size:val_size + test_size]}
        cohort = Cohort([s for s in scans if s.subject not in val | test], [s for s in scans if s.subject in val],
                        [s for s in scans if s.subject in test])
    if not cohort.train:
        raise BrainDataError("no training scans")
    return cohort


def load_nifti(path: Path):
    """The image at ``path`` (nibabel), as a 3D image: a missing, unreadable, non-3D or empty file is an error."""
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file {path} does not exist")
    try:
        img = nib.load(str(path))
        data_shape = img.shape
    except Exception as err:  # nibabel raises several types for truncated or foreign files
        raise BrainDataError(f"{path}: not a readable NIfTI image ({type(err).__name__}: {err})") from None
    if len(data_shape) == 4 and data_shape[3] == 1:
        img = nib.funcs.squeeze_image(img)
    elif len(data_shape) != 3:
        raise BrainDataError(f"{path}: a {len(data_shape)}D image of shape {data_shape}; a T1 volume is 3D")
    if min(img.shape) < 2:
        raise BrainDataError(f"{path}: empty image of shape {img.shape}")
    return img


def preprocess(path: Path, spacing: float) -> np.ndarray:
    """One image onto the RAS MNI grid at ``spacing`` mm, z-scored inside the brain (float32, zero outside)."""
    from nilearn.image import resample_img

    img = load_nifti(path)
    try:
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise BrainDataError(f"{path}: its voxel data cannot be read ({type(err).__name__}: {err})") from None
    if not np.isfinite(data).all():
        raise BrainDataError(f"{path}: the image has NaN or infinite voxels")
    if not data.any():
        raise BrainDataError(f"{path}: every voxel is zero (an empty image)")
    shape, affine = mni_grid(spacing)
    import nibabel as nib

    with warnings.catch_warnings():  # nilearn warns for two-valued images (a binary mask); a test image may be one
        warnings.filterwarnings("ignore", message="Resampling binary images")
        out = resample_img(nib.Nifti1Image(data, img.affine), target_affine=affine, target_shape=shape,
                           interpolation="linear", force_resample=True, copy_header=True)
    vol = np.asarray(out.get_fdata(dtype=np.float32))
    mask = vol > 1e-6 * float(np.abs(data).max())
    if mask.sum() < 8:
        raise BrainDataError(f"{path}: under 8 brain voxels on the MNI grid: is the image registered to MNI space "
                             "(its affine in millimetres)?")
    inside = vol[mask]
    std = float(inside.std())
    vol = np.where(mask, (vol - float(inside.mean())) / (std if std > 0 else 1.0), 0.0).astype(np.float32)
    return vol


def volume_cache_dir() -> Path:
    return cache_root() / "brain"


def cache_file(path: Path, spacing: float) -> Path:
    """Where the preprocessed volume of ``path`` at ``spacing`` is cached (keyed by the file and the settings)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{spacing}|{PREPROCESS_VERSION}"
                         .encode()).hexdigest()[:32]
    return volume_cache_dir() / f"{key}.npy"


def cached_volume(path: Path, spacing: float) -> Path:
    """The preprocessed volume's ``.npy`` file, made on first use (atomically), keyed by the file and settings."""
    target = cache_file(path, spacing)
    if target.is_file():
        return target
    vol = preprocess(path, spacing).astype(np.float16)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, vol)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def build_cache(paths: Sequence[Path], spacing: float, workers: int = 0) -> list[Path]:
    """The cache files of ``paths``, the missing ones preprocessed by ``workers`` processes in parallel (0: in this
    one). A file that cannot be preprocessed stops the build with its error (naming it); what was cached stays."""
    files = [cache_file(p, spacing) for p in paths]
    todo = [p for p, f in zip(paths, files) if not f.is_file()]
    if workers > 0 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork, as torch's data loader workers: the child inherits the imports (nilearn takes seconds to import)
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("fork")) as pool:
            for done in pool.map(cached_volume, todo, [spacing] * len(todo)):
                pass
    else:
        for p in todo:
            cached_volume(p, spacing)
    return files


def shift_flip(vol_CXYZ: np.ndarray, shift: int, flip: bool, rng: np.random.Generator) -> np.ndarray:
    """A random left-right flip (the first axis of the RAS grid) with probability 1/2, then a random shift of up to
    ``shift`` voxels along each axis (zero filled)."""
    if flip and rng.random() < 0.5:
        vol_CXYZ = vol_CXYZ[:, ::-1]
    if shift:
        s = rng.integers(0, 2 * shift + 1, 3)
        padded = np.pad(vol_CXYZ, ((0, 0), (shift, shift), (shift, shift), (shift, shift)))
        x, y, z = vol_CXYZ.shape[1:]
        vol_CXYZ = padded[:, s[0]:s[0] + x, s[1]:s[1] + y, s[2]:s[2] + z]
    return np.ascontiguousarray(vol_CXYZ)


class VolumeStore:
    """The preprocessed volumes of a list of scans: cached files (made by ``workers`` processes), held in memory
    when they fit ``memory_limit`` bytes (else read per example), served as float32 arrays."""

    def __init__(self, scans: Sequence[Scan], spacing: float, memory_limit: int = 2 << 30, workers: int = 0) -> None:
        self.scans, self.spacing = list(scans), spacing
        self.files = build_cache([s.path for s in self.scans], spacing, workers)
        self.shape, _ = mni_grid(spacing)
        nbytes = len(self.files) * int(np.prod(self.shape)) * 2
        self.volumes = np.stack([np.load(f) for f in self.files]) if nbytes <= memory_limit else None
        self.ages = np.array([s.age for s in self.scans], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.scans)

    @property
    def in_memory(self) -> bool:
        return self.volumes is not None

    def volume(self, i: int) -> np.ndarray:
        """``(1, X, Y, Z)`` float32."""
        vol = self.volumes[i] if self.volumes is not None else np.load(self.files[i])
        return vol.astype(np.float32)[None]

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """``(B, 1, X, Y, Z)`` float32 volumes."""
        if self.volumes is not None:
            batch = self.volumes[np.asarray(indices)]
        else:
            batch = np.stack([np.load(self.files[i]) for i in indices])
        return batch.astype(np.float32)[:, None]


class VolumeDataset(Dataset):
    """``(volume, age)`` of a store's scans; an :class:`~ermoe.data.loader.ExampleKey` draws the volume's shift and
    flip from its ``(seed, step, index)`` stream, an int reads it as it is."""

    def __init__(self, store: VolumeStore, seed: int = 0, shift: int = 0, flip: bool = False) -> None:
        self.store, self.seed, self.shift, self.flip = store, seed, shift, flip

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: ExampleKey | int) -> tuple[torch.Tensor, float]:
        index = key.index if isinstance(key, ExampleKey) else key
        vol = self.store.volume(index)
        if isinstance(key, ExampleKey) and (self.shift or self.flip):
            vol = shift_flip(vol, self.shift, self.flip, np.random.default_rng(example_seed(self.seed, key.step,
                                                                                            index)))
        return torch.from_numpy(vol), float(self.store.ages[index])


def collate_volumes(items: list[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([v for v, _ in items]), torch.tensor([a for _, a in items], dtype=torch.float32)
