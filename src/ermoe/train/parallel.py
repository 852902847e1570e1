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

from ..distributed import (ParallelGroups, expert_parameter_names, init_parallel, reduce_expert_grads, shard_experts, sync_batchnorm, sync_routing,
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


def _local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (an FSDP2 shard); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


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
    """One process (``groups`` None) or one rank of a data x expert parallel job; ``fsdp``: every weight but
    expert parallelism's experts sharded over all processes by FSDP2 (``shard: fsdp``) instead of replicated under
    DDP (the experts: this rank's rows, their gradients averaged over the replicas of its shard as under DDP)."""

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
        shard_experts(model, self.groups)
        if self.fsdp:  # every other weight sharded over all processes, each unit gathered for its forward
            sync_routing(model, self.groups)
            sync_batchnorm(model, self.groups)
            self.sharded_root = self._fully_shard(model)
            return self.sharded_root
        sync_routing(model, self.groups)
        sync_batchnorm(model, self.groups)
        return wrap_data_parallel(model, self.groups,
                                  find_unused_parameters=isinstance(model, RoutedModel) and model.may_skip_parameters)

    def gathered(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Under FSDP2 every weight gathered for the block (:func:`fsdp.gathered`); otherwise nothing."""
        return fsdp.gathered(model) if self.fsdp else contextlib.nullcontext()

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        """FSDP2 over every weight but expert parallelism's experts (this rank's rows; their gradients are reduced
        over their replicas by :meth:`after_backward`)."""
        experts = set(expert_parameter_names(model)) if self.sharded else set()
        return fsdp.shard(model, {p for n, p in model.named_parameters() if n in experts})

    def shard(self, model: nn.Module) -> None:
        """Cut a copy of the whole model as :meth:`prepare` cut the model (an EMA copy): to this rank's experts, and
        under FSDP2 sharded alike (its weights are then the same shards of the same tensors)."""
        if self.groups is not None:
            shard_experts(model, self.groups)
            if self.fsdp:
                self._fully_shard(model)

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
        # (FSDP2 reduce-scatters every gradient it shards: all of them, or all but expert parallelism's experts)
        if self.groups is not None and (self.sharded or not self.fsdp):
            reduce_expert_grads(model, self.groups)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """``clip_grad_norm_`` with the norm of the whole model's gradient: dense gradients are the same on every
        rank, the experts' norm is summed over their shards."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.fsdp and not self.sharded:  # sharded gradients: the norm of the whole one, every rank's shards summed
            return torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor()
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        # expert parallelism: the experts' squares summed over their group, FSDP2's shards over every rank (DDP's
        # dense gradients are whole on every rank)
        expert_names = set(expert_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        dense = [_local(p.grad) for n, p in named if n not in expert_names]
        experts = [p.grad for n, p in named if n in expert_names]
        def sq(grads: list[Tensor]) -> Tensor:
            return sum((g.detach().double().pow(2).sum() for g in grads),
                       torch.zeros((), dtype=torch.float64, device=params[0].device))

        expert_sq, dense_sq = sq(experts), sq(dense)
        dist.all_reduce(expert_sq, group=self.groups.ep)
        if self.fsdp:
            dist.all_reduce(dense_sq, group=self.groups.stats)
        norm = (dense_sq + expert_sq).sqrt()
        if math.isfinite(max_norm) and not self.fsdp:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(params[0].dtype))
        elif math.isfinite(max_norm):  # (torch's clip_grads_with_norm_ on FSDP2's local shards and the plain experts,
            coef = (max_norm / (norm.to(params[0].dtype) + 1e-6)).clamp(max=1.0)  # which one foreach cannot mix)
            torch._foreach_mul_([g.detach() for g in [*dense, *experts]], coef)
        return norm

    def all_finite(self, finite: bool) -> bool:
        """Whether every rank says so (a divergence stops every rank at the same step); a host flag, summed in host
        memory (the groups' gloo side)."""
        if self.groups is None or self.world_size == 1:
            return finite
        flag = torch.tensor(0.0 if finite else 1.0)
        dist.all_reduce(flag, group=self.groups.host)
        return float(flag) == 0.0

    def barrier(self) -> None:
        if self.groups is not None:
            dist.barrier(group=self.groups.stats)
