"""A built-in image-caption set (docs/retrieval.md): canvases of 2-4 real Fashion-MNIST items at named places, five
captions each from a small grammar with varied wording, written as PNG files and a Karpathy split JSON so that the
retrieval main job reads it through the same reader as COCO or Flickr30K (:mod:`ermoe.data.karpathy`).

A canvas is a 2 x 2 grid of 32-pixel cells (64 x 64 pixels); each item sits in its own cell, small (20 px) or
large (28 px), jittered by up to 2 pixels. Captions name items by class (with synonyms), size, place (corners),
relations between items in neighbouring cells ("a bag to the left of a sneaker", "a coat above two sandals"),
counts ("two bags and a boot") and the whole scene in reading order. The same items in other places make other
captions with the same words, so word order and relations matter: a bag of words cannot tell "a bag left of a
shoe" from "a shoe left of a bag". Training canvases take their items from Fashion-MNIST's training split,
validation and test canvases from its test split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache import cache_root, start_build

CAPTIONS_VERSION = 1
CELL, CANVAS = 32, 64
PLACES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
# Fashion-MNIST's classes: (singular names, plural names); the first of each is the plain name.
NAMES = [
    (["t-shirt", "top", "tee"], ["t-shirts", "tops", "tees"]),
    (["pair of trousers", "pair of pants"], ["pairs of trousers", "pairs of pants"]),
    (["pullover", "sweater", "jumper"], ["pullovers", "sweaters", "jumpers"]),
    (["dress"], ["dresses"]),
    (["coat", "jacket"], ["coats", "jackets"]),
    (["sandal"], ["sandals"]),
    (["shirt"], ["shirts"]),
    (["sneaker", "trainer", "running shoe"], ["sneakers", "trainers", "running shoes"]),
    (["bag", "handbag"], ["bags", "handbags"]),
    (["ankle boot", "boot"], ["ankle boots", "boots"]),
]
NUMBERS = {2: "two", 3: "three", 4: "four"}
BACKGROUND = len(NAMES)  # the item class of an empty cell, and of a caption's words that name no item


CAPTION_STYLES = ("mixed", "word_order")


@dataclass(frozen=True)
class CaptionSetSpec:
    """``style``: ``mixed`` (relations, scene, counts and places; many test captions are shared between images or
    singled out by their words alone) or ``word_order`` (every caption describes the whole canvas, no caption is
    shared between two images of a split, and ``twin_share`` of the images come in pairs that differ by two items
    swapped, whose captions use the same words in another order: :func:`word_order_split`)."""

    train_size: int = 10000
    val_size: int = 1000
    test_size: int = 1000
    seed: int = 0
    style: str = "mixed"
    twin_share: float = 0.5


@dataclass(frozen=True)
class Item:
    label: int
    row: int
    col: int
    large: bool


def _name(rng: np.random.Generator, item: Item, article: bool = True, size: bool | None = None) -> str:
    singular = NAMES[item.label][0]
    word = singular[int(rng.integers(len(singular)))]
    size = rng.random() < 0.35 if size is None else size
    if size:
        word = f"{'large' if item.large else 'small'} {word}" if rng.random() < 0.5 else \
            f"{'big' if item.large else 'little'} {word}"
    if not article:
        return word
    return ("an " if word[0] in "aeiou" else "a ") + word


def _relation(rng: np.random.Generator, a: Item, b: Item) -> str | None:
    """A sentence relating two items in neighbouring cells (same row or same column), or None."""
    if a.row == b.row and a.col != b.col:
        left, right = (a, b) if a.col < b.col else (b, a)
        forms = ["{l} to the left of {r}", "{r} to the right of {l}", "{l} on the left and {r} on the right",
                 "{r} next to {l}, which is on the left", "on the left {l}, on the right {r}"]
        return forms[int(rng.integers(len(forms)))].format(l=_name(rng, left), r=_name(rng, right))
    if a.col == b.col and a.row != b.row:
        top, bottom = (a, b) if a.row < b.row else (b, a)
        forms = ["{t} above {b}", "{b} below {t}", "{b} under {t}", "{t} on top and {b} underneath",
                 "{t} sitting above {b}"]
        return forms[int(rng.integers(len(forms)))].format(t=_name(rng, top), b=_name(rng, bottom))
    return None


def _counts(rng: np.random.Generator, items: list[Item]) -> str:
    labels = sorted({i.label for i in items}, key=lambda c: [i.label for i in items].index(c))
    parts = []
    for c in labels:
        n = sum(i.label == c for i in items)
        if n == 1:
            parts.append(_name(rng, next(i for i in items if i.label == c), size=False))
        else:
            plural = NAMES[c][1]
            parts.append(f"{NUMBERS[n]} {plural[int(rng.integers(len(plural)))]}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text if rng.random() < 0.5 else f"{NUMBERS[len(items)]} items: {text}"


def _scene(rng: np.random.Generator, items: list[Item]) -> str:
    ordered = sorted(items, key=lambda i: (i.row, i.col))
    if rng.random() < 0.5:
        return "; ".join(f"{PLACES[(i.row, i.col)]}: {_name(rng, i)}" for i in ordered)
    return ", ".join(f"{_name(rng, i)} at the {PLACES[(i.row, i.col)]}" for i in ordered)


def _place(rng: np.random.Generator, item: Item) -> str:
    forms = ["{n} in the {p} corner", "at the {p} there is {n}", "{n} at the {p}", "the {p} corner holds {n}"]
    return forms[int(rng.integers(len(forms)))].format(n=_name(rng, item), p=PLACES[(item.row, item.col)])


def captions_for(rng: np.random.Generator, items: list[Item], count: int = 5) -> list[str]:
    """``count`` distinct captions of a canvas: relations first (they need word order), then the scene, counts and
    places."""
    pairs = [(a, b) for i, a in enumerate(items) for b in items[i + 1:]]
    rng.shuffle(pairs)
    pool = [s for s in (_relation(rng, a, b) for a, b in pairs) if s is not None]
    pool += [_scene(rng, items), _counts(rng, items)] + [_place(rng, i) for i in items]
    pool += [_relation(rng, a, b) or _scene(rng, items) for a, b in pairs] + [_scene(rng, items) for _ in range(3)]
    out: list[str] = []
    for text in pool:
        if text not in out:
            out.append(text)
        if len(out) == count:
            break
    while len(out) < count:  # a two-item canvas with few distinct phrasings: draw more until 5 differ
        text = _scene(rng, items) if rng.random() < 0.5 else _place(rng, items[int(rng.integers(len(items)))])
        if text not in out:
            out.append(text)
    return out


ROWS, COLUMNS = ("top", "bottom"), ("left", "right")
_TOKENS = re.compile(r"\w+|[^\w\s]+")  # the caption tokenizer's pre-tokenizer (Hugging Face ``Whitespace``)


def token_key(text: str) -> tuple[str, ...]:
    """A caption as the text tower will see its words (lower-cased, split on words and punctuation)."""
    return tuple(_TOKENS.findall(text.lower()))


def _name_words() -> list[tuple[tuple[str, ...], int]]:
    """Every name of every class as caption words, longest first (so "t-shirt" is not read as "shirt")."""
    names = {token_key(n): c for c, (singular, plural) in enumerate(NAMES) for n in (*singular, *plural)}
    return sorted(names.items(), key=lambda kv: -len(kv[0]))


_NAME_WORDS = _name_words()
_PLACE_AFTER_TOP = {"left", "right", "row"}  # "top left", "the top row": a place, not the garment "top"


def word_classes(words: Sequence[str]) -> list[int]:
    """The item class each word of a caption names (its tokens, :func:`token_key`): the class of every word of an
    item's name ("pair of trousers": 1, 1, 1), ``BACKGROUND`` for the others (articles, sizes, places, relations).
    The ground truth a per-word oracle routes the text tower by."""
    out = [BACKGROUND] * len(words)
    i = 0
    while i < len(words):
        for name, label in _NAME_WORDS:
            if tuple(words[i:i + len(name)]) != name:
                continue
            place = name == ("top",) and ((i + 1 < len(words) and words[i + 1] in _PLACE_AFTER_TOP)
                                          or (i > 0 and words[i - 1] == "on"))  # "on top and x underneath"
            if not place:
                out[i:i + len(name)] = [label] * len(name)
                i += len(name) - 1
            break
        i += 1
    return out


def _line_clause(names: dict[int, str], items: list[Item], by_row: bool, line: int) -> str | None:
    """The items of one row (``by_row``) or column, in order along it: "x to the left of y in the top row",
    "x above y in the left column", or "x alone in the top row, on the left"; None for an empty line."""
    along, across = ("col", "row") if by_row else ("row", "col")
    here = sorted((i for i in range(len(items)) if getattr(items[i], across) == line),
                  key=lambda i: getattr(items[i], along))
    if not here:
        return None
    where = f"the {ROWS[line]} row" if by_row else f"the {COLUMNS[line]} column"
    if len(here) == 2:
        return f"{names[here[0]]} {'to the left of' if by_row else 'above'} {names[here[1]]} in {where}"
    side = (COLUMNS if by_row else ROWS)[getattr(items[here[0]], along)]
    return f"{names[here[0]]} alone in {where}, {'on' if by_row else 'at'} the {side}"


WHOLE_CANVAS_FORMS = 5


def whole_canvas_caption(form: int, names: dict[int, str], items: list[Item]) -> str:
    """Caption form ``form`` of a canvas, naming every item (``names[i]``: item i's words) and its place: the
    scene in reading order (two forms), row by row, column by column, corner by corner."""
    order = sorted(range(len(items)), key=lambda i: (items[i].row, items[i].col))
    place = {i: PLACES[(items[i].row, items[i].col)] for i in order}
    if form == 0:
        return "; ".join(f"{place[i]}: {names[i]}" for i in order)
    if form == 1:
        return ", ".join(f"{names[i]} at the {place[i]}" for i in order)
    if form == 2:
        return ", and ".join(c for c in (_line_clause(names, items, True, r) for r in (0, 1)) if c)
    if form == 3:
        return ", and ".join(c for c in (_line_clause(names, items, False, c) for c in (0, 1)) if c)
    if form == 4:
        return " and ".join(f"{names[i]} in the {place[i]} corner" for i in order)
    raise ValueError(f"caption form {form} of {WHOLE_CANVAS_FORMS}")


def swapped_twin(rng: np.random.Generator, items: list[Item]) -> list[Item] | None:
    """The canvas with two items that differ (class or size) exchanging cells, or None when all items are alike."""
    pairs = [(a, b) for a in range(len(items)) for b in range(a + 1, len(items))
             if (items[a].label, items[a].large) != (items[b].label, items[b].large)]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    twin = list(items)
    twin[a] = Item(items[a].label, items[b].row, items[b].col, items[a].large)
    twin[b] = Item(items[b].label, items[a].row, items[a].col, items[b].large)
    return twin


def draw_canvas(pool_images: np.ndarray, items: list[Item], picks: list[int], offsets: list[tuple[int, int]]
                ) -> np.ndarray:
    """A 64 x 64 canvas of the pool's images ``picks`` placed as ``items`` say, each shifted by its offset."""
    from PIL import Image

    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    for item, k, (dy, dx) in zip(items, picks, offsets):
        size = 28 if item.large else 20
        patch = pool_images[k]
        if size != patch.shape[0]:
            patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR))
        off = (CELL - size) // 2
        y, x = item.row * CELL + off + dy, item.col * CELL + off + dx
        canvas[y:y + size, x:x + size] = np.maximum(canvas[y:y + size, x:x + size], patch)
    return canvas


