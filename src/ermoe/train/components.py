"""The parts of a run that keep state from one checkpoint to the next, each built from its own settings and each
saving and restoring itself (``state_dict`` / ``load_state_dict``): a checkpoint holds ``{name: part.state_dict()}``
(format 2, :mod:`ermoe.train.checkpoint`). The loop that drives them is :class:`ermoe.train.trainer.Trainer`.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from ..analysis.diagnostics import chance_changed_share, changed_share, probe_routing
from ..models import RoutedModel
from ..routing.oracle import routed_by
from ..routing.stats import ep_straggler, load_summary
from ..weight_decay import decayed_parameter_names
from .checkpoint import IN_SHARDS, list_checkpoints, step_of
from .config import OptimConfig
from .parallel import Parallel
from .shards import optimizer_layout
from . import whole_state
from .run import LOG_FILE, Run


class Component(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Training diverged (a NaN or infinite loss, gradient, activation or optimizer state); the last good
    checkpoint is kept."""


class Position:
    """Where the run is: the optimizer steps taken. The epoch, and which batches come next, follow from it (and
    the seed)."""

    def __init__(self, steps_per_epoch: int, epochs: int, max_steps: int | None) -> None:
        self.step, self.steps_per_epoch = 0, steps_per_epoch
        self.total = steps_per_epoch * epochs
        self.last = min(self.total, max_steps or self.total)  # (max_steps stops early; the schedule spans epochs)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


class RunClock:
    """Training time over every segment of the run (each resume starts one): where each started and ended."""

    def __init__(self, position: Position) -> None:
        self.position, self.total, self.segments = position, 0.0, []
        self.start, self.current = 0, 0.0

    def add(self, seconds: float) -> None:
        self.total += seconds
        self.current += seconds

    def segments_so_far(self) -> list[dict[str, Any]]:
        return self.segments + [{"from_step": self.start, "to_step": self.position.step,
                                 "train_time_s": self.current}]

    def state_dict(self) -> dict[str, Any]:
        return {"train_time_s": self.total, "segments": self.segments_so_far()}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # after the position's
        self.total, self.segments = state["train_time_s"], list(state["segments"])
        self.start, self.current = self.position.step, 0.0


