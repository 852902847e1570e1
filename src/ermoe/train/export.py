"""``ermoe export RUN_DIR OUT_DIR``: a run's model (its latest intact checkpoint, or one named) in the Hugging Face
Hub's layout (:mod:`ermoe.models.hub`), with a model card of what the run was and what it measured, and the run's
config beside it so the card's command reproduces it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..models.hub import save_pretrained
from .config import TrainConfig
from .run import CONFIG_FILE, Run
from .trainer import load_run, results_text


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
               push_to: str | None = None) -> Path:
    """Write the run's model to ``out_dir`` (model.safetensors, config.json, README.md, train_config.yaml);
    ``push_to``: also upload the folder to that Hub repository (``huggingface_hub``; needs a token)."""
    run = Run(Path(run_dir))
    cfg, task, model, state, _ = load_run(run.root, checkpoint)
    m = cfg.model
    args = {**m.args, **task.model_args()}
    build = {"name": m.name, "args": args, "upcycle": model.ermoe_build["upcycle"]}  # (set by create_model)
    metrics = run.read_metrics()
    out = save_pretrained(model, out_dir, card=model_card(cfg, task, metrics, state["step"]), build=build)
    shutil.copyfile(run.root / CONFIG_FILE, out / "train_config.yaml")
    if push_to is not None:
        from ..models.hub import push_to_hub
        print(f"pushed to {push_to_hub(out, push_to)}")
    return out


def model_card(cfg: TrainConfig, task, metrics: dict[str, Any] | None, step: int) -> str:
    """The README.md of an exported run: the model and its router, the data and budget, the test results and the
    routing table of metrics.json, the command that reproduces it; the licence is the user's to fill in."""
    moe = cfg.model.moe
    router = "no MoE layers" if moe is None else (
        f"router `{moe.router}`, {moe.num_experts} experts, top-{moe.top_k}, blocks {moe.blocks!r}"
        + (f", router options {moe.router_kwargs}" if moe.router_kwargs else ""))
    o = cfg.optim
    lines = ["---", "library_name: ermoe", "tags: [mixture-of-experts, ermoe, " + cfg.task + "]",
             "license: # fill in the licence of these weights", "---", "",
             f"# {cfg.model.name} on {cfg.data.name} ({cfg.task})", "",
             f"- model: `{cfg.model.name}`, {router}",
             f"- data: `{cfg.data.name}`; budget: {o.epochs} epochs of batch {o.batch_size}"
             + (f" (stopped at {o.max_steps} steps)" if o.max_steps else "") + f", lr {o.lr:g}, seed {cfg.seed}; "
             f"weights of step {step}", ""]
    if metrics:
        lines += ["## Results (this run's metrics.json)", "", "```text", results_text(task, metrics), "```", ""]
    else:
        lines += ["No metrics.json in the run: run `ermoe eval RUN_DIR` before exporting for the results.", ""]
    lines += ["## Use", "", "```python", "import ermoe", 'model = ermoe.from_pretrained("PATH_OR_REPO")', "```", "",
              "Reproduce the run: `ermoe train --config train_config.yaml` (the run's own config, beside this card).",
              ""]
    return "\n".join(lines)
