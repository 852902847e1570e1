"""Token permutation between the routed tokens and the experts.

A *plan* turns a routing decision into expert-contiguous rows ("slots") and back:

    x_SD = plan.dispatch(x)            rows grouped by expert, expert e owning plan.counts_E[e] consecutive rows
    y_SD = experts(x_SD, plan.counts_E)
    out_TD = plan.combine(y_SD, gates) gate-weighted sum of each token's expert outputs, zeros where dropped

Token choice (:class:`TokenChoicePlan`): dropless by default, one stable sort of the T*K assignments by expert.
With a capacity, each expert keeps its first C assignments in priority order (all first choices before second
choices; within a choice, token order, or descending gate with V-MoE's Batch Prioritized Routing); dropped
assignments are sorted to the end and never computed. Forward and backward of both directions are row gathers
(the backward of a permutation is the inverse permutation), which is what keeps dispatch cheap.

Expert choice (:class:`ExpertChoicePlan`): the router already grouped the rows by expert.

The expert-parallel dispatcher (:mod:`ermoe.distributed`) slots in between ``dispatch`` and the experts (an
all-to-all of ``x_SD`` by ``counts_E``) and again before ``combine``; routers and experts do not change.

Shape suffixes: T tokens, D features, E experts, K selections per token, A = T*K assignments, S kept slots.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor
from torch.autograd import Function

from .routing.base import RouterOutput, count_per_expert


class _GatherSlots(Function):
    """``src[rows]`` where ``rows = perm[:S] // repeat``; backward gathers through the inverse permutation."""

    @staticmethod
    def forward(ctx, src: Tensor, perm_S: Tensor, inv_perm_A: Tensor, repeat: int) -> Tensor:
        ctx.save_for_backward(inv_perm_A)
        ctx.repeat, ctx.num_src = repeat, src.shape[0]
        rows = perm_S // repeat if repeat > 1 else perm_S
        return src.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad_SF: Tensor):
        (inv_perm_A,) = ctx.saved_tensors
        grad_AF = _pad_rows(grad_SF, inv_perm_A.numel()).index_select(0, inv_perm_A)
        if ctx.repeat > 1:
            grad_AF = grad_AF.view(ctx.num_src, ctx.repeat, grad_AF.shape[-1]).sum(dim=1)
        return grad_AF, None, None, None


