"""What an eigen router's basis directions respond to (``ermoe explain RUN_DIR``; docs/explain.md).

For each MoE layer with a basis (ERMoE: every expert's own basis U_e; EMoE: the shared basis U, each direction
grouped under the expert its weight ``gamma_r * pi[r, e]`` sends its energy to most), and each direction u:

- the tokens with the largest coordinates ``|u^T x|`` on it, over the examples read (image patches for the 2D ViTs,
  cells or patches of the volume for the 3D models);
- its **share**: among the tokens routed to its expert, the share whose largest coordinate (in that expert's
  directions) is this one;
- its **angle**: the principal angle (degrees) between u and the top-r PCA subspace of the tokens routed to its
  expert (r: the expert's number of directions): 0 when the direction lies in the span of what the expert is sent.
  A direction drawn at random lies at about ``arccos(sqrt(r / D))`` (its squared cosine averages r / D; 69.3
  degrees at r 24, D 192, where 20,000 random directions average 69.5): the layer's ``chance_angle_deg``.

Shape suffixes: T tokens, D model dim, E experts, R basis rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..orthogonal import pca_basis, principal_angles
from ..routing.eigenbasis import EigenbasisRouter
from ..routing.energy import EigenEnergyRouter
from .diagnostics import InputRecorder


@dataclass
class Direction:
    """One basis direction of a layer (module docstring). ``index``: its column in the expert's basis (ERMoE) or
    in the shared basis (EMoE); ``top_tokens``: rows of the layer's token table, largest ``|coordinate|`` first."""

    expert: int
    index: int
    share: float
    angle_deg: float
    top_tokens: list[int] = field(default_factory=list)
    top_coords: list[float] = field(default_factory=list)


@dataclass
class LayerDirections:
    """A layer's directions, its experts' shares of the tokens, and where each token came from: ``example[t]``
    and ``position[t]`` (its patch or cell index in the example's token grid)."""

    name: str
    router: str
    expert_share: list[float]
    directions: list[Direction]
    example: Tensor
    position: Tensor
    chance_angle_deg: float = float("nan")

    def summary(self) -> dict[str, Any]:
        """Plain data for explain.json (the token table left out)."""
        return {"router": self.router, "expert_share": self.expert_share, "chance_angle_deg": self.chance_angle_deg,
                "directions": [asdict(d) for d in self.directions]}


def basis_directions(router: nn.Module, x_TD: Tensor) -> list[tuple[int, int, Tensor, Tensor]]:
    """``(expert, index, u_D, coords_T)`` for every basis direction of an eigen router, with each token's
    coordinate on it. ERMoE: every expert's own directions; EMoE: the shared ones, each under its expert."""
    x = x_TD.double()
    if isinstance(router, EigenbasisRouter):
        u_EDR = router.basis.matrix.detach().double().cpu()
        z_TER = torch.einsum("td,edr->ter", x, u_EDR)
        return [(e, r, u_EDR[e, :, r], z_TER[:, e, r]) for e in range(u_EDR.shape[0]) for r in range(u_EDR.shape[2])]
    if isinstance(router, EigenEnergyRouter):
        u_DR = router.basis.matrix.detach().double().cpu()
        pi_RE = router.pi.detach().double().cpu()
        pi_RE = pi_RE.softmax(dim=-1) if router.pi_norm == "softmax" else pi_RE
        owner_R = (router.gamma.detach().double().cpu().unsqueeze(-1) * pi_RE).argmax(dim=-1)
        z_TR = x @ u_DR
        return [(int(owner_R[r]), r, u_DR[:, r], z_TR[:, r]) for r in range(u_DR.shape[1])]
    raise ValueError(f"explain shows basis directions: the ERMoE and EMoE routers have them, "
                     f"{type(router).__name__} has none")


def explain_layer(name: str, router: nn.Module, x_TD: Tensor, expert_T: Tensor, example_T: Tensor,
                  position_T: Tensor, num_experts: int, top: int = 8) -> LayerDirections:
    """The directions of one layer over its tokens ``x_TD``, routed (top-1) to ``expert_T`` (module docstring)."""
    found = basis_directions(router, x_TD)
    x = x_TD.double()
    counts = torch.bincount(expert_T, minlength=num_experts).double()
    directions = []
    by_expert: dict[int, list[int]] = {}
    for i, (e, _, _, _) in enumerate(found):
        by_expert.setdefault(e, []).append(i)
    for e, members in by_expert.items():
        mine = expert_T == e
        coords_TM = torch.stack([found[i][3] for i in members], dim=1)
        winner = coords_TM[mine].abs().argmax(dim=1) if mine.any() else torch.empty(0, dtype=torch.long)
        rank = len(members)
        subspace = pca_basis(x[mine], rank).double() if int(mine.sum()) >= rank else None
        for j, i in enumerate(members):
            _, index, u_D, coords_T = found[i]
            order = coords_T.abs().argsort(descending=True)[:top]
            directions.append(Direction(
                expert=e, index=index,
                share=float((winner == j).double().mean()) if len(winner) else float("nan"),
                angle_deg=math.degrees(float(principal_angles(u_D[:, None], subspace)[0]))
                if subspace is not None else float("nan"),
                top_tokens=order.tolist(), top_coords=coords_T[order].tolist()))
    directions.sort(key=lambda d: (d.expert, d.index))
    share = (counts / counts.sum().clamp_min(1)).tolist()
    per_expert = len(found) / len(by_expert)
    chance = math.degrees(math.acos(math.sqrt(min(1.0, per_expert / x.shape[1]))))
    return LayerDirections(name, type(router).__name__, share, directions, example_T, position_T, chance)


