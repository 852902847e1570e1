"""``ermoe explain RUN_DIR``: what the basis directions of a run's eigen routers respond to, drawn per layer
(:mod:`ermoe.analysis.explain`; docs/explain.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..analysis.explain import (LayerDirections, draw_angles, draw_locations, draw_patches, draw_tokens,
                                explain_model, token_in_context)
from .checkpoint import atomic_write_text
from .run import Run, strict_json
from .trainer import load_run


def explain(run_dir: str | Path, examples: int | None = None, split: str | None = None, per_expert: int = 4,
            top: int = 8, quiet: bool = False) -> dict[str, Any]:
    """Read ``examples`` examples of ``split`` (default: the validation split, else the training split: the test
    split stays unread) through the run's latest checkpoint; write ``figures/explain_<layer>.png`` per eigen-routed
    layer, ``figures/angles.png`` (from the run's probe log) and ``explain.json``; return what explain.json holds."""
    for key, value in (("examples", examples), ("directions per expert", per_expert), ("top", top)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"explain: {key} must be a positive integer, got {value!r}")
    cfg, task, model, _, _ = load_run(run_dir)
    run = Run(Path(run_dir))
    split = split or ("val" if task.has_split("val") else "train")
    grids, sequences = model.token_grid, model.token_sequence
    volumetric = any(len(g) == 3 for g in grids.values())
    examples = examples if examples is not None else (64 if volumetric else 2000)
    batches = [b.inputs for b in task.eval_batches(split, limit=examples)]
    layers, inputs = explain_model(model, batches, top=max(top, 100) if volumetric else top)
    images = inputs[0]
    words = task.vocabulary() if sequences else None
    run.figures.mkdir(parents=True, exist_ok=True)
    written, summaries = [], {}
    for layer in layers:
        path = run.figures / f"explain_{layer.name.replace('.', '_')}.png"
        grid = grids.get(layer.name)
        summaries[layer.name] = layer.summary()
        if layer.name in sequences and words is not None:
            ids = inputs[sequences[layer.name]]
            draw_tokens(layer, ids, words, path, per_expert, pad_id=task.model_args().get("pad_id", 0))
            for d, row in zip(layer.directions, summaries[layer.name]["directions"]):
                row["top_words"] = [token_in_context(ids, words, int(layer.example[t]), int(layer.position[t]), 0)
                                    for t in d.top_tokens]
        elif grid is not None and len(grid) == 3 and images.dim() == 5:
            draw_locations(layer, images, grid, path, per_expert)
        elif grid is not None and len(grid) == 2 and images.dim() == 4:
            draw_patches(layer, images, grid, path, per_expert)
        else:
            raise ValueError(f"explain draws image patches of a 2D ViT, locations in a volume or a text tower's "
                             f"words; layer {layer.name} of model {cfg.model.name!r} (inputs of shape "
                             f"{tuple(images.shape)}) has no token grid over its input and reads no token ids")
        written.append(path)
    angles = run.figures / "angles.png"
    if draw_angles(run.read_log(), angles):
        written.append(angles)
    out = {"run": str(run.root), "split": split, "examples": len(images),
           "layers": summaries,
           "figures": [str(p) for p in written],
           "note": "null where a value is undefined (an angle or share of a direction no token reached)"}
    atomic_write_text(run.root / "explain.json", json.dumps(strict_json(out), indent=1, allow_nan=False))
    if not quiet:
        print(explain_text(layers, split, len(images)))
        if not angles.exists():
            print("no probe geometry in the run's log (train with probe_every > 0, or let it checkpoint)")
        print("figures: " + ", ".join(str(p) for p in written))
    return out


def explain_text(layers: list[LayerDirections], split: str, examples: int) -> str:
    """Per layer: its router, its experts' token shares, and the mean share and angle of its directions."""
    lines = [f"{examples} {split} examples", f"{'layer':<16} {'router':<20} {'tokens/expert (%)':<34} "
             f"{'top share':>9} {'angle':>6} {'chance':>6}"]
    for layer in layers:
        shares = " ".join(f"{100 * s:.0f}" for s in layer.expert_share)
        finite = [d.angle_deg for d in layer.directions if not math.isnan(d.angle_deg)]
        top: dict[int, float] = {}
        for d in layer.directions:
            if not math.isnan(d.share):
                top[d.expert] = max(top.get(d.expert, 0.0), d.share)
        top_share = sum(top.values()) / len(top) if top else float("nan")
        angle = sum(finite) / len(finite) if finite else float("nan")
        lines.append(f"{layer.name:<16} {layer.router:<20} {shares:<34} {100 * top_share:>8.1f}% {angle:>6.1f} "
                     f"{layer.chance_angle_deg:>6.1f}")
    lines.append("top share: mean over experts of the largest share of an expert's tokens that one direction holds "
                 "(its largest coordinate); angle: mean principal angle (deg) of each direction to the PCA subspace "
                 "of its expert's tokens; chance: a random direction's")
    return "\n".join(lines)
