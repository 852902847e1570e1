"""Image-caption data in the Karpathy split format that COCO and Flickr30K users already have
(``dataset_coco.json``, ``dataset_flickr30k.json``; Karpathy & Fei-Fei 2015):

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                 "sentences": [{"raw": "A man with a red helmet on a small moped on a dirt road.", ...}, ...]}, ...]}

``filepath`` is optional (Flickr30K has none); an image's file is ``image_root/filepath/filename``. ``restval``
joins ``train``, as every paper since the split was published does. Images are decoded with PIL and resized
(shorter side to ``img_size``, centre crop) to uint8: once, and held in memory, when a split fits ``memory_limit``
bytes; else per batch from the files (:class:`ImageFiles`, read in the data loader's workers). A missing image, an
image without a caption, an unknown split and a malformed file are named errors, found before any training; an
unreadable image is named when it is first decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "val", "test", "restval")


class CaptionDataError(ValueError):
    """A caption file or one of its images is missing, malformed or unusable; the message names which."""


class ImageFiles:
    """Image files decoded when indexed: ``files[idx]`` is ``(len(idx), C, img_size, img_size)`` uint8, as an
    in-memory split's ``images[idx]``."""

    def __init__(self, paths: list[Path], img_size: int, channels: int) -> None:
        self.paths, self.img_size, self.channels = paths, img_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.channels, self.img_size, self.img_size)

    def __getitem__(self, idx: Tensor | slice | int) -> Tensor:
        if isinstance(idx, slice):
            idx = torch.arange(len(self.paths))[idx]
        if isinstance(idx, int) or (isinstance(idx, Tensor) and idx.dim() == 0):
            return torch.from_numpy(load_image(self.paths[int(idx)], self.img_size, self.channels))
        return torch.from_numpy(np.stack([load_image(self.paths[i], self.img_size, self.channels)
                                          for i in idx.tolist()]))


