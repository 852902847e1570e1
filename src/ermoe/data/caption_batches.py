"""Image-caption pairs as batches (:class:`CaptionBatches`): captions tokenised by a BPE vocabulary learned from the
training captions, each training image paired with one of its captions drawn from the ``(seed, step, image)``
random stream (exact resume, the same for any world size), images beyond the memory cap decoded in loader workers.
On the built-in caption set every batch carries its ground truth for the oracle router (``Batch.groups``): the item
class of each canvas cell (``"image"``, ``(B, 2, 2)``) and the item class each word of the paired caption names
(``"text"``, ``(B, context_length)``, -1 at padding)."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .augment import normalize
from .captions import BACKGROUND, word_classes
from .batches import Batch, BatchSource, Sampling
from .karpathy import CaptionData, CaptionSplit
from .loader import ExampleKey, StepBatchSampler, example_seed, iterate, make_loader
from .tokenize import caption_tokenizer, encode

PAD_ID = 0


class CaptionBatches(BatchSource):
    """A caption dataset's images (normalised by ``mean``/``std``) and token ids. ``tokens[split]``: every caption's
    ids ``(N_captions, context_length)``, the image each belongs to, and the first caption of each image."""

    def __init__(self, data: CaptionData, sampling: Sampling, vocab_size: int, context_length: int,
                 num_workers: int = 0) -> None:
        super().__init__(sampling)
        self.splits, self.items, self.mean, self.std = data.splits, data.items, data.mean, data.std
        # training images that should share a batch (a partition; None: none), e.g. word-order twins
        self.train_groups: list[list[int]] | None = None
        self.context_length, self.num_workers = context_length, num_workers
        self.tokenizer = caption_tokenizer([c for caps in self.splits["train"].captions for c in caps], vocab_size)
        self.tokens: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for name, split in self.splits.items():
            texts, owner = split.flat_captions()
            counts = torch.tensor([len(c) for c in split.captions])
            self.tokens[name] = (encode(self.tokenizer, texts, context_length), owner, torch.cumsum(counts, 0) - counts)
        # the oracle's ground truth where the data knows it (the built-in set): per split (cells, words)
        self.truth: dict[str, tuple[Tensor, Tensor]] | None = None
        if self.items is not None:
            self.truth = {name: (_cell_classes(self.items[name]), _caption_word_classes(
                self.tokenizer, split.flat_captions()[0], context_length)) for name, split in self.splits.items()}

    @property
    def num_train(self) -> int:
        return len(self.splits["train"])

    def example_entries(self, split: str) -> list[str]:
        """Each image's id and a digest of its captions."""
        part = self.splits[split]
        digests = [hashlib.sha1("\n".join(caps).encode()).hexdigest()[:12] for caps in part.captions]
        return [f"{key}:{digest}" for key, digest in zip(part.ids, digests)]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def model_args(self) -> dict[str, Any]:
        images = self.splits["train"].images
        return {"img_size": images.shape[-1], "in_chans": images.shape[1], "vocab_size": self.vocab_size,
                "context_length": self.context_length, "pad_id": PAD_ID}

    def _normalize(self, x: Tensor) -> Tensor:
        if self.mean.device != self.device:  # the statistics moved to the device once, not copied every step
            self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return normalize(x.to(self.device, non_blocking=True), self.mean, self.std)

    def image_chunks(self, split: str, size: int | None = None, limit: int | None = None
                     ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(indices, normalised images)`` of a split in chunks of ``size``; images on disk are decoded in the
        loader's workers."""
        self._require(split)
        data = self.splits[split]
        size = size or self.sampling.eval_batch_size
        n = len(data) if limit is None else min(limit, len(data))
        chunks = [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]
        if data.in_memory or not self.num_workers:
            for idx in chunks:
                yield idx, self._normalize(data.images[idx])
            return
        loader = make_loader(_Images(data), [c.tolist() for c in chunks], torch.stack, self.num_workers, self.device)
        for idx, x in zip(chunks, iterate(loader)):
            yield idx, self._normalize(x)

    def train_batches(self, start_step: int, stop_step: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """This rank's image-caption pairs of every step (images on disk decoded in the loader's workers); a
        contrastive loss then sees the global batch (``Objective.batch_coupled``)."""
        s = self.sampling
        sampler = StepBatchSampler(self.num_train, s.batch_size, s.seed, start_step, stop_step, rank, world,
                                   self.train_groups)
        ids, _, first = self.tokens["train"]
        counts = torch.tensor([len(c) for c in self.splits["train"].captions])
        pairs = _Pairs(self.splits["train"], ids, first, counts, s.seed,
                       None if self.truth is None else self.truth["train"])
        for images, ids, picks in iterate(make_loader(pairs, sampler, _collate_pairs, self.num_workers,
                                                      self.device)):
            yield Batch((self._normalize(images), ids.to(self.device, non_blocking=True)), None,
                        self._groups("train", picks))

    def eval_batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> Iterator[Batch]:
        """Each image with its first caption (probes, data-dependent initialisation); the retrieval evaluation
        embeds every caption."""
        self._require(split)
        ids, _, first = self.tokens[split]
        for idx, x in self.image_chunks(split, batch_size, limit):
            yield Batch((x, ids[first[idx]].to(self.device)), None, self._groups(split, torch.stack([idx, first[idx]],
                                                                                                   1)))

    def _groups(self, split: str, picks: Tensor) -> dict[str, Tensor] | None:
        """The oracle's ground truth of a batch's pairs (``picks``: ``(B, 2)`` image and caption indices)."""
        if self.truth is None:
            return None
        cells, words = self.truth[split]
        return {"image": cells[picks[:, 0].cpu()], "text": words[picks[:, 1].cpu()]}


class _Pairs(Dataset):
    """A training image (uint8, from memory or decoded) with one of its captions' token ids, the caption drawn from
    the example's ``(seed, step, image)`` stream."""

    def __init__(self, split: CaptionSplit, ids: Tensor, first: Tensor, counts: Tensor, seed: int,
                 truth: tuple[Tensor, Tensor] | None = None) -> None:
        self.split, self.ids, self.first, self.counts, self.seed = split, ids, first, counts, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: ExampleKey) -> tuple[Tensor, Tensor, Tensor]:
        u = np.random.default_rng(example_seed(self.seed, key.step, key.index)).random()
        pick = int(self.first[key.index]) + int(u * int(self.counts[key.index]))
        return self.split.images[key.index], self.ids[pick], torch.tensor([key.index, pick])


class _Images(Dataset):
    def __init__(self, split: CaptionSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Tensor:
        return self.split.images[i]


def _collate_pairs(items: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.stack(column) for column in zip(*items))  # images, token ids, (image, caption) indices


def _cell_classes(items: list[list[dict]]) -> Tensor:
    """Per canvas, the item class in each of its 2 x 2 cells (``BACKGROUND`` where empty): ``(N, 2, 2)``."""
    cells = torch.full((len(items), 2, 2), BACKGROUND, dtype=torch.long)
    for i, canvas in enumerate(items):
        for item in canvas:
            cells[i, item["row"], item["col"]] = item["label"]
    return cells


def _caption_word_classes(tokenizer, texts: list[str], context_length: int) -> Tensor:
    """Per caption, the item class each of its tokens names (:func:`ermoe.data.captions.word_classes`), -1 at
    padding: ``(N, context_length)``, aligned with :func:`~ermoe.data.tokenize.encode`'s ids (the tokenizer is
    word-level: a token is a word)."""
    out = torch.full((len(texts), context_length), -1, dtype=torch.long)
    normalizer, pre = tokenizer.normalizer, tokenizer.pre_tokenizer
    for i, text in enumerate(texts):
        words = [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))][:context_length]
        out[i, :len(words)] = torch.tensor(word_classes(words), dtype=torch.long)
    return out
