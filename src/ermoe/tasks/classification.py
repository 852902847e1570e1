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

from ..analysis.diagnostics import (VAL_EXAMPLES, LabelFn, classification_examples, classification_measures,
                                   evaluate_classifier, evaluate_routed, example_labels)
from ..analysis.report import draw_figures, layers_table
from ..data.folder import ImageFolderData
from ..data.image_batches import FolderBatches, ImageBatches, image_batches
from ..data.images import DATASETS, ImageData, ImageSet
from ..data.modules import InMemoryImageOptions
from ..routing.oracle import routed_by
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


PROBE_TRAIN_IMAGES = 1000  # the class probe's training (and validation) images, at most an eighth of the training set
PROBE_MAX_CLASSES = 100  # beyond, the probe's fit would cost more than the run's evaluation (ImageNet: left out)


@register_task
class ImageClassification(Task):
    name = "classification"
    datasets = DATASETS
    model_data_args = ("num_classes", "img_size", "in_chans")
    batches: ImageBatches | FolderBatches

    @property
    def data(self) -> ImageData | ImageFolderData:
        return self.batches.data

    @property
    def streamed(self) -> bool:
        return isinstance(self.batches, FolderBatches)

    def load(self) -> None:
        d = self.setup.data
        data = d.load()  # held in memory, or an ImageFolder's file lists (decoded per step)
        self.batches = FolderBatches(data, self.sampling) if isinstance(data, ImageFolderData) else \
            ImageBatches(data, self.sampling, d.crop_padding, d.hflip)
        if self.num_train < self.setup.batch_size:
            raise ValueError(f"optim.batch_size {self.setup.batch_size} exceeds the {self.num_train} training "
                             "images")
        self.objective = CrossEntropy(self.setup.label_smoothing)

    def prepare(self, model: nn.Module) -> None:
        """Pretrained weights expect the normalisation they were trained with, not the dataset's own statistics;
        with ``data.stem_cache`` the frozen stem's features of every split are computed (or read back) here."""
        pretrained = bool(self.setup.model_args.get("pretrained", False)) or self.setup.init_checkpoint
        norm = model.input_normalization(pretrained=pretrained)
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
        stem = model.frozen_stem()
        if stem is None:
            raise ValueError(f"data.stem_cache: model {self.setup.model_name!r} has no frozen stem to cache")
        self.batches.use_features(stem, {
            name: cached_stem_features(stem, split.images, self.data.mean, self.data.std, self.device,
                                       self.setup.eval_batch_size) for name, split in self.batches.splits().items()})

    def image_batches(self, images: ImageSet, batch_size: int | None = None) -> Iterator[Batch]:
        """Any images (another dataset's too) as this task's model inputs
        (:func:`ermoe.data.image_batches.image_batches`)."""
        stem = None if self.streamed else self.batches.stem
        return image_batches(images, self.data, self.device, batch_size or self.setup.eval_batch_size, stem)

    def measures(self) -> dict[str, Any]:
        return classification_measures(self.data.num_classes)

    def oracle_groups(self, batch: Batch) -> Tensor | None:
        """An image's class (None under mixup / CutMix, whose targets are soft: no one class to route by)."""
        target = batch.target
        return target if target is not None and target.dim() == 1 and not target.is_floating_point() else None

    def token_labels(self) -> tuple[int, Callable[[Tensor | None], LabelFn]]:
        """A token's label: its image's class."""
        return self.data.num_classes, example_labels

    def evaluate(self, model: nn.Module, autocast: Callable[[], Any], probe: Batch | None = None) -> dict[str, Any]:
        """The shared pass over the test split with the class statistics a classifier adds (images per class,
        MI over the class entropy, per-image correctness), and the validation split's top-1 and loads."""
        with routed_by(model, None if probe is None else self.oracle_groups(probe)):
            metrics = evaluate_classifier(model, self.routed_batches("test"), self.data.num_classes,
                                          probe=None if probe is None else probe.inputs, autocast=autocast,
                                          measures=self.measures())
        metrics.update(dataset=self.data.name, classes=self.data.classes, **self.validation(model, autocast))
        metrics.update(self.class_probe(model, autocast))
        if self.streamed:  # files left out as undecodable (data.skip_corrupt), by this process
            metrics.update(data_skipped_files=len(self.data.skipped), data_skipped=sorted(self.data.skipped))
        return metrics

    def class_probe(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, Any]:
        """A positive control of the specialisation claims, in a model without routing layers (the dense reference
        of a study): per block, a linear probe of the image's class from the tokens its token-wise layer reads
        (the patches; :func:`ermoe.analysis.token_probe.probe_ground_truth`), fitted on the first
        ``PROBE_TRAIN_IMAGES`` training images (at most an eighth of them: a check, not a second training;
        unaugmented), C chosen on as many validation images, read on the
        test split: ``truth_probe``. Nothing in a routed model (the probe asks what the dense tokens hold), without a
        validation split, or for a model without token sites; over ``PROBE_MAX_CLASSES`` classes, nothing, warned."""
        sites = model.token_sites
        if model.routed_layers() or self.data.val is None or not sites:
            return {}
        if self.data.num_classes > PROBE_MAX_CLASSES:
            warnings.warn(f"the class probe of a dense model is left out: {self.data.num_classes} classes exceed "
                          f"the {PROBE_MAX_CLASSES} a logistic regression on {PROBE_TRAIN_IMAGES} images can fit "
                          "in reasonable time", stacklevel=2)
            return {}
        from ..analysis.token_probe import can_probe, probe_ground_truth

        if not can_probe():
            return {}

        def batches(split: str):
            limit = None if split == "test" else min(PROBE_TRAIN_IMAGES, max(1, self.num_train // 8))
            return ((b.inputs, b.target, None) for b in self.eval_batches(split, limit=limit))

        return {"truth_probe": probe_ground_truth(model, sites, batches, autocast, self.setup.seed)}

    def validation(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, Any]:
        """The validation split's top-1 and each routing layer's load on the validation tokens (``val_layers``),
        in one pass: what a choice made on validation data reads (the study's preset check), with its per-example
        results (``VAL_EXAMPLES``: each image's correctness and expert counts, for the validation set's own sampling
        error). Nothing without a validation split."""
        if self.data.val is None:
            return {}
        from torchmetrics.classification import MulticlassAccuracy

        top1 = MulticlassAccuracy(self.data.num_classes, top_k=1, average="micro")
        correct: list[Tensor] = []
        ev = evaluate_routed(model, self.routed_batches("val"), {"top1": top1},
                             autocast=autocast,
                             on_output=lambda logits, labels: correct.append((logits.argmax(1) == labels).cpu()))
        return {"val_top1": ev.measures["top1"], "val_layers": {name: ev.counts[name].load() for name in ev.counts},
                VAL_EXAMPLES: classification_examples(correct, ev.example_loads)}

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
