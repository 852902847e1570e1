"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model's FFNs become MoE layers whose experts start from the
dense weights (docs/upcycling.md).

    model = ermoe.upcycle(dense_model, router="softmax_topk", num_experts=8, blocks="every_other",
                          renormalize=True)

Which FFNs are found (in module order; ``blocks`` indexes this list, so for a ViT it is the block index):

- timm's ``Mlp`` (``fc1 -> act -> fc2``; its ``norm`` must be the identity), in any timm model;
- torchvision's ``MLPBlock`` (its ViT);
- Hugging Face's ``fc1 / activation_fn / fc2`` MLPs (ViT, CLIP, SigLIP) and BERT's ``intermediate`` + ``output``
  pair (the output's ``dense`` becomes the identity: the MoE already returns D features);
- ermoe's own: the blocks of its ViTs (2D, 3D and the dual encoder's image tower), the text tower's blocks, and the
  SFCN's dense cell FFNs (``dense_ffn=True``).

How the experts start:

- MLP experts (the softmax family, cosine, expert choice, EMoE): E copies of the dense FFN. The layer's output is
  then ``(sum of the token's gates) * FFN(x)``: the dense model's output wherever the gates sum to one (top-1 with
  renormalised gates, ``renormalize=True``; EMoE with ``gate="renormalized"``).
- ERMoE's eigen experts, from the SVD ``W1 = P diag(s) Q^T`` of the FFN's first matrix: ``bases="split"`` (the
  default) deals the top E*R right-singular directions round-robin (expert e gets directions e, e+E, ...), each
  expert's ``V_e diag(s_e) = W1 U_e`` and its output map the dense ``W2``; a token then goes to the expert whose R
  directions hold most of its energy, which is that expert's rank-R part of ``W1``. ``bases="shared"`` gives every
  expert the top R directions (the best rank-R approximation, the smallest step-0 error), but then every expert has
  the same Eigenbasis Score: routing starts as a tie. docs/upcycling.md measures both against R.
- EMoE's shared basis: the top-R PCA directions of each layer's input features over ``sample_inputs`` (its PCA
  initialisation, :meth:`RoutedModel.init_routers_from_data`).

The dense model's dropout inside the FFN (timm's ``drop1``) is not kept; its output dropout is.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from ..moe import MoE
from .brain import CellFFN, CellMoE
from .protocol import TokenMoELayer, router_has_data_init
from .text import PaddedTokenMoE, TextTransformer
from .vit import MoEViT, PatchMoE, select_blocks

EigenBases = Literal["split", "shared"]


class UpcycledMoE(TokenMoELayer):
    """An MoE in the place of a dense FFN of a model ermoe did not build: every token of ``(..., D)`` is routed;
    the dense FFN's output dropout is kept."""

    def __init__(self, moe: MoE, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.moe(x))


@dataclass
class DenseFFN:
    """A dense FFN ``fc2(act(fc1(x)))`` found in a model, and how to put an MoE layer in its place."""

    name: str
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    install: Callable[[MoE], nn.Module]  # puts the MoE in place; returns the routing layer it installed


def _set(parent: nn.Module, attr: str, module: nn.Module) -> nn.Module:
    setattr(parent, attr, module)
    return module


def _timm_mlp(m: nn.Module) -> bool:
    from timm.layers import Mlp
    return type(m) is Mlp


def _torchvision_mlp(m: nn.Module) -> bool:
    from torchvision.models.vision_transformer import MLPBlock
    return type(m) is MLPBlock


def _hf_mlp(m: nn.Module) -> bool:
    return (type(m).__module__.startswith("transformers.") and isinstance(getattr(m, "fc1", None), nn.Linear)
            and isinstance(getattr(m, "fc2", None), nn.Linear) and isinstance(getattr(m, "activation_fn", None),
                                                                              nn.Module))


def _hf_pair(m: nn.Module) -> bool:
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    return (type(m).__module__.startswith("transformers.") and inter is not None and out is not None
            and isinstance(getattr(inter, "dense", None), nn.Linear)
            and isinstance(getattr(inter, "intermediate_act_fn", None), nn.Module)
            and isinstance(getattr(out, "dense", None), nn.Linear))


