"""The MoE layer (router + dispatch + experts) and the model-level helpers that collect from every MoE layer.

    layer = MoE(dim=384, hidden_dim=1536, num_experts=8, router="ermoe", top_k=1)
    y = layer(x)                    # (..., dim) -> (..., dim): a drop-in for an MLP
    layer.last_routing              # RoutingInfo of the last forward (detached)
    aux_loss(model)                 # weighted sum of every MoE layer's auxiliary losses (0-dim tensor)
    routing_stats(model)            # per layer: tokens per expert, load CV, max/mean, entropy, Gini, drop rate
    after_step(model)               # after optimizer.step(): retract bases, update loss-free biases, ...

Shape suffixes: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from . import devices
from .dispatch import LocalDispatcher, TokenChoicePlan, recomputed_dispatch
from .experts import EigenExperts, MLPExperts
from .routing import Router, RoutingInfo, create_router
from .routing.base import graph_free_state
from .routing.stats import load_summary


class NonFiniteInputError(ValueError):
    """An MoE layer received NaN or inf: usually a diverging model upstream, not bad data."""


class MoE(nn.Module):
    """Sparse Mixture-of-Experts layer.

    Args:
        dim: model dimension D (input and output width).
        hidden_dim: each expert's hidden width H.
        num_experts: E.
        router: a name from ``ermoe.list_routers()`` or a ``Router`` instance.
        top_k: experts per token (for expert choice: the average, which sets its capacity).
        capacity_factor: None: the router's default (dropless except ``vmoe``, whose default is 1.05); a number:
            each expert computes at most ``ceil(capacity_factor * T * k / E)`` assignments, the rest are dropped.
            ``float("inf")`` forces dropless.
        learn_alpha: multiply the output by a learned scalar alpha (init 1). None: as the router's paper does
            (``Router.learn_alpha``; EMoE: ``h <- h + alpha * sum_k p_k Expert_k(h)``), i.e. on for ``emoe`` only,
            given by name or as an instance.
        act_layer, expert_bias: the experts' activation and whether their linear maps have biases (None: as the
            papers: no bias for MLP experts, biases c_e and d_e for ERMoE's eigen experts).
        router_kwargs: keyword arguments of the router (see docs/routers.md).
        validate: scan CPU inputs for NaN/inf on every call (shape and dtype are always checked); off saves the scan.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        router: str | Router = "ermoe",
        top_k: int = 1,
        *,
        capacity_factor: float | None = None,
        learn_alpha: bool | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        expert_bias: bool | None = None,
        router_kwargs: dict[str, Any] | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be > 0 or None, got {capacity_factor!r}")
        if isinstance(router, str):
            self.router_name = router
            router = create_router(router, dim, num_experts, top_k, **(router_kwargs or {}))
        elif isinstance(router, Router):
            if router_kwargs:
                raise ValueError("MoE: router_kwargs only apply when the router is given by name")
            if (router.dim, router.num_experts, router.top_k) != (dim, num_experts, top_k):
                raise ValueError(f"MoE: router built for dim={router.dim}, num_experts={router.num_experts}, "
                                 f"top_k={router.top_k}; layer has {dim}, {num_experts}, {top_k}")
            self.router_name = type(router).__name__
        else:
            raise ValueError(f"MoE: router must be a name or a Router, got {type(router).__name__}")
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.router = router
        if router.expert_input_dim is not None:
            self.experts: nn.Module = EigenExperts(num_experts, router.expert_input_dim, hidden_dim, dim, act_layer,
                                                   bias=True if expert_bias is None else expert_bias)
        else:
            self.experts = MLPExperts(num_experts, dim, hidden_dim, act_layer, bias=bool(expert_bias))
        if capacity_factor is not None and not router.layer_capacity:
            raise ValueError(f"MoE: capacity_factor does not apply to {self.router_name!r}, which sets its own "
                             "capacity (give it as router_kwargs={'capacity_factor': ...})")
        if capacity_factor is None:
            capacity_factor = router.capacity_factor
        self.capacity_factor = None if capacity_factor == float("inf") else capacity_factor
        if learn_alpha is None:
            learn_alpha = router.learn_alpha
        self.alpha = nn.Parameter(torch.ones(())) if learn_alpha else None
        self.dispatcher = LocalDispatcher()
        self.validate = validate
        self.last_routing: RoutingInfo | None = None
        self._aux_loss: Tensor | None = None

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"MoE expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"MoE expects a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects input of shape (..., {self.dim}), got {tuple(x.shape)}")
        if context is not None:
            if not self.router.accepts_context:
                raise ValueError(f"router {self.router_name!r} takes no context tensor")
            if context.shape != x.shape:
                raise ValueError(f"context must have the input's shape {tuple(x.shape)}, got {tuple(context.shape)}")
        # The NaN scan reads a flag back to the host: on CPU that is free, on a GPU a sync per call, so CPU only;
        # not in compiled code either (a graph break per layer; optim.compile warns that it is off)
        if self.validate and x.device.type == "cpu" and not torch.compiler.is_compiling() and \
                not torch.isfinite(x).all():
            raise NonFiniteInputError("MoE input contains NaN or inf")

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(x, context)
        x_TD = x.reshape(-1, self.dim)
        context_TD = None if context is None else context.reshape(-1, self.dim)
        dtype = self.experts.w2.dtype
        if x_TD.dtype != dtype and devices.autocast_dtype(x_TD.device) is None:
            # Input of another float dtype than the layer's (e.g. bf16 into a float32 layer, outside autocast): the
            # layer computes in its own dtype, the output comes back in the input's.
            x_TD = x_TD.to(dtype)
            context_TD = None if context_TD is None else context_TD.to(dtype)
        route = self.router(x_TD, context_TD)
        num_tokens = x_TD.shape[0]
        plan = self.dispatcher.plan(route, num_tokens, self.capacity_factor, self.top_k, self.num_experts)
        if route.expert_choice or route.expert_inputs_TKR is None:
            source = x_TD
        else:  # ERMoE: each assignment's coordinates in its expert's basis
            source = route.expert_inputs_TKR.reshape(-1, self.router.expert_input_dim)
        x_SF = plan.dispatch(source)
        # The experts' input is not kept for backward but gathered again from the layer's input (local dispatch of
        # the tokens themselves: an exchanged or projected input would have to be kept instead). Under autocast the
        # experts save the input in the autocast dtype: cast here, so that the copy saved is the one recomputed
        recompute = type(self.dispatcher) is LocalDispatcher and source is x_TD
        cast = devices.autocast_dtype(x_SF.device) if recompute else None
        if cast is not None:
            x_SF = x_SF.to(cast)
        with recomputed_dispatch(x_SF, plan, source, cast) if recompute else contextlib.nullcontext():
            y_SD = self.dispatcher.run_experts(self.experts, x_SF, plan.counts_E)
        out_TD = plan.combine(y_SD, route.gates_EC if route.expert_choice else route.gates_TK)
        if self.alpha is not None:
            out_TD = self.alpha * out_TD
        self._aux_loss = sum(route.aux_losses.values()) if route.aux_losses else None
        self.last_routing = _routing_info(route, plan, num_tokens, self.top_k)
        return out_TD.to(x.dtype).view(x.shape)

    @property
    def sharded(self) -> bool:
        """Whether this process holds only some of the experts (expert parallelism, ``ermoe.distributed``)."""
        return self.experts.num_experts != self.num_experts

    def __getstate__(self) -> dict:
        return graph_free_state(self)  # the last forward's auxiliary loss holds its graph: a copy does not take it

    def aux_loss(self) -> Tensor | None:
        """Weighted auxiliary losses of the last forward (with their graph), or None."""
        return self._aux_loss

    def after_step(self) -> None:
        self.router.after_step()
        self.experts.clear_casts()  # the weights moved: their autocast copies are stale

    @torch.no_grad()
    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert's output on every token, ``(E, T, D)``, ungated (for homogeneity diagnostics)."""
        if self.sharded:
            raise ValueError("expert_outputs needs every expert in this process: the layer's experts are sharded "
                             "(expert parallelism); load ermoe.distributed.full_state_dict into an unsharded model")
        x_TD = x.reshape(-1, self.dim)
        num_tokens, num_experts = x_TD.shape[0], self.num_experts
        project = getattr(self.router, "project", None)
        if self.router.expert_input_dim is not None and project is not None:
            source = project(x_TD).transpose(0, 1).reshape(num_experts * num_tokens, -1)
        else:
            source = x_TD.repeat(num_experts, 1)
        counts_E = torch.full((num_experts,), num_tokens, dtype=torch.long, device=x_TD.device)
        return self.experts(source.to(x_TD.dtype), counts_E).view(num_experts, num_tokens, -1)

    @torch.no_grad()
    def init_from_features(self, features: Tensor) -> None:
        """Data-dependent initialisation of the router (PCA bases of ``emoe``/``ermoe``) from sample inputs."""
        self.router.init_from_features(features.reshape(-1, self.dim))

    def extra_repr(self) -> str:
        return (f"router={self.router_name!r}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}")