def word_order_split(rng: np.random.Generator, size: int, pool: tuple[np.ndarray, np.ndarray], twin_share: float,
                     max_tries: int = 100) -> list[tuple[np.ndarray, list[Item], list[str]]]:
    """``size`` canvases of one split with five whole-canvas captions each, no caption (as tokens) shared by two
    canvases, and about ``twin_share`` of the canvases in swapped pairs: the twin shows the same item images with
    two of them exchanged, and its captions use the same word choices, so each of its captions has the same words
    as its partner's in another order (only word order tells the two apart)."""
    images, labels = pool
    used: set[tuple[str, ...]] = set()
    out: list[tuple[np.ndarray, list[Item], list[str]]] = []
    while len(out) < size:
        n = int(rng.integers(2, 5))
        cells = [divmod(int(c), 2) for c in rng.permutation(4)[:n]]
        picks = [int(rng.integers(len(images))) for _ in cells]
        items = [Item(int(labels[k]), row, col, bool(rng.random() < 0.5)) for k, (row, col) in zip(picks, cells)]
        offsets = [tuple(int(v) for v in rng.integers(-2, 3, size=2)) for _ in cells]
        twin = swapped_twin(rng, items) if len(out) + 2 <= size and rng.random() < twin_share else None
        for _ in range(max_tries):
            # one word choice per (caption, item): the twin reads its items with the same words
            names = [{i: _name(rng, item) for i, item in enumerate(items)} for _ in range(WHOLE_CANVAS_FORMS)]
            canvases = [items] if twin is None else [items, twin]
            texts = [[whole_canvas_caption(f, names[f], its) for f in range(WHOLE_CANVAS_FORMS)] for its in canvases]
            keys = [token_key(t) for ts in texts for t in ts]
            if len(set(keys)) == len(keys) and not used.intersection(keys):
                used.update(keys)
                for its, ts in zip(canvases, texts):
                    out.append((draw_canvas(images, its, picks, offsets), its, ts))
                break
    return out


