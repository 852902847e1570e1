"""The training loop's view of a distributed job (``torchrun --nproc_per_node=N -m ermoe train ...``):
which rows of each global batch this rank reads, how gradients, clipping, logs and checkpoints see every rank, and
what a single process does instead (nothing). docs/distributed.md.

Every rank builds the same model from the same seed and the same config, reads the same data and walks the same
epoch order; rank r trains on its ``B / W`` consecutive rows of each global batch of B (the task's
``train_batches``: held in memory, every rank prepares the global batch and keeps its rows; streamed, it reads only
its own). Rank 0 alone writes the run
directory (config, log, checkpoints, metrics); checkpoints hold the whole model and the whole optimizer (sharded
expert tensors gathered), so a run resumes on any world size and expert-parallel size. Evaluation runs the same
forwards on every rank (expert parallelism needs every rank in every exchange) and rank 0 writes what it measured.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn.parallel import DistributedDataParallel

from ..distributed import (ParallelGroups, expert_parameter_names, full_state_dict, init_parallel,
                           load_full_state_dict, reduce_expert_grads, shard_experts, sync_batchnorm, sync_routing,
                           wrap_data_parallel)
from ..models.protocol import RoutedModel
from . import fsdp
from .config import ConfigError, TrainConfig


def launched_world_size() -> int:
    """The world size torchrun gave this process (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher of torch.distributed's environment) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class _GatherRows(Function):
    """All ranks' equal-sized blocks of rows, concatenated in rank order; backward: the sum over ranks of the
    gradient of this rank's block (every rank computes the loss from every block)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, world: int, rank: int) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


class Parallel:
    """One process (``groups`` None) or one rank of a data x expert parallel job; ``fsdp``: the data-parallel side
    shards the weights with FSDP2 (``shard: fsdp``) instead of replicating them under DDP."""

    def __init__(self, groups: ParallelGroups | None = None, owns_process_group: bool = False,
                 fsdp: bool = False) -> None:
        self.groups, self.owns_process_group, self.fsdp = groups, owns_process_group, fsdp and groups is not None
        self.world_size = groups.world_size if groups else 1
        self.rank = groups.rank if groups else 0
        self.main = self.rank == 0
        self.sharded = bool(groups and groups.ep_size > 1)
        self.param_counts: dict[str, int] | None = None  # the whole model's, counted before sharding
        self.sharded_root: nn.Module | None = None  # the model FSDP2 sharded (shard: fsdp)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Parallel":
        """Join torchrun's job when launched by it (or when ``ep_size`` > 1 asks for one)."""
        world = launched_world_size()
        if world == 1 and not dist.is_initialized():
            if cfg.ep_size > 1:
                raise ConfigError(f"ep_size={cfg.ep_size} shards experts over that many processes: launch with "
                                  f"torchrun --nproc_per_node={cfg.ep_size} -m ermoe train ... (docs/distributed.md)")
            if cfg.shard == "fsdp" and not cfg.distributed:
                raise ConfigError("shard: fsdp shards the weights over the processes of a torchrun job: launch with "
                                  "torchrun --nproc_per_node=N -m ermoe train ... (docs/distributed.md)")
            if not cfg.distributed:
                return cls()
            if not launched_by_torchrun():
                raise ConfigError("distributed=true joins torchrun's process group: launch with torchrun "
                                  "--nproc_per_node=N -m ermoe train ... (this process has no RANK/MASTER_ADDR)")
        world = dist.get_world_size() if dist.is_initialized() else world
        if world % cfg.ep_size:
            raise ConfigError(f"ep_size={cfg.ep_size} must divide the world size {world}")
        if cfg.optim.batch_size % world:
            raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by the world size {world}: "
                              "each rank trains on an equal share of every global batch")
        owns = not dist.is_initialized()
        return cls(init_parallel(cfg.ep_size, timeout_s=cfg.dist_timeout_s), owns_process_group=owns,
                   fsdp=cfg.shard == "fsdp")

    def close(self) -> None:
        """Leave the job if this object joined it (a caller's own process group is the caller's to end)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False

    # setup --------------------------------------------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU when the job runs on CUDA (LOCAL_RANK), else ``device``. ``cuda:N`` in a job is this
        rank's GPU only: a number that is not LOCAL_RANK would put several ranks on one GPU."""
        if self.groups and device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device.index is not None and device.index != local:
                raise ConfigError(f"device={device}: under torchrun each process takes the GPU of its LOCAL_RANK "
                                  f"(this one: cuda:{local}); give device=cuda (or auto)")
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return device

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard the experts and sync the routing statistics of ``model`` (in place, before its optimizer is built);
        returns the module the training forward goes through (DDP over all but the experts, or the model)."""
        self.param_counts = {"total": sum(p.numel() for p in model.parameters()),
                             "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                             "active": model.active_parameters()}
        if self.groups is None:
            return model
        if self.fsdp:  # every weight sharded over the data-parallel processes, each unit gathered for its forward
            sync_routing(model, self.groups)
            sync_batchnorm(model, self.groups)
            self.sharded_root = fsdp.shard(model)
            return self.sharded_root
        shard_experts(model, self.groups)
        sync_routing(model, self.groups)
        sync_batchnorm(model, self.groups)
        return wrap_data_parallel(model, self.groups,
                                  find_unused_parameters=isinstance(model, RoutedModel) and model.may_skip_parameters)

    def gathered(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Under FSDP2 every weight gathered for the block (:func:`fsdp.gathered`); otherwise nothing."""
        return fsdp.gathered(model) if self.fsdp else contextlib.nullcontext()

    def shard(self, model: nn.Module) -> None:
        """Cut a copy of the whole model to this rank's experts, as :meth:`prepare` cut the model (an EMA copy)."""
        if self.groups is not None:
            shard_experts(model, self.groups)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.groups is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def lock(self, lock_factory) -> contextlib.AbstractContextManager:
        return lock_factory() if self.main else contextlib.nullcontext()

    # training -----------------------------------------------------------------------------------------------------
    def gather_output(self, output: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        """Every rank's batch outputs, in rank order, for a loss that couples the batch's examples (``Task.
        Objective.batch_coupled``): per-example tensors are gathered (this rank's share keeps its gradient, and receives the
        gradients every rank's copy of the loss sends it), 0-dim ones (a logit scale) are left as they are."""
        if self.groups is None:
            return output
        single = isinstance(output, Tensor)
        parts = tuple(_GatherRows.apply(o, self.groups.stats, self.world_size, self.rank) if o.dim() > 0 else o
                      for o in ((output,) if single else output))
        return parts[0] if single else parts

    def accumulating(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """The context of a micro-batch's backward: before the step's last one, DDP does not all-reduce the
        gradients (they accumulate locally; the last backward reduces their sum)."""
        if self.fsdp:  # FSDP2: the gradients' reduce-scatter waits for the step's last backward
            self.sharded_root.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or not isinstance(module, DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def sum_stats(self, sums: dict[str, Tensor], replicated: tuple[str, ...] = ()) -> dict[str, float]:
        """Sums over a log window (0-dim tensors on this rank's device: loss x examples, correct predictions, ...),
        summed over every rank on the device and read to the host in one transfer; ``replicated``: sums every rank
        computed over the whole global batch (from gathered outputs), counted once."""
        keys = sorted(sums)
        values = torch.stack([sums[k] for k in keys])
        if self.groups is not None:
            share = torch.tensor([self.world_size if k in replicated else 1 for k in keys], dtype=values.dtype,
                                 device=values.device)
            values = values / share
            dist.all_reduce(values, group=self.groups.stats)
        return dict(zip(keys, values.tolist()))

    def sum_tensor(self, t: Tensor) -> Tensor:
        """``t`` summed over every rank (a copy); ``t`` itself in one process."""
        if self.groups is None:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, group=self.groups.stats)
        return out

    def after_backward(self, model: nn.Module) -> None:
        if self.groups is not None and not self.fsdp:  # (FSDP2 reduce-scatters every gradient, the experts' too)
            reduce_expert_grads(model, self.groups)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """``clip_grad_norm_`` with the norm of the whole model's gradient: dense gradients are the same on every
        rank, the experts' norm is summed over their shards."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.fsdp:  # sharded gradients: the norm of the whole one, every rank's shards summed
            return torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor()
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        expert_names = set(expert_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        dense = [p.grad for n, p in named if n not in expert_names]
        experts = [p.grad for n, p in named if n in expert_names]
        def sq(grads: list[Tensor]) -> Tensor:
            return sum((g.detach().double().pow(2).sum() for g in grads),
                       torch.zeros((), dtype=torch.float64, device=params[0].device))

        expert_sq = sq(experts)
        dist.all_reduce(expert_sq, group=self.groups.ep)
        norm = (sq(dense) + expert_sq).sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(params[0].dtype))
        return norm

    def all_finite(self, finite: bool) -> bool:
        """Whether every rank says so (a divergence stops every rank at the same step); a host flag, summed in host
        memory (the groups' gloo side)."""
        if self.groups is None or self.world_size == 1:
            return finite
        flag = torch.tensor(0.0 if finite else 1.0)
        dist.all_reduce(flag, group=self.groups.host)
        return float(flag) == 0.0

    # checkpoints --------------------------------------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The whole model's state dict (gathered on every rank; rank 0 writes it; under FSDP2 rank 0 alone holds
        it, in CPU memory)."""
        if self.fsdp:
            return fsdp.full_model_state(model)
        return full_state_dict(model, self.groups) if self.sharded else model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Load a whole-model state dict into ``model``, cut to this rank's experts."""
        if self.sharded:
            load_full_state_dict(model, state, self.groups)
        else:
            model.load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
        """The optimizer's state dict as one process holding the whole model would have it: the expert parameters'
        moments gathered over the expert-parallel group (parameter indices are the same on every world size)."""
        if self.fsdp:
            return fsdp.full_optimizer_state(optimizer, model)
        state = optimizer.state_dict()
        if not self.sharded:
            return state
        for index, _ in self._expert_indices(optimizer, model):
            per_param = state["state"].get(index)
            if per_param is None:
                continue
            gathered = dict(per_param)  # (state_dict() hands out the optimizer's own per-parameter dicts)
            for key, value in per_param.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    parts = [torch.empty_like(value) for _ in range(self.groups.ep_size)]
                    dist.all_gather(parts, value.contiguous(), group=self.groups.ep)
                    gathered[key] = torch.cat(parts)
            state["state"][index] = gathered
        return state

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any]) -> None:
        """Load a whole-model optimizer state (one process's layout, from any world size) into this rank's
        optimizer: its experts' rows under expert parallelism, its shards under FSDP2."""
        if self.fsdp:
            fsdp.load_full_optimizer_state(optimizer, model, state)
        else:
            optimizer.load_state_dict(self.local_optimizer_state(state, optimizer, model))

    def local_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                              model: nn.Module) -> dict[str, Any]:
        """A whole-model optimizer state (from any world size) cut to this rank's experts."""
        if not self.sharded:
            return state
        params = {id(p): p for p in model.parameters()}
        for index, _ in self._expert_indices(optimizer, model):
            per_param = state["state"].get(index)
            if per_param is None:
                continue
            rows = params[id(self._param_at(optimizer, index))].shape[0]
            lo = self.groups.ep_rank * rows
            state["state"][index] = {k: v[lo:lo + rows].clone() if isinstance(v, Tensor) and v.dim() > 0 else v
                                     for k, v in per_param.items()}
        return state

    @staticmethod
    def _param_at(optimizer: torch.optim.Optimizer, index: int) -> Tensor:
        return [p for group in optimizer.param_groups for p in group["params"]][index]

    def _expert_indices(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[int, str]]:
        names = {id(p): n for n, p in model.named_parameters()}
        experts = set(expert_parameter_names(model))
        flat = [p for group in optimizer.param_groups for p in group["params"]]
        return [(i, names[id(p)]) for i, p in enumerate(flat) if names.get(id(p)) in experts]

    def barrier(self) -> None:
        if self.groups is not None:
            dist.barrier(group=self.groups.stats)
