"""MRI volumes with ages as batches (:class:`VolumeBatches`): a CSV of scans split into train / val / test, each
split's preprocessed volumes held in memory up to ``data.memory_cap_gb`` or read from the cache in loader workers,
each training volume's shift and flip drawn from its own ``(seed, step, volume)`` stream (exact for any world size
and worker count)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from .batches import Batch, BatchSource, Sampling
from .loader import ExampleKey, StepBatchSampler, iterate, make_loader
from .nifti import VolumeDataset, VolumeStore, collate_volumes, mni_grid, read_csv, split_cohort


class VolumeBatches(BatchSource):
    """The scans of ``csv_path`` on the MNI grid of ``options.spacing`` (``options``: a brain dataset's section,
    ``ermoe.data.modules``). ``stores[split]``: the split's volumes and ages; ``groups[split]``, where the task sets
    it, each scan's ground-truth group (``Batch.groups``: a subject's ageing pattern)."""

    def __init__(self, csv_path: Path, options: Any, sampling: Sampling) -> None:
        super().__init__(sampling)
        o = self.options = options
        cohort = split_cohort(read_csv(csv_path), o.val_size, o.test_size, o.split_seed)
        train = cohort.train[:o.train_limit] if o.train_limit else cohort.train
        test = cohort.test[:o.test_limit] if o.test_limit else cohort.test
        if len(train) < sampling.batch_size:
            raise ValueError(f"optim.batch_size {sampling.batch_size} exceeds the {len(train)} training scans")
        cap = int(o.memory_cap_gb * 2 ** 30)
        self.stores = {name: VolumeStore(scans, o.spacing, cap, o.num_workers) for name, scans in
                       (("train", train), ("val", cohort.val), ("test", test)) if scans}
        self.shape, _ = mni_grid(o.spacing)
        self.groups: dict[str, np.ndarray] | None = None
        self._eval_loaders: dict[tuple[str, int, int], Any] = {}

    @property
    def num_train(self) -> int:
        return len(self.stores["train"])

    def has_split(self, split: str) -> bool:
        return split in self.stores

    def example_entries(self, split: str) -> list[str]:
        """Each scan's file name, size, age and subject."""
        return [f"{s.path.name}:{os.path.getsize(s.path)}:{s.age!r}:{s.subject}" for s in self.stores[split].scans]

    def ages(self, split: str) -> np.ndarray:
        return self.stores[split].ages

    def model_args(self) -> dict[str, Any]:
        return {"in_chans": 1, "volume_shape": tuple(self.shape)}

    def _loader(self, dataset: VolumeDataset, batches, persistent: bool = False):
        workers = self.options.num_workers
        return make_loader(dataset, batches, collate_volumes, workers, self.device, persistent=persistent and workers > 0)

    def _train_dataset(self) -> VolumeDataset:
        o = self.options
        return VolumeDataset(self.stores["train"], self.sampling.seed, o.crop_padding, o.hflip)

    def train_batch(self, indices: Tensor, step: int) -> Batch:
        """The volumes ``indices`` read at step ``step`` (their shifts and flips drawn per volume), in this
        process."""
        dataset = self._train_dataset()
        vols, ages = collate_volumes([dataset[ExampleKey(int(i), step, r)] for r, i in enumerate(indices.tolist())])
        return Batch((vols.to(self.device),), ages.to(self.device), self._groups("train", indices.tolist()))

    def _groups(self, split: str, indices) -> Tensor | None:
        if self.groups is None:
            return None
        return torch.from_numpy(self.groups[split][np.asarray(indices, dtype=np.int64)]).to(self.device)

    def train_batches(self, start_step: int, stop_step: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """This rank's volumes of every step, read (from memory or the cache files) and augmented in the loader's
        ``data.num_workers`` workers."""
        s = self.sampling
        sampler = StepBatchSampler(self.num_train, s.batch_size, s.seed, start_step, stop_step, rank, world)
        # the sampler's keys again, in the same order as the loader reads them: each batch's examples' groups
        keys = iter(sampler) if self.groups is not None else None
        for vols, ages in iterate(self._loader(self._train_dataset(), sampler)):
            groups = None if keys is None else self._groups("train", [key.index for key in next(keys)])
            yield Batch((vols.to(self.device, non_blocking=True),), ages.to(self.device, non_blocking=True), groups)

    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        if split not in self.stores:
            key = {"val": "data.val_size", "test": "data.test_size"}.get(split, "data")
            raise ValueError(f"the brain-age data has no {split} split (set {key}, or a split column in the CSV)")
        store = self.stores[split]
        n = len(store) if limit is None else min(limit, len(store))
        batch_size = batch_size or self.sampling.eval_batch_size
        starts = range(0, n, batch_size)
        if store.in_memory:
            for i in starts:
                idx = np.arange(i, min(i + batch_size, n))
                yield Batch((torch.from_numpy(store.get(idx)).to(self.device),),
                            torch.from_numpy(store.ages[idx]).to(self.device), self._groups(split, idx))
            return
        key = (split, batch_size, n)  # volumes read from the cache in the loader's workers; the loader is kept
        if key not in self._eval_loaders:
            batches = [list(range(i, min(i + batch_size, n))) for i in starts]
            self._eval_loaders[key] = self._loader(VolumeDataset(store), batches, persistent=True)
        for (vols, ages), i in zip(iterate(self._eval_loaders[key]), starts):
            yield Batch((vols.to(self.device),), ages.to(self.device), self._groups(split, range(i, i + len(ages))))
