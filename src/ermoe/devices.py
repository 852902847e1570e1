"""Small device facts that every layer asks for, safe on any device type (``meta`` and fake tensors included)."""

from __future__ import annotations

import torch

# Device types autocast knows (torch.is_autocast_enabled raises for others, e.g. "meta").
_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device`` right now, or None where autocast is off (or the device
    type has none, e.g. ``meta``). ermoe's layers ask here (as ``devices.autocast_dtype``), so a harness can stand
    in for autocast where torch has none (tests/test_gpu_harness.py, on ``meta``)."""
    kind = device.type
    if kind not in _AUTOCAST_TYPES or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)
