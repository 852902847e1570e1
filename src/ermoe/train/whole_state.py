"""A job's model and optimizer as one process holding the whole model has them (what a single-file checkpoint
holds, :mod:`ermoe.train.checkpoint`), gathered from every rank's part, and loaded back into any job: expert
parallelism's rows gathered over the expert-parallel group, FSDP2's shards on rank 0 (in CPU memory). Parameter
indices are the same on every world size, so the optimizer's one-process layout is too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import expert_parameter_names, full_state_dict, local_experts
from . import fsdp
from .parallel import Parallel


def model_state(parallel: Parallel, model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict (gathered on every rank; rank 0 writes it; under FSDP2 rank 0 alone holds
    it, in CPU memory)."""
    if parallel.fsdp:
        full = fsdp.full_model_state(model)
        if parallel.sharded:  # (FSDP2 leaves the experts alone: this rank's rows, gathered over their group)
            experts = set(expert_parameter_names(model))
            gathered = full_state_dict(model, parallel.groups, only=experts)
            full = {n: gathered[n].cpu() if n in experts else t for n, t in full.items()} if full else full
        return full
    return full_state_dict(model, parallel.groups) if parallel.sharded else model.state_dict()


def load_model_state(parallel: Parallel, model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a whole-model state dict into ``model``, cut to this rank's experts (and shards under FSDP2)."""
    if parallel.sharded:
        state = local_experts(model, state, parallel.groups)
    if parallel.fsdp:
        fsdp.load_full_model_state(model, state)
    else:
        model.load_state_dict(state)


def optimizer_state(parallel: Parallel, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's state dict as one process holding the whole model would have it: the expert parameters'
    moments gathered over the expert-parallel group (parameter indices are the same on every world size)."""
    if parallel.fsdp:
        full = fsdp.full_optimizer_state(optimizer, model)
        if parallel.sharded:  # the experts' moments (this rank's rows under FSDP2 too), gathered over their group
            experts = _gathered_expert_moments(parallel, optimizer, optimizer.state_dict(), model)
            if full:
                full["state"].update(experts)
        return full
    state = optimizer.state_dict()
    if not parallel.sharded:
        return state
    state["state"].update(_gathered_expert_moments(parallel, optimizer, state, model))
    return state


def _gathered_expert_moments(parallel: Parallel, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                             model: nn.Module) -> dict[int, dict[str, Any]]:
    """The expert parameters' moments in ``state`` (this rank's rows), gathered over the expert-parallel group
    (a collective): ``{index: per-parameter state}``."""
    out = {}
    for index, _ in _expert_indices(optimizer, model):
        per_param = state["state"].get(index)
        if per_param is None:
            continue
        gathered = dict(per_param)  # (state_dict() hands out the optimizer's own per-parameter dicts)
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                parts = [torch.empty_like(value) for _ in range(parallel.groups.ep_size)]
                dist.all_gather(parts, value.contiguous(), group=parallel.groups.ep)
                gathered[key] = torch.cat(parts).cpu() if parallel.fsdp else torch.cat(parts)
        out[index] = gathered
    return out


def load_optimizer_state(parallel: Parallel, optimizer: torch.optim.Optimizer, model: nn.Module,
                         state: dict[str, Any]) -> None:
    """Load a whole-model optimizer state (one process's layout, from any world size) into this rank's
    optimizer: its experts' rows under expert parallelism, its shards under FSDP2."""
    if parallel.fsdp:
        fsdp.load_full_optimizer_state(optimizer, model, local_optimizer_state(parallel, state, optimizer, model))
    else:
        optimizer.load_state_dict(local_optimizer_state(parallel, state, optimizer, model))


def local_optimizer_state(parallel: Parallel, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                          model: nn.Module) -> dict[str, Any]:
    """A whole-model optimizer state (from any world size) cut to this rank's experts."""
    if not parallel.sharded:
        return state
    params = {id(p): p for p in model.parameters()}
    for index, _ in _expert_indices(optimizer, model):
        per_param = state["state"].get(index)
        if per_param is None:
            continue
        rows = params[id(_param_at(optimizer, index))].shape[0]
        lo = parallel.groups.ep_rank * rows
        state["state"][index] = {k: v[lo:lo + rows].clone() if isinstance(v, Tensor) and v.dim() > 0 else v
                                 for k, v in per_param.items()}
    return state


def _param_at(optimizer: torch.optim.Optimizer, index: int) -> Tensor:
    return [p for group in optimizer.param_groups for p in group["params"]][index]


def _expert_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[int, str]]:
    """(index, name) of the optimizer's expert parameters."""
    experts = set(expert_parameter_names(model))
    return [(i, name) for i, name in enumerate(fsdp.parameter_names(optimizer, model)) if name in experts]
