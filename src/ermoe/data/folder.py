"""ImageFolder trees streamed from disk (the ImageNet layout): ``root/train/<class>/*`` and ``root/val/<class>/*``
(or ``test/``), each image decoded and augmented when a step needs it, in the data loader's worker processes.

Only the file list is read up front (no pixel is decoded before the first step asks for it). Augmentation is timm's
DeiT recipe (:class:`ImageAugment`: RandomResizedCrop, flips, RandAugment, random erasing through
``timm.data.create_transform``; mixup and CutMix with soft targets); every random draw is keyed by
``(seed, step, example)`` (:mod:`ermoe.data.loader`), so a batch is the same for any number of workers and any world
size. Mixup and CutMix mix the two examples of each pair of global-batch rows ``(2p, 2p + 1)`` (timm's ``pair``
mode with a fixed partner), which a rank always holds together.

A file that cannot be decoded stops the run with :class:`~ermoe.data.images.CorruptDatasetError` naming it, or with
``skip_corrupt`` is left out of its batch with a warning and counted.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..settings import FORBID_EXTRA
from .images import CorruptDatasetError, DatasetNotFoundError
from .loader import (ExampleKey, StepBatchSampler, example_seed, iterate, make_loader, seeded)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_RAND_KEYS = ("m", "n", "mstd", "mmax", "inc", "p")  # timm.data.auto_augment.rand_augment_transform's numeric keys


@dataclass
class ImageAugment:
    """Training augmentation of streamed images (``data.augment``; ``{}`` is DeiT's ImageNet recipe, Touvron et al.
    2021, section 6). The first six go to ``timm.data.create_transform``; mixing is ermoe's pair-wise version of
    timm's ``Mixup`` (world-size invariant, see the module docstring)."""

    __pydantic_config__ = FORBID_EXTRA

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop's area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # and aspect-ratio range
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; null: none
    color_jitter: float | None = None  # only without auto_augment (timm turns it off beside RandAugment)
    re_prob: float = 0.25  # random erasing
    interpolation: str = "bicubic"
    mixup_alpha: float = 0.8  # Beta(alpha, alpha) for mixup; 0: no mixup
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) for CutMix; 0: no CutMix
    mix_prob: float = 1.0  # the probability that a pair is mixed at all
    switch_prob: float = 0.5  # with both on: the probability of CutMix rather than mixup

    def __post_init__(self) -> None:
        def require(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"data.augment.{what}")

        require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
                f"scale must be [low, high] with 0 < low <= high <= 1, got {self.scale}")
        require(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], f"ratio must be [low, high] > 0, got "
                f"{self.ratio}")
        for key in ("hflip", "re_prob", "mix_prob", "switch_prob"):
            require(0 <= getattr(self, key) <= 1, f"{key} must be in [0, 1], got {getattr(self, key)}")
        require(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0")
        require(self.color_jitter is None or self.color_jitter >= 0, "color_jitter must be >= 0 or null")
        require(not (self.color_jitter and self.auto_augment and "3a" not in self.auto_augment),
                "color_jitter does not apply beside auto_augment (timm turns it off): set one of them to null")
        require(self.interpolation in ("bilinear", "bicubic", "nearest", "random"),
                f"interpolation must be bilinear, bicubic, nearest or random, got {self.interpolation!r}")
        if self.auto_augment:
            from timm.data.auto_augment import rand_augment_transform
            sections = self.auto_augment.split("-")
            if sections[0] != "rand":
                raise ValueError(f"data.augment.auto_augment must be a RandAugment spec ('rand-m9-mstd0.5-inc1'), "
                                 f"got {self.auto_augment!r}")
            # timm skips a section without a number silently ('rand-m9-zz' is 'rand-m9'): name it instead
            for section in sections[1:]:
                key = re.split(r"(\d.*)", section)
                if not section.startswith("t") and not (len(key) >= 2 and key[0] in _RAND_KEYS):
                    raise ValueError(f"data.augment.auto_augment {self.auto_augment!r}: section {section!r} is none "
                                     f"of timm's RandAugment settings ({', '.join(_RAND_KEYS)} with a number, or t)")
            try:
                rand_augment_transform(self.auto_augment, {})
            except Exception as err:  # noqa: BLE001 - timm asserts on a malformed spec
                raise ValueError(f"data.augment.auto_augment {self.auto_augment!r} is not a valid RandAugment spec: "
                                 f"{err or type(err).__name__}") from None

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def posterize_any_bits(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize op for every level: keeping 0 bits is a black image. At RandAugment's top magnitude timm's
    increasing posterize keeps 0 bits, which Pillow 13 refuses (``bits must be between ... 1 and 8``) and older
    Pillow computed as a black image."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def allow_zero_bit_posterize(transform: Any) -> Any:
    """``transform`` (timm's composed training transform) with its RandAugment's posterize ops as
    :func:`posterize_any_bits`: the same recipe, on any Pillow."""
    from timm.data.auto_augment import RandAugment, posterize

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = posterize_any_bits
    return transform


class Example(NamedTuple):
    """A decoded, transformed example, with its row in the global batch and its step (-1: evaluation)."""

    image: Tensor
    label: int
    row: int
    step: int


class Corrupt(NamedTuple):
    """An example whose file could not be decoded."""

    path: str
    error: str
    row: int
    step: int


def list_split(directory: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, class index)`` of every image file under ``directory/<class>/`` (sorted), and the class names;
    ``classes``: the training split's, which this split must have too."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        found, class_to_idx = find_classes(str(directory))
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"imagefolder {directory}: {err}") from None
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise CorruptDatasetError(f"{directory} has other classes than the train split: missing {missing}, "
                                  f"extra {extra}")
    try:
        samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # a class folder without image files
        raise DatasetNotFoundError(f"imagefolder {directory}: {err}") from None
    return samples, found


def _subset(samples: list[tuple[str, int]], limit: int | None, seed: int) -> list[tuple[str, int]]:
    """``limit`` examples drawn by ``seed`` (an ImageFolder list is sorted by class: its first N would be a few
    classes), kept in list order; all of them for None."""
    if limit is None or limit >= len(samples):
        return samples
    keep = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [samples[i] for i in keep.tolist()]


def decode_rgb(path: str):
    """The image at ``path`` as an RGB PIL image, fully read (a truncated file fails here, not later)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


class SampleTable:
    """``(path, label)`` pairs held in three numpy arrays (the paths' UTF-8 bytes end to end, their offsets, the
    labels) instead of a list of Python tuples. A forked loader worker that reads a Python object writes its reference
    count, which copies the memory page holding it: over an epoch every worker would copy the whole list (PyTorch
    issue 13246; 1.28 million ImageNet paths take about 230 MB as tuples). Arrays are read without writing."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        encoded = [path.encode() for path, _ in samples]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.paths = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.paths[self.offsets[i]:self.offsets[i + 1]].tobytes().decode(), int(self.labels[i])


class FolderDataset(Dataset):
    """Decoded, transformed examples of a list of files. A key is an :class:`ExampleKey` (training: the transform
    draws from the key's random stream) or an int (evaluation: a deterministic transform)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable[[Any], Tensor], seed: int) -> None:
        self.samples, self.transform, self.seed = SampleTable(samples), transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: ExampleKey | int) -> Example | Corrupt:
        index, row, step = (key.index, key.row, key.step) if isinstance(key, ExampleKey) else (key, key, -1)
        path, label = self.samples[index]
        try:
            img = decode_rgb(path)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a file that is not an image
            return Corrupt(path, f"{type(err).__name__}: {err}", row, step)
        if step < 0:
            return Example(self.transform(img), label, row, step)
        with seeded(example_seed(self.seed, step, index)):
            return Example(self.transform(img), label, row, step)


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (Yun et al. 2019, eq. 2): side ratios ``sqrt(1 - lam)``, centre uniform over the image, clipped
    to it; ``(y0, y1, x0, x1)``."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def mix_pairs(images: Tensor, labels: Tensor, rows: list[int], num_classes: int, aug: ImageAugment, seed: int,
              step: int) -> tuple[Tensor, Tensor]:
    """Mixup / CutMix of each pair of global rows ``(2p, 2p + 1)`` present in the batch, with soft targets: both
    examples of a pair get ``lam`` of their own image and label and ``1 - lam`` of the partner's (CutMix: ``lam``
    is the area left outside the pasted box). A row whose partner is absent (skipped as corrupt) stays unmixed.
    Every draw is keyed by ``(seed, step, p)``. Returns the images and ``(B, num_classes)`` float targets."""
    images = images.clone()
    targets = torch.nn.functional.one_hot(labels, num_classes).float()
    out = targets.clone()
    at = {r: i for i, r in enumerate(rows)}
    h, w = images.shape[-2:]
    for row, i in at.items():
        if row % 2 or row + 1 not in at:
            continue
        j = at[row + 1]
        rng = np.random.default_rng(example_seed(seed, step, row // 2, 0x6D6978))
        if rng.random() >= aug.mix_prob:
            continue
        cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha == 0 or rng.random() < aug.switch_prob)
        lam = float(rng.beta(aug.cutmix_alpha, aug.cutmix_alpha) if cutmix else rng.beta(aug.mixup_alpha,
                                                                                           aug.mixup_alpha))
        a, b = images[i].clone(), images[j].clone()
        if cutmix:
            y0, y1, x0, x1 = cutmix_box(lam, h, w, rng)
            images[i, :, y0:y1, x0:x1] = b[:, y0:y1, x0:x1]
            images[j, :, y0:y1, x0:x1] = a[:, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            images[i], images[j] = lam * a + (1 - lam) * b, lam * b + (1 - lam) * a
        out[i] = lam * targets[i] + (1 - lam) * targets[j]
        out[j] = lam * targets[j] + (1 - lam) * targets[i]
    return images, out


class FolderBatch(NamedTuple):
    images: Tensor
    target: Tensor  # int64 labels, or (B, C) soft targets when mixing
    rows: list[int]
    corrupt: list[Corrupt]


class Collate:
    """Stack decoded examples into a :class:`FolderBatch` (in the worker); training batches are mixed here."""

    def __init__(self, num_classes: int, augment: ImageAugment | None = None, seed: int = 0) -> None:
        self.num_classes, self.augment, self.seed = num_classes, augment, seed

    def __call__(self, items: list[Example | Corrupt]) -> FolderBatch:
        corrupt = [it for it in items if isinstance(it, Corrupt)]
        good = [it for it in items if isinstance(it, Example)]
        if not good:
            return FolderBatch(torch.zeros(0), torch.zeros(0, dtype=torch.int64), [], corrupt)
        images = torch.stack([it.image for it in good])
        labels = torch.tensor([it.label for it in good], dtype=torch.int64)
        rows = [it.row for it in good]
        if self.augment is not None and self.augment.mixes and good[0].step >= 0:
            images, target = mix_pairs(images, labels, rows, self.num_classes, self.augment, self.seed, good[0].step)
            return FolderBatch(images, target, rows, corrupt)
        return FolderBatch(images, labels, rows, corrupt)


class ImageFolderData:
    """An ImageFolder tree as a streamed dataset: its splits' file lists, its classes, and loaders of batches.

    ``mean``/``std`` normalise the decoded images (ImageNet's by default; a pretrained model's own replace them,
    ``ermoe.tasks.classification``). ``val_size`` training files (drawn by ``split_seed``) are held out as the
    validation split; ``train_limit``/``test_limit`` keep that many files, drawn by ``split_seed``.
    """

    name = "imagefolder"
    in_chans = 3

    def __init__(self, root: str | Path | None, img_size: int = 224, *, crop_pct: float = 0.875,
                 augment: ImageAugment | None = None, val_size: int = 0, split_seed: int = 0,
                 train_limit: int | None = None, test_limit: int | None = None, num_workers: int = 0,
                 skip_corrupt: bool = False) -> None:
        if root is None:
            raise DatasetNotFoundError("imagefolder needs --data.data_dir=DIR with train/ and val/ (or test/) "
                                       "subfolders of class folders (the ImageNet layout)")
        root = self.root = Path(root)
        # train/ and val/ (ImageNet's layout: its validation images are what papers test on) or test/; with both
        # val/ and test/, each is the split its name says
        both = (root / "val").is_dir() and (root / "test").is_dir()
        test_dir = root / "test" if both or not (root / "val").is_dir() else root / "val"
        if not (root / "train").is_dir() or not test_dir.is_dir():
            raise DatasetNotFoundError(f"imagefolder: expected {root}/train and {root}/val (or test) directories")
        train, self.classes = list_split(root / "train", None)
        test, _ = list_split(test_dir, self.classes)
        self.splits: dict[str, list[tuple[str, int]] | None] = {"train": train, "val": None, "test": test}
        if both:
            if val_size:
                raise ValueError(f"data.val_size holds training images out for validation, but {root} has its own "
                                 f"val/ beside test/ (the validation split): set data.val_size=0")
            self.splits["val"], _ = list_split(root / "val", self.classes)
        if val_size:
            if not 1 <= val_size < len(train):
                raise ValueError(f"data.val_size must be in [1, {len(train) - 1}] for the {len(train)} training "
                                 f"images of {root}, got {val_size}")
            held = set(torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))[:val_size]
                       .tolist())
            self.splits["val"] = [s for i, s in enumerate(train) if i in held]
            self.splits["train"] = [s for i, s in enumerate(train) if i not in held]
        self.splits["train"] = _subset(self.splits["train"], train_limit, split_seed + 1)
        self.splits["test"] = _subset(self.splits["test"], test_limit, split_seed + 2)
        self.img_size, self.crop_pct, self.augment = img_size, crop_pct, augment
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self.mean, self.std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.skipped: dict[str, str] = {}  # path -> error, files left out (skip_corrupt)
        self._eval_loaders: dict[tuple[str, int, int | None], Any] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.splits["train"])

    @property
    def val(self) -> list[tuple[str, int]] | None:
        return self.splits["val"]

    def split_size(self, split: str) -> int:
        return len(self.splits[split] or ())

    def transform(self, training: bool) -> Callable[[Any], Tensor]:
        from timm.data import create_transform

        common = dict(interpolation="bicubic", mean=tuple(self.mean.tolist()), std=tuple(self.std.tolist()))
        if not training or self.augment is None:
            return create_transform(self.img_size, is_training=False, crop_pct=self.crop_pct, **common)
        a = self.augment
        return allow_zero_bit_posterize(create_transform(
            self.img_size, is_training=True, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
            auto_augment=a.auto_augment, color_jitter=a.color_jitter, re_prob=a.re_prob,
            **{**common, "interpolation": a.interpolation}))

    def train_batches(self, seed: int, batch_size: int, start_step: int, stop_step: int, rank: int, world: int,
                      device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images, target)`` of this rank's rows of every step's global batch, decoded in the loader's workers."""
        sampler = StepBatchSampler(len(self), batch_size, seed, start_step, stop_step, rank, world)
        if self.augment is not None and self.augment.mixes and (sampler.lo % 2 or sampler.hi % 2):
            raise ValueError(f"data.augment mixes pairs of rows: each rank's share of optim.batch_size "
                             f"({sampler.hi - sampler.lo}) must be even")
        collate = Collate(self.num_classes, self.augment, seed)
        dataset = FolderDataset(self.splits["train"], self.transform(training=True), seed)
        loader = make_loader(dataset, sampler, collate, self.num_workers, device)
        for batch in iterate(loader):
            yield self._checked(batch)

    def eval_batches(self, split: str, batch_size: int, limit: int | None, device: torch.device
                     ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images, labels)`` of a split in order, without augmentation; ``limit``: its first files only. The
        loaders (and their workers) are kept for the next pass."""
        samples = self.splits[split]
        if samples is None:
            raise ValueError(f"{self.name} has no {split} split (data.val_size holds one out)")
        key = (split, batch_size, limit)
        if key not in self._eval_loaders:
            n = len(samples) if limit is None else min(limit, len(samples))
            batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
            dataset = FolderDataset(samples, self.transform(training=False), 0)
            self._eval_loaders[key] = make_loader(dataset, batches, Collate(self.num_classes), self.num_workers,
                                                  device, persistent=self.num_workers > 0)
        for batch in iterate(self._eval_loaders[key]):
            yield self._checked(batch)

    def _checked(self, batch: FolderBatch) -> tuple[Tensor, Tensor]:
        if batch.corrupt:
            if not self.skip_corrupt:
                bad = batch.corrupt[0]
                raise CorruptDatasetError(f"cannot decode image {bad.path}: {bad.error} (data.skip_corrupt: true "
                                          "leaves such files out with a warning)")
            new = [c for c in batch.corrupt if c.path not in self.skipped]
            if new:
                warnings.warn(f"imagefolder: left out {len(new)} file(s) that cannot be decoded: "
                              + ", ".join(f"{c.path} ({c.error})" for c in new), stacklevel=2)
                self.skipped.update({c.path: c.error for c in new})
            if len(batch.rows) == 0:
                raise CorruptDatasetError("every file of a batch failed to decode: "
                                          + ", ".join(c.path for c in batch.corrupt))
        return batch.images, batch.target
