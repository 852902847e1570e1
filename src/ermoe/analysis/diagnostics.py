"""What the experts do: load, specialisation, homogeneity, stability and basis geometry of every MoE layer.

All functions take plain tensors so they can be checked against slow references; :func:`evaluate_classifier`
runs a model over a dataset and gathers them per layer.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..models.protocol import RoutedLayer, RoutedModel
from ..orthogonal import OrthonormalBasis, pca_basis, principal_angles
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


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode for the block, and back in the mode it was in after it (also on an error)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


class ExpertLabelCounts:
    """One routing layer's (expert, label) counts over every token it computed in an evaluation, the label of a
    token given by a label function of its index in the batch: its image's class, its cell of the brain grid, its
    word, the item under its patch. Every task's routing diagnostics start from these counts (load from their row
    sums, specialisation as MI(expert; label) of the table)."""

    def __init__(self, num_experts: int, num_labels: int = 1) -> None:
        self.counts = torch.zeros(num_experts, num_labels, dtype=torch.long)
        self.dropped = self.assigned = 0

    def add(self, info: RoutingInfo, label_of: Callable[[Tensor], Tensor] | None = None) -> None:
        """Count the layer's last routing; ``label_of(tokens)``: the labels of those token indices (a CPU tensor;
        None: label 0, load only)."""
        tokens, experts = (t.cpu() for t in assignments(info))  # CPU indices index a label table on any device
        num_experts, num_labels = self.counts.shape
        labels = torch.zeros_like(tokens) if label_of is None else label_of(tokens).cpu()
        flat = torch.bincount(experts * num_labels + labels, minlength=num_experts * num_labels)
        self.counts += flat.view(num_experts, num_labels)
        self.dropped += info.dropped
        self.assigned += info.assignments

    @property
    def per_expert(self) -> Tensor:
        return self.counts.sum(1)

    def load(self) -> dict[str, Any]:
        """Tokens per expert, the load statistics of :func:`ermoe.routing.stats.load_summary`, the drop rate."""
        return {"tokens_per_expert": self.per_expert.tolist(), **load_summary(self.per_expert),
                "drop_rate": self.dropped / max(self.assigned, 1)}


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


def assignment_matrix(info: RoutingInfo, num_experts: int) -> Tensor:
    """``(T, E)`` bool on the CPU: the experts that actually computed each token (what the router chose, after
    capacity drops and thresholds; expert choice unrolled), for every router alike."""
    tokens, experts = assignments(info)
    out = torch.zeros(info.num_tokens, num_experts, dtype=torch.bool, device=tokens.device)
    out[tokens, experts] = True
    return out.cpu()


def changed_share(previous: Tensor, current: Tensor) -> float:
    """Share of probe tokens whose set of experts differs between two checkpoints (``(T, E)`` assignment
    matrices; for top-1 routing: whose expert changed)."""
    if previous.shape != current.shape:
        raise ValueError(f"probe routing shapes differ: {tuple(previous.shape)} vs {tuple(current.shape)}")
    return float((previous != current).reshape(len(previous), -1).any(-1).double().mean())


def chance_changed_share(assignment_TE: Tensor) -> float:
    """The share of tokens whose experts would differ if each token took the assignment of another probe token at
    random: ``1 - sum_s q_s^2`` over the distinct expert sets ``s`` the tokens hold (for top-1, ``1 - sum_e p_e^2``
    over the load). It is what a router with the same loads but no memory would change; a collapsed router's is
    near 0, so stability divided by it cannot reward collapse."""
    if len(assignment_TE) == 0:
        return float("nan")
    _, counts = torch.unique(assignment_TE, dim=0, return_counts=True)
    q = counts.double() / len(assignment_TE)
    return float(1 - (q * q).sum())


def basis_geometry(router: nn.Module, inputs_TD: Tensor, top1_T: Tensor) -> dict[str, Any] | None:
    """Orthonormality error and principal angles (degrees) of a router's basis/bases to the top-r PCA subspace of
    their inputs: the layer's inputs for a shared basis (EMoE), the tokens routed to the expert for per-expert bases
    (ERMoE; NaN where an expert got fewer than r probe tokens). None for routers without a basis."""
    bases = [m for m in router.children() if isinstance(m, OrthonormalBasis)]
    if not bases:
        return None
    (basis,) = bases
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


class _InputRecorder:
    """Forward pre-hooks keeping the tokens each token-routing MoE of ``layers`` receives, flattened to (T, D)."""

    def __init__(self, layers: list[RoutedLayer]) -> None:
        self.inputs: dict[str, list[Tensor]] = {view.name: [] for view in layers}
        self.handles = [view.moe.register_forward_pre_hook(self._hook(view.name)) for view in layers
                        if view.moe is not None]

    def _hook(self, name: str) -> Callable:
        def hook(_m, args):
            self.inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def evaluate_classifier(model: RoutedModel, batches: Iterable[tuple[Sequence[Tensor], Tensor]], num_classes: int,
                        probe: Sequence[Tensor] | None = None, max_probe_tokens: int = 4096,
                        autocast: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Accuracy (top-1/top-5), loss, and per routing layer: load, expert x class counts, MI, and on the probe inputs
    the top-1 routing (for stability), homogeneity and basis geometry. The model's ``batch_metrics`` (sums over the
    batch), if it has any, give ``model_metrics``: those sums over the test set per image.

    ``batches`` yields ``(inputs, labels)``: the model's positional inputs and the labels, on the model's device and
    preprocessed; ``probe``: the probe's model inputs.
    """
    with evaluating(model):
        return _evaluate_classifier(model, batches, num_classes, probe, max_probe_tokens, autocast)


