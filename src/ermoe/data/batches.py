"""A loaded dataset as the model's batches: the one interface the training loop, the evaluation, the probes and the
data-dependent initialisations read data through (:class:`BatchSource`).

Every data module's loaded form is one: in-memory images (:class:`ermoe.data.image_batches.ImageBatches`), an
ImageFolder tree (``FolderBatches``), image-caption pairs (:class:`ermoe.data.caption_batches.CaptionBatches`),
MRI volumes (:class:`ermoe.data.volume_batches.VolumeBatches`). A new task's data is a new source: what it reads,
how a step's examples become the model's inputs, and the seeded order of :mod:`ermoe.data.loader` by inheriting
:meth:`BatchSource.train_batches` (or its own, for data read in loader workers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from .loader import StepBatchSampler, shard_bounds


@dataclass
class Batch:
    """The model's positional inputs and the target of the criterion, on the training device: ``(images,)`` and
    labels for classification, ``(volumes,)`` and ages for brain age, ``(images, token_ids)`` and None for a dual
    encoder (its positives are the batch's pairs). ``groups``: each example's ground-truth group where the data
    knows one the target does not say (a subject's ageing pattern), or per input a mapping of them (a dual encoder's
    image cells and words), for the oracle router (``ermoe.routing.oracle``, a positive control); None otherwise."""

    inputs: tuple[Tensor, ...]
    target: Tensor | None
    groups: Tensor | dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.inputs[0].shape[0]

    def rows(self, start: int, stop: int) -> "Batch":
        """Examples ``[start, stop)`` of the batch (a distributed rank's share)."""
        return Batch(tuple(x[start:stop] for x in self.inputs),
                     None if self.target is None else self.target[start:stop],
                     None if self.groups is None else
                     {k: g[start:stop] for k, g in self.groups.items()} if isinstance(self.groups, dict) else
                     self.groups[start:stop])


@dataclass(frozen=True)
class Sampling:
    """How a run reads its data: the seed of the epoch order and of the augmentation, the global training batch,
    the evaluation batch, and the device the batches go to."""

    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500
    device: torch.device = torch.device("cpu")


class BatchSource(ABC):
    """A dataset's splits as batches on ``sampling.device``."""

    # Whether :meth:`train_batch` takes its indices on the device (data resident there: no copy per step)
    indices_on_device: bool = False

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling

    @property
    def device(self) -> torch.device:
        return self.sampling.device

    @property
    @abstractmethod
    def num_train(self) -> int:
        """Training examples per epoch."""

    @abstractmethod
    def has_split(self, split: str) -> bool:
        """Whether the data has split ``split`` (``train``, ``val``, ``test``)."""

    @abstractmethod
    def model_args(self) -> dict[str, Any]:
        """What the model builder takes from the data (e.g. ``num_classes``, ``img_size``, ``in_chans``)."""

    @abstractmethod
    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        """Batches of a split in order, without augmentation (``batch_size`` default: ``sampling.eval_batch_size``);
        ``limit``: its first examples only. Raises a ValueError naming the missing split."""

    def train_batch(self, indices: Tensor, step: int) -> Batch:
        """The training examples ``indices`` as a batch, their random augmentation drawn for step ``step`` (exact
        resume). What the default :meth:`train_batches` builds each step from; a source that overrides that need
        not have it."""
        raise NotImplementedError(f"{type(self).__name__} builds its batches in train_batches")

    def train_batches(self, start_step: int, stop_step: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Rank ``rank``'s rows of the global batch of every step from ``start_step`` to ``stop_step - 1``, in the
        run's seeded epoch order (:class:`ermoe.data.loader.StepBatchSampler`).

        This default prepares each step's whole global batch (:meth:`train_batch`: its random crops and flips drawn
        for the global batch as one process draws them) and keeps the rank's rows: exact for any world size, for
        data held in memory. A source that reads from disk reads only its rows, in loader workers."""
        size = self.sampling.batch_size
        lo, hi = shard_bounds(size, rank, world)
        sampler = StepBatchSampler(self.num_train, size, self.sampling.seed, start_step, stop_step)
        device = self.device if self.indices_on_device else torch.device("cpu")
        for step, rows in sampler.global_batches(device):
            batch = self.train_batch(rows, step)
            yield batch if world == 1 else batch.rows(lo, hi)

    def example_entries(self, split: str) -> list[str] | None:
        """One line per example of ``split``, in order, that changes when the example does (a file's path, size
        and label; a digest of an example held in memory): the run's data fingerprint
        (:mod:`ermoe.data.fingerprint`). None: this source does not list them (its data is then not checked)."""
        return None

    def probe(self, size: int) -> Batch:
        """Fixed evaluation inputs whose routing is followed across checkpoints: the first ``size`` validation
        examples, test examples when there is no validation split."""
        return next(self.eval_batches("val" if self.has_split("val") else "test", size))

    def _require(self, split: str, hint: str = "") -> None:
        if not self.has_split(split):
            raise ValueError(f"the data has no {split} split{hint}")
