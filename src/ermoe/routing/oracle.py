"""The oracle router: a positive control, not a method. Every token goes to expert ``g mod E`` of its ground-truth
group ``g``: its example's (the class of an image, the ageing pattern of a subject) or its own (the item class under
an image patch, the item class a caption's word names), at evaluation as in training.

A study runs it under the same budget as the methods to learn what routing by the very thing a claim is about can
reach on its testbed: the gain over a dense layer of the same active size, and the specialisation and stability
measures of experts that do specialise. A claim not confirmed is then read against it: the effect absent, or a
testbed that could not show it (docs/study.md, "Positive controls").

The groups come from the data, not the tokens, so every forward of a model with an oracle router runs inside
:func:`routed_by` with its batch's groups (the trainer, the evaluations, the probes and BatchNorm recalibration
do); a forward without them is an error naming what is missing. The T tokens of a forward are its B examples'
tokens in example-major order (``(B, N, D)`` flattened), as every model here hands them to its MoE layers; groups
with one entry per token (T of them, any shape) route each token by its own, one per example (B) by its example's.
A model whose towers route by different ground truths (a dual encoder's image patches and words) takes a mapping
from each tower's submodule name to its groups.

Shape suffixes: T tokens, E experts, K top-k (1), B examples.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Router, RouterOutput, register_router, upcast


class MissingGroupsError(ValueError):
    """A model with an oracle router ran a forward without its examples' ground-truth groups."""


# One group per example ((B,)) or per token (T entries, any shape); a mapping: per tower (submodule name -> groups).
Groups = Union[Tensor, Mapping[str, Union[Tensor, None]], None]


@register_router
class OracleRouter(Router):
    name = "oracle"
    control = True

    def __init__(self, dim: int, num_experts: int, top_k: int = 1) -> None:
        if top_k != 1:
            raise ValueError(f"the oracle router sends each token to one expert (its group's); top_k must be 1, got "
                             f"{top_k!r}")
        super().__init__(dim, num_experts, top_k)
        self.groups_B: Tensor | None = None  # set by routed_by for one forward

    def forward(self, x_TD: Tensor, context_TD: Tensor | None = None) -> RouterOutput:
        groups_B = self.groups_B
        if groups_B is None:
            raise MissingGroupsError(
                "the oracle router routes each token by its example's ground-truth group, and this forward was given "
                "none: run the model inside ermoe.routing.oracle.routed_by(model, groups), and train it on a task "
                "whose data has groups (classification: the class; brain age: a heterogeneous cohort's ageing "
                "patterns)")
        tokens = x_TD.shape[0]
        if groups_B.numel() == tokens and tokens:  # one per token (also one per example of one token each)
            idx_T = groups_B.reshape(-1)
        elif groups_B.dim() == 1 and groups_B.numel() and tokens % groups_B.numel() == 0:
            idx_T = groups_B.repeat_interleave(tokens // groups_B.numel())
        else:
            raise ValueError(f"the oracle router got groups of shape {tuple(groups_B.shape)} for {tokens} tokens: "
                             "it needs one group per token, or one per example (a 1-D tensor) with the tokens an "
                             "equal number per example")
        if idx_T.device.type == "cpu" and (idx_T < 0).any():  # (groups on an accelerator: not checked, no sync)
            raise ValueError("the oracle router got a negative group (padding?): every routed token needs its group")
        idx_T = idx_T.to(x_TD.device, torch.long) % self.num_experts
        probs_TE = F.one_hot(idx_T, self.num_experts).to(upcast(x_TD).dtype)
        return RouterOutput(probs_TE=probs_TE, topk_idx_TK=idx_T[:, None],
                            gates_TK=torch.ones(tokens, 1, dtype=probs_TE.dtype, device=x_TD.device))


def oracle_routers(model: nn.Module) -> dict[str, OracleRouter]:
    """The model's oracle routers by qualified name (wrappers' prefixes, ``_orig_mod.`` and ``module.``, left out)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, OracleRouter):
            while name.startswith(("_orig_mod.", "module.")):
                name = name.split(".", 1)[1]
            out[name] = m
    return out


def _groups_for(name: str, groups: Groups) -> Tensor | None:
    if not isinstance(groups, Mapping):
        return groups
    for tower, g in groups.items():
        if name == tower or name.startswith(tower + "."):
            return g
    return None  # a tower the mapping leaves out has no groups: its oracle forward says so


@contextlib.contextmanager
def routed_by(model: nn.Module, groups: Groups, routers: dict[str, OracleRouter] | None = None) -> Iterator[None]:
    """Forwards of ``model`` inside route its oracle routers by ``groups``: one ground-truth group per example of
    the batch or per token, or per tower a mapping from a submodule's name (``"image"``, ``"text"``) to the groups
    of the routers under it; None: the data has none, and an oracle forward says so. Nothing for a model without an
    oracle router; nested uses restore the groups of the outer one (a probe's, around an evaluation's batches).
    ``routers``: the model's oracle routers found once (:func:`oracle_routers`), for a caller on the training step's
    path (walking a ViT's modules costs about 0.2 ms)."""
    routers = oracle_routers(model) if routers is None else routers
    before = {name: r.groups_B for name, r in routers.items()}
    for name, r in routers.items():
        r.groups_B = _groups_for(name, groups)
    try:
        yield
    finally:
        for name, r in routers.items():
            r.groups_B = before[name]
