"""The datasets a run can read, registered by name, each with its own typed options: the ``data`` section of a run's
config is the options of the dataset it names (``data.name``), checked by :mod:`ermoe.settings` against their
annotations and by their own ``__post_init__`` (a key the dataset does not read is an error that names what it
reads).

    list_datasets()                  # ['fashion_mnist', 'digits', 'cifar10', ..., 'brain_cohort']
    data_options("imagefolder")      # ImageFolderOptions: data_dir, img_size, ..., augment, num_workers
    dataset_keys("nifti_csv")        # the keys its section takes

Which task reads a dataset is the task's to say (``ermoe.tasks``, ``Task.datasets``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..registry import Registry
from ..settings import FORBID_EXTRA, NonNegative, Positive, finite
from .folder import IMAGENET_MEAN, IMAGENET_STD, ImageAugment, ImageFolderData
from .images import ImageData, load_cifar, load_digits, load_fashion_mnist
from .karpathy import CaptionData, read_karpathy

_DATASETS: Registry[type["DataOptions"]] = Registry("dataset")


def register_data(cls: type["DataOptions"]) -> type["DataOptions"]:
    """Class decorator: register a dataset's options under their ``name``."""
    return _DATASETS.register(cls)


def list_datasets() -> list[str]:
    return _DATASETS.names()


def data_options(name: str) -> type["DataOptions"]:
    return _DATASETS.get(name)


def dataset_keys(name: str) -> list[str]:
    """The keys of dataset ``name``'s section besides ``name``."""
    return [f.name for f in dataclasses.fields(data_options(name))]


@dataclass
class DataOptions:
    """What every dataset's section has: its name (the registry's key, not a field)."""

    __pydantic_config__ = FORBID_EXTRA
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Rules across the section's fields (each field's own range is its annotation's constraint)."""

    def check_run(self, batch_size: int, model_name: str, model_args: dict[str, Any]) -> None:
        """What this dataset needs of the rest of a run's config (``ValueError`` naming it); nothing by default."""

    def to_dict(self) -> dict[str, Any]:
        """The section as in YAML: ``name`` first, then the options."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass
class _Limits(DataOptions):
    train_limit: Positive | None = None  # the first N training examples (quick runs), after validation is held out
    test_limit: Positive | None = None


@dataclass
class _Splits(_Limits):
    # Training examples held out as a validation split (0: none), drawn by split_seed: the same for every run.
    val_size: NonNegative = 0
    split_seed: int = 0


@dataclass
class InMemoryImageOptions(_Splits):
    # Compute a frozen pretrained stem's features once per image and cache them (ermoe.tasks.features).
    stem_cache: bool = False
    # Off by default: in the 4-epoch main job augmentation cost accuracy (docs/vision.md has the measurement).
    crop_padding: NonNegative = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stem_cache and (self.crop_padding or self.hflip):
            raise ValueError("data.stem_cache precomputes the features of unaugmented images: data.crop_padding "
                             "and data.hflip do not apply with it")

    def check_run(self, batch_size: int, model_name: str, model_args: dict[str, Any]) -> None:
        if self.stem_cache and not model_args.get("stem"):
            raise ValueError(f"data.stem_cache caches a frozen stem's features: model {model_name!r} has none "
                             "(set model.stem)")

    def read(self) -> ImageData:
        """The dataset's train and test splits in memory (before the validation split and the limits)."""
        raise NotImplementedError

    def load(self) -> ImageData:
        """The dataset with its validation split held out (``val_size``, ``split_seed``) and its limits applied."""
        data = self.read()
        if self.val_size:
            data.carve_validation(self.val_size, self.split_seed)
        data.train = data.train.subset(self.train_limit)
        data.test = data.test.subset(self.test_limit)
        return data


@dataclass
class _Downloadable:
    data_dir: str | None = None
    download: bool = False
    mirror: str | None = None

    def _check_mirror(self) -> None:
        if self.mirror is not None and not self.download:
            raise ValueError("data.mirror applies only with data.download: true")


@register_data
@dataclass
class FashionMNISTOptions(InMemoryImageOptions, _Downloadable):
    """Fashion-MNIST from ``data_dir``, the Debian package, or downloaded (``download``, from ``mirror``)."""

    name: ClassVar[str] = "fashion_mnist"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_mirror()

    def read(self) -> ImageData:
        return load_fashion_mnist(self.data_dir, self.download, self.mirror)


