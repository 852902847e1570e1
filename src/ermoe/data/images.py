"""Image classification datasets held in memory as uint8 tensors: Fashion-MNIST, scikit-learn digits, CIFAR-10/100
(python format), any ImageFolder tree.

Every loader returns an :class:`ImageData` with ``(N, C, H, W)`` uint8 images and int64 labels for a train and a
test split; augmentation runs batched on the training device (:mod:`ermoe.data.augment`). In-memory loading suits
datasets up to a few GB of decoded pixels; ImageFolder trees are decoded once and resized to ``img_size``.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .download import download_file

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5 of the official gzip files (github.com/zalandoresearch/fashion-mnist, the same in torchvision).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "imagefolder")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be parsed."""


@dataclass
class ImageSet:
    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, limit: int | None) -> "ImageSet":
        """The first ``limit`` examples (all of them for None)."""
        if limit is None or limit >= len(self):
            return self
        return ImageSet(self.images[:limit], self.labels[:limit])


@dataclass
class ImageData:
    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    mean: Tensor  # (C,) in [0, 1], from the training split
    std: Tensor
    val: ImageSet | None = None  # held out from the training split by carve_validation

    def carve_validation(self, size: int, seed: int = 0) -> None:
        """Hold out ``size`` training images, drawn by ``seed``, as the validation split; the rest stay the
        training split in their original order. The same ``(size, seed)`` always holds out the same images."""
        n = len(self.train)
        if not 1 <= size < n:
            raise ValueError(f"data.val_size must be in [1, {n - 1}] for {self.name}'s {n} training images, got {size}")
        held = torch.zeros(n, dtype=torch.bool)
        held[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]] = True
        self.val = ImageSet(self.train.images[held], self.train.labels[held])
        self.train = ImageSet(self.train.images[~held], self.train.labels[~held])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def img_size(self) -> int:
        return self.train.images.shape[2]


def _channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    x = images[: min(len(images), 20000)].double().div(255.0)
    return x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).float()