@dataclass
class CaptionSplit:
    """Images ``(N, C, H, W)`` uint8 (held, or :class:`ImageFiles` decoded per batch) and, per image, its captions
    (Karpathy: 5 for COCO and Flickr30K)."""

    images: Tensor | ImageFiles
    captions: list[list[str]]
    ids: list[str]

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.images) or len(self.ids) != len(self.images):
            raise ValueError(f"{len(self.images)} images, {len(self.captions)} caption lists, {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, Tensor)

    def subset(self, limit: int | None) -> "CaptionSplit":
        if limit is None or limit >= len(self):
            return self
        images = self.images[:limit] if self.in_memory else ImageFiles(self.images.paths[:limit],
                                                                       self.images.img_size, self.images.channels)
        return CaptionSplit(images, self.captions[:limit], self.ids[:limit])

    def flat_captions(self) -> tuple[list[str], Tensor]:
        """Every caption once, and the index of its image (the retrieval evaluation's text side)."""
        texts = [c for caps in self.captions for c in caps]
        owner = torch.repeat_interleave(torch.arange(len(self)), torch.tensor([len(c) for c in self.captions]))
        return texts, owner


@dataclass
class CaptionData:
    """A caption dataset as retrieval reads it: its splits, the channel mean and std its images are normalised by,
    and for the built-in set the items drawn on each canvas (by split), which its diagnostics label patches with."""

    source: Path
    splits: dict[str, CaptionSplit]
    mean: Tensor
    std: Tensor
    items: dict[str, list[list[dict]]] | None = None

    def limited(self, train_limit: int | None, test_limit: int | None) -> "CaptionData":
        """The first ``train_limit`` training and ``test_limit`` test images; a file without a test split is an
        error (retrieval is evaluated on it)."""
        if "test" not in self.splits:
            raise CaptionDataError(f"{self.source} has no test split: retrieval is evaluated on it")
        self.splits["train"] = self.splits["train"].subset(train_limit)
        self.splits["test"] = self.splits["test"].subset(test_limit)
        return self


def _entries(json_path: Path) -> list[dict]:
    if not json_path.is_file():
        raise CaptionDataError(f"caption file {json_path} not found")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise CaptionDataError(f"{json_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionDataError(f"{json_path}: expected a Karpathy split file, an object with an 'images' list")
    return data["images"]


def load_image(path: Path, img_size: int, channels: int) -> np.ndarray:
    """One image as ``(C, img_size, img_size)`` uint8: shorter side resized to ``img_size`` (bicubic), centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            scale = img_size / min(w, h)
            if (w, h) != (img_size, img_size):
                im = im.resize((max(img_size, round(w * scale)), max(img_size, round(h * scale))),
                               Image.Resampling.BICUBIC)
                w, h = im.size
                left, top = (w - img_size) // 2, (h - img_size) // 2
                im = im.crop((left, top, left + img_size, top + img_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise CaptionDataError(f"image {path} cannot be read: {err}") from None
    return np.array(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))  # a writable copy (PIL's is not)


def _refuse_repeated_images(json_path: Path, found: dict[str, list[tuple[Path, list[str], str]]]) -> None:
    """One image under two entries (the same file, however its path is written, or the same image id) is scored
    twice, or sits in two splits (leakage): an error naming the first ones and their splits."""
    seen: dict[tuple[str, str], list[str]] = {}
    for split, items in found.items():
        for path, _, key in items:
            seen.setdefault(("file", str(path.resolve())), []).append(split)
            seen.setdefault(("image id", key), []).append(split)
    repeated = [(what, name, splits) for (what, name), splits in seen.items() if len(splits) > 1]
    if repeated:
        shown = "; ".join(f"{what} {name} in {', '.join(splits)}" for what, name, splits in repeated[:3])
        raise CaptionDataError(f"{json_path}: {len(repeated)} image(s) listed more than once: {shown}. An image "
                               "listed twice is trained or scored twice, or sits in two splits (leakage): list each "
                               "image once")


def read_karpathy(json_path: str | Path, image_root: str | Path, img_size: int, channels: int = 3,
                  memory_limit: int | None = None) -> dict[str, CaptionSplit]:
    """The splits of a Karpathy file (``restval`` in ``train``): each split's images decoded and held when their
    ``img_size`` pixels fit ``memory_limit`` bytes (None: always), else left on disk and decoded per batch."""
    json_path, image_root = Path(json_path), Path(image_root)
    if not image_root.is_dir():
        raise CaptionDataError(f"data.image_root {image_root} is not a directory")
    entries = _entries(json_path)
    if not entries:
        raise CaptionDataError(f"{json_path} lists no images")
    found: dict[str, list[tuple[Path, list[str], str]]] = {}
    missing = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "filename" not in entry:
            raise CaptionDataError(f"{json_path}: images[{i}] has no 'filename'")
        split = entry.get("split")
        if split not in SPLITS:
            raise CaptionDataError(f"{json_path}: images[{i}] ({entry['filename']}) has split {split!r}; expected "
                                   f"one of {list(SPLITS)}")
        sentences = entry.get("sentences") or []
        captions = [s.get("raw", "").strip() for s in sentences if isinstance(s, dict)]
        captions = [c for c in captions if c]
        if not captions:
            raise CaptionDataError(f"{json_path}: images[{i}] ({entry['filename']}) has no caption")
        path = image_root / entry.get("filepath", "") / entry["filename"]
        if not path.is_file():
            missing.append(str(path))
        found.setdefault("train" if split == "restval" else split, []).append(
            (path, captions, str(entry.get("cocoid", entry.get("imgid", entry["filename"])))))
    if missing:
        raise CaptionDataError(f"{len(missing)} image file(s) listed in {json_path} are missing under {image_root}, "
                               f"e.g. {missing[:3]}")
    _refuse_repeated_images(json_path, found)
    if "train" not in found:
        raise CaptionDataError(f"{json_path} has no training images (split train or restval)")
    out = {}
    for split, items in found.items():
        files = ImageFiles([p for p, _, _ in items], img_size, channels)
        held = memory_limit is None or len(items) * channels * img_size ** 2 <= memory_limit
        out[split] = CaptionSplit(files[:] if held else files, [c for _, c, _ in items], [k for _, _, k in items])
    return out
