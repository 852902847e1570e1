"""Activation checkpointing (``model.grad_checkpointing``): a block's activations are recomputed in the backward pass
instead of kept, trading one more forward of the block for its activation memory.

The recomputation runs the block's forward a second time, inside backward. Whatever that forward changes besides
its output would change twice a step: BatchNorm's running statistics, a router's load counts (loss-free bias). So
the block's buffers are restored after the recomputation (:func:`checkpointed`), and a step changes them once, as
without checkpointing. Random choices (dropout, V-MoE's noise) are replayed from the saved RNG state, so the
recomputed routing is the routing of the forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def checkpointed(module: nn.Module, *args: Any) -> Tensor:
    """``module(*args)`` with its activations recomputed in backward (non-reentrant ``torch.utils.checkpoint``);
    its buffers as the forward left them after the recomputation. Without gradients, a plain call."""
    if not torch.is_grad_enabled():
        return module(*args)
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(module)))


class Blocks(nn.Sequential):
    """A sequence of blocks (a ViT's ``blocks``) that checkpoints each block when ``checkpoint`` is set; the same
    children and state-dict keys as the ``nn.Sequential`` it replaces."""

    checkpoint: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.checkpoint:
            return super().forward(x)
        for block in self:
            x = checkpointed(block, x)
        return x


def checkpoint_blocks(blocks: nn.Module, enable: bool) -> Blocks:
    """Make ``blocks`` (an ``nn.Sequential``) a :class:`Blocks` in place and set whether it checkpoints."""
    if not isinstance(blocks, nn.Sequential):
        raise TypeError(f"expected the blocks as an nn.Sequential, got {type(blocks).__name__}")
    if not isinstance(blocks, Blocks):
        blocks.__class__ = Blocks
    blocks.checkpoint = enable
    return blocks