@register_data
@dataclass
class DigitsOptions(InMemoryImageOptions):
    """scikit-learn's 8 x 8 digits."""

    name: ClassVar[str] = "digits"

    def read(self) -> ImageData:
        return load_digits()


@register_data
@dataclass
class Cifar10Options(InMemoryImageOptions):
    """CIFAR-10 from its extracted python-format archive in ``data_dir``."""

    name: ClassVar[str] = "cifar10"
    data_dir: str | None = None

    def read(self) -> ImageData:
        return load_cifar(self.data_dir, int(self.name[5:]))


@register_data
@dataclass
class Cifar100Options(Cifar10Options):
    name: ClassVar[str] = "cifar100"


@register_data
@dataclass
class ImageFolderOptions(_Splits):
    """An ImageFolder tree (the ImageNet layout) streamed from disk (docs/data.md)."""

    name: ClassVar[str] = "imagefolder"
    data_dir: str | None = None
    img_size: Positive | None = None  # the training and evaluation crop (224 when null)
    # centre crop's share of the resized image at evaluation (0.875: 256 -> 224)
    crop_pct: finite(gt=0, le=1) = 0.875
    # training augmentation: null none, {} DeiT's (ermoe.data.folder.ImageAugment)
    augment: ImageAugment | None = None
    num_workers: NonNegative = 0  # loader worker processes that decode (0: in the training process)
    skip_corrupt: bool = False  # leave undecodable files out with a warning instead of stopping the run

    def check_run(self, batch_size: int, model_name: str, model_args: dict[str, Any]) -> None:
        if self.augment is not None and self.augment.mixes and batch_size % 2:
            raise ValueError(f"optim.batch_size must be even with data.augment's mixup / CutMix (pairs of rows), got "
                             f"{batch_size}")

    def load(self) -> ImageFolderData:
        """The tree's file lists (its images are decoded when a step asks for them)."""
        return ImageFolderData(self.data_dir, self.img_size or 224, crop_pct=self.crop_pct, augment=self.augment,
                               val_size=self.val_size, split_seed=self.split_seed, train_limit=self.train_limit,
                               test_limit=self.test_limit, num_workers=self.num_workers,
                               skip_corrupt=self.skip_corrupt)


@dataclass
class _Cap:
    # decoded examples are held in memory up to this many GiB, else read per example (in the loader's workers)
    memory_cap_gb: finite(ge=0) = 2.0


@register_data
@dataclass
class KarpathyOptions(_Limits, _Cap):
    """A Karpathy split file (COCO, Flickr30K) and its images (docs/retrieval.md)."""

    name: ClassVar[str] = "karpathy"
    json: str | None = None
    image_root: str | None = None
    img_size: Positive | None = None  # 224 when null
    num_workers: NonNegative = 0

    def load(self) -> CaptionData:
        """The split file's images (held up to ``memory_cap_gb``, else decoded per batch) and captions; photographs
        are normalised with ImageNet's channel statistics (nothing is decoded up front)."""
        if self.json is None or self.image_root is None:
            raise ValueError("data.name karpathy needs data.json (the Karpathy split file) and data.image_root")
        splits = read_karpathy(self.json, self.image_root, self.img_size or 224, 3,
                               int(self.memory_cap_gb * 2 ** 30))
        return CaptionData(Path(self.json), splits, torch.tensor(IMAGENET_MEAN),
                           torch.tensor(IMAGENET_STD)).limited(self.train_limit, self.test_limit)


