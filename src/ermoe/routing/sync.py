"""Batch statistics of a router over a data-parallel group: every rank computes what one process would on the
whole global batch (docs/distributed.md, "Routing state").

A router, or a statistic module inside one, holds a :class:`SyncGroup` in ``sync_group`` (None: one process, the
sums are local). ``ermoe.distributed.sync_routing(model, group)`` sets it. A sum that carries a gradient is an
all-reduce whose backward is again an all-reduce of the gradients: with the data-parallel average of the gradients
that follows, a loss of global statistics gets exactly its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function


class SyncGroup:
    """A process group held by a module. A deep copy of the module (an EMA or best-model snapshot) shares it: a
    process group cannot be copied, and the copy runs on the same ranks."""

    def __init__(self, group) -> None:
        self.group = group

    def __deepcopy__(self, memo) -> "SyncGroup":
        return self

    def __reduce__(self):
        raise TypeError("a SyncGroup (a torch.distributed process group) cannot be pickled: save the state dict")


class _AllReduceSum(Function):
    """Sum over the ranks; the gradient of every rank's input is the sum of every rank's output gradient (each rank's
    input reaches every rank's output)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def global_sum(t: Tensor, sync: SyncGroup | None) -> Tensor:
    """``t`` summed over the group's ranks (autograd-aware); ``t`` itself when ``sync`` is None."""
    if sync is None:
        return t
    if t.requires_grad:
        return _AllReduceSum.apply(t, sync.group)
    out = t.detach().clone(memory_format=torch.contiguous_format)
    torch.distributed.all_reduce(out, group=sync.group)
    return out


def global_count(num: int, sync: SyncGroup | None, device: torch.device | None = None) -> int | Tensor:
    """How many rows (tokens) the whole group holds: ``num`` summed over the ranks.

    Without a group, ``num`` itself. With one, a 0-dim long tensor on ``device``: reading it on the host would stall
    a GPU's queue every step, so callers compute with it (:func:`at_least_one`, ``torch.where``) instead of
    branching on it.
    """
    if sync is None:
        return num
    # torch.full, not torch.tensor: a fill on the device, not a blocking copy from host memory
    return global_sum(torch.full((), num, dtype=torch.long, device=device), sync)


def at_least_one(num: int | Tensor) -> int | Tensor:
    """``max(num, 1)`` for a count from :func:`global_count`: the denominator of a mean that is 0 over no tokens."""
    return num.clamp_min(1) if isinstance(num, Tensor) else max(num, 1)


def update_weight(momentum: float, num: int | Tensor, like: Tensor) -> float | Tensor:
    """The lerp weight of a running statistic: ``momentum`` over a batch with tokens, 0 over none (a device tensor
    of ``like``'s dtype under a group, so the choice needs no host sync)."""
    if isinstance(num, Tensor):
        return momentum * (num > 0).to(like.dtype)
    return momentum if num > 0 else 0.0


def global_cat(t: Tensor, sync: SyncGroup | None) -> Tensor:
    """Every rank's rows of ``t`` (any number per rank, the same trailing shape) concatenated in rank order, without
    gradient: what one process holding the whole batch has. ``t`` itself when ``sync`` is None."""
    if sync is None:
        return t
    dist = torch.distributed
    world = dist.get_world_size(sync.group)
    rows = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(sizes, rows, group=sync.group)
    counts = [int(n) for n in sizes]
    padded = t.detach().new_zeros((max(counts), *t.shape[1:]))
    padded[:t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=sync.group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])
