"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``shard: fsdp``: weights, gradients and optimizer moments
sharded over the processes, each of the model's :meth:`~ermoe.models.RoutedModel.shard_units` (the ViT blocks) a
unit gathered for its own forward; beside expert parallelism the experts are left to it (this rank's rows, whole).
Checkpoints are sharded (:mod:`ermoe.train.shards`) or in one process's layout (the whole model, the optimizer
indexed by parameter order, gathered here): either resumes on any world size, sharded or not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..models.protocol import RoutedModel

_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: nn.Module, ignored: set[nn.Parameter] | None = None) -> nn.Module:
    """Shard ``model`` in place: its shard units first, then the rest as the root unit. ``ignored``: parameters
    left as they are (expert parallelism's experts: this rank's rows, their gradients reduced by the caller)."""
    for unit in model.shard_units() if isinstance(model, RoutedModel) else []:
        fully_shard(unit, ignored_params=ignored)
    return fully_shard(model, ignored_params=ignored)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every unit's weights gathered (and kept through forwards) for the block: the routing probes read experts'
    and bases' weights outside a forward, which sharded they are not."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, in CPU memory (a collective; the other ranks get nothing)."""
    return get_model_state_dict(model, options=_FULL_ON_RANK0)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole model's state dict (every rank holds it) into this rank's shards."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def parameter_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The name of each of the optimizer's parameters, in its order (the index one process's layout uses)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The whole optimizer state on rank 0 in one process's layout (by parameter index; FSDP2 gives it by name)."""
    full = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)
    if not full:  # (ranks other than 0 hold nothing)
        return {}
    index = {name: i for i, name in enumerate(parameter_names(optimizer, model))}
    return {"state": {index[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any]) -> None:
    """Load a whole optimizer state in one process's layout (every rank holds it) into this rank's shards."""
    names = parameter_names(optimizer, model)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
