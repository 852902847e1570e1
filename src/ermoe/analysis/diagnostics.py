"""What the experts do: load, specialisation, homogeneity, stability and basis geometry of every MoE layer.

All functions take plain tensors so they can be checked against slow references; :func:`evaluate_classifier`
runs a model over a dataset and gathers them per layer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..models.routed import last_routing, num_experts, routed_layers
from ..models.vit import PatchMoE
from ..orthogonal import pca_basis, principal_angles
from ..routing.base import RoutingInfo
from ..routing.stats import load_summary


def assignments(info: RoutingInfo) -> tuple[Tensor, Tensor]:
    """The (token, expert) pairs a layer computed: token-choice drops (-1) excluded; expert choice unrolled."""
    if info.choice == "expert":
        idx_EC = info.expert_idx
        experts = torch.arange(idx_EC.shape[0], device=idx_EC.device).unsqueeze(1).expand_as(idx_EC)
        keep = idx_EC >= 0
        return idx_EC[keep], experts[keep]
    idx_TK = info.expert_idx
    tokens = torch.arange(idx_TK.shape[0], device=idx_TK.device).unsqueeze(1).expand_as(idx_TK)
    keep = idx_TK >= 0
    return tokens[keep], idx_TK[keep]


def mutual_information(joint_counts: Tensor) -> float:
    """I(X; Y) in bits from a table of co-occurrence counts (rows X, columns Y)."""
    p = joint_counts.double() / joint_counts.sum().clamp_min(1)
    px, py = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (px * py).expand_as(p)[nz]).log2()).sum())


def entropy_bits(counts: Tensor) -> float:
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def homogeneity(outputs_ETD: Tensor) -> float:
    """Mean pairwise cosine similarity of expert outputs over the same tokens: per token, averaged over pairs."""
    e = outputs_ETD.shape[0]
    if e < 2:
        return float("nan")
    y = torch.nn.functional.normalize(outputs_ETD.double(), dim=-1)
    sim_EE = torch.einsum("etd,ftd->ef", y, y) / y.shape[1]
    off = ~torch.eye(e, dtype=torch.bool, device=y.device)
    return float(sim_EE[off].mean())


def changed_share(previous: Tensor, current: Tensor) -> float:
    """Share of probe tokens whose (top-1) expert differs between two checkpoints."""
    if previous.shape != current.shape:
        raise ValueError(f"probe routing shapes differ: {tuple(previous.shape)} vs {tuple(current.shape)}")
    return float((previous != current).double().mean())


def basis_geometry(router: nn.Module, inputs_TD: Tensor, top1_T: Tensor) -> dict[str, Any] | None:
    """Orthonormality error and principal angles (degrees) of a router's basis/bases to the top-r PCA subspace of
    their inputs: the layer's inputs for a shared basis (EMoE), the tokens routed to the expert for per-expert bases
    (ERMoE; NaN where an expert got fewer than r probe tokens). None for routers without a basis."""
    basis = getattr(router, "basis", None)
    if basis is None:
        return None
    u = basis.matrix.detach().double().cpu()
    x = inputs_TD.double().cpu()
    rank = u.shape[-1]
    error = float(basis.error().max())
    if u.dim() == 2:
        angles = [float(torch.rad2deg(principal_angles(u, pca_basis(x, rank))).mean())]
    else:
        angles = []
        for e in range(u.shape[0]):
            mine = x[top1_T.cpu() == e]
            angles.append(float(torch.rad2deg(principal_angles(u[e], pca_basis(mine, rank))).mean())
                          if len(mine) >= rank else float("nan"))
    finite = [a for a in angles if not math.isnan(a)]
    return {"ortho_error": error, "principal_angle_deg": angles,
            "principal_angle_deg_mean": sum(finite) / len(finite) if finite else float("nan")}


class _Recorder:
    """Every routing layer of a model; optionally forward hooks keeping each PatchMoE's patch-token inputs."""

    def __init__(self, model: nn.Module, keep_inputs: bool = False) -> None:
        self.layers = routed_layers(model)
        self.keep_inputs = keep_inputs
        self.inputs: dict[str, list[Tensor]] = {n: [] for n, _ in self.layers}
        self.handles = []
        for name, layer in self.layers:
            if keep_inputs and isinstance(layer, PatchMoE):
                self.handles.append(layer.register_forward_pre_hook(self._pre(name, layer)))

    def _pre(self, name: str, layer: PatchMoE) -> Callable:
        def hook(_m, args):
            self.inputs[name].append(args[0][:, layer.num_prefix_tokens:].detach())
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int,
                        probe: Tensor | None = None, max_probe_tokens: int = 4096,
                        autocast: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Accuracy (top-1/top-5), loss, and per MoE layer: load, expert x class counts, MI, and on the probe images
    the top-1 routing (for stability), homogeneity and basis geometry. A model with a ``batch_metrics(logits,
    labels)`` method (sums over the batch) adds ``model_metrics``: those sums over the test set per image.

    ``batches`` yields ``(images, labels)`` already on the model's device and preprocessed.
    """
    was_training = model.training
    model.eval()
    layers = routed_layers(model)
    counts = {n: torch.zeros(num_experts(l), num_classes, dtype=torch.long) for n, l in layers}
    dropped = {n: 0 for n, _ in layers}
    assigned = {n: 0 for n, _ in layers}
    class_images = torch.zeros(num_classes, dtype=torch.long)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    model_sums: dict[str, float] = {}  # models with a batch_metrics(logits, labels) method: per-image sums
    ctx = autocast or torch.no_grad
    for images, labels in batches:
        with ctx():
            logits = model(images).float()
            extra = model.batch_metrics(logits, labels) if hasattr(model, "batch_metrics") else {}
        for key, value in extra.items():
            model_sums[key] = model_sums.get(key, 0.0) + value
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        total += len(labels)
        class_images += torch.bincount(labels.cpu(), minlength=num_classes)
        for name, layer in layers:
            info = last_routing(layer)
            tokens, experts = assignments(info)
            per_image = info.num_tokens // len(labels)
            cls = labels[tokens // per_image]
            counts[name] += torch.bincount((experts * num_classes + cls).cpu(),
                                           minlength=counts[name].numel()).view_as(counts[name])
            dropped[name] += info.dropped
            assigned[name] += info.assignments
    result: dict[str, Any] = {"test_top1": correct1 / max(total, 1), "test_top5": correct5 / max(total, 1),
                              "test_loss": loss_sum / max(total, 1), "test_images": total,
                              "class_images": class_images.tolist(), "layers": {}}
    if model_sums:
        result["model_metrics"] = {key: value / max(total, 1) for key, value in model_sums.items()}
    probe_stats = probe_routing(model, probe, max_probe_tokens, ctx) if probe is not None else {}
    h_class = entropy_bits(class_images)
    for name, layer in layers:
        joint = counts[name]
        mi = mutual_information(joint)
        stats: dict[str, Any] = {"tokens_per_expert": joint.sum(1).tolist(), **load_summary(joint.sum(1)),
                                 "drop_rate": dropped[name] / max(assigned[name], 1),
                                 "expert_class_counts": joint.tolist(), "mi_bits": mi,
                                 "mi_over_class_entropy": mi / h_class if h_class > 0 else float("nan")}
        stats.update(probe_stats.get(name, {}))
        result["layers"][name] = stats
    model.train(was_training)
    return result


def _load_counts(layer: nn.Module, info: RoutingInfo) -> Tensor:
    """Probe load of a layer: tokens per preferred (top-1) expert; DeepMoE's gated convs: images per open channel."""
    if isinstance(layer, PatchMoE):
        counts = torch.bincount(info.probs.float().argmax(-1).reshape(-1), minlength=num_experts(layer))
        return counts.cpu()
    return info.tokens_per_expert.cpu()


