"""Labelled images as batches: in-memory sets augmented on the device (:class:`ImageBatches`), ImageFolder trees
decoded in loader workers (:class:`FolderBatches`)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import normalize, train_transform
from .batches import Batch, BatchSource, Sampling
from .folder import ImageFolderData
from .images import ImageData, ImageSet


class ImageBatches(BatchSource):
    """An in-memory image set (uint8): random crops and flips drawn per step on the device, normalised by
    ``data.mean``/``data.std`` (a pretrained model's own statistics may replace them). With :meth:`use_features`
    each split's frozen stem features stand in for its images (``data.stem_cache``)."""

    def __init__(self, data: ImageData, sampling: Sampling, crop_padding: int = 0, hflip: bool = False) -> None:
        super().__init__(sampling)
        self.data, self.crop_padding, self.hflip = data, crop_padding, hflip
        self.features: dict[str, Tensor] | None = None
        self.stem: nn.Module | None = None
        self._resident: tuple[tuple, ImageData] | None = None

    def example_entries(self, split: str) -> list[str]:
        """Each image's digest and label (the arrays as loaded, before any held-out split is moved to a device)."""
        part = getattr(self.data, split)
        images, labels = part.images.cpu().numpy(), part.labels.tolist()
        return [f"{hashlib.sha1(images[i].tobytes()).hexdigest()[:16]}:{labels[i]}" for i in range(len(images))]

    @property
    def indices_on_device(self) -> bool:  # the images live on the device; cached features where they were made
        return self.features is None

    def on_device(self) -> ImageData:
        """The data with every split (uint8) and the normalisation on the training device, copied once (again only
        if a split or the statistics are replaced, as a pretrained model's normalisation replaces them): a step
        then indexes device memory, with no copy from the host. On the CPU, the data itself."""
        d = self.data
        sources = (d.train, d.val, d.test, d.mean, d.std)  # held, so compared by identity without reuse of an id
        if self._resident is None or any(a is not b for a, b in zip(self._resident[0], sources)):
            def move(split: ImageSet | None) -> ImageSet | None:
                return None if split is None else ImageSet(split.images.to(self.device), split.labels.to(self.device))
            resident = dataclasses.replace(d, train=move(d.train), val=move(d.val), test=move(d.test),
                                           mean=d.mean.to(self.device), std=d.std.to(self.device))
            self._resident = sources, resident
        return self._resident[1]

    def splits(self) -> dict[str, ImageSet]:
        return {name: split for name, split in (("train", self.data.train), ("val", self.data.val),
                                                ("test", self.data.test)) if split is not None}

    def use_features(self, stem: nn.Module, features: dict[str, Tensor]) -> None:
        """Serve each split's cached features of the frozen ``stem`` instead of its images (no augmentation)."""
        self.stem, self.features = stem, features

    @property
    def num_train(self) -> int:
        return len(self.data.train)

    def has_split(self, split: str) -> bool:
        return split in self.splits()

    def model_args(self) -> dict[str, Any]:
        return {"num_classes": self.data.num_classes, "img_size": self.data.img_size, "in_chans": self.data.in_chans}

    def train_batch(self, indices: Tensor, step: int) -> Batch:
        if self.features is not None:  # no augmentation with cached features (the config refuses it)
            return Batch((self.features["train"][indices].to(self.device),),
                         self.data.train.labels[indices].to(self.device))
        data = self.on_device()
        indices = indices.to(self.device)
        gen = None
        if self.crop_padding > 0 or self.hflip:
            gen = torch.Generator(device=self.device).manual_seed(self.sampling.seed * 1_000_003 + step)
        x = train_transform(data.train.images[indices], data.mean, data.std, crop_padding=self.crop_padding,
                            hflip=self.hflip, generator=gen)
        return Batch((x,), data.train.labels[indices])

    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        self._require(split, " (data.val_size holds one out)")
        subset = self.splits()[split]
        if self.features is None:
            data = self.on_device()
            resident = {"train": data.train, "val": data.val, "test": data.test}[split]
            yield from image_batches(resident.subset(limit), data, self.device,
                                     batch_size or self.sampling.eval_batch_size, self.stem)
            return
        features, labels = self.features[split][:limit], subset.labels[:limit]
        batch_size = batch_size or self.sampling.eval_batch_size
        for i in range(0, len(features), batch_size):
            yield Batch((features[i:i + batch_size].to(self.device),), labels[i:i + batch_size].to(self.device))

    def image_batches(self, images: ImageSet, batch_size: int | None = None) -> Iterator[Batch]:
        """Any images (another dataset's too) as this source's model inputs (:func:`image_batches`)."""
        return image_batches(images, self.data, self.device, batch_size or self.sampling.eval_batch_size, self.stem)


def image_batches(images: ImageSet, like: ImageData | ImageFolderData, device: torch.device, batch_size: int,
                  stem: nn.Module | None = None) -> Iterator[Batch]:
    """Any images as the model inputs of data ``like``: resized to its images' size, their channels matched (grey
    repeated, colour averaged), normalised by its ``mean``/``std``; with ``stem``, that frozen stem's features."""
    size, chans = like.img_size, like.in_chans
    for i in range(0, len(images), batch_size):
        x = images.images[i:i + batch_size].to(device)
        if x.shape[1] != chans:
            if chans != 1 and x.shape[1] != 1:
                raise ValueError(f"cannot map {x.shape[1]}-channel images to the model's {chans} channels")
            x = x.float().mean(1, keepdim=True) if chans == 1 else x.float().repeat(1, chans, 1, 1)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = normalize(x, like.mean, like.std)
        if stem is not None:  # the model takes the stem's features (data.stem_cache): compute them live
            x = stem.frozen_features(x)
        yield Batch((x,), images.labels[i:i + batch_size].to(device))


class FolderBatches(BatchSource):
    """An ImageFolder tree: only this rank's rows of each step are read, decoded and augmented, in the loader's
    workers (:class:`ermoe.data.folder.ImageFolderData`)."""

    def __init__(self, data: ImageFolderData, sampling: Sampling) -> None:
        super().__init__(sampling)
        self.data = data

    @property
    def num_train(self) -> int:
        return len(self.data)

    def has_split(self, split: str) -> bool:
        return self.data.splits.get(split) is not None

    def example_entries(self, split: str) -> list[str]:
        """Each file's path under the tree's root, its size and its class."""
        root, classes = self.data.root, self.data.classes
        return [f"{Path(path).relative_to(root)}:{os.path.getsize(path)}:{classes[label]}"
                for path, label in self.data.splits[split]]

    def model_args(self) -> dict[str, Any]:
        return {"num_classes": self.data.num_classes, "img_size": self.data.img_size, "in_chans": self.data.in_chans}

    def train_batches(self, start_step: int, stop_step: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        s, device = self.sampling, self.device
        for images, target in self.data.train_batches(s.seed, s.batch_size, start_step, stop_step, rank, world,
                                                      device):
            yield Batch((images.to(device, non_blocking=True),), target.to(device, non_blocking=True))

    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        for images, labels in self.data.eval_batches(split, batch_size or self.sampling.eval_batch_size, limit,
                                                     self.device):
            yield Batch((images.to(self.device),), labels.to(self.device))
