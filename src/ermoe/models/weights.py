"""Loading weights into a model by name and shape (``model.init_checkpoint``, ``model.upcycle_from``;
docs/upcycling.md): what matches is loaded, the rest reported; a shape mismatch is an error naming the key, except the
classifier head (a new task's head keeps its fresh weights) and timm's absolute position embedding (resampled to the
model's patch grid, as timm does for pretrained weights). Reading files and runs: :mod:`ermoe.train.init_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_SHOWN = 6  # keys listed per report line


class WeightShapeError(ValueError):
    """A tensor of the weights has another shape than the model's tensor of the same name."""


@dataclass
class LoadReport:
    """What :func:`load_matching` did: loaded keys, the model's keys the file lacks, the file's keys the model
    lacks, heads skipped for their shape, position embeddings resampled."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line for what was loaded, one each for missing and unexpected keys (and skipped / resampled)."""
        def keys(names: list[str]) -> str:
            more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
            return ", ".join(names[:_SHOWN]) + more

        out = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for label, names in (("missing (kept as initialised)", self.missing),
                             ("unexpected (not used)", self.unexpected),
                             ("head skipped (another shape: a new head)", self.skipped_head),
                             ("position embedding resampled", self.resampled)):
            if names:
                out.append(f"  {label} {len(names)}: {keys(names)}")
        return out


def _head_keys(model: nn.Module) -> set[str]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


def _resample_pos_embed(model: nn.Module, value: Tensor) -> Tensor | None:
    """timm's absolute position embedding resampled to the model's patch grid; None where that does not apply."""
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if grid is None or getattr(model, "no_embed_class", False) or len(grid) != 2:
        return None
    from timm.layers import resample_abs_pos_embed
    prefix = getattr(model, "num_prefix_tokens", 1)
    return resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)


@torch.no_grad()
def load_matching(model: nn.Module, weights: dict[str, Tensor], source: str = "weights") -> LoadReport:
    """Load the tensors of ``weights`` whose names and shapes match ``model``'s state (module docstring)."""
    own = model.state_dict()
    heads = _head_keys(model)
    report = LoadReport(source)
    chosen: dict[str, Tensor] = {}
    for key, value in weights.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{source}: {key} holds NaN or inf: nothing was loaded")
        if key not in own:
            report.unexpected.append(key)
            continue
        want = own[key].shape
        if value.shape != want:
            if key in heads:
                report.skipped_head.append(key)
                continue
            if key == "pos_embed":
                resampled = _resample_pos_embed(model, value)
                if resampled is not None and resampled.shape == want:
                    chosen[key] = resampled
                    report.resampled.append(key)
                    continue
            raise WeightShapeError(f"{source}: {key} has shape {tuple(value.shape)}, the model's has {tuple(want)}")
        chosen[key] = value
    report.loaded = [k for k in chosen if k not in report.resampled]
    report.missing = [k for k in own if k not in chosen and k not in report.skipped_head]
    model.load_state_dict(chosen, strict=False)
    return report