def _check_timm_mlp(name: str, mlp: nn.Module) -> None:
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError(f"upcycle: the FFN {name} normalises its hidden features (timm Mlp with norm_layer): its "
                         "experts could not start from it exactly")


def _block_ffns(prefix: str, blocks: nn.ModuleList, install: Callable[[int, nn.Module], Callable[[MoE], nn.Module]]
                ) -> list[DenseFFN]:
    """The timm ``Mlp`` of every transformer block of an ermoe model (blocks already holding an MoE are skipped)."""
    found = []
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)  # a post-block MoE wraps its block: no FFN of its own here
        if _timm_mlp(mlp):
            _check_timm_mlp(f"{prefix}blocks.{i}.mlp", mlp)
            found.append(DenseFFN(f"{prefix}blocks.{i}.mlp", mlp.fc1, mlp.act, mlp.fc2, install(i, mlp)))
    return found


def find_dense_ffns(model: nn.Module) -> list[DenseFFN]:
    """Every dense FFN of ``model`` that :func:`upcycle` can replace, in module order (module docstring)."""
    found: list[DenseFFN] = []
    taken: list[str] = []  # modules whose FFNs are found: their submodules are not searched again

    def inside(name: str) -> bool:
        return any(t == "" or name == t or name.startswith(t + ".") for t in taken)

    for name, m in model.named_modules():
        if inside(name):
            continue
        prefix = f"{name}." if name else ""
        parent_name, _, attr = name.rpartition(".")
        if isinstance(m, MoEViT):
            found += _block_ffns(prefix, m.blocks, lambda i, mlp, vit=m: functools.partial(
                _install_patch_moe, vit.blocks[i], mlp, vit.num_prefix_tokens))
        elif isinstance(m, TextTransformer):
            found += _block_ffns(prefix, m.blocks, lambda i, _mlp, tower=m: functools.partial(
                _install_text_moe, tower, i))
        elif isinstance(m, CellFFN):
            lin1, act, lin2 = m.ffn
            found.append(DenseFFN(name, lin1, act, lin2, functools.partial(
                _install_cell_moe, model.get_submodule(parent_name), attr, m)))
        elif _timm_mlp(m) or _torchvision_mlp(m) or _hf_mlp(m):
            if _timm_mlp(m):
                _check_timm_mlp(name, m)
                fc1, act, fc2, drop = m.fc1, m.act, m.fc2, m.drop2
            elif _torchvision_mlp(m):
                fc1, act, _, fc2, drop = m
            else:
                fc1, act, fc2, drop = m.fc1, m.activation_fn, m.fc2, None
            found.append(DenseFFN(name, fc1, act, fc2, lambda moe, p=model.get_submodule(parent_name), a=attr,
                                  d=drop: _set(p, a, UpcycledMoE(moe, d))))
        elif _hf_pair(m):
            inter, out = m.intermediate, m.output
            found.append(DenseFFN(f"{prefix}intermediate", inter.dense, inter.intermediate_act_fn, out.dense,
                                  functools.partial(_install_hf_pair, m)))
        else:
            continue
        taken.append(name)
    return found


def _install_patch_moe(block: nn.Module, mlp: nn.Module, num_prefix: int, moe: MoE) -> nn.Module:
    # The class token (and registers) keep the dense FFN they had: ermoe's ViTs route patch tokens only.
    return _set(block, "mlp", PatchMoE(moe, num_prefix, prefix_ffn=mlp if num_prefix else None))


def _install_text_moe(tower: TextTransformer, index: int, moe: MoE) -> nn.Module:
    layer = PaddedTokenMoE(moe)
    tower.blocks[index].mlp = layer
    tower.moe_layers.append(layer)
    return layer


def _install_cell_moe(parent: nn.Module, attr: str, cell: CellFFN, moe: MoE) -> nn.Module:
    layer = CellMoE(cell.norm.normalized_shape[0], moe)
    layer.norm = cell.norm  # the dense cell's LayerNorm, as it was
    return _set(parent, attr, layer)  # a ModuleDict's entry too (setattr registers the module under its key)