@torch.no_grad()
def probe_load(model: nn.Module, probe: Tensor, ctx: Callable[[], Any] = torch.no_grad) -> dict[str, Tensor]:
    """Per routing layer, the load on fixed probe images (see ``_load_counts``): one eval forward, nothing else."""
    was_training = model.training
    model.eval()
    try:
        with ctx():
            model(probe)
    finally:
        model.train(was_training)
    return {name: _load_counts(layer, last_routing(layer)) for name, layer in routed_layers(model)}


@torch.no_grad()
def probe_routing(model: nn.Module, probe: Tensor, max_tokens: int = 4096,
                  ctx: Callable[[], Any] = torch.no_grad) -> dict[str, dict[str, Any]]:
    """Per layer on fixed probe images: ``probe_top1`` (the router's preferred expert per patch token, a tensor),
    homogeneity of the expert outputs, and basis geometry; for DeepMoE's gated convolutions ``probe_load`` (open
    channels counted over the probe images) instead of the last two."""
    was_training = model.training
    model.eval()
    rec = _Recorder(model, keep_inputs=True)
    try:
        with ctx():
            model(probe)
    finally:
        rec.close()
    out = {}
    for name, layer in rec.layers:
        info = last_routing(layer)
        top1 = info.probs.float().argmax(-1).cpu()
        if not isinstance(layer, PatchMoE):
            # DeepMoE's channel gates: stability follows each image's strongest channel; the load counts every
            # open channel, as the end-of-run load does.
            out[name] = {"probe_top1": top1, "probe_load": _load_counts(layer, info)}
            continue
        x_TD = torch.cat(rec.inputs[name]).reshape(-1, layer.moe.dim)[:max_tokens].float()
        stats: dict[str, Any] = {"probe_top1": top1, "probe_load": _load_counts(layer, info)}
        moe = layer.moe
        with ctx():
            stats["homogeneity"] = homogeneity(moe.expert_outputs(x_TD.to(next(moe.parameters()).dtype)).float())
        geometry = basis_geometry(moe.router, x_TD, top1[: len(x_TD)])
        if geometry is not None:
            stats.update(geometry)
        out[name] = stats
    model.train(was_training)
    return out
