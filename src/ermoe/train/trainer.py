"""Training and evaluation of image classifiers with MoE layers (the ``ermoe train`` / ``ermoe eval`` jobs)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..analysis.diagnostics import changed_share, evaluate_classifier, probe_load, probe_routing
from ..analysis.report import draw_figures, results_table
from ..data.augment import normalize, train_transform
from ..data.images import ImageData, load_dataset
from ..models.stems import find_stem
from ..models.vit import create_model, init_moe_from_data, patch_moe_layers
from ..moe import after_step, aux_loss
from ..routing.stats import load_summary
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from .config import TrainConfig, config_from_dict, dump_config

CONFIG_FILE, METRICS_FILE, LOG_FILE = "config.yaml", "metrics.json", "log.jsonl"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.optim.amp
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def build_model(cfg: TrainConfig, data: ImageData) -> nn.Module:
    m = cfg.model
    kwargs: dict[str, Any] = dict(num_classes=data.num_classes, img_size=data.img_size, in_chans=data.in_chans,
                                  global_pool=m.global_pool, drop_path_rate=m.drop_path_rate, moe=m.moe,
                                  pretrained=m.pretrained, freeze_backbone=m.freeze_backbone)
    if not (m.name.startswith("vit_") and "_patch" in m.name):
        kwargs.update(patch_size=m.patch_size, depth=m.depth, embed_dim=m.embed_dim, num_heads=m.num_heads,
                      mlp_ratio=m.mlp_ratio, class_token=m.class_token)
    if m.stem is not None:
        kwargs.update(stem=m.stem, stem_weights=m.stem_weights)
    kwargs["total_steps"] = len(data.train) // cfg.optim.batch_size * cfg.optim.epochs  # data already subset
    return create_model(m.name, **kwargs)


def _use_pretrained_normalization(cfg: TrainConfig, model: nn.Module, data: ImageData) -> None:
    """A pretrained backbone expects the normalisation it was trained with, not the dataset's own statistics."""
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    stem = find_stem(model)
    if stem is not None:
        data.mean = torch.full((data.in_chans,), stem.input_mean)
        data.std = torch.full((data.in_chans,), stem.input_std)
    elif cfg.model.pretrained and "mean" in pcfg and len(pcfg["mean"]) == data.in_chans:
        data.mean, data.std = torch.tensor(pcfg["mean"]), torch.tensor(pcfg["std"])


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, scales, alpha, position/class embeddings (the usual ViT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")) else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def eval_batches(data: ImageData, split: str, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    subset = getattr(data, split)
    for i in range(0, len(subset), batch_size):
        x = normalize(subset.images[i:i + batch_size].to(device), data.mean, data.std)
        yield x, subset.labels[i:i + batch_size].to(device)


@dataclass
class Run:
    """A run directory and what lives in it."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def read_config(self) -> TrainConfig:
        import yaml
        path = self.root / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{self.root} is not a run directory: {CONFIG_FILE} not found")
        return config_from_dict(yaml.safe_load(path.read_text()))

    def truncate_log(self, step: int) -> None:
        """Drop log lines beyond ``step`` (written after the checkpoint we resume from): they will be redone."""
        path = self.root / LOG_FILE
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def new_run_dir(cfg: TrainConfig) -> Path:
    base = cfg.run_name or f"{cfg.data.name}-{cfg.model.name}-{cfg.model.moe.router}-seed{cfg.seed}"
    root = Path(cfg.out_dir) / base
    n = 2
    while root.exists():  # never write into an existing run
        root = Path(cfg.out_dir) / f"{base}-{n}"
        n += 1
    return root


class Logger:
    """JSONL log plus TensorBoard when it is installed and wanted."""

    def __init__(self, root: Path, tensorboard: bool) -> None:
        self.file = open(root / LOG_FILE, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(root / "tensorboard"))
            except ImportError:
                pass

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def train(cfg: TrainConfig, resume: str | Path | None = None, quiet: bool = False) -> Path:
    """Train (or resume) a run; evaluates at the end and returns the run directory."""
    if resume is not None:
        run = Run(Path(resume))
        # Read and verify the checkpoint before anything in the run directory is touched.
        _, state = load_checkpoint(run.root)
    else:
        run = Run(new_run_dir(cfg))
        state = None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data.name, cfg.data.data_dir, download=cfg.data.download, mirror=cfg.data.mirror,
                        img_size=cfg.data.img_size)
    data.train = data.train.subset(cfg.data.train_limit)
    data.test = data.test.subset(cfg.data.test_limit)
    o = cfg.optim
    steps_per_epoch = len(data.train) // o.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {o.batch_size} exceeds the {len(data.train)} training images")
    total_steps = steps_per_epoch * o.epochs
    last_step = min(total_steps, o.max_steps or total_steps)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    _use_pretrained_normalization(cfg, model, data)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=o.warmup_steps, total=total_steps, min_ratio=o.min_lr_ratio))
    dtype = amp_dtype(cfg, device)
    autocast = autocast_ctx(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    probe = next(eval_batches(data, "test", cfg.probe_size, device))[0]
    step, prev_probe, probe_changed = 0, None, {}
    if state is not None:
        load_checkpoint(run.root, model, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step, prev_probe, probe_changed = state["step"], state.get("probe_top1"), state.get("probe_changed", {})
        run.truncate_log(step)
    else:
        run.root.mkdir(parents=True)
        if cfg.model.moe_init == "pca":
            batches = [x for x, _ in eval_batches(data, "train", o.batch_size, device)][:cfg.model.moe_init_batches]
            init_moe_from_data(model, batches)
    atomic_write_text(run.root / CONFIG_FILE, dump_config(cfg))
    logger = Logger(run.root, cfg.tensorboard)

    def log_probe_load(at_step: int, counts: dict[str, Tensor]) -> None:
        """Load over training on the fixed probe images: CV under the layer's name, then max/mean and Gini."""
        if counts:
            record: dict[str, Any] = {"kind": "probe_load", "step": at_step}
            for n, c in counts.items():
                summary = load_summary(c)
                record.update({n: summary["load_cv"], f"{n}/max_over_mean": summary["max_over_mean"],
                               f"{n}/gini": summary["gini"]})
            logger.log(record)

    def checkpoint(at_step: int) -> None:
        nonlocal prev_probe, probe_changed
        probed = probe_routing(model, probe, ctx=autocast)
        current = {n: s["probe_top1"] for n, s in probed.items()}
        log_probe_load(at_step, {n: s["probe_load"] for n, s in probed.items()})
        if prev_probe is not None:
            probe_changed = {n: changed_share(prev_probe[n], current[n]) for n in current if n in prev_probe}
            logger.log({"kind": "stability", "step": at_step, **probe_changed})
        prev_probe = current
        save_checkpoint(run.checkpoints, at_step, model, {
            "step": at_step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": _rng_state(), "probe_top1": current,
            "probe_changed": probe_changed}, keep=cfg.keep_checkpoints)

    train_time = 0.0
    progress = None
    if cfg.progress and not quiet:
        from tqdm.auto import tqdm
        progress = tqdm(total=last_step, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    checked_grads = False
    model.train()
    window_loss, window_correct, window_seen, window_t0 = 0.0, 0, 0, time.perf_counter()
    try:
        order, order_epoch = None, -1
        while step < last_step:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(data.train), cfg.seed, epoch), epoch
            t0 = time.perf_counter()
            idx = order[i * o.batch_size:(i + 1) * o.batch_size]
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
            x = train_transform(data.train.images[idx].to(device), data.mean, data.std,
                                crop_padding=cfg.data.crop_padding, hflip=cfg.data.hflip, generator=gen)
            y = data.train.labels[idx].to(device)
            with autocast():
                logits = model(x)
                if hasattr(model, "training_loss"):  # whole-model baselines add their own terms (early exit, L1)
                    task_loss = model.training_loss(logits, y, o.label_smoothing)
                else:
                    task_loss = F.cross_entropy(logits.float(), y, label_smoothing=o.label_smoothing)
                extra = aux_loss(model)
                loss = task_loss + extra
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss is {loss_value} at step {step} (epoch {epoch}); training stopped. The last good "
                    f"checkpoint in {run.checkpoints} is kept; resume with a lower lr or check the data.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if not checked_grads and getattr(model, "experts_active", True):
                _warn_gradless_moe(model)
                checked_grads = True
            if o.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            after_step(model)
            step += 1
            train_time += time.perf_counter() - t0
            window_loss += loss_value * len(y)
            window_correct += int((logits.argmax(1) == y).sum())
            window_seen += len(y)
            if step % cfg.log_every == 0 or step == last_step:
                elapsed = time.perf_counter() - window_t0
                record = {"kind": "train", "step": step, "epoch": epoch, "loss": window_loss / window_seen,
                          "acc": window_correct / window_seen, "lr": scheduler.get_last_lr()[0],
                          "aux_loss": float(extra.detach()), "img_per_s": window_seen / max(elapsed, 1e-9)}
                logger.log(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                         img_s=f"{record['img_per_s']:.0f}")
                window_loss, window_correct, window_seen, window_t0 = 0.0, 0, 0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            end_of_epoch = step % steps_per_epoch == 0
            if step == last_step or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or end_of_epoch:
                checkpoint(step)
            elif cfg.probe_every and step % cfg.probe_every == 0:
                log_probe_load(step, probe_load(model, probe, autocast))
            if end_of_epoch and step != last_step:
                acc = _quick_accuracy(model, data, o.eval_batch_size, device, autocast)
                logger.log({"kind": "eval", "step": step, "epoch": epoch, "test_top1": acc})
    finally:
        if progress is not None:
            progress.close()
    metrics = evaluate_run(run, model, data, cfg, device, autocast, probe_changed)
    metrics.update(step=step, train_time_s=train_time,
                   train_img_per_s=step * o.batch_size / train_time if train_time and state is None else None)
    write_metrics(run, metrics)
    logger.log({"kind": "eval", "step": step, "test_top1": metrics["test_top1"], "test_top5": metrics["test_top5"]})
    logger.close()
    if not quiet:
        print(results_table(metrics))
        print(f"run directory: {run.root} (figures in {run.figures})")
    return run.root


def _warn_gradless_moe(model: nn.Module) -> None:
    """SPEC 7: warn about MoE layers whose trainable parameters got no gradient from the first backward."""
    for name, layer in patch_moe_layers(model):
        params = [p for p in layer.parameters() if p.requires_grad]
        if params and all(p.grad is None or not p.grad.any() for p in params):
            warnings.warn(f"MoE layer {name} got no gradient: its output does not reach the loss (a patch-only MoE "
                          "under a class-token head?). Use global_pool='avg' or move the layer.", stacklevel=2)


@torch.no_grad()
def _quick_accuracy(model: nn.Module, data: ImageData, batch_size: int, device: torch.device, autocast) -> float:
    was = model.training
    model.eval()
    correct = 0
    for x, y in eval_batches(data, "test", batch_size, device):
        with autocast():
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct / len(data.test)


def evaluate_run(run: Run, model: nn.Module, data: ImageData, cfg: TrainConfig, device: torch.device, autocast,
                 probe_changed: dict[str, float]) -> dict[str, Any]:
    t0 = time.perf_counter()
    probe = next(eval_batches(data, "test", cfg.probe_size, device))[0]
    metrics = evaluate_classifier(model, eval_batches(data, "test", cfg.optim.eval_batch_size, device),
                                  data.num_classes, probe=probe, autocast=autocast)
    metrics["eval_time_s"] = time.perf_counter() - t0
    for name, stats in metrics["layers"].items():
        stats.pop("probe_top1", None)
        stats.pop("probe_load", None)
        stats["probe_changed"] = probe_changed.get(name)
    metrics.update(dataset=data.name, classes=data.classes, run=str(run.root),
                   params_total=sum(p.numel() for p in model.parameters()), params_active=active_parameters(model),
                   params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    draw_figures(metrics, run.figures)
    return metrics


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: all, less the experts it is not routed to (top_k of num_experts per layer)."""
    total = sum(p.numel() for p in model.parameters())
    for _, layer in patch_moe_layers(model):
        moe = layer.moe
        expert_params = sum(p.numel() for p in moe.experts.parameters())
        total -= round(expert_params * (1 - moe.top_k / moe.num_experts))
    return total


def write_metrics(run: Run, metrics: dict[str, Any]) -> None:
    atomic_write_text(run.root / METRICS_FILE, json.dumps(metrics, indent=1, default=float))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None
             ) -> tuple[TrainConfig, ImageData, nn.Module, dict[str, Any], torch.device]:
    """Rebuild a run's data and model from its config and load a checkpoint (the latest by default)."""
    run = Run(Path(run_dir))
    cfg = run.read_config()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data.name, cfg.data.data_dir, download=cfg.data.download, mirror=cfg.data.mirror,
                        img_size=cfg.data.img_size)
    data.train = data.train.subset(cfg.data.train_limit)
    data.test = data.test.subset(cfg.data.test_limit)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The checkpoint holds every weight: no need to fetch pretrained ones again.
        model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False)),
                            data).to(device)
    _use_pretrained_normalization(cfg, model, data)
    _, state = load_checkpoint(Path(checkpoint) if checkpoint else run.root, model, map_location=device)
    return cfg, data, model, state, device