def _install_hf_pair(layer: nn.Module, moe: MoE) -> nn.Module:
    layer.output.dense = nn.Identity()
    return _set(layer, "intermediate", UpcycledMoE(moe))


@torch.no_grad()
def copy_mlp_experts(moe: MoE, ffn: DenseFFN) -> None:
    """Every expert of ``moe`` (MLP experts) a copy of the dense FFN."""
    experts = moe.experts
    experts.w1.copy_(ffn.fc1.weight.expand_as(experts.w1))
    experts.w2.copy_(ffn.fc2.weight.expand_as(experts.w2))
    if experts.b1 is not None:
        experts.b1.copy_(ffn.fc1.bias.expand_as(experts.b1))
        experts.b2.copy_(ffn.fc2.bias.expand_as(experts.b2))


@torch.no_grad()
def eigen_bases(w1_HD: Tensor, num_experts: int, rank: int, bases: EigenBases = "split") -> Tensor:
    """The experts' orthonormal bases ``(E, D, R)`` from the top right-singular directions of ``W1`` (module
    docstring): ``split`` deals the top E*R round-robin, ``shared`` gives every expert the top R."""
    if bases not in ("split", "shared"):
        raise ValueError(f"upcycle: bases must be 'split' or 'shared', got {bases!r}")
    hidden, dim = w1_HD.shape
    need = num_experts * rank if bases == "split" else rank
    if need > min(hidden, dim):
        raise ValueError(f"upcycle: {bases} eigen bases need {'num_experts*rank' if bases == 'split' else 'rank'} "
                         f"= {need} <= min(hidden, dim) = {min(hidden, dim)} singular directions of the FFN")
    _, _, vh = torch.linalg.svd(w1_HD.double(), full_matrices=False)
    q_DM = vh.T
    if bases == "shared":
        return q_DM[:, :rank].expand(num_experts, dim, rank).clone()
    return torch.stack([q_DM[:, e:num_experts * rank:num_experts] for e in range(num_experts)])


@torch.no_grad()
def set_eigen_experts(moe: MoE, ffn: DenseFFN, bases: EigenBases = "split") -> None:
    """ERMoE's bases and eigen experts from the dense FFN (module docstring): ``V_e diag(s_e) = W1 U_e``, with
    ``s_e`` the column norms (the singular values) and the dense biases and output map."""
    router, experts = moe.router, moe.experts
    router.basis.set_(eigen_bases(ffn.fc1.weight, moe.num_experts, router.rank, bases))
    u_EDR = router.basis.matrix.detach().double()  # as the router holds it (orthonormalisation may flip signs)
    vs_EHR = ffn.fc1.weight.double() @ u_EDR
    scales_ER = vs_EHR.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    experts.scales.copy_(scales_ER)
    experts.v.copy_(vs_EHR / scales_ER.unsqueeze(1))
    experts.w2.copy_(ffn.fc2.weight.expand_as(experts.w2))
    if experts.c is not None:
        experts.c.copy_(ffn.fc1.bias.expand_as(experts.c) if ffn.fc1.bias is not None else 0.0)
        experts.d.copy_(ffn.fc2.bias.expand_as(experts.d) if ffn.fc2.bias is not None else 0.0)
    elif ffn.fc1.bias is not None or ffn.fc2.bias is not None:
        raise ValueError("upcycle: the dense FFN has biases; eigen experts without bias (expert_bias=False) "
                         "cannot start from it")


def _act_factory(act: nn.Module) -> Callable[[], nn.Module]:
    return lambda: copy.deepcopy(act)