class RandomState:
    """The generators of torch (and of every CUDA device): what the next dropout mask or augmentation draws."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Logger:
    """log.jsonl, plus TensorBoard when it is installed and wanted; ``run`` None: logs nothing (a distributed
    run's ranks other than 0). Its state is the step the log holds records up to: a resume drops the records after
    it (they will be written again)."""

    def __init__(self, run: Run | None, tensorboard: bool, position: Position) -> None:
        self.run, self.position, self.file, self.tb = run, position, None, None
        if tensorboard and run is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run.root / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed: the run logs to log.jsonl only "
                              "(pip install tensorboard, or set tensorboard: false)", stacklevel=2)

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        if self.file is None:  # opened at the first record, after a resume's truncation
            self.file = open(self.run.root / LOG_FILE, "a")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.position.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.run is not None:
            if self.file is not None:
                raise RuntimeError("the log is restored before its first record")
            self.run.truncate_log(state["step"])

    def close(self) -> None:
        for handle in (self.file, self.tb):
            if handle is not None:
                handle.close()


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the parameters :func:`ermoe.weight_decay.decayed_parameter_names` names (two or
    more dimensions, not exempted by their module's ``no_weight_decay()``)."""
    decayed = decayed_parameter_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in decayed else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # PyTorch's fused kernel (optim.fused; by default where every parameter is on a CUDA device), foreach elsewhere
    fused = all(p.is_cuda for p in decay + no_decay) if o.fused is None else o.fused
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=fused or None)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """``optim.amp``'s dtype on ``device`` (auto: bf16 on a CUDA GPU that has it, else none)."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def autocast_ctx(device: torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


class Optimization:
    """AdamW, its schedule (warm-up then cosine, :func:`lr_lambda`), autocast and fp16's grad scaler.

    The schedule is a function of the settings and the step alone: a restored state keeps the moments and the step,
    and takes the group settings (learning rate, weight decay) and the schedule from ``settings``, so an override of
    either on resume applies from the step it resumes at. Moments are saved as one process holding the whole model
    would have them (any world size resumes them); ``in_shards``: kept in a sharded checkpoint's shards instead
    (:mod:`ermoe.train.shards`), its state holding their layout only."""

    def __init__(self, model: nn.Module, settings: OptimConfig, total_steps: int, device: torch.device,
                 parallel: Parallel, in_shards: bool = False) -> None:
        self.model, self.settings, self.total_steps, self.parallel = model, settings, total_steps, parallel
        self.in_shards = in_shards
        self.optimizer = build_optimizer(model, settings)
        dtype = amp_dtype(settings.amp, device)
        self.autocast = autocast_ctx(device, dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self._schedule_from(0)

    def _schedule_from(self, step: int) -> None:
        o = self.settings
        decay, no_decay = self.optimizer.param_groups
        decay["weight_decay"], no_decay["weight_decay"] = o.weight_decay, 0.0
        for group in self.optimizer.param_groups:
            group["initial_lr"] = o.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_lambda, warmup=o.warmup_steps, total=self.total_steps, min_ratio=o.min_lr_ratio),
            last_epoch=step - 1)

    def state_dict(self) -> dict[str, Any]:
        optimizer = (optimizer_layout(self.optimizer, self.model) if self.in_shards else
                     whole_state.optimizer_state(self.parallel, self.optimizer, self.model))
        return {"optimizer": optimizer, "scaler": self.scaler.state_dict(),
                "schedule_step": self.scheduler.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["optimizer"]["state"] != IN_SHARDS:  # (else the trainer loads the moments from the shards)
            whole_state.load_optimizer_state(self.parallel, self.optimizer, self.model,
                                             state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self._schedule_from(state["schedule_step"])


class NonFiniteGuard:
    """Stops the run at a non-finite loss, gradient, activation, weight or optimizer moment, naming the step, the
    last good checkpoint and how to go on.

    ``on_device`` (a fused optimizer, no grad scaler): no host read per step; the kernel skips a step whose loss or
    gradient is not finite (its ``found_inf`` flag, weights and moments left as they were), the guard counts it on
    the device and the next log line or checkpoint stops the run. Otherwise the loss is read every step and the
    gradient norm too (fp16's scaler skips such steps by design). A checkpoint is written only after a clean check,
    so the guard has no state to carry across one."""

    def __init__(self, on_device: bool, scaled: bool, device: torch.device, checkpoints: Path, position: Position,
                 parallel: Parallel) -> None:
        self.on_device, self.scaled, self.checkpoints, self.position = on_device, scaled, checkpoints, position
        self.parallel = parallel
        self.step_bad: Tensor | None = None
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # steps skipped since the last check
        self.first_skipped = torch.full((), -1, dtype=torch.long, device=device)

    def check_loss(self, total: Tensor) -> None:
        if self.on_device:
            bad = ~torch.isfinite(total.detach())
            self.step_bad = bad if self.step_bad is None else self.step_bad | bad
            return
        value = float(total.detach())
        if not self.parallel.all_finite(math.isfinite(value)):
            raise self.diverged(f"the loss is {value}" if not math.isfinite(value)
                                else "another rank's loss is not finite")

    def check_gradient(self, norm: Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.on_device:  # the same on every rank: the gradients are all-reduced before the norm
            bad = self.step_bad | ~torch.isfinite(norm)
            optimizer.found_inf = bad.float()  # the fused kernel leaves weights and moments as they were
            self.skipped += bad
            self.first_skipped = torch.where(bad & (self.first_skipped < 0), self.position.step, self.first_skipped)
            self.step_bad = None
        elif not self.scaled and not math.isfinite(float(norm)):
            raise self.diverged(f"the gradient norm is {float(norm)}")

    def log_sums(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The skipped steps, read with the log window's sums in one transfer."""
        return {"skipped_steps": self.skipped.to(dtype)} if self.on_device else {}

    def raise_skipped(self) -> None:
        first, count = int(self.first_skipped), int(self.skipped)
        later = f"; {count - 1} later step(s) skipped as well" if count > 1 else ""
        raise self.diverged(f"a non-finite loss or gradient (its update skipped{later})", step=first)

    def check_before_saving(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.on_device:
            skipped = int(self.skipped)
            if not self.parallel.all_finite(skipped == 0):  # every rank joins the collective, then stops
                if skipped:
                    self.raise_skipped()
                raise self.diverged("another rank skipped a step with a non-finite loss or gradient")
        if not self.parallel.all_finite(tensors_finite(_tensors([model.state_dict(), optimizer.state_dict()["state"]]))):
            raise self.diverged("non-finite weights or optimizer moments")

    def diverged(self, what: str, step: int | None = None) -> NonFiniteLossError:
        kept = list_checkpoints(self.checkpoints)
        step = self.position.step if step is None else step
        root = self.checkpoints.parent
        if not kept:  # (nothing to resume: advice to resume would fail)
            return NonFiniteLossError(
                f"{what} at step {step}; training stopped. No checkpoint was written yet, so there is nothing to "
                f"resume: start the run again with a lower learning rate (--optim.lr=...) or more warm-up "
                f"(--optim.warmup_steps=...), or check the data (the directory {root} can be removed).")
        return NonFiniteLossError(
            f"{what} at step {step}; training stopped. The last good checkpoint (step {step_of(kept[-1])}) in "
            f"{self.checkpoints} is kept: resume with a lower learning rate (ermoe train --resume {root} "
            f"--optim.lr=...), or from an older checkpoint (--from-step N), or check the data.")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"the non-finite guard carries no state across a checkpoint, got {sorted(state)}")


def tensors_finite(tensors) -> bool:
    """Whether every tensor is finite, read to the host once per device (not once per tensor: a sync each on a
    GPU)."""
    from torch.distributed.tensor import DTensor

    flags: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t  # (FSDP2: this rank's shard; every rank checks its own)
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _tensors(trees: list[Any]):
    """Every floating-point tensor in nested dicts and lists."""
    for tree in trees:
        if isinstance(tree, Tensor):
            if tree.is_floating_point():
                yield tree
        elif isinstance(tree, dict):
            yield from _tensors(list(tree.values()))
        elif isinstance(tree, (list, tuple)):
            yield from _tensors(list(tree))


class RoutingMonitor:
    """The routing of a fixed probe of held-out examples: its load (CV, max/mean, Gini) and the eigen bases'
    principal angles to their tokens' PCA subspace, logged every ``probe_every`` steps and at each checkpoint, and
    its stability between checkpoints (the share of probe tokens whose experts changed, beside the share a
    memoryless router with the same loads would change). Its state: the last checkpoint's assignments. ``groups``:
    the probe examples' ground-truth groups, for an oracle router (``ermoe.routing.oracle``)."""

    def __init__(self, model: RoutedModel, probe: list[Tensor], autocast: Callable[[], Any], logger: Logger,
                 groups: Tensor | None = None) -> None:
        self.model, self.probe, self.autocast, self.logger = model, probe, autocast, logger
        self.groups = groups
        self.previous: dict[str, Tensor] | None = None
        self.changed: dict[str, tuple[float, float]] = {}  # layer -> (changed, chance)

    def log(self, step: int) -> dict[str, dict[str, Any]]:
        with routed_by(self.model, self.groups):
            probed = probe_routing(self.model, self.probe, ctx=self.autocast)
        self._log_load(step, {n: s["probe_load"] for n, s in probed.items()})
        angles = {n: s for n, s in probed.items() if "principal_angle_deg" in s}
        if angles:
            record: dict[str, Any] = {"kind": "probe_geometry", "step": step}
            for n, s in angles.items():
                record.update({n: s["principal_angle_deg_mean"], f"{n}/experts": s["principal_angle_deg"]})
            self.logger.log(record)
        return probed

    def _log_load(self, step: int, counts: dict[str, Tensor]) -> None:
        if counts:
            record: dict[str, Any] = {"kind": "probe_load", "step": step}
            for n, c in counts.items():
                summary = load_summary(c)
                record.update({n: summary["load_cv"], f"{n}/max_over_mean": summary["max_over_mean"],
                               f"{n}/gini": summary["gini"]})
            self.logger.log(record)

    def at_checkpoint(self, step: int) -> None:
        current = {n: s["probe_assignment"] for n, s in self.log(step).items()}
        if self.previous is not None:
            self.changed = {n: (changed_share(self.previous[n], current[n]), chance_changed_share(current[n]))
                            for n in current if n in self.previous}
            record = {"kind": "stability", "step": step}
            for n, (changed, chance) in self.changed.items():
                record.update({n: changed, f"{n}/chance": chance})
            self.logger.log(record)
        self.previous = current

    def state_dict(self) -> dict[str, Any]:
        return {"assignment": self.previous, "changed": self.changed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state["assignment"]
        self.changed = state["changed"] if self.previous is not None else {}


class StragglerMeter:
    """Per routing layer whose experts a deployment shards, the expert-parallel straggler factor summed over the
    training steps: the busiest expert's assignments over the mean in the global batch, what an expert-parallel
    deployment with one expert per rank would wait for (docs/distributed.md). Summed on the device: no host read
    per step."""

    def __init__(self, model: RoutedModel, parallel: Parallel) -> None:
        self.views = [v for v in model.routed_layers() if v.layer.expert_parallel]
        self.parallel = parallel
        self.sums: dict[str, Tensor | float] = {}
        self.steps = 0

    def track(self) -> None:
        for view in self.views:
            info = view.last_routing
            if info is not None:
                factor = ep_straggler(self.parallel.sum_tensor(info.tokens_per_expert), view.num_experts)
                self.sums[view.name] = self.sums.get(view.name, 0.0) + factor
        self.steps += 1

    def mean(self) -> dict[str, float]:
        return {n: float(v) / self.steps for n, v in self.sums.items()} if self.steps else {}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {n: float(v) for n, v in self.sums.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.steps = dict(state["sums"]), state["steps"]


class EMA:
    """timm's ``ModelEmaV3`` of the whole model (parameters and buffers) with ``decay``, cut to this rank's
    experts like the model; its state is the whole model's (any world size resumes it), or :data:`IN_SHARDS`
    (``in_shards``: a sharded checkpoint holds the weights)."""

    def __init__(self, model: nn.Module, decay: float, parallel: Parallel, in_shards: bool = False) -> None:
        from timm.utils.model_ema import ModelEmaV3

        # (under FSDP2 the weights are DTensors and the buffers plain: one lerp per tensor, not one foreach over both)
        self.ema = ModelEmaV3(model, decay=decay, foreach=not parallel.fsdp)
        self.parallel, self.in_shards = parallel, in_shards

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def shard(self) -> None:
        self.parallel.shard(self.module)

    def update(self, model: nn.Module, step: int) -> None:
        self.ema.update(model, step)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": IN_SHARDS if self.in_shards else whole_state.model_state(self.parallel, self.module)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state["weights"], str):  # (IN_SHARDS: the trainer loads them from the shards)
            whole_state.load_model_state(self.parallel, self.module, state["weights"])
