"""Expert maps over the anatomy (brain age): per expert, the share of each location's tokens routed to it, drawn as
three orthogonal slices over the MNI152 template (one row per expert), from a run's metrics alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def expert_shares(counts_EN: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """``(E, x, y, z)``: the share of each cell's tokens that each expert computed (0 where no token was routed)."""
    counts = np.asarray(counts_EN, dtype=float)
    total = counts.sum(0, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0).reshape(-1, *grid)


def _template(spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    """The MNI152 T1 template on the run's grid (grey background of the maps); zeros without nilearn."""
    try:
        from nilearn import datasets
        from nilearn.image import resample_img

        from ..data.nifti import mni_grid

        grid_shape, affine = mni_grid(spacing)
        img = resample_img(datasets.load_mni152_template(resolution=1), target_affine=affine,
                           target_shape=grid_shape, interpolation="linear", force_resample=True, copy_header=True)
        return np.asarray(img.get_fdata(dtype=np.float32))
    except ImportError:
        return np.zeros(shape, dtype=np.float32)


def draw_expert_maps(metrics: dict[str, Any], fig_dir: str | Path) -> list[Path]:
    """One PNG per MoE layer: rows = experts, columns = sagittal, coronal and axial slices through the centre of
    the volume, the expert's share of the location's tokens in colour over the template. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    fig_dir = Path(fig_dir)
    layers = {n: s for n, s in metrics.get("layers", {}).items() if "expert_cell_counts" in s}
    if not layers:
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    shape = tuple(metrics["volume_shape"])
    background = _template(metrics["spacing"], shape)
    centre = [n // 2 for n in shape]
    written = []
    for name, s in layers.items():
        shares = expert_shares(np.asarray(s["expert_cell_counts"]), tuple(s["token_grid"]))
        up = F.interpolate(torch.from_numpy(shares).float()[None], size=shape, mode="nearest")[0].numpy()
        num_experts = len(up)
        fig, axes = plt.subplots(num_experts, 3, figsize=(6.6, 2.0 * num_experts), squeeze=False)
        for e in range(num_experts):
            for col, axis in enumerate(range(3)):
                ax = axes[e][col]
                bg = np.take(background, centre[axis], axis=axis).T
                overlay = np.take(up[e], centre[axis], axis=axis).T
                ax.imshow(bg, cmap="gray", origin="lower")
                im = ax.imshow(np.ma.masked_where(bg <= 0, overlay), cmap="magma", vmin=0, vmax=1, alpha=0.6,
                               origin="lower")
                ax.set_xticks([]), ax.set_yticks([])
                if e == 0:
                    ax.set_title(("sagittal", "coronal", "axial")[col], fontsize=8)
            axes[e][0].set_ylabel(f"expert {e}\n({s['tokens_per_expert'][e]} tokens)", fontsize=7)
        fig.suptitle(f"{name}: share of each location's tokens (MI with tissue {s['mi_tissue_bits']:.2f} bits)",
                     fontsize=8)
        fig.colorbar(im, ax=axes, fraction=0.03)
        path = fig_dir / f"expert_maps_{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