def upcycle(model: nn.Module, router: str = "ermoe", num_experts: int = 8, *, top_k: int = 1,
            blocks: str | Sequence[int] = "all", bases: EigenBases = "split",
            capacity_factor: float | None = None, learn_alpha: bool | None = None,
            sample_inputs: Iterable[Sequence[Tensor] | dict[str, Tensor] | Tensor] | None = None,
            **router_kwargs: Any) -> nn.Module:
    """Replace the chosen dense FFNs of ``model`` (in place) by MoE layers whose experts start from them; returns
    the model. ``blocks``: indices into :func:`find_dense_ffns`'s list (``"all"``, ``"every_other"``,
    ``"last:N"`` or ints; for a ViT, block indices). ``bases``: ERMoE's eigen bases, ``split`` or ``shared``
    (module docstring). ``sample_inputs``: tuples of model inputs whose features set data-initialised routers
    (EMoE's PCA basis; required for it). The router's own settings come as keyword arguments (docs/routers.md).
    """
    ffns = find_dense_ffns(model)
    if not ffns:
        raise ValueError(f"upcycle: found no dense FFN to replace in {type(model).__name__} (supported: timm Mlp, "
                         "torchvision MLPBlock, Hugging Face MLPs and BERT's intermediate/output, ermoe's models)")
    chosen = select_blocks(blocks, len(ffns))
    if router != "ermoe" and bases != "split":
        raise ValueError(f"upcycle: bases applies to ERMoE's eigen experts only, not to router {router!r}")
    data_init = router != "ermoe" and router_has_data_init(router)
    if data_init and sample_inputs is None:
        raise ValueError(f"upcycle: router {router!r} sets its basis from the features (PCA): pass sample_inputs "
                         "(a few batches of model inputs)")
    if sample_inputs is not None and not data_init:
        raise ValueError(f"upcycle: sample_inputs sets a PCA basis; router {router!r} takes none")
    installed = []
    for i in chosen:
        ffn = ffns[i]
        dim, hidden = ffn.fc1.in_features, ffn.fc1.out_features
        if ffn.fc2.in_features != hidden or ffn.fc2.out_features != dim:
            raise ValueError(f"upcycle: {ffn.name} maps {dim} -> {hidden} -> {ffn.fc2.out_features}: an FFN must "
                             "return its input width")
        has_bias = ffn.fc1.bias is not None or ffn.fc2.bias is not None
        moe = MoE(dim, hidden, num_experts, router, top_k, capacity_factor=capacity_factor, learn_alpha=learn_alpha,
                  act_layer=_act_factory(ffn.act), expert_bias=has_bias, router_kwargs=dict(router_kwargs))
        moe.to(device=ffn.fc1.weight.device, dtype=ffn.fc1.weight.dtype)
        if router == "ermoe":
            set_eigen_experts(moe, ffn, bases)
        else:
            copy_mlp_experts(moe, ffn)
        installed.append(ffn.install(moe))
    if data_init:
        init_from_samples(model, installed, sample_inputs)
    if getattr(model, "ermoe_build", None) is not None:  # how to rebuild it (ermoe.models.hub)
        model.ermoe_build = {**model.ermoe_build, "upcycle": {
            "router": router, "num_experts": num_experts, "top_k": top_k, "blocks": blocks, "bases": bases,
            "capacity_factor": capacity_factor, "learn_alpha": learn_alpha, "router_kwargs": dict(router_kwargs)}}
    return model


@torch.no_grad()
def init_from_samples(model: nn.Module, layers: Sequence[nn.Module],
                      sample_inputs: Iterable[Sequence[Tensor] | dict[str, Tensor] | Tensor]) -> None:
    """PCA-initialise the routers of ``layers`` (routing layers of ``model``) from the tokens each sees on
    ``sample_inputs``, in order, each after a fresh pass (as :meth:`RoutedModel.init_routers_from_data`). A batch
    is a tuple of positional inputs, a dict of keyword inputs (Hugging Face models), or one tensor."""
    batches = [b if isinstance(b, dict) else tuple(b) if isinstance(b, (tuple, list)) else (b,)
               for b in sample_inputs]
    if not batches:
        raise ValueError("upcycle: sample_inputs is empty")
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            moe = layer.token_moe()
            seen: list[Tensor] = []
            handle = moe.register_forward_pre_hook(
                lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
            try:
                for inputs in batches:
                    model(**inputs) if isinstance(inputs, dict) else model(*inputs)
            finally:
                handle.remove()
            moe.init_from_features(torch.cat(seen).to(next(moe.parameters()).device))
    finally:
        model.train(was_training)
