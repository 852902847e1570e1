"""A frozen stem's features, computed once per image and cached on disk (``data.stem_cache``).

A frozen pretrained stem (``ermoe.models.stems``) is a fixed function of each image, and on a CPU it costs most of
a training step. Its features for a whole split are computed once, saved under ``$ERMOE_CACHE_DIR`` (default
``~/.cache/ermoe``) in a file keyed by everything they depend on (the stem's weights, its token grid, the images,
their normalisation), and on every later read the first images are recomputed by the live stem and compared, so a
cache that no longer matches is an error, not a silent difference.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.augment import normalize
from ..data.cache import cache_root

VERIFY_IMAGES = 32


def cache_dir() -> Path:
    return cache_root() / "stem_features"


def _digest(*parts: Tensor | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            h.update(str((tuple(part.shape), part.dtype)).encode())
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(part.encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def _compute(stem: nn.Module, images: Tensor, mean: Tensor, std: Tensor, device: torch.device,
             batch_size: int) -> Tensor:
    stem.eval()
    out = [stem.frozen_features(normalize(images[i:i + batch_size].to(device), mean, std)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def cached_stem_features(stem: nn.Module, images: Tensor, mean: Tensor, std: Tensor, device: torch.device,
                         batch_size: int = 500) -> Tensor:
    """The frozen features of ``images`` (uint8 ``(N, C, H, W)``), from the cache or computed and cached."""
    from safetensors.torch import load_file, save_file

    # Keyed by the frozen part only: the stem's trainable projection differs per seed, its input does not.
    weights = [t for _, t in sorted(stem.frozen_state().items()) if t.is_floating_point()]
    key = _digest(*weights, str(stem.grid_size), images, mean.float(), std.float())
    path = cache_dir() / f"{key}.safetensors"
    check = _compute(stem, images[:VERIFY_IMAGES], mean, std, device, batch_size)
    if path.exists():
        features = load_file(str(path))["features"]
        if features.shape[0] != len(images) or not torch.allclose(features[:VERIFY_IMAGES], check, atol=1e-4,
                                                                    rtol=1e-4):
            raise RuntimeError(f"the stem feature cache {path} does not match the live stem on its first images; "
                               "delete it to recompute")
        return features
    features = _compute(stem, images, mean, std, device, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"features": features.contiguous()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return features
