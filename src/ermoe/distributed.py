"""Expert and data parallelism on ``torch.distributed`` (docs/distributed.md).

    groups = init_parallel(ep_size=2)           # after torchrun started the processes (or init_process_group)
    model = build_model(...)                   # the same seed on every rank: the same full model everywhere
    shard_experts(model, groups)               # each rank keeps E / ep_size experts of every MoE layer
    sync_routing(model, groups)                # routing statistics and auxiliary losses of the global batch
    sync_batchnorm(model, groups)              # BatchNorm statistics of the global batch (gloo and NCCL alike)
    ddp = wrap_data_parallel(model, groups)    # DDP over everything but the experts
    loss = task_loss(ddp(x)) + aux_loss(model); loss.backward()
    reduce_expert_grads(model, groups)         # expert gradients over the ranks that hold the same shard
    optimizer.step(); after_step(model)

Layout: ``world = dp_replicas x ep_size``; rank ``r`` is expert-parallel rank ``r % ep_size`` of the token-exchange
group ``r // ep_size`` (consecutive ranks exchange tokens, as on one node). Every rank reads its own data. Routers,
and every parameter outside the experts, are replicated on all ranks and averaged by DDP; experts are sharded over
the ``ep_size`` ranks of a group and averaged over the ``dp_replicas`` ranks holding the same shard.

Token exchange: each rank routes its own tokens, sorts them by expert (``ermoe.dispatch``), sends every other rank
the rows for that rank's experts with ``all_to_all_single`` (uneven splits, the counts exchanged first), runs its
local experts on what it received (the same sorted grouped matmul as one process) and sends the outputs back.
The exchange is differentiable (its backward is the reverse exchange), so expert gradients arrive where the
experts live. Per-batch decisions (capacity, expert choice's top-C, V-MoE's noise) are taken on each rank's tokens, as
GShard's groups; everything else equals one process on the whole batch.

Shape suffixes: S rows, F features, E experts, L local experts, P ranks of the expert-parallel group.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn import functional as F

from . import devices
from .dispatch import LocalDispatcher
from .moe import MoE, moe_layers
from .routing.sync import SyncGroup, global_sum

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of a data x expert parallel job (one per role, so their collectives never interleave).

    ``dp``: every rank (dense gradients, routing statistics); ``ep``: this rank's token-exchange group; ``expert_dp``:
    the ranks holding the same expert shard; ``host``: every rank, for CPU tensors (host flags and counts, no device
    sync): ``stats`` itself when the job's backend serves CPU tensors, else a gloo group beside it. Groups of one rank
    are None.
    """

    world_size: int
    rank: int
    ep_size: int
    dp: Any
    stats: Any
    ep: Any
    expert_dp: Any
    host: Any = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def replicas(self) -> int:
        """How many ranks hold each expert shard."""
        return self.world_size // self.ep_size


