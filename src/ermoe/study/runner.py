"""``ermoe study``: every method x seed under one budget, resumable, then the generated report."""

from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..settings import yaml_load
from ..train.config import ConfigError, build_section, config_from_dict, merge_settings
from ..train.checkpoint import list_checkpoints
from ..train.lock import RunLock
from ..train.run import EXAMPLES_FILES, METRICS_FILE, Run
from ..train.trainer import load_run, train
from .kinds import StudyKind, study_kind, study_plan
from .report import IMAGE_BASELINES, IMAGE_MARGINS
from .methods import DEFAULT_METHODS, STUDY_SET_METHODS


@dataclass
class StudyConfig:
    """What the study runs. ``train`` holds overrides of the training config shared by every run (the budget)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    out_dir: str = "runs/study"
    report: str = "docs/results.md"
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    fewshot_draws: int = 5
    fewshot_train_pool: int = 3000  # images the support sets are drawn from (the transfer set's training split)
    # Few-shot probes on data the backbone never saw: a dataset name (its images resized to the model's input), or
    # "in_domain" (support from the training images, queries from the validation split; labelled as such).
    fewshot_transfer: str = "digits"
    # A finished or started run whose config (or ermoe version) differs from what the study would run now:
    # "refuse" (an error naming the difference) or "rerun" (it is moved aside to <run>.stale-<time>, kept).
    stale: Literal["refuse", "rerun"] = "refuse"
    # Methods this study's config chose before its runs, on an earlier study's validation data (a confirmation):
    # its report does not mark them exploratory where the method table does (ermoe.study.methods.EXPLORATORY).
    preregistered: list[str] = field(default_factory=list)
    # Fixed before any run (ermoe.study.plan): the non-inferiority margin of each measure, in its units, with the
    # reason for its size ({measure: {value, reason}}), and the baseline of each claim ({claim: method, or a list of
    # one method per comparison}). The report prints both; nothing is computed from the results.
    margins: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(IMAGE_MARGINS))
    baselines: dict[str, Any] = field(default_factory=lambda: dict(IMAGE_BASELINES))
    # Fixed before any run, like the margins: a method's router settings chosen for this study ({method: {kwargs:
    # {name: value}, reason: <how they were chosen>}}), e.g. Switch's balancing coefficient chosen on validation
    # loads; merged into every MoE layer's router_kwargs of that method's runs.
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=lambda: {
        "model": {"name": "vit_tiny", "embed_dim": 96, "num_heads": 3, "depth": 4, "patch_size": 7,
                  "moe": {"num_experts": 8, "top_k": 1, "blocks": "every_other"}},
        # docs/method.md, section 7's budget; 5,000 further training images are held out for validation
        "data": {"name": "fashion_mnist", "train_limit": 20000, "test_limit": 5000, "val_size": 5000},
        "optim": {"epochs": 3, "batch_size": 128, "lr": 1.0e-3, "warmup_steps": 100},
        "probe_size": 256, "probe_every": 39, "tensorboard": False, "progress": False, "keep_checkpoints": 1,
    })


QUICK = {
    "seeds": [0, 1],
    "out_dir": "runs/study-quick",
    "report": "runs/study-quick/results.md",
    "fewshot_shots": [1, 5],
    "fewshot_draws": 2,
    "fewshot_train_pool": 1000,
    "train": {"model": {"embed_dim": 32, "num_heads": 2, "depth": 2, "moe": {"num_experts": 4, "blocks": "all"}},
              "data": {"train_limit": 2048, "test_limit": 1000, "val_size": 500},
              "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 10}, "probe_size": 64, "probe_every": 8},
}


def load_study_config(path: str | Path | None = None, quick: bool = False,
                      overrides: dict[str, Any] | None = None) -> StudyConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"study config {path} not found")
        try:
            values = yaml_load(path.read_text()) or {}  # the train configs' reader (YAML 1.2 floats: 3e-4)
        except yaml.YAMLError as err:
            raise ConfigError(f"study config {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"study config {path} must hold a mapping, got {type(values).__name__}")
    overrides = overrides or {}
    task = ((overrides.get("train") or {}).get("task") or (values.get("train") or {}).get("task")
            or "classification")
    kind = study_kind(task)
    if not kind.fewshot:
        given = sorted(k for k in (*values, *overrides) if k.startswith("fewshot"))
        if given:
            raise ConfigError(f"{', '.join(given)}: few-shot probes are part of the image-classification study; the "
                              f"{task} study has none")
    defaults = StudyConfig()  # the image study's; a config's margins and baselines merge into the kind's own
    merged = kind.defaults if kind.defaults is not None else {"train": defaults.train, "margins": defaults.margins,
                                                              "baselines": defaults.baselines}
    merged = merge_settings(merged, values)
    if quick:
        merged = merge_settings(merged, kind.quick if kind.quick is not None else QUICK)
    merged = merge_settings(merged, overrides)
    for given in (values, overrides):  # a margin the config states replaces the default whole: value and reason
        stated = given.get("margins") or {}
        if not isinstance(stated, dict):
            raise ConfigError(f"study.margins: expected a mapping of measure -> {{value, reason}}, got {stated!r}")
        merged["margins"].update(stated)
    cfg = build_section(StudyConfig, merged)
    for name in cfg.methods:
        if name not in kind.methods:
            raise ConfigError(f"study.methods: unknown {task} study method {name!r}; choose from {list(kind.methods)}")
    if not cfg.seeds:
        raise ConfigError("study.seeds must name at least one seed")
    unset = [m for m in cfg.methods if m in STUDY_SET_METHODS and m not in cfg.router_kwargs]
    if unset:
        raise ConfigError(f"study.methods: {unset} take their router settings from the study config, fixed before "
                          f"the runs: study.router_kwargs.{unset[0]}: {{kwargs: {{...}}, reason: <how they were "
                          "chosen>}")
    if cfg.preregistered and kind.task != "classification":
        raise ConfigError(f"study.preregistered: the {task} study marks no method exploratory, so there is nothing "
                          "for it to change")
    stray = [m for m in cfg.preregistered if m not in cfg.methods]
    if stray:
        raise ConfigError(f"study.preregistered: {stray} is not among this study's methods {cfg.methods}")
    if kind.fewshot and cfg.fewshot_transfer != "in_domain":
        from ..data.images import DATASETS
        if cfg.fewshot_transfer not in DATASETS:
            raise ConfigError(f"study.fewshot_transfer must be 'in_domain' or one of {DATASETS}, got "
                              f"{cfg.fewshot_transfer!r}")
        if cfg.fewshot_transfer == cfg.train.get("data", {}).get("name", "fashion_mnist"):
            raise ConfigError(f"study.fewshot_transfer {cfg.fewshot_transfer!r} is the training data: a transfer "
                              "probe needs data the backbone never saw (or 'in_domain', labelled as such)")
    run_config(cfg, cfg.methods[0], cfg.seeds[0])  # validates the training overrides before anything runs
    study_plan(cfg)  # and the margins and baselines
    return cfg


def kind_of(cfg: StudyConfig) -> StudyKind:
    """The study a config asks for, by its training task."""
    return study_kind(cfg.train.get("task", "classification"))


def run_config(cfg: StudyConfig, method: str, seed: int):
    """The training config of one run: the shared budget, the method's whole model section, the seed."""
    model = kind_of(cfg).method_model(method, cfg.train.get("model", {}))
    if method in cfg.router_kwargs:
        model = _with_router_kwargs(model, cfg.router_kwargs[method]["kwargs"])
    values = {"figures": False, **cfg.train, "model": model}  # the report draws its own (a study's train may ask)
    values = merge_settings(values, {"seed": seed, "out_dir": str(Path(cfg.out_dir) / method),
                                     "run_name": f"seed{seed}"})
    return config_from_dict(values)


