"""What differs between applications, behind one interface the training loop drives: the data and its batches, the
loss, the evaluation metrics, and what the report shows.

The loop (``ermoe.train``) is written once, for every task: resume, checkpoints, AMP, logging, routing probes and the
non-finite guard. A task plugs in with a :class:`Task` subclass registered by name (the config's ``task``); it sees
what it needs of the run's config as a :class:`TaskSetup`, not the config itself:

    task = build_task(name, setup, device); task.load()     # the data, once
    model = create_model(model_name, **model_args, **task.model_args())
    for batch in task.train_batches(start_step, stop_step, rank, world):   # this rank's rows, step by step
    out = model(*batch.inputs)
    loss = model.training_loss(out, batch.target, task.objective.loss) + model.aux_loss()
    task.objective.batch_stats(out, batch)                   # sums for the training log, e.g. correct predictions
    metrics = task.evaluate(model, autocast, probe)          # the run's metrics.json
    task.results_table(metrics); task.draw_figures(metrics, run.figures)

A batch's ``inputs`` are the model's positional arguments: ``(images,)`` for classification, ``(volumes,)`` for brain
age, ``(images, token_ids)`` for a dual encoder; ``target`` is what the criterion compares the output with (labels,
ages, or None for a contrastive loss whose positives are the batch's pairs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..data.loader import StepBatchSampler, shard_bounds
from ..data.modules import DataOptions


@dataclass
class Batch:
    """The model's positional inputs and the target of the criterion, on the training device."""

    inputs: tuple[Tensor, ...]
    target: Tensor | None

    def __len__(self) -> int:
        return self.inputs[0].shape[0]

    def rows(self, start: int, stop: int) -> "Batch":
        """Examples ``[start, stop)`` of the batch (a distributed rank's share)."""
        return Batch(tuple(x[start:stop] for x in self.inputs),
                     None if self.target is None else self.target[start:stop])


@dataclass(frozen=True)
class TaskSetup:
    """What a task reads of a run's config (``ermoe.train`` makes it from one): the dataset's options and the task's
    own, the seed its batches and augmentation are drawn from, the batch sizes, the probe size, the criterion's
    label smoothing, and the model it feeds (a pretrained model's input normalisation; a builder that places maps on
    the brain grid)."""

    data: DataOptions
    options: Any = None  # the task's Options instance; None for a task that takes none
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500
    probe_size: int = 256
    label_smoothing: float = 0.0
    model_name: str = "vit_tiny"
    model_args: dict[str, Any] = field(default_factory=dict)


class Objective(ABC):
    """What a task trains for: its criterion and the sums it logs, on the device (no host sync a step). Built by the
    task from its data (e.g. brain age standardises the target by the training ages)."""

    # Whether the loss couples a batch's examples (a contrastive loss whose negatives are the batch): a distributed
    # run then computes it on every rank over the global batch's outputs (ermoe.train.parallel), not per rank.
    batch_coupled: ClassVar[bool] = False

    @abstractmethod
    def loss(self, output: Tensor, target: Tensor | None) -> Tensor:
        """The criterion (the model may add terms of its own, ``RoutedModel.training_loss``)."""

    def batch_stats(self, output: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Sums over a training batch for the log (divided by the examples seen), e.g. ``{"acc": correct}``: 0-dim
        tensors on the device, summed there over the log window and read once per window."""
        return {}


class Task(ABC):
    """One application: its data, loss, metrics and report. Subclasses register with :func:`register_task`.

    ``datasets`` names the ``data.name`` values the task reads (each dataset's options: ``ermoe.data.modules``);
    ``model_data_args`` names the model keywords :meth:`model_args` supplies from the data (a config setting one is
    an error).
    """

    name: ClassVar[str]
    datasets: ClassVar[tuple[str, ...]]
    model_data_args: ClassVar[tuple[str, ...]] = ()
    # A dataclass of the task's own settings (the config's ``task_options``, checked against its fields and their
    # types); None: the task takes none.
    Options: ClassVar[type | None] = None
    objective: Objective  # set by load(): what the task trains for

    def __init__(self, setup: TaskSetup, device: torch.device) -> None:
        self.setup, self.device = setup, device
        self.options = setup.options

    # data -------------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> None:
        """Read the data (once per process) and set :attr:`objective`; raises a clear error for missing or corrupt
        files."""

    @abstractmethod
    def model_args(self) -> dict[str, Any]:
        """What the model builder takes from the data (e.g. ``num_classes``, ``img_size``, ``in_chans``)."""

    def prepare(self, model: nn.Module) -> None:
        """Adapt the data pipeline to the built model (e.g. the input normalisation pretrained weights expect)."""

    @property
    @abstractmethod
    def num_train(self) -> int:
        """Training examples per epoch."""

    def train_batch(self, indices: Tensor, step: int) -> Batch:
        """The training examples ``indices`` as a batch; random augmentation is seeded by ``step`` (exact resume).
        What the default :meth:`train_batches` builds each step from; a task that overrides that need not have it."""
        raise NotImplementedError(f"task {self.name!r} builds its batches in train_batches")

    def train_batches(self, start_step: int, stop_step: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Rank ``rank``'s rows of the global batch of every step from ``start_step`` to ``stop_step - 1``, in the
        run's seeded epoch order (:class:`ermoe.data.loader.StepBatchSampler`).

        This default prepares each step's whole global batch (:meth:`train_batch`: its random crops, flips and
        caption picks drawn for the global batch as one process draws them) and keeps the rank's rows: exact for any
        world size, for data held in memory. A task that streams from disk reads only its rows (classification's
        ImageFolder)."""
        size = self.setup.batch_size
        lo, hi = shard_bounds(size, rank, world)
        for keys in StepBatchSampler(self.num_train, size, self.setup.seed, start_step, stop_step):
            batch = self.train_batch(torch.tensor([k.index for k in keys]), keys[0].step)
            yield batch if world == 1 else batch.rows(lo, hi)

    @abstractmethod
    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        """Batches of a split in order, without augmentation; ``limit``: its first examples only."""

    @abstractmethod
    def has_split(self, split: str) -> bool:
        """Whether the data has split ``split`` (``train``, ``val``, ``test``)."""

    def probe(self) -> Batch:
        """Fixed evaluation inputs whose routing is followed across checkpoints (stability, load over training):
        the first ``probe_size`` validation examples, test examples when there is no validation split."""
        return next(self.eval_batches("val" if self.has_split("val") else "test", self.setup.probe_size))

    # evaluation -------------------------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, autocast: Callable[[], Any], probe: Batch | None = None) -> dict[str, Any]:
        """The run's metrics on the test split: the task's measures and, per routing layer, its diagnostics."""

    @abstractmethod
    def quick_eval(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float]:
        """A cheap headline measure for the per-epoch log (e.g. ``{"test_top1": ...}``)."""

    @staticmethod
    @abstractmethod
    def results_table(metrics: dict[str, Any]) -> str:
        """A plain-text summary of a run's metrics (``ermoe train/eval/report`` print it)."""

    @staticmethod
    @abstractmethod
    def draw_figures(metrics: dict[str, Any], fig_dir: Path) -> list[Path]:
        """The run's figures from its metrics alone; returns the files written."""


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under its ``name``."""
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    return list(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list_tasks()}")
    return _TASKS[name]


def build_task(name: str, setup: TaskSetup, device: torch.device) -> Task:
    """Task ``name`` on ``setup``, not loaded yet (call ``load()``)."""
    return task_class(name)(setup, device)