def default_backend() -> str:
    """The process group's backend: on a CUDA machine NCCL for CUDA tensors and gloo beside it for CPU tensors
    (``cpu:gloo,cuda:nccl``: a CPU tensor reaching a collective, e.g. a flag or a count, is served instead of
    rejected), else gloo."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(ep_size: int = 1, backend: str | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelGroups:
    """Join the job (``torch.distributed.init_process_group`` from torchrun's environment, unless already joined)
    and make its groups, each with the job's backend. ``backend``: None picks :func:`default_backend`.
    ``timeout_s`` bounds every collective: a rank that fails or stops brings its peers down with a timeout error
    instead of a hang."""
    if not dist.is_initialized():
        dist.init_process_group(backend or default_backend(), timeout=datetime.timedelta(seconds=timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size must be a positive divisor of the world size {world}, got {ep_size!r}")
    # new_group is collective: every rank creates every group, in the same order, and keeps its own.
    dp = dist.new_group(list(range(world))) if world > 1 else None
    stats = dist.new_group(list(range(world))) if world > 1 else None
    ep = expert_dp = None
    for start in range(0, world, ep_size):
        ranks = list(range(start, start + ep_size))
        group = dist.new_group(ranks) if ep_size > 1 else None
        if rank in ranks:
            ep = group
    for shard in range(ep_size):
        ranks = list(range(shard, world, ep_size))
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            expert_dp = group
    host = None
    if world > 1:  # CPU flags and counts: on a plain NCCL job (a caller's own group), gloo beside it
        host = stats if serves_cpu(dist.get_backend()) else dist.new_group(list(range(world)), backend="gloo")
    return ParallelGroups(world, rank, ep_size, dp, stats, ep, expert_dp, host)


def serves_cpu(backend: str) -> bool:
    """Whether a process group of this backend (``dist.get_backend()``: "gloo", "nccl", "cpu:gloo,cuda:nccl", ...)
    takes CPU tensors."""
    return any(part.startswith("cpu:") or part in ("gloo", "mpi", "ucc") for part in str(backend).lower().split(","))


class _Exchange(Function):
    """``all_to_all_single`` with uneven splits; its backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x_SF: Tensor, out_sizes: list[int], in_sizes: list[int], group) -> Tensor:
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        out = x_SF.new_empty((sum(out_sizes), *x_SF.shape[1:]))
        dist.all_to_all_single(out, x_SF.contiguous(), out_sizes, in_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_sizes, in_sizes = ctx.sizes
        return _Exchange.apply(grad.contiguous(), in_sizes, out_sizes, ctx.group), None, None, None


def _exchange(x_SF: Tensor, out_sizes: list[int], in_sizes: list[int], group) -> Tensor:
    """Differentiable token exchange: ``in_sizes[p]`` rows of ``x`` go to rank p, ``out_sizes[p]`` come from it."""
    return _Exchange.apply(x_SF, out_sizes, in_sizes, group)


class ExpertParallelDispatcher(LocalDispatcher):
    """Runs a layer's experts sharded over an expert-parallel group: rank p of P holds experts
    ``[p * L, (p + 1) * L)``, ``L = E / P`` (see the module docstring)."""

    def __init__(self, group, size: int, rank: int, num_experts: int) -> None:
        if num_experts % size:
            raise ValueError(f"{num_experts} experts cannot be sharded over {size} expert-parallel ranks "
                             "(num_experts must be divisible by ep_size)")
        self.sync, self.size, self.rank = SyncGroup(group), size, rank
        self.num_experts, self.local_experts = num_experts, num_experts // size

    def run_experts(self, experts, x_SF: Tensor, counts_E: Tensor) -> Tensor:
        size, local = self.size, self.local_experts
        group = self.sync.group
        send_PL = counts_E.view(size, local).contiguous()  # rows this rank sends to (rank p, its local expert l)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL, group=group)  # rows it receives from (rank p, for expert l)
        sizes = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()  # the splits live on the host: one sync
        send_sizes, recv_sizes = sizes
        dtype = devices.autocast_dtype(x_SF.device)
        if dtype is not None:  # the experts compute in the autocast dtype: send that (half the bytes of float32)
            x_SF = x_SF.to(dtype)
        x_recv = _exchange(x_SF, recv_sizes, send_sizes, group)
        # Received rows are ordered by source rank, then local expert: regroup them by local expert (stable, so
        # within an expert by source rank) for the grouped matmul, and undo that order before sending back.
        expert_R = torch.arange(local, device=x_SF.device).repeat(size).repeat_interleave(
            recv_PL.reshape(-1), output_size=x_recv.shape[0])
        order = torch.argsort(expert_R, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = experts(x_recv.index_select(0, order), recv_PL.sum(0))
        return _exchange(y.index_select(0, inverse), send_sizes, recv_sizes, group)


def _shardable(layer: MoE, name: str, ep_size: int) -> None:
    if layer.num_experts % ep_size:
        raise ValueError(f"MoE layer {name or 'moe'} has {layer.num_experts} experts, which cannot be sharded over "
                         f"ep_size={ep_size} ranks (num_experts must be divisible by ep_size)")
    if isinstance(layer.dispatcher, ExpertParallelDispatcher):
        raise ValueError(f"MoE layer {name or 'moe'} is already sharded")


def shard_experts(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Keep this rank's ``E / ep_size`` experts of every MoE layer (in place; call before building the optimizer,
    on a model built identically on every rank). With ``ep_size`` 1 the model is left as it is."""
    layers = moe_layers(model)
    if groups.ep_size == 1:
        return model
    if not layers:
        raise ValueError(f"ep_size={groups.ep_size}: the model has no ermoe.MoE layer whose experts could be "
                         "sharded (expert parallelism applies to MoE layers only)")
    for name, layer in layers:
        _shardable(layer, name, groups.ep_size)
    for _, layer in layers:
        local = layer.num_experts // groups.ep_size
        lo = groups.ep_rank * local
        experts = layer.experts
        for pname, param in list(experts.named_parameters(recurse=False)):
            setattr(experts, pname, nn.Parameter(param.detach()[lo:lo + local].clone(),
                                                 requires_grad=param.requires_grad))
        experts.num_experts = local
        layer.dispatcher = ExpertParallelDispatcher(groups.ep, groups.ep_size, groups.ep_rank, layer.num_experts)
    return model


def sync_routing(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Make every router's batch statistics (standardisation, whitening, second moments), loss-free bias loads and
    auxiliary losses those of the global batch, summed over all ranks (``ermoe.routing.sync``)."""
    if groups.world_size > 1:
        sync = SyncGroup(groups.stats)
        for module in model.modules():
            if hasattr(type(module), "sync_group"):
                module.sync_group = sync
    return model



class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, summed over the ranks of ``sync_group``
    (as ``torch.nn.SyncBatchNorm``, which runs on GPUs only; this one runs on gloo and NCCL alike): mean, then the
    variance around it (two passes), gradients through both. Same parameters, buffers and state-dict keys as the
    ``nn.BatchNorm{1,2,3}d`` it replaces (:func:`sync_batchnorm`); in eval mode, the running statistics, as ever.
    With ``sync_group`` None it is an ordinary BatchNorm of this process's batch."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, sync_group: SyncGroup | None = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.sync_group = sync_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (batch, channels, ...), got {x.dim()}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum  # _BatchNorm.forward's rule
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, its weight kept on the device (no host sync)
                factor = self.num_batches_tracked.reciprocal().to(self.running_mean.dtype)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        out_dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in float32, as cuDNN's BatchNorm keeps them
            x = x.float()
        local = x.numel() // x.shape[1]
        if self.sync_group is None:
            count: int | Tensor = local
            if local <= 1:
                raise ValueError(f"expected more than 1 value per channel when training, got input size "
                                 f"{tuple(x.shape)}")
        else:  # the global count as a device tensor (>= 2: every rank holds values); read by no host code
            if local < 1:
                raise ValueError(f"expected values per channel when training, got input size {tuple(x.shape)}")
            count = global_sum(torch.full((), local, dtype=x.dtype, device=x.device), self.sync_group)
        mean = global_sum(x.sum(dims), self.sync_group) / count
        centered = x - mean.view(shape)
        var = global_sum(centered.square().sum(dims), self.sync_group) / count
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(out_dtype)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def sync_batchnorm(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Replace every ``nn.BatchNorm{1,2,3}d`` of ``model`` (in place, before the optimizer is built) by a
    :class:`GlobalBatchNorm` over all ranks, with the same parameter and buffer tensors: training normalises by the
    global batch's statistics, so a data-parallel step equals one process on the whole batch and every rank keeps
    the same running statistics. Other BatchNorm subclasses (a fused BatchNorm + activation) keep their per-rank
    statistics, with a warning. Returns the model (a BatchNorm given as the model itself comes back replaced)."""
    if groups.world_size == 1:
        return model
    sync = SyncGroup(groups.stats)
    others: list[str] = []

    def convert(module: nn.Module, name: str) -> nn.Module:
        if type(module) in _BATCHNORMS:
            new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, sync)
            new.training = module.training
            for key in ("weight", "bias"):
                if getattr(module, key) is not None:
                    setattr(new, key, getattr(module, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(module, key) is not None:
                    new.register_buffer(key, getattr(module, key))
            return new
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
            others.append(f"{name or 'model'} ({type(module).__name__})")
        for child_name, child in module.named_children():
            setattr(module, child_name, convert(child, f"{name}.{child_name}" if name else child_name))
        return module

    model = convert(model, "")
    if others:
        warnings.warn(f"sync_batchnorm: {', '.join(others)} keep BatchNorm statistics of each rank's share of the "
                      "batch (only nn.BatchNorm1d/2d/3d are replaced)", stacklevel=2)
    return model

def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the experts' parameters (sharded under expert parallelism)."""
    names = []
    for layer_name, layer in moe_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        names += [prefix + n for n, _ in layer.experts.named_parameters(recurse=False)]
    return names


def wrap_data_parallel(model: nn.Module, groups: ParallelGroups, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel`` over every parameter but the experts (those are reduced by
    :func:`reduce_expert_grads`); buffers are synced once, at wrapping, not before every forward (the routing
    statistics are kept identical by :func:`sync_routing`). A single process gets the model back unwrapped."""
    if groups.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    ddp_kwargs.setdefault("forward_sync_buffers", False)
    return DistributedDataParallel(model, process_group=groups.dp, **ddp_kwargs)


def reduce_expert_grads(model: nn.Module, groups: ParallelGroups) -> None:
    """After backward: each expert gradient summed over the ranks holding the same shard and divided by the world
    size, as DDP averages the others (a rank's local expert gradient already holds its whole exchange group's
    share). An expert that got no token has a zero gradient, never a missing one, so every rank reduces the same
    buffer and an optimizer step treats the shard alike everywhere. A layer that ran on no rank this step (a phase
    in which a branch is skipped) keeps no gradient, as in one process, so the optimizer skips it (its Adam step
    count and weight decay do not move)."""
    if groups.world_size == 1:
        return
    names = expert_parameter_names(model)
    wanted = set(names)
    params = [p for n, p in model.named_parameters() if n in wanted and p.requires_grad]
    if not params:
        return
    # Which parameters got a gradient on any rank: a host fact of every rank, summed in host memory (no device sync)
    ran = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(ran, group=groups.host)
    params = [p for p, n in zip(params, ran.tolist()) if n]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if groups.expert_dp is not None:
        dist.all_reduce(flat, group=groups.expert_dp)
    flat /= groups.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def full_state_dict(model: nn.Module, groups: ParallelGroups, only: set[str] | None = None) -> dict[str, Tensor]:
    """The state dict of the whole model on every rank: sharded expert tensors gathered over the expert-parallel
    group, in expert order (what one process would hold; any world size can load it). ``only``: these entries."""
    state = model.state_dict()
    if only is not None:
        state = {name: t for name, t in state.items() if name in only}
    if groups.ep_size == 1:
        return state
    out = {}
    expert_names = set(expert_parameter_names(model))
    for name, tensor in state.items():
        if name in expert_names:
            parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.ep)
            tensor = torch.cat(parts)
        out[name] = tensor
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], groups: ParallelGroups) -> None:
    """Load a whole-model state dict (from :func:`full_state_dict` or one process) into a sharded model: each
    rank takes its experts' rows."""
    model.load_state_dict(local_experts(model, state, groups))


def local_experts(model: nn.Module, state: dict[str, Tensor], groups: ParallelGroups) -> dict[str, Tensor]:
    """A whole-model state dict with each expert tensor cut to this rank's rows (``model``: sharded by
    :func:`shard_experts`)."""
    local = {}
    expert_names = set(expert_parameter_names(model))
    own = model.state_dict()
    for name, tensor in state.items():
        if name in expert_names and name in own:
            rows = own[name].shape[0]
            if tensor.shape[0] != rows * groups.ep_size:
                raise ValueError(f"{name}: the state holds {tensor.shape[0]} experts, the model "
                                 f"{rows} x ep_size {groups.ep_size}")
            tensor = tensor[groups.ep_rank * rows:(groups.ep_rank + 1) * rows]
        local[name] = tensor
    return local


# -- running a function on N local processes (tests, benchmarks) --------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, timeout_s: float,
                  result_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    except BaseException:
        import traceback
        (Path(result_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes joined with gloo on 127.0.0.1 and
    return what each returned (tensors and plain data). ``fn`` must be importable (a module-level function). A rank
    that raises brings the others down and the error is raised here; a job still running after ``timeout_s``
    (collectives time out after it too) is killed and reported as a hang."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    import time

    name = getattr(fn, "__name__", fn)
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_local_worker, args=(fn, world_size, free_port(), timeout_s, result_dir, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = timeout_s + 60.0  # the collectives' own timeout first, then this
        start = time.monotonic()
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() - start > deadline:
                    raise TimeoutError(f"{name} on {world_size} ranks did not finish within {deadline:.0f} s (a hang)")
        except ProcessException as err:
            # A failing rank takes its peers down with connection errors of their own; which one the spawn reports
            # first is a race. Report every rank's error, the root cause among them.
            failed = sorted((p.stat().st_mtime, int(p.stem[4:]), p) for p in Path(result_dir).glob("rank*.err"))
            errors = [f"rank {r}: {p.read_text().strip().splitlines()[-1]}" for _, r, p in failed]  # first first
            raise RuntimeError(f"{name} failed on {world_size} ranks: " + ("; ".join(errors) or str(err))) from err
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(result_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
