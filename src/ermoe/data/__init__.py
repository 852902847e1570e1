"""Datasets (in memory, uint8) and batched on-device augmentation."""

from .augment import normalize, random_crop, random_hflip, train_transform
from .download import DownloadError, download_file, file_md5
from .images import (DATASETS, CorruptDatasetError, DatasetNotFoundError, ImageData, ImageSet, load_cifar,
                     load_dataset, load_digits, load_fashion_mnist, load_imagefolder, read_idx)

__all__ = ["DATASETS", "CorruptDatasetError", "DatasetNotFoundError", "DownloadError", "ImageData", "ImageSet",
           "download_file", "file_md5", "load_cifar", "load_dataset", "load_digits", "load_fashion_mnist",
           "load_imagefolder", "normalize", "random_crop", "random_hflip", "read_idx", "train_transform"]