def evaluate(run_dir: str | Path, checkpoint: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """``ermoe eval``: rebuild the model from the run's config, load a checkpoint (latest by default), evaluate,
    rewrite metrics.json and the figures."""
    run = Run(Path(run_dir))
    cfg, data, model, state, device = load_run(run_dir, checkpoint)
    autocast = autocast_ctx(device, amp_dtype(cfg, device))
    metrics = evaluate_run(run, model, data, cfg, device, autocast, state.get("probe_changed", {}))
    metrics["step"] = state["step"]
    old = run.root / METRICS_FILE
    if old.exists():  # keep what only training knows
        previous = json.loads(old.read_text())
        for key in ("train_time_s", "train_img_per_s", "run_wall_s"):
            if key in previous:
                metrics.setdefault(key, previous[key])
    write_metrics(run, metrics)
    if not quiet:
        print(results_table(metrics))
    return metrics


def report(run_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """``ermoe report``: redraw the figures and print the table from metrics.json."""
    run = Run(Path(run_dir))
    path = run.root / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `ermoe eval {run.root}` first")
    metrics = json.loads(path.read_text())
    files = draw_figures(metrics, run.figures)
    if not quiet:
        print(results_table(metrics))
        print("figures: " + ", ".join(str(f) for f in files))
    return metrics
