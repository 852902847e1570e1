"""Datasets: in memory (uint8, batched on-device augmentation) or streamed from disk through torch.utils.data."""

from .augment import normalize, random_crop, random_hflip, train_transform
from .download import DownloadError, download_file, file_md5
from .folder import ImageAugment, ImageFolderData
from .images import (DATASETS, CorruptDatasetError, DatasetNotFoundError, ImageData, ImageSet, load_cifar,
                     load_dataset, load_digits, load_fashion_mnist, load_imagefolder, read_idx)
from .loader import DataLoaderWorkerError, StepBatchSampler, epoch_order, example_seed

__all__ = ["DATASETS", "CorruptDatasetError", "DataLoaderWorkerError", "DatasetNotFoundError", "DownloadError",
           "ImageAugment", "ImageData", "ImageFolderData", "ImageSet", "StepBatchSampler", "download_file",
           "epoch_order", "example_seed", "file_md5", "load_cifar", "load_dataset", "load_digits",
           "load_fashion_mnist", "load_imagefolder", "normalize", "random_crop", "random_hflip", "read_idx",
           "train_transform"]
