"""Sharded checkpoints (``checkpoint_format: sharded``; the default under ``shard: fsdp``): every rank writes the
tensors it holds through ``torch.distributed.checkpoint`` (DCP) and reads back only those its place in the job
needs, whatever the world size, expert-parallel size or sharding that wrote them. docs/distributed.md.

Layout: ``RUN/checkpoints/step_N/{shards/, state.pt, manifest.json}``. ``shards/`` is DCP's folder (``.metadata``
and each rank's ``__R_0.distcp``) of one flat dict: ``model/NAME`` (the state dict), ``optimizer/PARAM/KEY`` (AdamW's
moments and step, by parameter name) and ``ema/NAME``. ``state.pt`` holds the trainer's parts as a single-file
checkpoint does (:mod:`ermoe.train.checkpoint`), with :data:`IN_SHARDS` where a part's tensors are in ``shards/``;
the manifest holds every file's SHA-256. The directory is written under a hidden name and renamed into place by rank
0 once every rank's shards are on disk, so a crash leaves the previous checkpoint intact. All ranks must see one
filesystem (one machine, or a shared one).

FSDP2's tensors are DTensors already; under expert parallelism this rank's experts' rows are wrapped as DTensors
sharded over the expert-parallel group, so DCP knows where they sit in the whole tensor (replicas of a shard are
written once).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import expert_parameter_names
from .checkpoint import (EMA, IN_SHARDS, MODEL, OPTIMIZER, SHARDS, STATE, CheckpointError, begin_checkpoint,
                         commit_checkpoint, dcp_call, load_dcp, sharded_metadata)
from .fsdp import parameter_names
from .parallel import Parallel


# writing -----------------------------------------------------------------------------------------------------------
def _experts_as_dtensors(model: nn.Module, parallel: Parallel):
    """``(name, tensor) -> tensor``: this rank's rows of an expert tensor as a DTensor sharded (dim 0) over the
    expert-parallel group; anything else as it is."""
    if not parallel.sharded:
        return lambda name, t: t
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    experts = set(expert_parameter_names(model))
    meshes: dict[str, DeviceMesh] = {}

    def wrap(name: str, t: Tensor) -> Tensor:
        if name not in experts or t.dim() == 0:
            return t
        mesh = meshes.get(t.device.type)
        if mesh is None:
            mesh = meshes[t.device.type] = DeviceMesh.from_group(parallel.groups.ep, t.device.type)
        return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)  # (a view: a load fills t in place)
    return wrap


def shard_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None,
                  parallel: Parallel) -> dict[str, Tensor]:
    """Every tensor of a sharded checkpoint as this rank holds it (views of the live ones: a DCP load fills them in
    place). An optimizer without state yet gets it (zeros, step 1: what a load overwrites)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    wrap = _experts_as_dtensors(model, parallel)
    out = {MODEL + name: wrap(name, t) for name, t in model.state_dict().items()}
    for name, per_param in get_optimizer_state_dict(model, optimizer)["state"].items():
        for key, value in per_param.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"optimizer state {name}/{key} is a {type(value).__name__}, not a tensor: "
                                      "a sharded checkpoint holds tensors only (use checkpoint_format: single)")
            out[f"{OPTIMIZER}{name}/{key}"] = wrap(name, value)
    if ema is not None:
        out.update({EMA + name: wrap(name, t) for name, t in ema.state_dict().items()})
    return out


def optimizer_layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """What state.pt keeps of the optimizer when its moments are in the shards: its groups (one process's layout,
    by parameter index) and each index's parameter name."""
    return {"state": IN_SHARDS, "param_groups": optimizer.state_dict()["param_groups"],
            "param_names": parameter_names(optimizer, model)}


def save_sharded_checkpoint(ckpt_dir: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int,
                            parallel: Parallel) -> None:
    """Checkpoint ``step``: every rank's ``tensors`` through DCP, rank 0's ``state`` beside them (a collective)."""
    import torch.distributed.checkpoint as dcp

    tmp = Path(parallel.broadcast(str(begin_checkpoint(ckpt_dir, step)) if parallel.main else None))
    no_dist = not dist.is_initialized()
    try:
        with dcp_call(no_dist):
            dcp.save(tensors, checkpoint_id=tmp / SHARDS, no_dist=no_dist)
        if parallel.main:
            torch.save(state, tmp / STATE)
    except BaseException:
        if parallel.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if parallel.main:
        commit_checkpoint(ckpt_dir, step, tmp, keep, format="sharded")
    parallel.barrier()


# reading -----------------------------------------------------------------------------------------------------------
def _check_fits(ckpt: Path, targets: dict[str, Tensor], meta: dict[str, Any], prefix: str, what: str) -> None:
    want = {k for k in targets if k.startswith(prefix)}
    have = {k for k in meta if k.startswith(prefix)}
    if want != have:
        missing = sorted(k[len(prefix):] for k in want - have)[:5]
        extra = sorted(k[len(prefix):] for k in have - want)[:5]
        raise CheckpointError(f"the sharded checkpoint {ckpt} does not fit {what}: missing {missing}, "
                              f"unexpected {extra}")
    for key in sorted(want):
        if tuple(targets[key].shape) != tuple(meta[key].size):
            raise CheckpointError(f"the sharded checkpoint {ckpt} does not fit {what}: {key[len(prefix):]} is "
                                  f"{tuple(meta[key].size)} there, {tuple(targets[key].shape)} here")


def load_shards(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None,
                parallel: Parallel) -> None:
    """Fill ``model``, ``optimizer`` and ``ema`` (as this rank holds them: sharded, cut to its experts, or whole)
    from a sharded checkpoint written at any world size (a collective in a job). Refuses, naming the keys, a
    checkpoint of another model; nothing is loaded then."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    meta = sharded_metadata(ckpt)
    targets = shard_tensors(model, optimizer, ema, parallel)
    _check_fits(ckpt, targets, meta, MODEL, "the model")
    if ema is not None:
        _check_fits(ckpt, targets, meta, EMA, "the EMA weights")
    # the optimizer: parameters that had no state when it was saved (never a gradient) keep none
    optim_keys = {k for k in targets if k.startswith(OPTIMIZER)}
    targets = {k: t for k, t in targets.items() if k in meta or k not in optim_keys}
    _check_fits(ckpt, targets, meta, OPTIMIZER, "the optimizer")
    load_dcp(ckpt, targets, no_dist=not dist.is_initialized())

    experts = set(expert_parameter_names(model)) if parallel.sharded else set()

    def local(name: str, t: Tensor) -> Tensor:  # (an expert-parallel wrapper's rows; FSDP2's own DTensors stay)
        return t.to_local() if name in experts and isinstance(t, DTensor) else t

    for prefix, module in ((MODEL, model), (EMA, ema)):
        if module is not None:
            module.load_state_dict({k[len(prefix):]: local(k[len(prefix):], t) for k, t in targets.items()
                                    if k.startswith(prefix)})
    state: dict[str, dict[str, Tensor]] = {}
    for key, t in targets.items():
        if key.startswith(OPTIMIZER):
            name, what = key[len(OPTIMIZER):].rsplit("/", 1)
            state.setdefault(name, {})[what] = local(name, t)
    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})
