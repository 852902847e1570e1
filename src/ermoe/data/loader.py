"""Training batches through ``torch.utils.data``: which examples each step reads, on which rank, with which random
augmentation, so that a batch is bitwise the same for any number of loader workers, any world size and any resume
step.

- :func:`epoch_order`: the seeded order of an epoch (the same formula for every task and dataset);
  :func:`grouped_epoch_order` the same over groups of examples that should share a batch.
- :class:`StepBatchSampler`: for each step from a start step, this rank's rows of that step's global batch, as
  :class:`ExampleKey` s ``(index, step, row)``: the example, the step that reads it, its row in the global batch.
- :func:`example_seed` and :func:`seeded`: the random state an example's augmentation draws from is a function of
  ``(seed, step, index)`` alone (not of the worker, the process or the examples before it).
- :func:`make_loader`: a ``DataLoader`` over those keys with workers, pinned memory on CUDA, prefetching and
  persistent workers; :func:`iterate` turns a loader worker's death into a named error.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


class ExampleKey(NamedTuple):
    """One example as a training step reads it: its dataset index, the step, and its row in the global batch."""

    index: int
    step: int
    row: int


class DataLoaderWorkerError(RuntimeError):
    """A data loader worker process died (killed, out of memory); the run stops, its last checkpoint is kept."""


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The order in which epoch ``epoch`` of a run with ``seed`` visits its ``n`` training examples."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def grouped_epoch_order(groups: list[Tensor], seed: int, epoch: int) -> Tensor:
    """:func:`epoch_order` over ``groups`` (a partition of the examples, :func:`check_groups`): the groups in a
    seeded order, each group's examples one after another, so that consecutive batches cut at most one group each."""
    order = epoch_order(len(groups), seed, epoch)
    return torch.cat([groups[int(g)] for g in order])


def check_groups(groups: Iterable[Iterable[int]], n: int) -> list[Tensor]:
    """``groups`` as index tensors, checked to hold each of the ``n`` examples exactly once (ValueError if not)."""
    out = [torch.as_tensor(list(g), dtype=torch.long) for g in groups]
    seen = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    if any(len(g) == 0 for g in out) or len(seen) != n or not torch.equal(seen.sort().values, torch.arange(n)):
        raise ValueError(f"batch groups must hold each of the {n} training examples exactly once, in non-empty "
                         f"groups ({len(seen)} entries in {len(out)} groups)")
    return out


def shard_bounds(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of every global batch of ``batch_size`` that rank ``rank`` of ``world`` trains on."""
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the world size {world}")
    share = batch_size // world
    return rank * share, (rank + 1) * share


class StepBatchSampler(Sampler[list[ExampleKey]]):
    """Steps ``start_step .. stop_step - 1`` of a run: each yields this rank's rows of the step's global batch of
    ``batch_size`` examples, drawn in :func:`epoch_order` (the last partial batch of an epoch is dropped).
    ``groups``: a partition of the examples whose members should share a batch (hard negatives for a contrastive
    loss); the epoch then visits them in :func:`grouped_epoch_order`."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, start_step: int, stop_step: int,
                 rank: int = 0, world: int = 1, groups: Iterable[Iterable[int]] | None = None) -> None:
        if num_examples < batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")
        self.groups = None if groups is None else check_groups(groups, num_examples)
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.steps_per_epoch = num_examples // batch_size
        self.lo, self.hi = shard_bounds(batch_size, rank, world)

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)

    def global_rows(self, step: int, order: Tensor) -> Tensor:
        """The dataset indices of step ``step``'s whole global batch (``order``: its epoch's order)."""
        i = step % self.steps_per_epoch
        return order[i * self.batch_size:(i + 1) * self.batch_size]

    def _order(self, epoch: int) -> Tensor:
        return (epoch_order(self.n, self.seed, epoch) if self.groups is None
                else grouped_epoch_order(self.groups, self.seed, epoch))

    def global_batches(self, device: torch.device) -> Iterator[tuple[int, Tensor]]:
        """``(step, dataset indices of the step's whole global batch)``, the indices on ``device``: each epoch's
        order is copied there once, so a step costs no copy from the host (data held on the device)."""
        order, order_epoch = None, -1
        for step in range(self.start_step, self.stop_step):
            epoch = step // self.steps_per_epoch
            if epoch != order_epoch:
                order, order_epoch = self._order(epoch).to(device), epoch
            yield step, self.global_rows(step, order)

    def __iter__(self) -> Iterator[list[ExampleKey]]:
        order, order_epoch = None, -1
        for step in range(self.start_step, self.stop_step):
            epoch = step // self.steps_per_epoch
            if epoch != order_epoch:
                order, order_epoch = self._order(epoch), epoch
            rows = self.global_rows(step, order)[self.lo:self.hi].tolist()
            yield [ExampleKey(int(idx), step, self.lo + j) for j, idx in enumerate(rows)]