def _make(name: str, train: ImageSet, test: ImageSet, classes: list[str]) -> ImageData:
    mean, std = _channel_stats(train.images)
    return ImageData(name, train, test, classes, mean, std)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, validating its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise CorruptDatasetError(f"cannot read {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CorruptDatasetError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise CorruptDatasetError(f"{path}: header says shape {shape} ({expected} bytes), file holds "
                                  f"{len(data) - header} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _missing(d: Path) -> list[str]:
    return [f for f in FASHION_MNIST_FILES if not ((d / f).exists() or (d / f[:-3]).exists())]


def _fashion_mnist_dir(data_dir: str | Path | None, download: bool, mirror: str | None) -> Path:
    """``data_dir`` when given (downloaded into with ``download``), never another copy; else the Debian package's
    copy, else the download cache."""
    if download:
        target = Path(data_dir) if data_dir else Path.home() / ".cache" / "ermoe" / "fashion-mnist"
        base = (mirror or FASHION_MNIST_URL).rstrip("/") + "/"
        for fname, md5 in FASHION_MNIST_FILES.items():
            if not (target / fname).exists() and not (target / fname[:-3]).exists():
                download_file(base + fname, target / fname, md5)
        return target
    if data_dir:
        d = Path(data_dir)
        if not d.is_dir():
            raise DatasetNotFoundError(f"data.data_dir {d} is not a directory (Fashion-MNIST's four idx files are "
                                       "expected there; --data.download=true fetches them into it)")
        if _missing(d):
            raise DatasetNotFoundError(f"data.data_dir {d} lacks Fashion-MNIST files: {', '.join(_missing(d))} (or "
                                       "their uncompressed versions); --data.download=true fetches them into it")
        return d
    looked = []
    for d in (DEBIAN_FASHION_MNIST, Path.home() / ".cache" / "ermoe" / "fashion-mnist"):
        looked.append(str(d))
        if not _missing(d):
            return d
    raise DatasetNotFoundError(
        "Fashion-MNIST not found; looked in: " + ", ".join(looked) + ". Get it in one of three ways: "
        "(1) pass --data.data_dir=DIR holding the four idx files (train-images-idx3-ubyte.gz, ...); "
        "(2) install the Debian package: sudo apt-get install dataset-fashion-mnist; "
        "(3) pass --data.download=true to fetch the official files (checksums verified).")


def load_fashion_mnist(data_dir: str | Path | None = None, download: bool = False,
                       mirror: str | None = None) -> ImageData:
    root = _fashion_mnist_dir(data_dir, download, mirror)

    def read(fname: str) -> np.ndarray:
        path = root / fname if (root / fname).exists() else root / fname[:-3]
        return read_idx(path)

    splits = []
    for prefix in ("train", "t10k"):
        images, labels = read(f"{prefix}-images-idx3-ubyte.gz"), read(f"{prefix}-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CorruptDatasetError(f"{root}: {prefix} images {images.shape} and labels {labels.shape} disagree")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise CorruptDatasetError(f"{root}: {prefix} labels go up to {int(labels.max())}; Fashion-MNIST has "
                                      f"{len(FASHION_MNIST_CLASSES)} classes (0-9)")
        splits.append(ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return _make("fashion_mnist", splits[0], splits[1], list(FASHION_MNIST_CLASSES))


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1797 images, pixel values 0-16 scaled to 0-255), a fixed stratified split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise DatasetNotFoundError("the digits dataset ships with scikit-learn: pip install scikit-learn") from err
    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    tr_x, te_x, tr_y, te_y = train_test_split(images, bunch.target, test_size=test_fraction, random_state=seed,
                                              stratify=bunch.target)
    to_set = lambda x, y: ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
    return _make("digits", to_set(tr_x, tr_y), to_set(te_x, te_y), [str(i) for i in range(10)])


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DatasetNotFoundError(f"CIFAR file {path} not found")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CorruptDatasetError(f"cannot read CIFAR file {path}: {err}") from err


def load_cifar(data_dir: str | Path | None, num_classes: int = 10) -> ImageData:
    """CIFAR-10/100 from their python-format directories (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    if data_dir is None:
        raise DatasetNotFoundError(f"CIFAR-{num_classes} needs --data.data_dir: the directory that holds the "
                                   "extracted python-format archive (from https://www.cs.toronto.edu/~kriz/cifar.html)")
    root = Path(data_dir)
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (root / sub).is_dir():
        root = root / sub
    if num_classes == 10:
        train_files, test_files, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
        meta, names_key = "batches.meta", b"label_names"
    else:
        train_files, test_files, key = ["train"], ["test"], b"fine_labels"
        meta, names_key = "meta", b"fine_label_names"

    def read(files: list[str]) -> ImageSet:
        xs, ys = [], []
        for fname in files:
            d = _unpickle(root / fname)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    names_path = root / meta
    classes = ([n.decode() for n in _unpickle(names_path)[names_key]] if names_path.exists()
               else [str(i) for i in range(num_classes)])
    return _make(f"cifar{num_classes}", read(train_files), read(test_files), classes)


def load_imagefolder(data_dir: str | Path | None, img_size: int) -> ImageData:
    """``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (or ``val``), decoded and resized to RGB."""
    if data_dir is None:
        raise DatasetNotFoundError("imagefolder needs --data.data_dir=DIR with train/ and test/ (or val/) subfolders")
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = Path(data_dir)
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        raise DatasetNotFoundError(f"imagefolder: expected {root}/train and {root}/test (or val) directories")
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)])

    def read(d: Path, classes: list[str] | None) -> tuple[ImageSet, list[str]]:
        try:
            folder = ImageFolder(str(d), transform=lambda img: tf(img.convert("RGB")))
        except FileNotFoundError as err:  # a class folder without image files
            raise DatasetNotFoundError(f"imagefolder {d}: {err}") from None
        if classes is not None and folder.classes != classes:
            raise CorruptDatasetError(f"{d} has classes {folder.classes}, the train split {classes}")
        xs, ys = [], []
        for i, (path, label) in enumerate(folder.samples):
            try:
                x, _ = folder[i]
            except Exception as err:  # noqa: BLE001 - PIL raises many types for a file that is not an image
                raise CorruptDatasetError(f"cannot decode image {path}: {err}") from None
            xs.append(x)
            ys.append(label)
        return ImageSet(torch.stack(xs), torch.tensor(ys, dtype=torch.int64)), folder.classes

    train, classes = read(root / "train", None)
    test, _ = read(test_dir, classes)
    return _make("imagefolder", train, test, classes)


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False, mirror: str | None = None,
                 img_size: int | None = None) -> ImageData:
    """Load one of :data:`DATASETS` by name."""
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir, download, mirror)
    if name == "digits":
        return load_digits()
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_dir, int(name[5:]))
    if name == "imagefolder":
        return load_imagefolder(data_dir, img_size or 224)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