def _evaluate_classifier(model: RoutedModel, batches: Iterable[tuple[Sequence[Tensor], Tensor]], num_classes: int,
                         probe: Sequence[Tensor] | None, max_probe_tokens: int,
                         autocast: Callable[[], Any] | None) -> dict[str, Any]:
    layers = model.routed_layers()
    counts = {v.name: ExpertLabelCounts(v.num_experts, num_classes) for v in layers}
    class_images = torch.zeros(num_classes, dtype=torch.long)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    model_sums: dict[str, float] = {}  # models with a batch_metrics(logits, labels) method: per-image sums
    ctx = autocast or torch.no_grad
    for inputs, labels in batches:
        with ctx():
            logits = model(*inputs).float()
            extra = model.batch_metrics(logits, labels)
        for key, value in extra.items():
            model_sums[key] = model_sums.get(key, 0.0) + value
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        total += len(labels)
        class_images += torch.bincount(labels.cpu(), minlength=num_classes)
        for view in layers:  # a token's label: its image's class
            per_image = view.last_routing.num_tokens // len(labels)
            counts[view.name].add(view.last_routing, lambda tokens: labels[tokens // per_image])
    result: dict[str, Any] = {"test_top1": correct1 / max(total, 1), "test_top5": correct5 / max(total, 1),
                              "test_loss": loss_sum / max(total, 1), "test_images": total,
                              "class_images": class_images.tolist(), "layers": {}}
    if model_sums:
        result["model_metrics"] = {key: value / max(total, 1) for key, value in model_sums.items()}
    probe_stats = probe_routing(model, probe, max_probe_tokens, ctx) if probe is not None else {}
    h_class = entropy_bits(class_images)
    for name, acc in counts.items():
        joint = acc.counts
        mi = mutual_information(joint)
        stats: dict[str, Any] = {**acc.load(), "expert_class_counts": joint.tolist(), "mi_bits": mi,
                                 "mi_over_class_entropy": mi / h_class if h_class > 0 else float("nan")}
        stats.update(probe_stats.get(name, {}))
        result["layers"][name] = stats
    return result


def _load_counts(info: RoutingInfo) -> Tensor:
    """Probe load of a layer: the assignments each expert computed (for DeepMoE's gated convolutions, the images
    per open channel), as the layer recorded them."""
    return info.tokens_per_expert.cpu()


@torch.no_grad()
def probe_load(model: RoutedModel, probe: Sequence[Tensor], ctx: Callable[[], Any] = torch.no_grad
               ) -> dict[str, Tensor]:
    """Per routing layer, the load on fixed probe inputs (see ``_load_counts``): one eval forward, nothing else."""
    with evaluating(model), ctx():
        model(*probe)
    return {view.name: _load_counts(view.last_routing) for view in model.routed_layers()}


@torch.no_grad()
def probe_routing(model: RoutedModel, probe: Sequence[Tensor], max_tokens: int = 4096,
                  ctx: Callable[[], Any] = torch.no_grad) -> dict[str, dict[str, Any]]:
    """Per routing layer on fixed probe inputs: ``probe_assignment`` (the ``(T, E)`` experts that computed each
    token, for stability), ``probe_load``, and for token MoEs the homogeneity of the expert outputs and the basis
    geometry."""
    with evaluating(model):
        return _probe_routing(model, probe, max_tokens, ctx)


def _probe_routing(model: RoutedModel, probe: Sequence[Tensor], max_tokens: int, ctx: Callable[[], Any]
                   ) -> dict[str, dict[str, Any]]:
    layers = model.routed_layers()
    rec = _InputRecorder(layers)
    try:
        with ctx():
            model(*probe)
    finally:
        rec.close()
    out = {}
    for view in layers:
        info = view.last_routing
        assigned_TE = assignment_matrix(info, view.num_experts)
        # each token's first computed expert (-1: none), for the per-expert geometry
        top1 = torch.where(assigned_TE.any(-1), assigned_TE.float().argmax(-1), -1) if info.choice == "expert" \
            else info.expert_idx[:, 0].cpu()
        stats: dict[str, Any] = {"probe_assignment": assigned_TE, "probe_load": _load_counts(info)}
        moe = view.moe
        if moe is not None:
            x_TD = torch.cat(rec.inputs[view.name])[:max_tokens].float()
            if moe.sharded:  # most experts' outputs are on other ranks
                warnings.warn(f"{view.name}: homogeneity is not measured with sharded experts (expert parallelism); "
                              "`ermoe eval` of the run in one process measures it", stacklevel=2)
            else:
                with ctx():
                    stats["homogeneity"] = homogeneity(
                        moe.expert_outputs(x_TD.to(next(moe.parameters()).dtype)).float())
            geometry = basis_geometry(moe.router, x_TD, top1[: len(x_TD)])
            if geometry is not None:
                stats.update(geometry)
        out[view.name] = stats
    return out
