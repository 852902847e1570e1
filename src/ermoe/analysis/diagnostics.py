"""What the experts do: load, specialisation, homogeneity, stability and basis geometry of every MoE layer.

All functions take plain tensors so they can be checked against slow references; :func:`evaluate_classifier`
runs a model over a dataset and gathers them per layer.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..models.protocol import RoutedLayer, RoutedModel
from ..orthogonal import OrthonormalBasis, pca_basis, principal_angles
from ..routing.base import RoutingInfo
from ..routing.oracle import routed_by
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


# A routing layer's label function: the labels of the tokens (indices into the layer's last routing) it computed.
LabelFn = Callable[[RoutingInfo, Tensor], Tensor]


def example_labels(labels: Tensor) -> LabelFn:
    """The label function whose tokens carry their example's label: a layer that routes ``n`` tokens per example
    (patches, cells, or one per example) holds example ``i``'s tokens at ``[i n, (i + 1) n)``."""
    labels = labels.cpu()
    return lambda info, tokens: labels[tokens // (info.num_tokens // len(labels))]


class RoutingCounts:
    """The routing accumulator of an evaluation: per routing layer, its :class:`ExpertLabelCounts` over every
    forward pass, a token's label given by a :data:`LabelFn` (its image's class, its brain cell, its word, the item
    under its patch). ``num_labels``: labels per layer (an int for every layer, or by layer name: only the layers
    named are counted)."""

    def __init__(self, layers: Sequence[RoutedLayer], num_labels: int | dict[str, int] = 1) -> None:
        sizes = num_labels if isinstance(num_labels, dict) else {v.name: num_labels for v in layers}
        self.views = {v.name: v for v in layers if v.name in sizes}
        self.tables = {name: ExpertLabelCounts(v.num_experts, sizes[name]) for name, v in self.views.items()}

    def add(self, label_of: LabelFn | None = None, layers: Iterable[str] | None = None) -> None:
        """Count the last routing of ``layers`` (default: every counted layer) under ``label_of`` (None: load
        only)."""
        for name in self.tables if layers is None else layers:
            info = self.views[name].last_routing
            fn = None if label_of is None else (lambda tokens, info=info: label_of(info, tokens))
            self.tables[name].add(info, fn)

    def __getitem__(self, name: str) -> ExpertLabelCounts:
        return self.tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    def stats(self, name: str, label: str = "label") -> dict[str, Any]:
        """The layer's load statistics, its ``expert_{label}_counts`` table and ``mi_bits``, I(expert; label)."""
        table = self.tables[name]
        return {**table.load(), f"expert_{label}_counts": table.counts.tolist(),
                "mi_bits": mutual_information(table.counts)}


# The keys of a task's metrics under which it hands over per-example results (arrays of one row per example:
# ``correct``, ``abs_error``, ``load/<layer>``) of the test split and of the validation split; the run stores them
# beside metrics.json, not in it.
TEST_EXAMPLES = "per_example"
VAL_EXAMPLES = "val_per_example"


class ExampleLoads:
    """Per routing layer, the assignments each example's tokens made to each expert: ``(examples, E)`` counts over
    an evaluation, for the layers that route the same number of tokens per example (patches, cells, one per image).
    From them a study resamples the test examples (the test set's own sampling error of a load statistic)."""

    def __init__(self, layers: Sequence[RoutedLayer]) -> None:
        self.views = {v.name: v for v in layers}
        self.rows: dict[str, list[Tensor]] = {name: [] for name in self.views}
        self.uneven: set[str] = set()  # layers whose token count is not a multiple of the batch's examples

    def add(self, examples: int, layers: Iterable[str] | None = None) -> None:
        """Count the last routing of ``layers`` (default: all) over a batch of ``examples`` examples."""
        for name in self.views if layers is None else layers:
            view = self.views[name]
            info = view.last_routing
            if info is None or info.num_tokens % examples:
                self.uneven.add(name)
                continue
            tokens, experts = (t.cpu() for t in assignments(info))
            example = tokens // (info.num_tokens // examples)
            counts = torch.bincount(example * view.num_experts + experts, minlength=examples * view.num_experts)
            self.rows[name].append(counts.view(examples, view.num_experts))

    def arrays(self) -> dict[str, np.ndarray]:
        """``load/<layer>``: the ``(examples, E)`` counts of every evenly routed layer."""
        return {f"load/{name}": torch.cat(rows).numpy() for name, rows in self.rows.items()
                if rows and name not in self.uneven}


def classification_examples(correct: list[Tensor], loads: ExampleLoads) -> dict[str, np.ndarray]:
    """The per-example records of a classification pass: each image's top-1 correctness (the batches' boolean
    tensors, in order) and its tokens per expert per layer."""
    return {"correct": torch.cat(correct).numpy() if correct else np.zeros(0, bool), **loads.arrays()}


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


class InputRecorder:
    """Forward pre-hooks on ``modules`` (name -> a routing layer's token MoE) handing each input to
    :meth:`record`: by default kept flattened to ``(T, D)`` in ``inputs``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, list[Tensor]] = {name: [] for name in modules}
        self.handles = [m.register_forward_pre_hook(lambda _m, args, name=name: self.record(name, args[0]))
                        for name, m in modules.items()]

    def record(self, name: str, x: Tensor) -> None:
        self.inputs[name].append(x.detach().reshape(-1, x.shape[-1]))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class PerExample:
    """A measure that is the mean over examples of ``fn(output, target)`` (one value per example), e.g. the
    cross-entropy: a torchmetrics ``MeanMetric`` with the ``update(output, target)`` of the other measures."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        from torchmetrics.aggregation import MeanMetric

        self.fn, self.mean = fn, MeanMetric()

    def to(self, device: torch.device) -> "PerExample":
        self.mean = self.mean.to(device)
        return self

    def update(self, output: Tensor, target: Tensor) -> None:
        self.mean.update(self.fn(output, target))

    def compute(self) -> Tensor:
        return self.mean.compute()


@dataclass
class Evaluation:
    """What :func:`evaluate_routed` gathered: each measure's value, the examples seen, the routing counts, per
    routing layer the probe's measures (:func:`probe_routing`; empty without a probe), and each example's expert
    loads (:class:`ExampleLoads`)."""

    measures: dict[str, float]
    examples: int
    counts: RoutingCounts
    probe: dict[str, dict[str, Any]]
    example_loads: ExampleLoads

    def layers(self, label: str = "label") -> dict[str, dict[str, Any]]:
        """Per routing layer: its load, ``expert_{label}_counts`` and ``mi_bits``, and the probe's measures."""
        return {name: {**self.counts.stats(name, label), **self.probe.get(name, {})} for name in self.counts}


@torch.no_grad()
def evaluate_routed(model: RoutedModel, batches: Iterable[tuple[Sequence[Tensor], Tensor | None]
                                                    | tuple[Sequence[Tensor], Tensor | None, Tensor | None]],
                    measures: dict[str, Any], num_labels: int = 1,
                    label_of: Callable[[Tensor | None], LabelFn] | None = None,
                    probe: Sequence[Tensor] | None = None, max_probe_tokens: int = 4096,
                    autocast: Callable[[], Any] | None = None,
                    on_output: Callable[[Tensor, Tensor | None], None] | None = None) -> Evaluation:
    """One evaluation pass of any task, in eval mode: each batch ``(inputs, target)`` (or ``(inputs, target,
    groups)``: the examples' ground-truth groups an oracle router routes by, ``ermoe.routing.oracle``) through the model, every
    measure (a torchmetrics metric, or anything with ``to``/``update(output, target)``/``compute``) updated with
    the output and the target, and every routing layer's assignments counted by the token labels
    ``label_of(target)`` gives (:class:`RoutingCounts`; None: load only, one label). ``on_output(output,
    target)``: anything else a task gathers. Then the probe's routing measures (stability, homogeneity, basis
    geometry)."""
    with evaluating(model):
        counts = RoutingCounts(model.routed_layers(), num_labels)
        loads = ExampleLoads(model.routed_layers())
        ctx = autocast or torch.no_grad
        examples = 0
        for inputs, target, *groups in batches:
            with ctx(), routed_by(model, groups[0] if groups else None):
                output = model(*inputs)
            output = output.float() if isinstance(output, Tensor) else output
            for measure in measures.values():
                measure.to(inputs[0].device).update(output, target)
            if on_output is not None:
                on_output(output, target)
            examples += len(inputs[0])
            counts.add(None if label_of is None else label_of(target))
            loads.add(len(inputs[0]))
        values = {name: float(m.compute()) if examples else float("nan") for name, m in measures.items()}
        probe_stats = probe_routing(model, probe, max_probe_tokens, ctx) if probe is not None else {}
    return Evaluation(values, examples, counts, probe_stats, loads)


def classification_measures(num_classes: int) -> dict[str, Any]:
    """A classifier's test measures: top-1 (the headline), top-5 (torchmetrics, micro averages over images) and the
    cross-entropy."""
    from torchmetrics.classification import MulticlassAccuracy

    return {**{f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in (1, 5)},
            "loss": PerExample(lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"))}


def evaluate_classifier(model: RoutedModel, batches: Iterable[tuple[Sequence[Tensor], Tensor]], num_classes: int,
                        probe: Sequence[Tensor] | None = None, max_probe_tokens: int = 4096,
                        autocast: Callable[[], Any] | None = None, measures: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """:func:`evaluate_routed` of a classifier, a token labelled by its image's class: ``measures`` (by default
    :func:`classification_measures`) as ``test_<name>``, and per routing layer load, expert x class counts, MI and
    on the probe inputs the routing (for stability), homogeneity and basis geometry; with what a classifier adds:
    images per class, MI over the class entropy, each image's correctness and expert loads (``TEST_EXAMPLES``), and
    the model's ``batch_metrics`` (sums over the batch), if it has any, as ``model_metrics``: those sums over the
    test set per image.

    ``batches`` yields ``(inputs, labels)``: the model's positional inputs and the labels, on the model's device and
    preprocessed; ``probe``: the probe's model inputs.
    """
    measures = classification_measures(num_classes) if measures is None else measures
    class_images = torch.zeros(num_classes, dtype=torch.long)
    model_sums: dict[str, float] = {}  # models with a batch_metrics(logits, labels) method: per-image sums
    correct: list[Tensor] = []

    def gather(logits: Tensor, labels: Tensor) -> None:
        nonlocal class_images
        class_images += torch.bincount(labels.cpu(), minlength=num_classes)
        correct.append((logits.argmax(1) == labels).cpu())
        for key, value in model.batch_metrics(logits, labels).items():
            model_sums[key] = model_sums.get(key, 0.0) + value

    ev = evaluate_routed(model, batches, measures, num_classes, example_labels, probe, max_probe_tokens, autocast,
                         gather)
    result: dict[str, Any] = {**{f"test_{k}": (0.0 if math.isnan(v) else v) for k, v in ev.measures.items()},
                              "test_images": ev.examples, "class_images": class_images.tolist(), "layers": {},
                              TEST_EXAMPLES: classification_examples(correct, ev.example_loads)}
    if model_sums:
        result["model_metrics"] = {key: value / max(ev.examples, 1) for key, value in model_sums.items()}
    h_class = entropy_bits(class_images)
    for name, stats in ev.layers("class").items():
        stats["mi_over_class_entropy"] = stats["mi_bits"] / h_class if h_class > 0 else float("nan")
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
    rec = InputRecorder({view.name: view.moe for view in layers if view.moe is not None})
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