class _ScatterSlots(Function):
    """Slots back to assignment order, zero rows for dropped assignments; backward is the forward gather."""

    @staticmethod
    def forward(ctx, y_SF: Tensor, perm_S: Tensor, inv_perm_A: Tensor) -> Tensor:
        ctx.save_for_backward(perm_S)
        return _pad_rows(y_SF, inv_perm_A.numel()).index_select(0, inv_perm_A)

    @staticmethod
    def backward(ctx, grad_AF: Tensor):
        (perm_S,) = ctx.saved_tensors
        return grad_AF.index_select(0, perm_S), None, None


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """``ceil(capacity_factor * T * K / E)``: the most assignments one expert computes."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


class TokenChoicePlan:
    """Dispatch plan for token-choice routing; see the module docstring."""

    def __init__(self, topk_idx_TK: Tensor, num_experts: int, keep_TK: Tensor | None = None,
                 capacity: int | None = None, priority_TK: Tensor | None = None) -> None:
        num_tokens, top_k = topk_idx_TK.shape
        self.num_tokens, self.top_k, self.num_experts = num_tokens, top_k, num_experts
        num_assign = num_tokens * top_k
        device = topk_idx_TK.device
        expert_A = topk_idx_TK.reshape(-1)
        self.assigned_E = count_per_expert(expert_A, num_experts)
        if keep_TK is not None:  # selections the router itself dropped go to bucket E (never computed)
            expert_A = torch.where(keep_TK.reshape(-1), expert_A, num_experts)
        if capacity is None:
            perm = torch.argsort(expert_A, stable=True)
            bucket_A = expert_A
        else:
            perm, bucket_A = self._capacity_order(expert_A, capacity, priority_TK)
        counts = count_per_expert(bucket_A, num_experts + 1)
        self.counts_E = counts[:num_experts]
        # Drops need the kept count on the host (to slice the permutation); dropless routing needs no sync.
        self.num_dropped = int(counts[num_experts]) if (capacity is not None or keep_TK is not None) else 0
        self.num_kept = num_assign - self.num_dropped
        self.perm_S = perm[: self.num_kept]
        self.inv_perm_A = torch.empty_like(perm)
        self.inv_perm_A[perm] = torch.arange(num_assign, device=device)

    def _capacity_order(self, expert_A: Tensor, capacity: int, priority_TK: Tensor | None) -> tuple[Tensor, Tensor]:
        num_tokens, top_k, num_experts = self.num_tokens, self.top_k, self.num_experts
        device = expert_A.device
        # Priority order of the assignments a = t*K + k: every first choice before any second choice, ...
        order = torch.arange(num_tokens * top_k, device=device).view(num_tokens, top_k).T.reshape(-1)
        if priority_TK is not None:  # ... and within a choice, the highest priority first (BPR).
            by_prio = torch.argsort(-priority_TK.T.reshape(-1), stable=True)
            by_choice = torch.argsort(torch.div(by_prio, num_tokens, rounding_mode="floor"), stable=True)
            order = order[by_prio[by_choice]]
        grouped = order[torch.argsort(expert_A[order], stable=True)]  # by expert, priority order within
        expert_G = expert_A[grouped]
        counts = count_per_expert(expert_G, num_experts + 1)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(expert_G.numel(), device=device) - starts[expert_G]
        bucket_G = torch.where(position < capacity, expert_G, num_experts)
        final = torch.argsort(bucket_G, stable=True)
        bucket_A = torch.empty_like(expert_A)
        bucket_A[grouped] = bucket_G
        return grouped[final], bucket_A

    def dispatch(self, x: Tensor) -> Tensor:
        """Rows of ``x`` for every kept slot: ``x`` holds one row per token (T, F) or per assignment (T*K, F)."""
        if x.shape[0] == self.num_tokens:
            repeat = self.top_k
        elif x.shape[0] == self.num_tokens * self.top_k:
            repeat = 1
        else:
            raise ValueError(f"dispatch expects {self.num_tokens} token rows or {self.num_tokens * self.top_k} "
                             f"assignment rows, got {x.shape[0]}")
        return _GatherSlots.apply(x, self.perm_S, self.inv_perm_A, repeat)

    def combine(self, y_SD: Tensor, gates_TK: Tensor) -> Tensor:
        """``out_t = sum_k gate_{t,k} * y_{slot(t,k)}`` with zero for dropped selections."""
        y_AD = _ScatterSlots.apply(y_SD, self.perm_S, self.inv_perm_A)
        gates_TK = gates_TK.to(y_AD.dtype)
        if self.top_k == 1:
            return y_AD * gates_TK
        y_TKD = y_AD.view(self.num_tokens, self.top_k, y_AD.shape[-1])
        return torch.bmm(gates_TK.unsqueeze(1), y_TKD).squeeze(1)

    def dropped_TK(self) -> Tensor:
        """(T, K) mask of the selections that were dropped (capacity or the router's own threshold)."""
        dropped = torch.ones(self.num_tokens * self.top_k, dtype=torch.bool, device=self.perm_S.device)
        dropped[self.perm_S] = False
        return dropped.view(self.num_tokens, self.top_k)


class ExpertChoicePlan:
    """Dispatch plan for expert-choice routing: expert e's slots are its chosen tokens ``token_idx_EC[e]``."""

    def __init__(self, token_idx_EC: Tensor, num_tokens: int) -> None:
        num_experts, capacity = token_idx_EC.shape
        self.num_tokens, self.num_experts = num_tokens, num_experts
        self.token_idx_S = token_idx_EC.reshape(-1)
        self.counts_E = torch.full((num_experts,), capacity, dtype=torch.long, device=token_idx_EC.device)
        self.assigned_E = self.counts_E
        self.num_kept, self.num_dropped = self.token_idx_S.numel(), 0

    def dispatch(self, x_TD: Tensor) -> Tensor:
        return x_TD.index_select(0, self.token_idx_S)

    def combine(self, y_SD: Tensor, gates_EC: Tensor) -> Tensor:
        weighted = y_SD * gates_EC.reshape(-1, 1).to(y_SD.dtype)
        return y_SD.new_zeros(self.num_tokens, y_SD.shape[1]).index_add_(0, self.token_idx_S, weighted)


Plan = TokenChoicePlan | ExpertChoicePlan

# Whether recomputed_dispatch is on (a switch for the tests and benchmarks that measure what it saves).
RECOMPUTE_DISPATCHED = True


@contextlib.contextmanager
def recomputed_dispatch(x_SF: Tensor, plan: Plan, source: Tensor,
                        dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within the block, autograd keeps no copy of ``x_SF`` (``plan.dispatch(source)``, the expert-ordered copy
    of the tokens) for backward: whatever saves it (the experts' first matmul, for its weight gradient) keeps a
    recipe, and backward gathers the rows from ``source`` again, a cheap row gather, when it needs them. Frees
    T x K x D values between forward and backward (``source``, the layer's input, is kept anyway: the router's
    projection saves it). ``dtype``: ``x_SF`` is ``plan.dispatch(source)`` cast to it (autocast). Off without
    gradients and under torch.compile (which traces no saved-tensor hooks)."""
    if not (RECOMPUTE_DISPATCHED and x_SF.requires_grad) or torch.compiler.is_compiling():
        yield
        return
    ptr, shape, dtype = x_SF.data_ptr(), x_SF.shape, x_SF.dtype
    recipe = object()

    def pack(t: Tensor):
        return recipe if (t.data_ptr() == ptr and t.shape == shape and t.dtype == dtype) else t

    def unpack(packed):
        if packed is not recipe:
            return packed
        with torch.no_grad():
            rows = plan.dispatch(source)
            return rows if dtype is None else rows.to(dtype)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class LocalDispatcher:
    """Builds the plan and runs the experts in one process (no expert parallelism; see
    :class:`ermoe.distributed.ExpertParallelDispatcher` for the sharded one)."""

    def run_experts(self, experts, x_SF: Tensor, counts_E: Tensor) -> Tensor:
        """The experts on the dispatched rows: ``counts_E[e]`` consecutive rows for expert e."""
        return experts(x_SF, counts_E)

    def plan(self, route: RouterOutput, num_tokens: int, capacity_factor: float | None, top_k: int,
             num_experts: int) -> Plan:
        if route.expert_choice:
            return ExpertChoicePlan(route.token_idx_EC, num_tokens)
        capacity = None if capacity_factor is None else expert_capacity(capacity_factor, num_tokens, top_k,
                                                                        num_experts)
        return TokenChoicePlan(route.topk_idx_TK, num_experts, keep_TK=route.keep_TK, capacity=capacity,
                               priority_TK=route.priority_TK)
