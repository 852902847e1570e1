"""What differs between applications, behind one interface the training loop drives: the data as batches, what
the model trains for, and how it is evaluated and reported.

The loop (``ermoe.train``) is written once, for every task: resume, checkpoints, AMP, logging, routing probes and the
non-finite guard. A task plugs in with a :class:`Task` subclass registered by name (the config's ``task``); it sees
what it needs of the run's config as a :class:`TaskSetup`, not the config itself. A task is three parts:

- its data, a :class:`~ermoe.data.batches.BatchSource` (``task.batches``) built from the dataset's module
  (``ermoe.data.modules``): the training batches of each step and rank, the evaluation batches, the model's
  data-dependent arguments;
- its :class:`Objective`: the criterion and the sums the training log shows, on the device;
- its evaluation: the task's measures, and per routing layer the counts of
  :class:`~ermoe.analysis.diagnostics.RoutingCounts` keyed by a label function (a token's class, brain cell, word,
  item), from which load and specialisation follow.

    task = build_task(name, setup, device); task.load()     # the data, once
    model = create_model(model_name, **model_args, **task.model_args())
    for batch in task.train_batches(start_step, stop_step, rank, world):   # this rank's rows, step by step
    out = model(*batch.inputs)
    loss = model.training_loss(out, batch.target, task.objective.loss) + model.aux_loss()
    task.objective.batch_stats(out, batch)                   # sums for the training log, e.g. correct predictions
    metrics = task.evaluate(model, autocast, probe)          # the run's metrics.json
    task.results_table(metrics); task.draw_figures(metrics, run.figures)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..analysis.diagnostics import LabelFn, evaluate_routed
from ..analysis.report import draw_load, layers_table
from ..data.batches import Batch, BatchSource, Sampling
from ..data.modules import DataOptions
from ..registry import Registry
from ..routing.oracle import routed_by


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
    init_checkpoint: bool = False  # the model starts from weights on disk (model.init_checkpoint)


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
    batches: BatchSource  # set by load(): the data as the model's batches
    objective: Objective  # set by load(): what the task trains for

    def __init__(self, setup: TaskSetup, device: torch.device) -> None:
        self.setup, self.device = setup, device
        self.options = setup.options

    # data -------------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> None:
        """Read the data (once per process): set :attr:`batches` (the dataset's :class:`BatchSource`) and
        :attr:`objective`; raises a clear error for missing or corrupt files."""

    @property
    def sampling(self) -> Sampling:
        """How this task's batches are drawn (what :attr:`batches` is built with)."""
        s = self.setup
        return Sampling(s.seed, s.batch_size, s.eval_batch_size, self.device)

    def model_args(self) -> dict[str, Any]:
        """What the model builder takes from the data (e.g. ``num_classes``, ``img_size``, ``in_chans``)."""
        return self.batches.model_args()

    def prepare(self, model: nn.Module) -> None:
        """Adapt the data pipeline to the built model (e.g. the input normalisation pretrained weights expect)."""

    @property
    def num_train(self) -> int:
        """Training examples per epoch."""
        return self.batches.num_train

    def train_batches(self, start_step: int, stop_step: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Rank ``rank``'s rows of the global batch of every step from ``start_step`` to ``stop_step - 1``
        (:meth:`BatchSource.train_batches`)."""
        return self.batches.train_batches(start_step, stop_step, rank, world)

    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        """Batches of a split in order, without augmentation; ``limit``: its first examples only."""
        return self.batches.eval_batches(split, batch_size, limit)

    def has_split(self, split: str) -> bool:
        """Whether the data has split ``split`` (``train``, ``val``, ``test``)."""
        return self.batches.has_split(split)

    def probe(self) -> Batch:
        """Fixed evaluation inputs whose routing is followed across checkpoints (stability, load over training):
        the first ``probe_size`` validation examples, test examples when there is no validation split."""
        return self.batches.probe(self.setup.probe_size)

    # evaluation -------------------------------------------------------------------------------------------------
    # What the defaults below read: the task's test measures and the label of each routed token. The built-in
    # tasks declare theirs where they can be said this way and override only what is theirs: classification its
    # evaluate (class statistics, the validation split's loads), results table and heatmaps; brain age its
    # evaluate (a token's label is its cell of a per-layer grid; the bias correction needs every prediction),
    # table and brain maps; retrieval everything (Recall@K needs every embedding at once: no per-batch measure).

    def measures(self) -> dict[str, Any]:
        """The task's measures, fresh for one pass: name -> torchmetrics metric (or anything with
        ``to``/``update(output, target)``/``compute``, e.g. :class:`ermoe.analysis.diagnostics.PerExample`). The
        first is the headline :meth:`quick_eval` logs on the validation split."""
        return {}

    def token_labels(self) -> tuple[int, Callable[[Tensor | None], LabelFn]] | None:
        """How many labels a routed token can have and, from a batch's target, the label of each token a routing
        layer computed (:data:`~ermoe.analysis.diagnostics.LabelFn`; e.g.
        :func:`~ermoe.analysis.diagnostics.example_labels`: its example's class). None: load only."""
        return None

    def oracle_groups(self, batch: Batch) -> Tensor | None:
        """Each example's ground-truth group, what the oracle router (a positive control, ``ermoe.routing.oracle``)
        routes by: ``batch.groups`` where the data has them (a subject's ageing pattern); None: the task has none.
        Classification: the class."""
        return batch.groups

    def routed_batches(self, split: str) -> Iterator[tuple[tuple[Tensor, ...], Tensor | None, Tensor | None]]:
        """A split's batches as :func:`~ermoe.analysis.diagnostics.evaluate_routed` reads them: ``(inputs, target,
        oracle groups)``."""
        return ((b.inputs, b.target, self.oracle_groups(b)) for b in self.eval_batches(split))

    def vocabulary(self) -> list[str] | None:
        """For a task with token-id inputs, each id's word (``ermoe explain`` shows a text tower's tokens by it);
        None otherwise."""
        return None

    def evaluate(self, model: nn.Module, autocast: Callable[[], Any], probe: Batch | None = None) -> dict[str, Any]:
        """The run's metrics on the test split: each measure as ``test_<name>``, ``test_examples``, and per routing
        layer its load, (expert, label) counts and MI(expert; label), with the probe's routing measures."""
        labels = self.token_labels()
        num_labels, label_of = labels if labels is not None else (1, None)
        with routed_by(model, None if probe is None else self.oracle_groups(probe)):
            ev = evaluate_routed(model, self.routed_batches("test"), self.measures(), num_labels, label_of,
                                 None if probe is None else probe.inputs, autocast=autocast)
        return {**{f"test_{k}": v for k, v in ev.measures.items()}, "test_examples": ev.examples,
                **self.quick_eval(model, autocast), "layers": ev.layers()}

    def quick_eval(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float]:
        """The headline measure on the validation split for the per-epoch log (nothing without a validation split
        or a measure: the test split is read once, at the end)."""
        measures = self.measures()
        if not measures or not self.has_split("val"):
            return {}
        name, measure = next(iter(measures.items()))
        ev = evaluate_routed(model, self.routed_batches("val"), {name: measure}, autocast=autocast)
        return {f"val_{name}": ev.measures[name]}

    @staticmethod
    def results_table(metrics: dict[str, Any]) -> str:
        """A plain-text summary of a run's metrics (``ermoe train/eval/report`` print it): the test measures, then
        the routing layers' table."""
        head = "   ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if k.startswith("test_") and isinstance(v, float))
        return "\n".join([f"{head}   ({metrics.get('test_examples', 0)} test examples)", *layers_table(metrics)])

    @staticmethod
    def draw_figures(metrics: dict[str, Any], fig_dir: Path) -> list[Path]:
        """The run's figures from its metrics alone; returns the files written (default: the load per expert)."""
        return draw_load(metrics, fig_dir)


_TASKS: Registry[type[Task]] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under its ``name``."""
    return _TASKS.register(cls)


def list_tasks() -> list[str]:
    return _TASKS.names()


def task_class(name: str) -> type[Task]:
    return _TASKS.get(name)


def build_task(name: str, setup: TaskSetup, device: torch.device) -> Task:
    """Task ``name`` on ``setup``, not loaded yet (call ``load()``)."""
    return task_class(name)(setup, device)
