"""Image classification: in-memory image datasets and ImageFolder trees streamed from disk (the ImageNet layout),
cross-entropy (with soft targets under mixup / CutMix), top-1/top-5 and the routing diagnostics per class (load,
MI(expert; class), the expert x class heatmap)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..analysis.diagnostics import evaluate_classifier, evaluating
from ..analysis.report import draw_figures, layers_table
from ..data.augment import normalize, train_transform
from ..data.folder import ImageFolderData
from ..data.images import DATASETS, ImageData, ImageSet
from ..data.modules import InMemoryImageOptions
from .base import Batch, Objective, Task, register_task
from .features import cached_stem_features

class CrossEntropy(Objective):
    """Cross-entropy with label smoothing (hard labels, or the soft targets of mixup / CutMix); logs the correct
    predictions."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.float(), target, label_smoothing=self.label_smoothing)

    def batch_stats(self, output: Tensor, batch: Batch) -> dict[str, Tensor]:
        # under mixup / CutMix the target is soft: its largest share counts as the label
        labels = batch.target if batch.target.dim() == 1 else batch.target.argmax(1)
        return {"acc": (output.argmax(1) == labels).sum()}


@register_task
class ImageClassification(Task):
    name = "classification"
    datasets = DATASETS
    model_data_args = ("num_classes", "img_size", "in_chans")
    data: ImageData | ImageFolderData
    # With data.stem_cache: each split's frozen stem features, which then stand in for its images as model input.
    features: dict[str, Tensor] | None = None
    stem: nn.Module | None = None

    @property
    def streamed(self) -> bool:
        return isinstance(self.data, ImageFolderData)

    def load(self) -> None:
        self.data = self.setup.data.load()  # held in memory, or an ImageFolder's file lists (decoded per step)
        if self.num_train < self.setup.batch_size:
            raise ValueError(f"optim.batch_size {self.setup.batch_size} exceeds the {self.num_train} training "
                             "images")
        self.objective = CrossEntropy(self.setup.label_smoothing)

    def model_args(self) -> dict[str, Any]:
        data = self.data
        return dict(zip(self.model_data_args, (data.num_classes, data.img_size, data.in_chans)))

    def prepare(self, model: nn.Module) -> None:
        """Pretrained weights expect the normalisation they were trained with, not the dataset's own statistics;
        with ``data.stem_cache`` the frozen stem's features of every split are computed (or read back) here."""
        norm = model.input_normalization(pretrained=bool(self.setup.model_args.get("pretrained", False)))
        if norm is not None:
            mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in norm)
            if len(mean) == self.data.in_chans:
                self.data.mean, self.data.std = mean, std
            else:
                warnings.warn(f"the model's pretrained input normalisation has {len(mean)} channels, the images "
                              f"{self.data.in_chans}: normalising with the dataset's own statistics instead",
                              stacklevel=2)
        if isinstance(self.setup.data, InMemoryImageOptions) and self.setup.data.stem_cache:
            self._cache_stem(model)

    def _cache_stem(self, model: nn.Module) -> None:
        self.stem = model.frozen_stem()
        if self.stem is None:
            raise ValueError(f"data.stem_cache: model {self.setup.model_name!r} has no frozen stem to cache")
        splits = {"train": self.data.train, "val": self.data.val, "test": self.data.test}
        self.features = {name: cached_stem_features(self.stem, split.images, self.data.mean, self.data.std,
                                                    self.device, self.setup.eval_batch_size)
                         for name, split in splits.items() if split is not None}

    @property
    def num_train(self) -> int:
        return len(self.data) if self.streamed else len(self.data.train)

    def train_batches(self, start_step: int, stop_step: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """In-memory sets: as every task (the global batch prepared, this rank's rows kept). Streamed folders: only
        this rank's rows are read and decoded, in the loader's workers."""
        if not self.streamed:
            yield from super().train_batches(start_step, stop_step, rank, world)
            return
        for images, target in self.data.train_batches(self.setup.seed, self.setup.batch_size, start_step,
                                                      stop_step, rank, world, self.device):
            yield Batch((images.to(self.device, non_blocking=True),), target.to(self.device, non_blocking=True))

    def train_batch(self, indices: Tensor, step: int) -> Batch:
        d, device = self.setup.data, self.device
        if self.features is not None:  # no augmentation with cached features (the config refuses it)
            return Batch((self.features["train"][indices].to(device),), self.data.train.labels[indices].to(device))
        gen = torch.Generator(device=device).manual_seed(self.setup.seed * 1_000_003 + step)
        x = train_transform(self.data.train.images[indices].to(device), self.data.mean, self.data.std,
                            crop_padding=d.crop_padding, hflip=d.hflip, generator=gen)
        return Batch((x,), self.data.train.labels[indices].to(device))

    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        if self.streamed:
            for images, labels in self.data.eval_batches(split, batch_size or self.setup.eval_batch_size, limit,
                                                         self.device):
                yield Batch((images.to(self.device),), labels.to(self.device))
            return
        subset = {"train": self.data.train, "val": self.data.val, "test": self.data.test}[split]
        if subset is None:
            raise ValueError(f"{self.data.name} has no {split} split (data.val_size holds one out)")
        if self.features is not None:
            features, labels = self.features[split][:limit], subset.labels[:limit]
            batch_size = batch_size or self.setup.eval_batch_size
            for i in range(0, len(features), batch_size):
                yield Batch((features[i:i + batch_size].to(self.device),), labels[i:i + batch_size].to(self.device))
            return
        yield from self.image_batches(subset.subset(limit), batch_size)

    def image_batches(self, images: ImageSet, batch_size: int | None = None) -> Iterator[Batch]:
        """Any images (another dataset's too) as this task's model inputs: resized to the training images' size,
        their channels matched (grey repeated, colour averaged), normalised as the training images are."""
        batch_size = batch_size or self.setup.eval_batch_size
        size, chans = self.data.img_size, self.data.in_chans
        for i in range(0, len(images), batch_size):
            x = images.images[i:i + batch_size].to(self.device)
            if x.shape[1] != chans:
                if chans != 1 and x.shape[1] != 1:
                    raise ValueError(f"cannot map {x.shape[1]}-channel images to the model's {chans} channels")
                x = x.float().mean(1, keepdim=True) if chans == 1 else x.float().repeat(1, chans, 1, 1)
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = normalize(x, self.data.mean, self.data.std)
            if self.stem is not None:  # the model takes the stem's features (data.stem_cache): compute them live
                x = self.stem.frozen_features(x)
            yield Batch((x,), images.labels[i:i + batch_size].to(self.device))

    def has_split(self, split: str) -> bool:
        return split != "val" or self.data.val is not None

    def evaluate(self, model: nn.Module, autocast: Callable[[], Any], probe: Batch | None = None) -> dict[str, Any]:
        metrics = evaluate_classifier(model, ((b.inputs, b.target) for b in self.eval_batches("test")),
                                      self.data.num_classes,
                                      probe=None if probe is None else probe.inputs, autocast=autocast)
        metrics.update(dataset=self.data.name, classes=self.data.classes, **self.quick_eval(model, autocast))
        if self.streamed:  # files left out as undecodable (data.skip_corrupt), by this process
            metrics.update(data_skipped_files=len(self.data.skipped), data_skipped=sorted(self.data.skipped))
        return metrics

    @torch.no_grad()
    def quick_eval(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float]:
        """Top-1 on the validation split (nothing without one: the test split is read once, at the end)."""
        if self.data.val is None:
            return {}
        correct = 0
        with evaluating(model):
            for batch in self.eval_batches("val"):
                with autocast():
                    correct += int((model(*batch.inputs).argmax(1) == batch.target).sum())
        return {"val_top1": correct / len(self.data.val)}

    @staticmethod
    def results_table(metrics: dict[str, Any]) -> str:
        head = (f"test top-1 {metrics['test_top1']:.4f}   top-5 {metrics['test_top5']:.4f}   "
                f"loss {metrics['test_loss']:.4f}   ({metrics['test_images']} test images)")
        if metrics.get("train_time_s") is not None:
            head += f"   train {metrics['train_time_s']:.0f} s"
        return "\n".join([head, *layers_table(metrics)])

    @staticmethod
    def draw_figures(metrics: dict[str, Any], fig_dir: Path) -> list[Path]:
        return draw_figures(metrics, fig_dir)