@register_data
@dataclass
class FashionCaptionsOptions(_Limits, _Downloadable):
    """The built-in caption set, generated once from Fashion-MNIST (docs/retrieval.md)."""

    name: ClassVar[str] = "fashion_captions"
    caption_set_size: Positive = 10000  # training canvases (+ 1,000 validation, 1,000 test)
    # "mixed": relations, scene, counts and places; "word_order": whole-canvas captions, none shared between two
    # images of a split, half the images in swapped pairs that only word order tells apart (docs/retrieval.md)
    captions: str = "mixed"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_mirror()
        from .captions import CAPTION_STYLES
        if self.captions not in CAPTION_STYLES:
            raise ValueError(f"data.captions must be one of {CAPTION_STYLES}, got {self.captions!r}")

    def load(self) -> CaptionData:
        """The built-in caption set (generated once from Fashion-MNIST, cached), its 64-pixel grey canvases held in
        memory and normalised by their own channel statistics, and the items on each canvas."""
        import json

        from .captions import CaptionSetSpec, build_caption_set

        fm = load_fashion_mnist(self.data_dir, download=self.download, mirror=self.mirror)
        pool = lambda s: (s.images[:, 0].numpy(), s.labels.numpy())  # noqa: E731
        json_path = build_caption_set(CaptionSetSpec(train_size=self.caption_set_size, style=self.captions),
                                      pool(fm.train), pool(fm.test), log=print)
        items: dict[str, list[list[dict]]] = {}
        for e in json.loads(json_path.read_text())["images"]:
            items.setdefault("train" if e["split"] == "restval" else e["split"], []).append(e["items"])
        splits = read_karpathy(json_path, json_path.parent, 64, 1)
        x = splits["train"].images[:20000].double().div(255.0)
        mean, std = x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).float().clamp_min(1e-3)
        return CaptionData(json_path, splits, mean, std, items).limited(self.train_limit, self.test_limit)


@dataclass
class _Volumes(_Splits, _Cap):
    """Brain volumes resampled to the MNI grid at ``spacing`` mm; ``test_size`` subjects held out for testing (with
    ``val_size`` for validation) unless the CSV has a split column. For volumes ``crop_padding`` is the largest
    random shift in voxels, ``hflip`` a random left-right flip."""

    spacing: finite(gt=0) = 2.0
    test_size: NonNegative = 0
    crop_padding: NonNegative = 0
    hflip: bool = False
    num_workers: NonNegative = 0  # processes that build the cache, and loader workers that read it

    def scans_csv(self) -> tuple[Path, dict[str, Any] | None]:
        """The CSV of scans (``path``, ``age``, ...) and, for a generated cohort, its ground truth."""
        raise NotImplementedError


@register_data
@dataclass
class NiftiCsvOptions(_Volumes):
    """A CSV of NIfTI files with ages (docs/brainage.md)."""

    name: ClassVar[str] = "nifti_csv"
    csv: str | None = None

    def scans_csv(self) -> tuple[Path, dict[str, Any] | None]:
        """The CSV of scans, and no ground truth (someone else's data)."""
        if self.csv is None:
            raise ValueError("data.name nifti_csv needs data.csv: a CSV with columns path and age")
        return Path(self.csv), None


@register_data
@dataclass
class BrainCohortOptions(_Volumes):
    """The built-in ageing cohort, generated once (docs/brainage.md)."""

    name: ClassVar[str] = "brain_cohort"
    cohort_size: int = 600
    cohort_seed: int = 0
    # "homogeneous": everyone ages alike; "heterogeneous": two ageing patterns (hippocampal- or ventricle-
    # predominant) and sex-dependent grey-matter loss that only the image shows (docs/brainage.md)
    ageing: str = "homogeneous"
    # heterogeneous only: how far apart the patterns age (each pattern's rate multipliers raised to this power; 1:
    # the cohort as first built, 2: e.g. hippocampal loss x6.25 against x0.25)
    pattern_strength: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        from .cohort import AGEING
        if self.ageing not in AGEING:
            raise ValueError(f"data.ageing must be one of {AGEING}, got {self.ageing!r}")
        if not self.pattern_strength > 0:
            raise ValueError(f"data.pattern_strength must be > 0, got {self.pattern_strength!r}")
        if self.pattern_strength != 1.0 and self.ageing != "heterogeneous":
            raise ValueError("data.pattern_strength applies to data.ageing: heterogeneous only (a homogeneous cohort "
                             "has no patterns)")

    def scans_csv(self) -> tuple[Path, dict[str, Any] | None]:
        """The generated cohort's CSV (made once, cached) and what is known of it: the error floor its biological
        variation sets, that variation's sd, its size and folder (tissue and ageing maps), how it ages."""
        from .cohort import CohortSpec, build_cohort

        spec = CohortSpec(size=self.cohort_size, seed=self.cohort_seed, spacing=self.spacing, ageing=self.ageing,
                          pattern_strength=self.pattern_strength)
        csv_path = build_cohort(spec, log=print)
        return csv_path, {"floor_mae": spec.floor_mae(), "bio_sd": spec.bio_sd, "size": spec.size,
                          "dir": str(csv_path.parent), "ageing": spec.ageing,
                          **({"pattern_strength": spec.pattern_strength} if spec.pattern_strength != 1.0 else {})}