def example_seed(*parts: int) -> int:
    """A 64-bit seed that is a function of ``parts`` alone (e.g. ``(seed, step, index)``), well mixed so that
    neighbouring steps and indices get unrelated streams (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


@contextlib.contextmanager
def seeded(seed: int):
    """Seed Python's, numpy's and torch's CPU generators (what timm's and torchvision's transforms draw from) for
    the block, and give the caller's states back after it: a worker and the main process draw the same numbers."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)


def make_loader(dataset: Dataset, batch_sampler: Iterable[list[Any]], collate_fn: Callable[[list[Any]], Any],
                num_workers: int, device: torch.device, prefetch_factor: int = 2,
                persistent: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``batch_sampler``'s batches of keys: ``num_workers`` processes (0: in this one; torch
    gives each worker one thread), pinned memory when the batches go to a CUDA device, ``prefetch_factor`` batches
    ahead per worker, workers kept between passes with ``persistent``."""
    extra = dict(prefetch_factor=prefetch_factor, persistent_workers=persistent) if num_workers > 0 else {}
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=device.type == "cuda", **extra)


def worker_death(err: BaseException) -> DataLoaderWorkerError | None:
    """The named error for a loader worker's death (torch raises it as a RuntimeError where the main process is
    when the worker dies: in ``next()`` or, through its SIGCHLD handler, in the middle of a training step), or
    None for any other error."""
    text = str(err)
    if isinstance(err, RuntimeError) and "DataLoader worker" in text and ("killed" in text or "exited" in text):
        return DataLoaderWorkerError(
            f"a data loader worker died ({text.splitlines()[0]}). The run stopped; its last checkpoint is kept and "
            "it resumes with `ermoe train --resume RUN`. Fewer workers (data.num_workers) use less memory.")
    return None


def iterate(loader: Iterable[Any]) -> Iterator[Any]:
    """``loader``'s batches; a worker that died ends it with :class:`DataLoaderWorkerError`, an error raised in a
    worker arrives with its own message (not a bare worker traceback)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - re-raised as it is, or named
            named = worker_death(err) or worker_error(err)
            if named is None:
                raise
            if isinstance(named, DataLoaderWorkerError):
                _shut_down(it)
            raise named from None
        yield batch


def _shut_down(it: Iterator[Any]) -> None:
    """Stop a loader iterator's workers now. Until its workers are shut down torch's SIGCHLD handler keeps their
    pids and raises its raw "worker is killed" RuntimeError at any later child's exit, wherever this process is (in
    a finally block that writes the run's lock, say), in place of the named error; the iterator itself lives on in
    the error's traceback."""
    shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator; in-process ones have none
    if shutdown is not None:
        shutdown()


def worker_error(err: BaseException) -> BaseException | None:
    """An error raised in a loader worker arrives as ``Caught X in DataLoader worker process N`` with the worker's
    traceback as its message: the same type with the original message alone (a named error, e.g. the file that
    cannot be read), or None for an error that did not come from a worker."""
    text = str(err)
    if not text.startswith("Caught ") or "in DataLoader worker process" not in text.splitlines()[0]:
        return None
    last = text.rstrip().splitlines()[-1]
    message = last.split(": ", 1)[1] if ": " in last else last
    try:
        return type(err)(message)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments: keep the worker's report
        return None