def _routing_info(route, plan, num_tokens: int, top_k: int) -> RoutingInfo:
    aux = {name: loss.detach() for name, loss in route.aux_losses.items()}
    if isinstance(plan, TokenChoicePlan):
        expert_idx = route.topk_idx_TK
        if plan.num_dropped:
            expert_idx = expert_idx.masked_fill(plan.dropped_TK(), -1)
        return RoutingInfo(num_tokens=num_tokens, expert_idx=expert_idx.detach(), gates=route.gates_TK.detach(),
                           probs=route.probs_TE.detach(), tokens_per_expert=plan.counts_E.detach(),
                           assigned_per_expert=plan.assigned_E.detach(), aux_losses=aux, dropped=plan.num_dropped,
                           assignments=num_tokens * top_k, choice="token")
    return RoutingInfo(num_tokens=num_tokens, expert_idx=route.token_idx_EC.detach(), gates=route.gates_EC.detach(),
                       probs=route.probs_TE.detach(), tokens_per_expert=plan.counts_E.detach(),
                       assigned_per_expert=plan.assigned_E.detach(), aux_losses=aux, dropped=0,
                       assignments=plan.num_kept, choice="expert")


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of a model with its qualified name (the model itself if it is one: name '')."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every MoE layer's weighted auxiliary losses from the last forward; a 0-dim zero if there are none."""
    total: Tensor | None = None
    for _, layer in moe_layers(model):
        loss = layer.aux_loss()
        if loss is not None:
            total = loss if total is None else total + loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def routing_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per MoE layer (by name) the last forward's load: tokens per expert, CV, max/mean, entropy, Gini, drop rate."""
    stats = {}
    for name, layer in moe_layers(model):
        info = layer.last_routing
        if info is None:
            continue
        counts = info.tokens_per_expert
        stats[name or "moe"] = {"tokens_per_expert": counts.tolist(), **load_summary(counts),
                                "drop_rate": info.drop_rate, "num_tokens": info.num_tokens,
                                **{name: float(loss) for name, loss in info.aux_losses.items()}}
    return stats


def after_step(model: nn.Module) -> None:
    """Call after ``optimizer.step()``: each router's non-gradient updates (QR retraction, loss-free bias, ...)."""
    for _, layer in moe_layers(model):
        layer.after_step()
