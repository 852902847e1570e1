"""Retrieval metrics as CLIP_benchmark defines them: Recall@K for image->text (a query image is a hit when any of
its captions is among its K most similar captions) and text->image ("image retrieval": a caption is a hit when its
image is among its K most similar images), and the median rank, computed over the whole test set in chunks so
memory stays ``chunk x N``.

Ties count against the query: a positive's rank is one plus the number of negatives scoring at least as high, so a
model whose embeddings are all equal ranks every positive last instead of first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


@torch.no_grad()
def retrieval_ranks(image_NE: Tensor, text_ME: Tensor, owner_M: Tensor, chunk: int = 1024
                    ) -> tuple[Tensor, Tensor]:
    """``(image_rank_N, text_rank_M)``: each image's rank of its best caption among all captions, and each caption's
    rank of its image among all images (1 = first). ``owner_M``: the image index of every caption."""
    image_NE, text_ME = image_NE.float(), text_ME.float()
    owner_M = owner_M.to(image_NE.device)
    n, m = len(image_NE), len(text_ME)
    if owner_M.shape != (m,) or (m and (owner_M.min() < 0 or owner_M.max() >= n)):
        raise ValueError(f"owner must give an image index in [0, {n}) for each of the {m} captions")
    text_rank = torch.empty(m, dtype=torch.long)
    for s in range(0, m, chunk):
        sims = text_ME[s:s + chunk] @ image_NE.t()  # (c, N)
        pos = sims.gather(1, owner_M[s:s + chunk, None])
        text_rank[s:s + chunk] = (sims >= pos).sum(1).cpu()  # the positive itself counts once: rank = 1 + negatives
    image_rank = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        sims = image_NE[s:s + chunk] @ text_ME.t()  # (c, M)
        mine = owner_M[None, :] == torch.arange(s, min(s + chunk, n), device=owner_M.device)[:, None]
        if not mine.any(1).all():
            raise ValueError("every image needs at least one caption")
        best = sims.masked_fill(~mine, float("-inf")).max(1, keepdim=True).values
        image_rank[s:s + chunk] = ((sims >= best) & ~mine).sum(1).cpu() + 1
    return image_rank, text_rank


def recall_at(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    return {k: float((ranks <= k).double().mean()) for k in ks}


def retrieval_metrics(image_NE: Tensor, text_ME: Tensor, owner_M: Tensor, ks: Sequence[int] = (1, 5, 10),
                      prefix: str = "test_", chunk: int = 1024) -> dict[str, float]:
    """``{prefix}i2t_r@K``, ``{prefix}t2i_r@K``, the median ranks ``{prefix}i2t_medr`` / ``{prefix}t2i_medr`` and
    ``{prefix}rsum`` (the sum of the six recalls, in percent, as the retrieval literature reports it)."""
    return metrics_from_ranks(*retrieval_ranks(image_NE, text_ME, owner_M, chunk), ks, prefix)


def metrics_from_ranks(image_rank: Tensor, text_rank: Tensor, ks: Sequence[int] = (1, 5, 10),
                       prefix: str = "test_") -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics` from the ranks :func:`retrieval_ranks` gives."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", image_rank), ("t2i", text_rank)):
        for k, r in recall_at(ranks, ks).items():
            out[f"{prefix}{name}_r@{k}"] = r
        out[f"{prefix}{name}_medr"] = float(ranks.double().quantile(0.5))
    out[f"{prefix}rsum"] = 100 * sum(v for k, v in out.items() if "_r@" in k)
    return out


# The kind of a caption, as caption_kinds gives it
BAG_UNIQUE, ORDER_DECIDES, TEXT_SHARED = 0, 1, 2


def caption_kinds(ids_ML: Tensor, owner_M: Tensor, pad_id: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """Per caption of a split, from the captions as the text tower sees them (token ids, padding dropped), its kind
    and its rivals, ``(kind_M, rivals)``. Kinds:

    - ``TEXT_SHARED``: its exact token sequence is also a caption of another image (no text model can rank the right
      image above that one);
    - ``ORDER_DECIDES``: otherwise, its bag of words is also a caption of another image, in another order (only a
      model that reads word order can tell the two images apart); its rivals are those other images, sorted;
    - ``BAG_UNIQUE``: the rest, whose words alone single out their image (a bag of words suffices).

    ``rivals[m]`` is empty for a caption that is not ``ORDER_DECIDES``.
    """
    if ids_ML.dim() != 2 or len(ids_ML) != len(owner_M) or len(ids_ML) == 0:
        raise ValueError(f"caption_kinds needs (M, L) token ids and M owners, got {tuple(ids_ML.shape)} and "
                         f"{tuple(owner_M.shape)}")
    seqs = [tuple(row[row != pad_id].tolist()) for row in ids_ML.cpu()]
    owners = owner_M.cpu().tolist()
    by_seq: dict[tuple, set[int]] = {}
    by_bag: dict[tuple, set[int]] = {}
    for seq, owner in zip(seqs, owners):
        by_seq.setdefault(seq, set()).add(owner)
        by_bag.setdefault(tuple(sorted(seq)), set()).add(owner)
    kind = np.full(len(seqs), BAG_UNIQUE, dtype=np.int8)
    rivals: list[list[int]] = [[] for _ in seqs]
    for m, (seq, owner) in enumerate(zip(seqs, owners)):
        if by_seq[seq] - {owner}:
            kind[m] = TEXT_SHARED
        elif by_bag[tuple(sorted(seq))] - {owner}:
            kind[m] = ORDER_DECIDES
            rivals[m] = sorted(by_bag[tuple(sorted(seq))] - {owner})
    return kind, rivals


def caption_ambiguity(ids_ML: Tensor, owner_M: Tensor, pad_id: int = 0) -> dict[str, float]:
    """How much of a split's text-to-image retrieval word order can decide: the shares of its captions of each kind
    :func:`caption_kinds` gives (``text_shared``, ``order_decides``, ``bag_unique``)."""
    return kind_shares(caption_kinds(ids_ML, owner_M, pad_id)[0])


def word_order_groups(ids_ML: Tensor, owner_M: Tensor, num_images: int, pad_id: int = 0) -> list[list[int]]:
    """The images of a split grouped by word order: two images share a group when a caption of one is a rival of the
    other's (:func:`caption_kinds`: the same words in another order), transitively; every other image is a group of
    its own. A partition of ``range(num_images)``, each group sorted, the groups in order of their first image."""
    _, rivals = caption_kinds(ids_ML, owner_M, pad_id)
    parent = list(range(num_images))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for owner, others in zip(owner_M.tolist(), rivals):
        for other in others:
            a, b = root(owner), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(num_images):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def kind_shares(kind_M: np.ndarray) -> dict[str, float]:
    """The share of captions of each kind (:func:`caption_kinds`) by name."""
    shares = np.bincount(kind_M, minlength=3) / len(kind_M)
    return {"text_shared": float(shares[TEXT_SHARED]), "order_decides": float(shares[ORDER_DECIDES]),
            "bag_unique": float(shares[BAG_UNIQUE])}


@torch.no_grad()
def word_order_correct(image_NE: Tensor, text_ME: Tensor, owner_M: Tensor, rivals: Sequence[Sequence[int]]
                       ) -> np.ndarray:
    """Per caption whether the model tells its image from the images only word order separates it from: 1 when its
    own image scores strictly above every one of its ``rivals`` (:func:`caption_kinds`; ties count against it, as in
    the ranks), 0 when not, -1 for a caption without rivals. A text tower blind to word order embeds a caption and its
    rival's reordering alike, so over a swapped pair it is right on at most one of the two (exactly one barring
    ties): about 1/2 where each caption has one rival, as a random ranking (:func:`word_order_chance`)."""
    image_NE, text_ME = image_NE.float(), text_ME.float()
    if len(rivals) != len(text_ME) or len(owner_M) != len(text_ME):
        raise ValueError(f"word_order_correct needs one owner and one rival list per caption: {len(text_ME)} "
                         f"captions, {len(owner_M)} owners, {len(rivals)} rival lists")
    out = np.full(len(text_ME), -1, dtype=np.int8)
    for m, (owner, others) in enumerate(zip(owner_M.tolist(), rivals)):
        if others:
            sims = image_NE[torch.as_tensor([owner, *others])] @ text_ME[m]
            out[m] = int(bool((sims[0] > sims[1:]).all()))
    return out


def word_order_chance(rivals: Sequence[Sequence[int]]) -> float:
    """What :func:`word_order_correct` averages to for a model that cannot read word order and ranks a caption's own
    image and its rivals at random: the mean of 1 / (1 + rivals) over the captions that have rivals."""
    counts = [len(r) for r in rivals if len(r)]
    return float(np.mean([1 / (1 + c) for c in counts])) if counts else float("nan")
