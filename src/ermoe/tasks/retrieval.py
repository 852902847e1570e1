"""Image-text retrieval (docs/retrieval.md): a dual encoder trained with the symmetric InfoNCE loss on image-caption
pairs, evaluated with Recall@1/5/10 both ways and the median rank over the whole test set, plus the routing
diagnostics of both towers (load, MI(expert; word) for the text tower, MI(expert; item class of the patch's cell) on
the built-in caption set, stability). On the built-in set the oracle router (a positive control) routes each image
patch by the item class under it and each word by the item class it names (``data.captions.word_classes``).

Data: ``data.name: karpathy`` reads a Karpathy split file (``data.json``) and its images (``data.image_root``);
``fashion_captions`` generates the built-in caption set (:mod:`ermoe.data.captions`) and reads it through the same
reader. Captions are tokenised by a BPE vocabulary learned from the training captions (``task_options.vocab_size``,
``task_options.context_length``). Each training step pairs every image of the batch with one of its captions,
drawn from the ``(seed, step, image)`` random stream (exact resume, the same for any world size). Karpathy images
beyond ``data.memory_cap_gb`` are decoded per batch, in ``data.num_workers`` loader workers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..analysis.diagnostics import TEST_EXAMPLES, RoutingCounts, evaluating, mutual_information, probe_routing
from ..analysis.retrieval import (ORDER_DECIDES, caption_kinds, kind_shares, metrics_from_ranks, retrieval_metrics,
                                  retrieval_ranks, word_order_chance, word_order_correct, word_order_groups)
from ..data.caption_batches import PAD_ID, CaptionBatches
from ..data.captions import BACKGROUND
from ..data.karpathy import CaptionSplit
from ..data.modules import KarpathyOptions
from ..models.dual import clip_loss
from ..routing.oracle import routed_by
from ..settings import FORBID_EXTRA
from .base import Batch, Objective, Task, register_task


@dataclass
class RetrievalOptions:
    __pydantic_config__ = FORBID_EXTRA
    vocab_size: int = 2000
    context_length: int = 32
    # Keep training images whose captions only word order tells apart (analysis.retrieval.word_order_groups) in one
    # batch, so that the contrastive loss has negatives only a text tower that reads word order can reject (in
    # random batches of 128 from 10,000 canvases an image's twin shares its batch about 1% of the time).
    word_order_batches: bool = False

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ValueError(f"task_options.context_length must be >= 2, got {self.context_length}")


class Contrastive(Objective):
    """CLIP's symmetric InfoNCE over the batch's image-caption pairs; logs the in-batch image-to-text top-1."""

    batch_coupled = True  # every other pair of the (global) batch is a negative

    def loss(self, output, target: Tensor | None) -> Tensor:
        return clip_loss(*output)

    def batch_stats(self, output, batch: Batch) -> dict[str, Tensor]:
        image, text, _ = output
        sims = image.float() @ text.float().t()
        hits = (sims.argmax(1) == torch.arange(len(sims), device=sims.device)).sum()
        return {"batch_i2t_acc": hits}  # in-batch top-1, a training-time sanity signal


PROBE_TRAIN_IMAGES = 500  # the item probe's training (and validation) images, at most an eighth of the training set


@register_task
class Retrieval(Task):
    name = "retrieval"
    datasets = ("fashion_captions", "karpathy")
    model_data_args = ("img_size", "in_chans", "vocab_size", "context_length", "pad_id")
    Options = RetrievalOptions

    def load(self) -> None:
        try:
            import PIL  # noqa: F401
            import tokenizers  # noqa: F401
        except ImportError as err:
            raise ImportError(f"retrieval decodes images with Pillow and tokenises captions with Hugging Face "
                              f"tokenizers ({err}): pip install -e '.[retrieval]'") from None
        data = self.setup.data.load()  # a Karpathy file, or the built-in caption set
        if len(data.splits["train"]) < self.setup.batch_size:
            raise ValueError(f"optim.batch_size {self.setup.batch_size} exceeds the {len(data.splits['train'])} "
                             "training images")
        # Karpathy images may be read from disk in loader workers; the built-in set is held in memory
        workers = self.setup.data.num_workers if isinstance(self.setup.data, KarpathyOptions) else 0
        self.batches = CaptionBatches(data, self.sampling, self.options.vocab_size, self.options.context_length,
                                      workers)
        if self.options.word_order_batches:
            ids, owner, _ = self.batches.tokens["train"]
            groups = word_order_groups(ids, owner, len(self.splits["train"]))
            if len(groups) == len(self.splits["train"]):
                raise ValueError("task_options.word_order_batches: no two training images have captions that only "
                                 "word order tells apart, so there is nothing to keep in one batch (the built-in "
                                 "set has them: data.captions word_order)")
            largest = max(len(g) for g in groups)
            if largest > self.setup.batch_size:
                raise ValueError(f"task_options.word_order_batches: a group of {largest} images that only word order "
                                 f"tells apart exceeds optim.batch_size {self.setup.batch_size}")
            self.batches.train_groups = groups
        self.objective = Contrastive()
        self.image_grid: tuple[int, int] | None = None  # set by prepare(model): where the patch labels fall
        self._patch_labels_of: dict[str, Tensor | None] = {}  # per split, for the grid prepare() set

    @property
    def splits(self) -> dict[str, CaptionSplit]:
        return self.batches.splits

    @property
    def items(self) -> dict[str, list[list[dict]]] | None:
        return self.batches.items

    def vocabulary(self) -> list[str]:
        tokenizer = self.batches.tokenizer
        return [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]

    def prepare(self, model: nn.Module) -> None:
        self.image_grid = model.image_grid  # where the oracle's and the diagnostics' patch labels fall
        self._patch_labels_of = {}
        norm = model.input_normalization(pretrained=False)
        if norm is not None:
            self.batches.mean, self.batches.std = (torch.as_tensor(v, dtype=torch.float32) for v in norm)

    def oracle_groups(self, batch: Batch) -> dict[str, Tensor] | None:
        """The oracle's ground truth of a batch (built-in set only): per image patch the item class under it, per
        real token of the caption the item class its word names (``BACKGROUND`` for neither)."""
        if batch.groups is None:
            return None
        ids = batch.inputs[1]
        words = batch.groups["text"]
        return {"image": self.patch_classes(batch.groups["image"]), "text": words[(ids != PAD_ID).to(words.device)]}

    def patch_classes(self, cells_B22: Tensor) -> Tensor:
        """The item class of the canvas cell under each patch token, ``(B, P)`` in row-major patch order."""
        if self.image_grid is None:
            raise RuntimeError("retrieval: the image tower's token grid is not known yet (task.prepare(model) sets it)")
        rows, cols = self.image_grid
        if not self.patches_split_cells():
            raise ValueError(f"the image tower's {rows} x {cols} token grid does not split the canvas's 2 x 2 cells: "
                             "a patch would straddle two items (use a patch size that divides the canvas cell, 32 px)")
        return cells_B22.repeat_interleave(rows // 2, 1).repeat_interleave(cols // 2, 2).flatten(1)

    @torch.no_grad()
    def embed(self, model: nn.Module, split: str, autocast: Callable[[], Any],
              on_image: Callable[[Tensor], None] | None = None,
              on_text: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Every image and every caption of ``split`` embedded in chunks: ``(images, texts, owner)``."""
        size = self.setup.eval_batch_size
        truth = self.batches.truth[split] if self.batches.truth is not None else None
        cells = self._patch_labels(split)
        with evaluating(model):
            images = []
            for idx, x in self.batches.image_chunks(split, size):
                with autocast(), routed_by(model, None if cells is None else {"image": cells[idx]}):
                    images.append(model.encode_image(x).float().cpu())
                if on_image is not None:
                    on_image(idx)
            ids, owner, _ = self.batches.tokens[split]
            texts = []
            for s in range(0, len(ids), size):
                chunk = ids[s:s + size].to(self.device)
                with autocast(), routed_by(model, None if truth is None else {
                        "text": truth[1][s:s + size][chunk.cpu() != PAD_ID]}):
                    texts.append(model.encode_text(chunk).float().cpu())
                if on_text is not None:
                    on_text(chunk.cpu())
        return torch.cat(images), torch.cat(texts), owner

    def evaluate(self, model: nn.Module, autocast: Callable[[], Any], probe: Batch | None = None) -> dict[str, Any]:
        layers = {v.name: v for v in model.routed_layers()}
        image_layers = [n for n in layers if n.startswith("image.")]
        text_layers = [n for n in layers if n.startswith("text.")]
        cell_labels = self._patch_labels("test")
        # a text token's label: its word; an image token's: the item class under its patch (built-in set only)
        counts = RoutingCounts(list(layers.values()), {
            **{n: self.batches.vocab_size for n in text_layers},
            **{n: 1 if cell_labels is None else BACKGROUND + 1 for n in image_layers}})

        def on_image(idx: Tensor) -> None:
            if cell_labels is None:
                counts.add(layers=image_layers)
                return
            cells = cell_labels[idx]
            per_image = cells.shape[1]
            counts.add(lambda info, t: cells[t // per_image, t % per_image], image_layers)

        def on_text(chunk: Tensor) -> None:
            real = chunk[chunk != PAD_ID]  # the MoE routes real tokens only, in row-major order
            counts.add(lambda info, t: real[t], text_layers)

        images, texts, owner = self.embed(model, "test", autocast, on_image, on_text)
        image_rank, text_rank = retrieval_ranks(images, texts, owner)
        order_metrics, order_records = self.word_order(images, texts, owner)
        metrics: dict[str, Any] = {"dataset": self.setup.data.name, "test_images": len(images),
                                   "test_captions": len(texts), **metrics_from_ranks(image_rank, text_rank),
                                   # per test image its rank; per caption (caption/*) its rank, its image, its kind
                                   TEST_EXAMPLES: {"i2t_rank": image_rank.numpy(),
                                                   "caption/t2i_rank": text_rank.numpy(),
                                                   "caption/owner": owner.cpu().numpy(), **order_records},
                                   "chance_t2i_r@1": 1 / len(images), "chance_i2t_r@1": float(
                                       np.mean([len(c) for c in self.splits["test"].captions]) / len(texts)),
                                   **order_metrics}
        if "val" in self.splits:
            metrics.update(self.quick_eval(model, autocast))
        probe_stats = {}
        if probe is not None:
            with routed_by(model, self.oracle_groups(probe)):
                probe_stats = probe_routing(model, probe.inputs, ctx=autocast)
        out = {}
        for n in layers:
            stats: dict[str, Any] = counts[n].load()
            if n in text_layers:
                stats["mi_word_bits"] = mutual_information(counts[n].counts)
            elif cell_labels is not None:
                stats["mi_item_bits"] = mutual_information(counts[n].counts)
                stats["expert_item_counts"] = counts[n].counts.tolist()
            stats.update(probe_stats.get(n, {}))
            out[n] = stats
        metrics["layers"] = out
        metrics.update(self.item_probe(model, autocast))
        return metrics

    def item_probe(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, Any]:
        """A positive control of the specialisation claims, in dense towers (the study's ``dense``): per block of
        each tower, a linear probe of the item class from the tokens its token-wise layer reads (image: the item
        class under each patch; text: the class each word names, ``BACKGROUND`` for neither), fitted on the first
        ``PROBE_TRAIN_IMAGES`` training images (at most an eighth of them) with their first captions, C chosen on
        as many validation images,
        read on the test split: ``truth_probe``. Nothing in routed towers, off the built-in set (no item classes)
        or without a validation split."""
        sites = model.token_sites
        if model.routed_layers() or self.batches.truth is None or "val" not in self.splits or not sites:
            return {}
        from ..analysis.token_probe import can_probe, probe_ground_truth

        if not can_probe():
            return {}

        images = min(PROBE_TRAIN_IMAGES, max(1, self.num_train // 8))

        def batches(tower: str):
            def of(split: str):
                for b in self.eval_batches(split, limit=None if split == "test" else images):
                    labels = self.patch_classes(b.groups["image"]) if tower == "image" else b.groups["text"]
                    yield b.inputs, labels, None
            return of

        found = {}
        towers = ("image", "text") if self._patch_labels("val") is not None else ("text",)
        for tower in towers:
            tower_sites = {n: site for n, site in sites.items() if n.startswith(tower + ".")}
            if tower_sites:
                found.update(probe_ground_truth(model, tower_sites, batches(tower), autocast, self.setup.seed))
        return {"truth_probe": found}

    def word_order(self, images: Tensor, texts: Tensor, owner: Tensor) -> tuple[dict[str, float],
                                                                                dict[str, np.ndarray]]:
        """What word order decides on the test split and whether the model reads it (analysis.retrieval.caption_kinds,
        word_order_correct), from the test embeddings: the metrics (the shares of each caption kind,
        ``test_caption_*``; with any order-decided caption, ``test_word_order_acc``, the share of them whose image the
        model scores above every rival image, and ``test_word_order_chance``, an order-blind model's) and the
        per-caption records (``caption/kind``, ``caption/order_correct``: 1, 0, or -1 without rivals)."""
        ids, token_owner, _ = self.batches.tokens["test"]
        if not torch.equal(token_owner.cpu(), owner.cpu()):
            raise RuntimeError("the test captions' tokens and embeddings are not in the same order")
        kind, rivals = caption_kinds(ids, token_owner)
        correct = word_order_correct(images, texts, owner, rivals)
        metrics = {f"test_caption_{k}": v for k, v in kind_shares(kind).items()}
        if (kind == ORDER_DECIDES).any():
            metrics["test_word_order_acc"] = float(correct[kind == ORDER_DECIDES].mean())
            metrics["test_word_order_chance"] = word_order_chance(rivals)
        return metrics, {"caption/kind": kind, "caption/order_correct": correct}

    def _patch_labels(self, split: str) -> Tensor | None:
        """Per built-in canvas, the item class (or background) of the cell under each patch token, ``(N, P)``; None
        without item classes, or where a patch would straddle two cells (warned once for the prepared model). Built
        once per split: the evaluation, its embedding pass and the item probe all read them."""
        if self.batches.truth is None or self.image_grid is None:
            return None
        if split not in self._patch_labels_of:
            labels = None
            if self.patches_split_cells():
                labels = self.patch_classes(self.batches.truth[split][0])
            elif not self._patch_labels_of:  # the first split asked for since prepare(): warn once
                rows, cols = self.image_grid
                warnings.warn(f"the image tower's {rows} x {cols} token grid does not split the canvas's 2 x 2 "
                              "cells: image patches have no item class, so MI(expert; item) and the image tower's "
                              "probe are left out (use a patch size that divides the canvas cell, 32 px)",
                              stacklevel=2)
            self._patch_labels_of[split] = labels
        return self._patch_labels_of[split]

    def patches_split_cells(self) -> bool:
        """Whether each image patch lies in one cell of the built-in canvas's 2 x 2 grid (an even token grid)."""
        rows, cols = self.image_grid
        return rows % 2 == 0 and cols % 2 == 0

    @torch.no_grad()
    def quick_eval(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float]:
        """Recall on the validation split (nothing without one: the test split is read once, at the end)."""
        if "val" not in self.splits:
            return {}
        images, texts, owner = self.embed(model, "val", autocast)
        return retrieval_metrics(images, texts, owner, prefix="val_")

    @staticmethod
    def results_table(metrics: dict[str, Any]) -> str:
        m = metrics
        lines = [f"image->text R@1 {100 * m['test_i2t_r@1']:.1f}  R@5 {100 * m['test_i2t_r@5']:.1f}  R@10 "
                 f"{100 * m['test_i2t_r@10']:.1f}  median rank {m['test_i2t_medr']:.0f}   (chance R@1 "
                 f"{100 * m['chance_i2t_r@1']:.2f})",
                 f"text->image R@1 {100 * m['test_t2i_r@1']:.1f}  R@5 {100 * m['test_t2i_r@5']:.1f}  R@10 "
                 f"{100 * m['test_t2i_r@10']:.1f}  median rank {m['test_t2i_medr']:.0f}   (chance R@1 "
                 f"{100 * m['chance_t2i_r@1']:.2f})",
                 f"RSUM {m['test_rsum']:.1f}   ({m['test_images']} test images, {m['test_captions']} captions)"]
        if "test_caption_order_decides" in m:
            lines.append(f"test captions: {100 * m['test_caption_bag_unique']:.1f}% single out their image by their "
                         f"words alone, {100 * m['test_caption_order_decides']:.1f}% only by word order, "
                         f"{100 * m['test_caption_text_shared']:.1f}% share their text with another image's caption")
        for name, s in m.get("layers", {}).items():
            mi = (f"   MI(expert; word) {s['mi_word_bits']:.3f} bits" if "mi_word_bits" in s else
                  f"   MI(expert; item) {s['mi_item_bits']:.3f} bits" if "mi_item_bits" in s else "")
            lines.append(f"{name}: load CV {s['load_cv']:.3f}   max/mean {s['max_over_mean']:.2f}{mi}")
        return "\n".join(lines)

    @staticmethod
    def draw_figures(metrics: dict[str, Any], fig_dir: Path) -> list[Path]:
        """Tokens per expert of every routing layer, image and text towers side by side."""
        layers = metrics.get("layers", {})
        if not layers:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 2.8), squeeze=False)
        for ax, (name, s) in zip(axes[0], layers.items()):
            load = np.asarray(s["tokens_per_expert"], dtype=float)
            ax.bar(range(len(load)), load / max(load.sum(), 1.0))
            ax.axhline(1 / len(load), color="k", lw=0.8, ls="--")
            ax.set_title(f"{name}\nCV {s['load_cv']:.2f}", fontsize=7)
            ax.set_xlabel("expert", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[0][0].set_ylabel("share of test tokens", fontsize=7)
        fig.tight_layout()
        fig_dir = Path(fig_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        path = fig_dir / "expert_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]
