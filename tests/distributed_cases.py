"""What the ranks of tests/test_distributed.py run (spawned processes import this module by name).

Every case builds the same float64 MoE layer from a seed on every rank and gives rank r its rows of one global batch
(``splits[r]`` tokens). The job shards the experts, syncs the routing state, wraps the rest in DDP, and takes two
SGD steps on ``loss_r = W / T * sum_{t in r} <out_t, g_t> + aux``, whose DDP average is the loss of one process on the
whole batch, ``1 / T * sum_t <out_t, g_t> + aux``. Each rank returns its outputs of both steps, the gradients of
the first step (expert gradients gathered to the whole bank) and the state after the second step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ermoe import MoE, after_step, aux_loss
from ermoe.distributed import (ParallelGroups, expert_parameter_names, full_state_dict, init_parallel,
                               load_full_state_dict, reduce_expert_grads, shard_experts, sync_routing,
                               wrap_data_parallel)

DIM, HIDDEN = 6, 5


def make_layer(case: dict[str, Any]) -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, HIDDEN, case["num_experts"], router=case["router"], top_k=case.get("top_k", 1),
                capacity_factor=case.get("capacity_factor"), router_kwargs=case.get("router_kwargs"),
                expert_bias=case.get("expert_bias")).double()
    for name, value in case.get("buffers", {}).items():
        layer.get_buffer(name).copy_(torch.as_tensor(value, dtype=torch.float64))
    return layer


def make_batch(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    total = sum(case["splits"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, total, DIM, generator=g, dtype=torch.float64)  # two steps
    target = torch.randn(2, total, DIM, generator=g, dtype=torch.float64)
    return x, target


def rows_of(rank: int, splits: list[int]) -> slice:
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def steps(model, layer: MoE, x, target, scale: float, lr: float = 0.1, reduce=None, groups=None) -> dict[str, Any]:
    """Two SGD steps; what each produced. ``model`` is what the forward goes through (DDP or the layer);
    ``groups``: row splits routed as separate groups (one process standing in for the ranks' per-batch decisions)."""
    out = {}
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        if groups is None:
            y = model(x[step])
        else:
            y = torch.cat([model(x[step, rows]) for rows in groups])
        loss = scale * (y * target[step]).sum() + aux_loss(layer)
        loss.backward()
        if reduce is not None:
            reduce()
        out[f"y{step}"] = y.detach().clone()
        out[f"aux{step}"] = float(aux_loss(layer).detach())
        if step == 0:
            out["grads"] = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                            for n, p in layer.named_parameters()}
        opt.step()
        after_step(layer)
    out["buffers"] = {n: b.detach().clone() for n, b in layer.named_buffers()}
    return out


def reference(case: dict[str, Any], per_rank_groups: bool = False) -> dict[str, Any]:
    """One process on the whole batch; ``per_rank_groups``: routing each rank's rows as its own group (capacity,
    expert choice: the per-batch decisions a distributed step takes per rank)."""
    layer = make_layer(case)
    x, target = make_batch(case)
    groups = [rows_of(r, case["splits"]) for r in range(len(case["splits"]))] if per_rank_groups else None
    out = steps(layer, layer, x, target, 1.0 / x.shape[1], groups=groups)
    out["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    return out


def run_case(groups: ParallelGroups, case: dict[str, Any]) -> dict[str, Any]:
    layer = make_layer(case)
    shard_experts(layer, groups)
    sync_routing(layer, groups)
    model = wrap_data_parallel(layer, groups)
    x, target = make_batch(case)
    mine = rows_of(groups.rank, case["splits"])
    scale = groups.world_size / x.shape[1]
    out = steps(model, layer, x[:, mine], target[:, mine], scale, reduce=lambda: reduce_expert_grads(layer, groups))
    for name in expert_parameter_names(layer):  # the whole bank's gradient, gathered like the weights (in one order:
        # a set's order differs between processes)
        grad = out["grads"][name]
        parts = [torch.empty_like(grad) for _ in range(groups.ep_size)]
        dist.all_gather(parts, grad, group=groups.ep) if groups.ep is not None else parts.__setitem__(0, grad)
        out["grads"][name] = torch.cat(parts)
    out["state"] = full_state_dict(layer, groups)
    return out


def ep_job(rank: int, world: int, ep_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = init_parallel(ep_size)
    return [run_case(groups, case) for case in cases]


def reshard_job(rank: int, world: int, ep_size: int, case: dict[str, Any], state: dict[str, torch.Tensor]
                ) -> dict[str, Any]:
    """Load a whole-model state into a sharded layer and gather it back; and this rank's forward on its rows."""
    groups = init_parallel(ep_size)
    layer = make_layer(case)
    shard_experts(layer, groups)
    load_full_state_dict(layer, state, groups)
    x, _ = make_batch(case)
    with torch.no_grad():
        y = layer.eval()(x[0, rows_of(rank, case["splits"])])
    return {"state": full_state_dict(layer, groups), "y": y}


def failing_job(rank: int, world: int) -> None:
    """Rank 1 raises before a collective that rank 0 waits in."""
    init_parallel(1, timeout_s=30)
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    dist.barrier()



# -- BatchNorm over the global batch --------------------------------------------------------------------------------

def bn_net() -> torch.nn.Module:
    """A float64 net with a BatchNorm of every rank (1d on a sequence, 2d, 3d) and one without running statistics."""
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Unflatten(2, (2, 2)),  # (B, 3, 4, 4) -> (B, 3, 2, 2, 4)
        nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4, momentum=None), nn.Flatten(2),  # (B, 4, 16)
        nn.BatchNorm1d(4, affine=False), nn.BatchNorm1d(4, track_running_stats=False), nn.Flatten(1),
    ).double()