def compose(rng: np.random.Generator, pool_images: np.ndarray, pool_labels: np.ndarray
            ) -> tuple[np.ndarray, list[Item]]:
    """One canvas (64 x 64 uint8) with 2-4 items from the pool in distinct cells."""
    n = int(rng.integers(2, 5))
    cells = [divmod(int(c), 2) for c in rng.permutation(4)[:n]]
    items, picks, offsets = [], [], []
    for row, col in cells:
        k = int(rng.integers(len(pool_images)))
        large = bool(rng.random() < 0.5)
        offsets.append(tuple(int(v) for v in rng.integers(-2, 3, size=2)))
        picks.append(k)
        items.append(Item(int(pool_labels[k]), row, col, large))
    return draw_canvas(pool_images, items, picks, offsets), items


def caption_set_dir(spec: CaptionSetSpec) -> Path:
    fields = asdict(spec)
    if spec.style == "mixed":  # the key of the sets built before there were styles
        del fields["style"], fields["twin_share"]
    key = hashlib.sha256(json.dumps({**fields, "v": CAPTIONS_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root()
    return root / "fashion_captions" / key


def build_caption_set(spec: CaptionSetSpec, train_pool: tuple[np.ndarray, np.ndarray],
                      test_pool: tuple[np.ndarray, np.ndarray], log=None) -> Path:
    """The set's Karpathy JSON (generated on first use under ``$ERMOE_CACHE_DIR/fashion_captions``; the JSON is
    written last, atomically, so a half-built set is rebuilt, never read). ``*_pool``: Fashion-MNIST images
    ``(N, 28, 28)`` uint8 and labels for the training canvases and for the validation and test canvases."""
    from PIL import Image

    for key in ("train_size", "val_size", "test_size"):
        if getattr(spec, key) < 1:
            raise ValueError(f"data.{key} of the caption set must be >= 1, got {getattr(spec, key)}")
    if spec.style not in CAPTION_STYLES:
        raise ValueError(f"data.captions must be one of {CAPTION_STYLES}, got {spec.style!r}")
    if not 0.0 <= spec.twin_share <= 1.0:
        raise ValueError(f"the caption set's twin_share must be in [0, 1], got {spec.twin_share}")
    root = caption_set_dir(spec)
    json_path = root / "dataset_fashion_captions.json"
    if start_build(root, json_path.name) is not None:
        return json_path
    rng = np.random.default_rng(spec.seed)
    entries = []
    sent_id = 0
    for split, size, pool in (("train", spec.train_size, train_pool), ("val", spec.val_size, test_pool),
                              ("test", spec.test_size, test_pool)):
        if spec.style == "word_order":
            canvases = word_order_split(rng, size, pool, spec.twin_share)
        else:
            canvases = []
            for _ in range(size):
                canvas, items = compose(rng, *pool)
                canvases.append((canvas, items, captions_for(rng, items)))
        for canvas, items, captions in canvases:
            img_id = len(entries)
            name = f"{img_id:06d}.png"
            Image.fromarray(canvas).save(root / "images" / name)
            entries.append({
                "filepath": "images", "filename": name, "imgid": img_id, "split": split,
                "sentids": list(range(sent_id, sent_id + len(captions))),
                "sentences": [{"raw": c, "tokens": c.replace(",", "").replace(";", "").replace(":", "").split(),
                               "imgid": img_id, "sentid": sent_id + j} for j, c in enumerate(captions)],
                "items": [asdict(i) for i in items]})
            sent_id += len(captions)
            if log is not None and len(entries) % 2000 == 0:
                log(f"caption set: {len(entries)}/{spec.train_size + spec.val_size + spec.test_size} images")
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"dataset": "fashion_captions", "version": CAPTIONS_VERSION, "spec": asdict(spec),
                               "images": entries}))
    os.replace(tmp, json_path)
    return json_path