class TokenRecorder(InputRecorder):
    """The tokens the MoE of each named routing layer receives, with the example and position each came from. The
    layer's input is ``(B, N, D)``: the MoE gets all N tokens of each example, or those its layer's
    :meth:`~ermoe.models.RoutingLayer.token_mask` marks (the text tower's real tokens)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.places: dict[str, list[Tensor]] = {n: [] for n in layers}  # (T, 2): example in batch, position
        self.batch_sizes: dict[str, list[int]] = {n: [] for n in layers}
        super().__init__({n: layer.token_moe() for n, layer in layers.items()})
        self.tokens = self.inputs

    def record(self, name: str, x: Tensor) -> None:
        if x.dim() == 3:
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
        else:
            mask = self.layers[name].token_mask()
            if x.dim() != 2 or mask is None or int(mask.sum()) != x.shape[0]:
                raise ValueError(f"explain: layer {name} receives tokens of shape {tuple(x.shape)} without "
                                 "a (examples, tokens) mask placing them; it needs (examples, tokens, dim) "
                                 "input or a layer with token_mask()")
        super().record(name, x.float().cpu())
        self.places[name].append(mask.cpu().nonzero())
        self.batch_sizes[name].append(mask.shape[0])

    def table(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_TD, example_T, position_T)`` of a layer over every batch recorded."""
        examples, positions, offset = [], [], 0
        for places, b in zip(self.places[name], self.batch_sizes[name]):
            examples.append(places[:, 0] + offset)
            positions.append(places[:, 1])
            offset += b
        return torch.cat(self.tokens[name]), torch.cat(examples), torch.cat(positions)