def bn_batch(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = 1.5 + 2.0 * torch.randn(2, total, 2, 4, 4, generator=g, dtype=torch.float64)  # two steps
    return x, torch.randn(2, total, 64, generator=g, dtype=torch.float64)


def bn_steps(net, forward, x, target, scale: float) -> dict[str, Any]:
    """Two SGD steps on ``scale * <net(x), target>``; the outputs, the first gradients and the state after."""
    out: dict[str, Any] = {}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        y = forward(x[step])
        (scale * (y * target[step]).sum()).backward()
        out[f"y{step}"] = y.detach().clone()
        if step == 0:
            out["grads"] = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        opt.step()
    out["state"] = {k: v.clone() for k, v in net.state_dict().items()}
    return out


def bn_evaluate(net, x, out: dict[str, Any]) -> dict[str, Any]:
    """An eval forward on the whole first batch; then the running statistics recalibrated on the same whole batches
    (every rank runs them, as the trainer does)."""
    from ermoe.train.precise_bn import recalibrate_batchnorm
    out["eval"] = net.eval()(x[0]).detach()
    recalibrate_batchnorm(net.train(), [(x[0],), (x[1, :5],)])
    out["recalibrated"] = {k: v.clone() for k, v in net.state_dict().items()}
    return out


def bn_reference(splits: list[int]) -> dict[str, Any]:
    net = bn_net()
    x, target = bn_batch(sum(splits))
    return bn_evaluate(net, x, bn_steps(net, net, x, target, 1.0 / x.shape[1]))


def bn_job(rank: int, world: int, splits: list[int]) -> dict[str, Any]:
    """Data parallelism over a BatchNorm net: rank r trains on its rows of the global batch; then every rank
    recalibrates on the same whole batches (as the trainer does)."""
    from ermoe.distributed import GlobalBatchNorm, sync_batchnorm
    groups = init_parallel(1)
    net = bn_net()
    sync_batchnorm(net, groups)
    converted = sum(isinstance(m, GlobalBatchNorm) for m in net.modules())
    model = wrap_data_parallel(net, groups)
    x, target = bn_batch(sum(splits))
    mine = rows_of(rank, splits)
    out = bn_evaluate(net, x, bn_steps(net, model, x[:, mine], target[:, mine], world / x.shape[1]))
    out["converted"] = converted
    return out

# -- the training loop on several ranks ----------------------------------------------------------------------------

def tiny_digits(out_dir: str, **extra: Any) -> dict[str, Any]:
    """A seconds-long digits run, with random crops (drawn for the global batch, so a rank's share is augmented as
    the same rows in one process); ``extra``: config sections to merge in (``optim={"max_steps": 8}``)."""
    from ermoe.train.config import merge_settings

    return merge_settings({
        "out_dir": out_dir, "run_name": "run", "progress": False, "tensorboard": False, "log_every": 1,
        "probe_size": 32,
        "data": {"name": "digits", "train_limit": 512, "hflip": True, "crop_padding": 1},
        "model": {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                  "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all",
                          "router_kwargs": {"standardize": True}}},
        "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 3, "eval_batch_size": 128},
    }, extra)


def train_job(rank: int, world: int, overrides: dict[str, Any], resume: str | None = None) -> str:
    from ermoe.train import load_config, train
    from ermoe.train.config import merge_settings, config_from_dict, config_to_dict
    from ermoe.train.run import Run

    if resume is None:
        return str(train(load_config(None, overrides), quiet=True))
    cfg = config_from_dict(merge_settings(config_to_dict(Run(Path(resume)).read_config()), overrides))
    return str(train(cfg, resume=resume, quiet=True))


# -- host flags on a job whose backend takes no CPU tensors --------------------------------------------------------
def host_flags_job(rank: int, world: int) -> dict[str, Any]:
    """A plain NCCL job (its backend name faked on gloo): the groups get a gloo group for host flags beside it, and
    a rank's divergence flag reaches every rank through it."""
    from unittest import mock

    from ermoe.train.parallel import Parallel

    with mock.patch.object(dist, "get_backend", return_value="nccl"):
        groups = init_parallel(1)
    parallel = Parallel(groups)
    return {"separate": groups.host is not groups.stats, "all_finite": parallel.all_finite(rank == 0),
            "backend": dist.get_backend(groups.host)}


def autocast_exchange_job(rank: int, world: int) -> dict[str, Any]:
    """An expert-parallel layer under bf16 autocast: the dtypes its token exchanges send, forward and backward."""
    from unittest import mock

    import ermoe.distributed as ed

    groups = init_parallel(world)
    torch.manual_seed(0)
    layer = MoE(16, 32, 4, router="softmax_topk")
    shard_experts(layer, groups)
    sent = []
    exchange = ed._Exchange.apply

    def spy(x, *args):
        sent.append(x.dtype)
        return exchange(x, *args)

    with mock.patch.object(ed._Exchange, "apply", spy):
        x = torch.randn(10, 16, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()
    return {"sent": [str(d) for d in sent], "grad": str(x.grad.dtype)}