def _with_router_kwargs(model: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model`` with ``kwargs`` merged into the router_kwargs of every MoE section in it (a tower's too)."""
    out = {}
    for key, value in model.items():
        if key == "moe" and isinstance(value, dict) and value.get("router"):
            value = {**value, "router_kwargs": {**(value.get("router_kwargs") or {}), **kwargs}}
        elif isinstance(value, dict):
            value = _with_router_kwargs(value, kwargs)
        out[key] = value
    return out


def run_dir(cfg: StudyConfig, method: str, seed: int) -> Path:
    return Path(cfg.out_dir) / method / f"seed{seed}"


def _probes_fewshot(kind: StudyKind, method: str) -> bool:
    """Whether a run of ``method`` gets few-shot probes: in a study that has them, every method but a control (the
    oracle routes by the label, and a few-shot query's label is what the probe predicts)."""
    return kind.fewshot and kind.methods[method][0] != "control"


def _finished(path: Path, kind: StudyKind, method: str) -> dict[str, Any] | None:
    """A finished run's metrics (with its few-shot probes where it gets them), else None."""
    metrics_path = path / METRICS_FILE
    if not metrics_path.exists():
        return None
    metrics = json.loads(metrics_path.read_text())
    return metrics if "fewshot" in metrics or not _probes_fewshot(kind, method) else None


def add_fewshot(path: Path, cfg: StudyConfig) -> dict[str, Any]:
    """Few-shot linear probes on the frozen pooled features of a finished run; stored in its metrics.json."""
    with RunLock(path):
        return _add_fewshot(path, cfg)


def _add_fewshot(path: Path, cfg: StudyConfig) -> dict[str, Any]:
    from ..analysis.fewshot import extract_features, few_shot_probe
    from ..data.images import load_dataset

    train_cfg, task, model, _, _ = load_run(path)
    if cfg.fewshot_transfer == "in_domain":  # labelled as such in the report
        support = list(task.eval_batches("train", limit=cfg.fewshot_train_pool))
        query = list(task.eval_batches("val" if task.data.val is not None else "test"))
    else:
        transfer = load_dataset(cfg.fewshot_transfer)
        support = list(task.image_batches(transfer.train.subset(cfg.fewshot_train_pool)))
        query = list(task.image_batches(transfer.test))
    ftr = extract_features(model, (b.inputs for b in support))
    fte = extract_features(model, (b.inputs for b in query))
    ytr = torch.cat([b.target for b in support]).cpu()
    yte = torch.cat([b.target for b in query]).cpu()
    fewshot = {}
    for shots in cfg.fewshot_shots:
        mean, std = few_shot_probe(ftr, ytr, fte, yte, shots, cfg.fewshot_draws, seed=train_cfg.seed)
        fewshot[str(shots)] = {"mean": mean, "std": std}
    metrics = json.loads((path / METRICS_FILE).read_text())
    metrics["fewshot"] = fewshot
    metrics["fewshot_transfer"] = cfg.fewshot_transfer
    Run(path).write_metrics(metrics)
    return metrics


def record_validation_examples(path: Path) -> bool:
    """A finished run evaluated before its per-example validation results were kept (``val_examples.npz``) gets
    them from its final checkpoint: the validation pass only, checked against the validation measures its
    metrics.json holds (top-1 and every layer's tokens per expert, exactly) before they are written. Returns whether
    they were written; a checkpoint that does not give back those measures warns and writes nothing (the report's
    comparisons of that run then rest on the seeds alone)."""
    import numpy as np

    from ..analysis.diagnostics import VAL_EXAMPLES
    from ..train.components import amp_dtype, autocast_ctx

    if (path / EXAMPLES_FILES["val"]).exists() or "val_layers" not in (Run(path).read_metrics() or {}):
        return False
    with RunLock(path):
        run = Run(path)
        metrics = run.read_metrics()
        train_cfg, task, model, _, device = load_run(path)
        fresh = task.validation(model, autocast_ctx(device, amp_dtype(train_cfg.optim.amp, device)))
        arrays = fresh[VAL_EXAMPLES]
        recorded = metrics["val_layers"]
        # top-1 as torchmetrics computed it (float32): the tolerance is far below one image in the split
        same = (np.isclose(arrays["correct"].mean(), metrics["val_top1"], rtol=1e-6, atol=1e-9)
                and set(recorded) == set(fresh["val_layers"])
                and all(fresh["val_layers"][name]["tokens_per_expert"] == recorded[name]["tokens_per_expert"]
                        for name in recorded))
        if not same:
            warnings.warn(f"{path}: its checkpoint does not give back the validation measures in its metrics.json "
                          f"(top-1 {float(arrays['correct'].mean()):.6f} against {metrics['val_top1']:.6f}); no "
                          "validation records written, its comparisons rest on the seeds alone", stacklevel=2)
            return False
        run.write_examples(arrays, "val")
        return True


def record_word_order(path: Path) -> bool:
    """A finished retrieval run evaluated before word order was measured gets it from its final checkpoint: the
    test split embedded again, checked against the ranks its ``test_examples.npz`` holds (every image's and every
    caption's, exactly), then ``test_word_order_acc`` and ``test_word_order_chance`` join its metrics.json and the
    per-caption records (``caption/kind``, ``caption/order_correct``) its test examples (Retrieval.word_order).
    Returns whether they were written; a checkpoint that does not give back the ranks warns and writes nothing."""
    import numpy as np

    from ..analysis.retrieval import retrieval_ranks
    from ..train.components import amp_dtype, autocast_ctx

    run = Run(path)
    metrics = run.read_metrics() or {}
    if metrics.get("task") != "retrieval" or not metrics.get("test_caption_order_decides"):
        return False
    examples = run.read_examples()
    if examples is None or "caption/order_correct" in examples:
        return False
    with RunLock(path):
        train_cfg, task, model, _, device = load_run(path)
        images, texts, owner = task.embed(model, "test", autocast_ctx(device, amp_dtype(train_cfg.optim.amp, device)))
        image_rank, text_rank = retrieval_ranks(images, texts, owner)
        if not (np.array_equal(image_rank.numpy(), examples.get("i2t_rank"))
                and np.array_equal(text_rank.numpy(), examples.get("caption/t2i_rank"))):
            warnings.warn(f"{path}: its checkpoint does not give back the test ranks in its test_examples.npz; word "
                          "order not measured, nothing written", stacklevel=2)
            return False
        order_metrics, records = task.word_order(images, texts, owner)
        # metrics first: a run cut off between the two writes is measured again the next time (same numbers)
        run.write_metrics({**metrics, **order_metrics})
        run.write_examples({**examples, **records})
        return True


def stale_reason(path: Path, train_cfg) -> str | None:
    """Why the run in ``path`` is not the run the study would make now (its config or the ermoe version that made
    it differ; where it lives aside, and whether it drew its own figures, aside), or None."""
    from .. import __version__
    from ..train.run import CONFIG_FILE, DRAWING, config_changes

    if not (path / CONFIG_FILE).exists():
        return None
    run = Run(path)
    diff = [f"{k} {change['from']!r} -> {change['to']!r}"
            for k, change in config_changes(run.read_config(), train_cfg).items() if k not in DRAWING]
    if diff:
        return "its config differs: " + ", ".join(diff)
    metrics = run.read_metrics()
    if metrics is not None and metrics.get("ermoe_version") != __version__:
        return f"it was made by ermoe {metrics.get('ermoe_version')}, this is {__version__}"
    return None


def run_study(cfg: StudyConfig, log=print) -> dict[str, dict[int, dict[str, Any]]]:
    """Train every (method, seed) not finished yet (resuming interrupted ones), add few-shot probes, return metrics."""
    kind = kind_of(cfg)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    total = len(cfg.methods) * len(cfg.seeds)
    done = 0
    for method in cfg.methods:
        for seed in cfg.seeds:
            done += 1
            path = run_dir(cfg, method, seed)
            train_cfg = run_config(cfg, method, seed)
            reason = stale_reason(path, train_cfg)
            if reason is not None:
                if cfg.stale == "refuse":
                    raise ConfigError(f"{path} is not this study's run: {reason}. Delete it, choose another "
                                      "out_dir, or pass --stale=rerun to move it aside and run it again")
                aside = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(aside)
                log(f"{path}: {reason}; moved to {aside}, running it again")
            metrics = _finished(path, kind, method)
            t0 = time.perf_counter()
            if metrics is None:
                resumed = False
                if (path / METRICS_FILE).exists():
                    pass  # trained and evaluated; only the probes are missing
                elif list_checkpoints(path / "checkpoints"):
                    train(train_cfg, resume=path, quiet=True)
                    resumed = True
                else:
                    if path.exists():  # started but never checkpointed: nothing worth keeping
                        with RunLock(path):  # unless another process is writing it
                            pass
                        shutil.rmtree(path)
                    train(train_cfg, quiet=True)
                metrics = add_fewshot(path, cfg) if _probes_fewshot(kind, method) else Run(path).read_metrics()
                # Time of this run as it ran, kept for the report: a run re-evaluated by `ermoe eval` keeps its
                # training time and adds the probes'; one resumed from a checkpoint adds its earlier parts' training
                # time (their segments; the evaluation and setup of a part cut short left no record).
                wall = time.perf_counter() - t0
                if resumed:
                    wall += sum(part["train_time_s"] for part in metrics.get("segments", [])[:-1])
                metrics["run_wall_s"] = metrics.get("run_wall_s", 0.0) + wall
                Run(path).write_metrics(metrics)
                status = f"{metrics['run_wall_s']:.0f} s"
            else:
                status = "done before, skipped"
                if record_validation_examples(path):  # evaluated before they were kept: no training, no timing
                    status += "; validation records added from its final checkpoint"
                if record_word_order(path):
                    status += "; word order measured from its final checkpoint"
                    metrics = Run(path).read_metrics()
            key, form = kind.headline
            log(f"[{done}/{total}] {method} seed {seed}: {form.format(metrics[key])} ({status})")
            metrics["run"] = str(path)  # where it is now (its records are read from there), not where it ran
            results.setdefault(method, {})[seed] = metrics
    return results