@torch.no_grad()
def explain_model(model: nn.Module, batches: Iterable[Sequence[Tensor]], top: int = 8
                  ) -> tuple[list[LayerDirections], list[Tensor]]:
    """Every eigen-routed layer of a :class:`~ermoe.models.RoutedModel` over ``batches`` (tuples of model inputs,
    in eval mode); returns the layers and each model input over all batches (for drawing)."""
    views = [v for v in model.routed_layers() if v.moe is not None
             and isinstance(v.moe.router, (EigenbasisRouter, EigenEnergyRouter))]
    if not views:
        raise ValueError("explain: the model has no ERMoE or EMoE layer (only eigen routers have basis directions)")
    recorder = TokenRecorder({v.name: v.layer for v in views})
    experts: dict[str, list[Tensor]] = {v.name: [] for v in views}
    inputs: list[list[Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(*batch)
            inputs.append([x.detach().cpu() for x in batch])
            for v in views:
                experts[v.name].append(v.last_routing.expert_idx[:, 0].cpu())
    finally:
        recorder.close()
        model.train(was_training)
    layers = []
    for v in views:
        x_TD, example_T, position_T = recorder.table(v.name)
        layers.append(explain_layer(v.name, v.moe.router, x_TD, torch.cat(experts[v.name]), example_T, position_T,
                                    v.num_experts, top))
    return layers, [torch.cat(xs) for xs in zip(*inputs)]


def _chosen(layer: LayerDirections, per_expert: int) -> list[list[Direction]]:
    """Per expert, its ``per_expert`` directions with the largest share (the ones its tokens lean on most)."""
    rows: dict[int, list[Direction]] = {}
    for d in layer.directions:
        rows.setdefault(d.expert, []).append(d)
    return [sorted(ds, key=lambda d: -(d.share if not math.isnan(d.share) else -1.0))[:per_expert]
            for _, ds in sorted(rows.items())]


def _label(layer: LayerDirections, d: Direction) -> str:
    return (f"e{d.expert} ({100 * layer.expert_share[d.expert]:.0f}% tok) u{d.index}\n"
            f"share {100 * d.share:.0f}%  angle {d.angle_deg:.0f}°")


def draw_patches(layer: LayerDirections, images_NCHW: Tensor, grid: tuple[int, int], path, per_expert: int = 4
                 ) -> None:
    """One row per (expert, direction): the image patches with the largest coordinates on the direction, each
    with one patch of context around it (the patch itself outlined)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = [d for ds in _chosen(layer, per_expert) for d in ds]
    cols = max(len(d.top_tokens) for d in rows)
    _, channels, height, width = images_NCHW.shape
    ph, pw = height // grid[0], width // grid[1]
    fig, axes = plt.subplots(len(rows), cols + 1, figsize=(1.0 * cols + 2.2, 1.0 * len(rows)), squeeze=False)
    for r, d in enumerate(rows):
        axes[r, 0].axis("off")
        axes[r, 0].text(0.0, 0.5, _label(layer, d), fontsize=6, va="center", transform=axes[r, 0].transAxes)
        for c in range(cols):
            ax = axes[r, c + 1]
            ax.axis("off")
            if c >= len(d.top_tokens):
                continue
            t = d.top_tokens[c]
            image = images_NCHW[int(layer.example[t])].float()
            gy, gx = divmod(int(layer.position[t]), grid[1])
            y0, x0 = max(0, (gy - 1) * ph), max(0, (gx - 1) * pw)
            y1, x1 = min(height, (gy + 2) * ph), min(width, (gx + 2) * pw)
            crop = image[:, y0:y1, x0:x1]
            lo, hi = image.min(), image.max()
            crop = ((crop - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0).numpy()
            ax.imshow(crop[..., 0] if channels == 1 else crop[..., :3], cmap="gray" if channels == 1 else None,
                      vmin=0, vmax=1)
            ax.add_patch(Rectangle((gx * pw - x0 - 0.5, gy * ph - y0 - 0.5), pw, ph, fill=False, color="red",
                                   linewidth=0.8))
    fig.suptitle(f"{layer.name} ({layer.router}): patches with the largest |coordinate| per direction", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / len(rows)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_locations(layer: LayerDirections, volumes_NCXYZ: Tensor, grid: tuple[int, int, int], path,
                   per_expert: int = 4, top: int = 100) -> None:
    """One panel per (expert, direction): where in the volume its ``top`` largest-coordinate tokens lie (their
    count per grid cell, summed over the last axis), over the mean input volume summed the same way."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    chosen = _chosen(layer, per_expert)
    background = volumes_NCXYZ.float().mean(dim=(0, 1)).sum(dim=-1)  # (X, Y)
    fig, axes = plt.subplots(len(chosen), per_expert, figsize=(1.6 * per_expert, 1.7 * len(chosen)), squeeze=False)
    for r, ds in enumerate(chosen):
        for c in range(per_expert):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(ds):
                continue
            d = ds[c]
            counts = torch.zeros(grid)
            for t in d.top_tokens[:top]:
                i, rest = divmod(int(layer.position[t]), grid[1] * grid[2])
                counts[i, rest // grid[2], rest % grid[2]] += 1
            heat = F.interpolate(counts.sum(-1)[None, None], size=tuple(background.shape), mode="nearest")[0, 0]
            ax.imshow(background.T.numpy(), cmap="gray", origin="lower")
            ax.imshow(heat.T.numpy(), cmap="hot", alpha=0.5, origin="lower")
            ax.set_title(_label(layer, d), fontsize=5)
    fig.suptitle(f"{layer.name} ({layer.router}): where each direction's top {top} tokens lie "
                 "(axial sum over the mean input)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / len(chosen)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_tokens(layer: LayerDirections, ids_NL: Tensor, words: list[str], path, per_expert: int = 4,
                context: int = 3, pad_id: int = 0) -> None:
    """One row per (expert, direction): its top tokens, each as its word in brackets with ``context`` words of its
    caption either side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [d for ds in _chosen(layer, per_expert) for d in ds]
    cols = max(len(d.top_tokens) for d in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(2.2 + 1.9 * cols, 0.45 * len(rows) + 0.4), squeeze=False)
    for r, d in enumerate(rows):
        ax = axes[r, 0]
        ax.axis("off")
        snippets = [token_in_context(ids_NL, words, int(layer.example[t]), int(layer.position[t]), context,
                                     pad_id) for t in d.top_tokens]
        ax.text(0.0, 0.5, _label(layer, d).replace("\n", "  "), fontsize=6, va="center", transform=ax.transAxes)
        ax.text(0.2, 0.5, "  |  ".join(snippets), fontsize=6, va="center", family="monospace",
                transform=ax.transAxes)
    fig.suptitle(f"{layer.name} ({layer.router}): words with the largest |coordinate| per direction", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / len(rows)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_in_context(ids_NL: Tensor, words: list[str], example: int, position: int, context: int = 3,
                     pad_id: int = 0) -> str:
    """The word at ``position`` of caption ``example`` in brackets, with up to ``context`` words either side
    (``pad_id`` ends a caption)."""
    row = ids_NL[example].tolist()
    end = row.index(pad_id) if pad_id in row else len(row)
    left = " ".join(words[i] for i in row[max(0, position - context):position])
    right = " ".join(words[i] for i in row[position + 1:min(end, position + 1 + context)])
    return " ".join(part for part in (left, f"[{words[row[position]]}]", right) if part)


def draw_angles(records: list[dict[str, Any]], path) -> bool:
    """The mean principal angle of each layer's bases to the PCA subspace of their tokens over training (the
    ``probe_geometry`` records of a run's log); False when the log has none."""
    records = [r for r in records if r.get("kind") == "probe_geometry"]
    if not records:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in records[0] if k not in ("kind", "step") and "/" not in k]
    fig, ax = plt.subplots(figsize=(6, 3))
    for name in names:
        ax.plot([r["step"] for r in records], [r.get(name, float("nan")) for r in records], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("mean principal angle (deg)")
    ax.set_title("bases vs. the PCA subspace of their tokens (probe)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
