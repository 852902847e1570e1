"""The training loop, written once for every task (``ermoe train`` / ``ermoe eval`` / ``ermoe report``).

What differs between applications lives in the task (:mod:`ermoe.tasks`); what differs between models lives behind
the model protocol (:mod:`ermoe.models.protocol`). Here: the run directory, the optimizer and schedule, AMP, the
non-finite guard, logging, the routing probes (load over training, stability between checkpoints), checkpoints and
exact resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import __version__
from ..analysis.diagnostics import (TEST_EXAMPLES, VAL_EXAMPLES, chance_changed_share, changed_share,
                                   probe_routing)
from ..data.loader import worker_death
from ..models import RoutedModel, create_model, upcycle
from ..moe import NonFiniteInputError
from ..routing.stats import ep_straggler, load_summary
from ..tasks import Batch, Task, TaskSetup, build_task, task_class
from ..weight_decay import decayed_parameter_names
from .checkpoint import (CheckpointError, clean_temporaries, find_checkpoint, list_checkpoints, load_weights,
                         read_checkpoint, resolve_checkpoint, save_checkpoint, step_of)
from .config import ConfigError, TrainConfig
from .init_weights import LoadReport, init_from_checkpoint, load_matching, read_weights
from .lock import RunLock
from .parallel import Parallel
from .precise_bn import recalibrate_batchnorm, trainable_batchnorms
from .run import LOG_FILE, METRICS_FILE, Run, resume_changes


class NonFiniteLossError(RuntimeError):
    """Training diverged (a NaN or infinite loss, gradient, activation or optimizer state); the last good
    checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.optim.amp
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def autocast_ctx(device: torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def task_setup(cfg: TrainConfig) -> TaskSetup:
    """What the run's task reads of its config."""
    options_cls = task_class(cfg.task).Options
    return TaskSetup(data=cfg.data, options=options_cls(**cfg.task_options) if options_cls is not None else None,
                     seed=cfg.seed, batch_size=cfg.optim.batch_size, eval_batch_size=cfg.optim.eval_batch_size,
                     probe_size=cfg.probe_size, label_smoothing=cfg.optim.label_smoothing,
                     model_name=cfg.model.name, model_args=dict(cfg.model.args),
                     init_checkpoint=cfg.model.init_checkpoint is not None)


def create_task(cfg: TrainConfig, device: torch.device) -> Task:
    """The task of a run's config, on ``device``, not loaded yet (call ``load()``)."""
    return build_task(cfg.task, task_setup(cfg), device)


def build_model(cfg: TrainConfig, task: Task, load_pretrained: bool = True, quiet: bool = False) -> RoutedModel:
    """The run's model: its config's builder arguments plus what the task's data says, started from
    ``model.init_checkpoint`` or upcycled from ``model.upcycle_from`` (docs/upcycling.md). ``load_pretrained=False``
    builds the skeleton only (a checkpoint will fill every weight; no weights file is read)."""
    m = cfg.model
    args = dict(m.args)
    if not load_pretrained and "pretrained" in args:
        args["pretrained"] = False
    if m.upcycle_from is None:
        model = create_model(m.name, **args, **task.model_args())
        if m.init_checkpoint is not None and load_pretrained:
            _report(init_from_checkpoint(model, m.init_checkpoint), quiet)
        return model
    spec = m.moe
    model = create_model(m.name, **{**args, "moe": None}, **task.model_args())
    if load_pretrained:
        report = load_matching(model, read_weights(m.upcycle_from), f"upcycle_from {m.upcycle_from}")
        if report.missing or report.unexpected or report.skipped_head or report.resampled:
            raise ConfigError("model.upcycle_from must hold the dense version of this model (moe: null); "
                              + "; ".join(line.strip() for line in report.lines()[1:]))
        _report([report], quiet)
    try:
        return upcycle(model, spec.router, spec.num_experts, top_k=spec.top_k, blocks=spec.blocks,
                       bases=m.upcycle_bases or "split", capacity_factor=spec.capacity_factor,
                       learn_alpha=spec.learn_alpha, **spec.router_kwargs)
    except ValueError as err:
        raise ConfigError(f"model.upcycle_from: {err}") from None


def _report(reports: list[LoadReport], quiet: bool) -> None:
    if not quiet:
        for report in reports:
            print("\n".join(report.lines()))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the parameters :func:`ermoe.weight_decay.decayed_parameter_names` names (two or
    more dimensions, not exempted by their module's ``no_weight_decay()``)."""
    decayed = decayed_parameter_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in decayed else no_decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # PyTorch's fused kernel (optim.fused; by default where every parameter is on a CUDA device), foreach elsewhere
    fused = all(p.is_cuda for p in decay + no_decay) if o.fused is None else o.fused
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=fused or None)


def build_ema(model: nn.Module, decay: float | None, state: dict[str, Tensor] | None = None) -> nn.Module | None:
    """timm's ``ModelEmaV3`` of ``model`` (parameters and buffers) with ``decay``, its weights read from ``state``
    (a whole-model state dict from a checkpoint) when resuming; None without a decay (``optim.ema`` cannot change
    on resume)."""
    if decay is None:
        return None
    from timm.utils.model_ema import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay)
    if state is not None:
        ema.module.load_state_dict(state)
    return ema


class Logger:
    """JSONL log plus TensorBoard when it is installed and wanted; ``root`` None: logs nothing (the ranks of a
    distributed run other than rank 0)."""

    def __init__(self, root: Path | None, tensorboard: bool) -> None:
        self.file = open(root / LOG_FILE, "a") if root is not None else None
        self.tb = None
        if tensorboard and root is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(root / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed: the run logs to log.jsonl only "
                              "(pip install tensorboard, or set tensorboard: false)", stacklevel=2)

    def log(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
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


def warn_gradless_routing(model: RoutedModel) -> None:
    """Warn about routing layers whose trainable parameters got no gradient, or only zeros, from the last backward
    (docs/method.md, "Patch-only routing in the last block")."""
    for view in model.routed_layers():
        params = [p for p in view.layer.parameters() if p.requires_grad]
        if params and all(p.grad is None or not p.grad.any() for p in params):
            warnings.warn(f"routing layer {view.name} got no gradient: its output does not reach the loss (a "
                          "patch-only MoE under a class-token head?). Use global_pool='avg' or move the layer.",
                          stacklevel=2)


class Trainer:
    """One run's training: steps, logs, probes and checkpoints. ``state``: a checkpoint's state to resume from.

    The learning-rate schedule is a function of the config and the step alone, so the scheduler is rebuilt from the
    config on resume (not read back from the checkpoint); the optimizer's moments come from the checkpoint and its
    groups' settings from the config. An override of the schedule or of the weight decay on resume therefore takes
    effect from the step it resumes at.
    """

    def __init__(self, cfg: TrainConfig, run: Run, task: Task, model: RoutedModel, device: torch.device,
                 state: dict[str, Any] | None = None, quiet: bool = False, parallel: Parallel | None = None) -> None:
        self.cfg, self.run, self.task, self.model, self.device, self.quiet = cfg, run, task, model, device, quiet
        # A distributed rank: shard the experts, sync the routing state; the training forward goes through DDP.
        self.parallel = parallel if parallel is not None else Parallel()
        o = cfg.optim
        share = o.batch_size // self.parallel.world_size
        if share % o.accum_steps:
            raise ConfigError(f"optim.accum_steps={o.accum_steps} must divide each rank's share of optim.batch_size "
                              f"({share} = {o.batch_size} / {self.parallel.world_size} processes)")
        # the weights' moving average: a copy of the whole model (its EMA read back on resume), then sharded alike
        self.ema = build_ema(model, o.ema, None if state is None else state.get("ema"))
        self.forward_model = self.parallel.prepare(model)
        if self.ema is not None:
            self.parallel.shard(self.ema.module)
        if o.compile is not None:  # the training forward only (evaluation and probes run eager)
            warnings.warn(f"optim.compile={o.compile!r}: the MoE layers do not scan their inputs for NaN in compiled "
                          "code (the non-finite guard still stops the run)", stacklevel=2)
            self.forward_model = torch.compile(self.forward_model, backend=o.compile)
        self.steps_per_epoch = task.num_train // o.batch_size
        self.total_steps = self.steps_per_epoch * o.epochs
        self.last_step = min(self.total_steps, o.max_steps or self.total_steps)
        self.optimizer = build_optimizer(model, cfg)
        dtype = amp_dtype(cfg, device)
        self.autocast = autocast_ctx(device, dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.probe = task.probe()
        self.step, self.prev_probe, self.probe_changed = 0, None, {}  # probe_changed: layer -> (changed, chance)
        self.train_time, self.segments = 0.0, []  # over every segment of the run (resumes), up to self.step
        # Per routing layer, the sum over training steps of the expert-parallel straggler factor (docs/distributed.md)
        self.straggler: dict[str, Tensor | float] = {}
        self.straggler_steps = 0
        self.routed = model.routed_layers()  # (fixed for the run: not re-walked every step)
        self.sharded_routed = [v for v in self.routed if v.layer.expert_parallel]  # those with a straggler factor
        # the log's sums accumulate on the device in float64 (MPS has none: float32 there)
        self.sum_dtype = torch.float32 if device.type == "mps" else torch.float64
        self.last_aux: Tensor = torch.zeros(())
        self.replicated: tuple[str, ...] = ()
        # The non-finite guard on the device (a fused optimizer skips a step whose loss or gradient is not finite,
        # told by its found_inf flag; read at the next log line or checkpoint), else checked every step on the host
        self.device_guard = bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()
        self.step_bad: Tensor | None = None
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # steps skipped since the last check
        self.first_skipped = torch.full((), -1, dtype=torch.long, device=device)
        if state is not None:
            self.optimizer.load_state_dict(self.parallel.local_optimizer_state(state["optimizer"], self.optimizer,
                                                                               model))
            self.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            # (older checkpoints kept each token's argmax expert under "probe_top1": not comparable, not read)
            self.step, self.prev_probe = state["step"], state.get("probe_assignment")
            self.probe_changed = state.get("probe_changed", {}) if self.prev_probe is not None else {}
            self.train_time, self.segments = state.get("train_time_s", 0.0), state.get("segments", [])
            self.straggler = dict(state.get("straggler", {}))
            self.straggler_steps = state.get("straggler_steps", 0)
            if self.parallel.main:
                run.truncate_log(self.step)  # lines after the checkpoint will be redone; before the log is opened
        decay, no_decay = self.optimizer.param_groups
        decay["weight_decay"], no_decay["weight_decay"] = o.weight_decay, 0.0
        for group in self.optimizer.param_groups:
            group["initial_lr"] = o.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_lambda, warmup=o.warmup_steps, total=self.total_steps, min_ratio=o.min_lr_ratio),
            last_epoch=self.step - 1)
        self.segment_start, self.segment_time = self.step, 0.0
        self.logger = Logger(run.root if self.parallel.main else None, cfg.tensorboard)

    def fit(self) -> None:
        """Train from the current step to the last one."""
        cfg, model = self.cfg, self.model
        model.on_train_start(self.total_steps)
        progress = None
        if cfg.progress and not self.quiet and self.parallel.main:
            from tqdm.auto import tqdm
            progress = tqdm(total=self.last_step, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        checked_grads = False
        model.train()
        window: dict[str, Tensor] = {}  # sums over the log window, on the device: read once per window
        window_t0 = time.perf_counter()
        batches = self.task.train_batches(self.step, self.last_step, self.parallel.rank, self.parallel.world_size)
        try:
            t0 = time.perf_counter()
            for batch in batches:
                epoch = self.step // self.steps_per_epoch
                stats = self._train_step(batch, epoch)
                if not checked_grads and model.experts_active:
                    warn_gradless_routing(model)
                    checked_grads = True
                self._update()
                elapsed_step = time.perf_counter() - t0
                self.train_time += elapsed_step
                self.segment_time += elapsed_step
                for key, value in stats.items():
                    value = value.detach().to(self.sum_dtype)
                    window[key] = window[key] + value if key in window else value
                step = self.step
                if step % cfg.log_every == 0 or step == self.last_step:
                    elapsed = time.perf_counter() - window_t0
                    if self.device_guard:  # read with the log's sums, in one transfer
                        window["skipped_steps"] = self.skipped.to(self.sum_dtype)
                    sums = self.parallel.sum_stats(window, replicated=self.replicated)
                    if sums.pop("skipped_steps", 0):
                        self._raise_skipped()
                    seen = sums.pop("examples")
                    record = {"kind": "train", "step": step, "epoch": epoch, **{k: v / seen for k, v in sums.items()},
                              "lr": self.scheduler.get_last_lr()[0], "aux_loss": float(self.last_aux),
                              "img_per_s": seen / max(elapsed, 1e-9)}
                    self.logger.log(record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")
                    window, window_t0 = {}, time.perf_counter()
                if progress is not None:
                    progress.update(1)
                end_of_epoch = step % self.steps_per_epoch == 0
                due = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                if step == self.last_step or due or end_of_epoch:
                    self.checkpoint()
                elif cfg.probe_every and step % cfg.probe_every == 0:
                    self._log_probe(probe_routing(model, self.probe.inputs, ctx=self.autocast))
                if end_of_epoch and step != self.last_step:
                    self.logger.log({"kind": "eval", "step": step, "epoch": epoch,
                                     **self.task.quick_eval(model, self.autocast)})
                t0 = time.perf_counter()  # the next step's time includes waiting for its batch
        except RuntimeError as err:  # a loader worker's death surfaces wherever this process is
            named = worker_death(err)
            if named is None:
                raise
            raise named from None
        finally:
            batches.close()
            if progress is not None:
                progress.close()

    def _track_straggler(self) -> None:
        """Add this step's straggler factor of every routing layer: the busiest expert's assignments over the mean
        in the global batch, i.e. what an expert-parallel deployment with one expert per rank (or even replicas of
        each) would wait for; not for layers whose experts no deployment shards (gated channels). Accumulated on
        the device: no host sync per step."""
        for view in self.sharded_routed:
            info = view.last_routing
            if info is None:
                continue
            factor = ep_straggler(self.parallel.sum_tensor(info.tokens_per_expert), view.num_experts)
            self.straggler[view.name] = self.straggler.get(view.name, 0.0) + factor
        self.straggler_steps += 1

    def mean_straggler(self) -> dict[str, float]:
        """Per routing layer, the straggler factor averaged over the training steps so far."""
        return {n: float(v) / self.straggler_steps for n, v in self.straggler.items()} if self.straggler_steps else {}

    def _raise_skipped(self) -> None:
        """Stop for a step the device guard skipped (its weights and moments untouched)."""
        first, count = int(self.first_skipped), int(self.skipped)
        later = f"; {count - 1} later step(s) skipped as well" if count > 1 else ""
        raise self._diverged(f"a non-finite loss or gradient (its update skipped{later})", step=first)

    def _diverged(self, what: str, step: int | None = None) -> NonFiniteLossError:
        kept = list_checkpoints(self.run.checkpoints)
        where = f"step {step_of(kept[-1])}" if kept else "none yet"
        step = self.step if step is None else step
        return NonFiniteLossError(
            f"{what} at step {step}; training stopped. The last good checkpoint ({where}) in "
            f"{self.run.checkpoints} is kept: resume with a lower learning rate (ermoe train --resume {self.run.root} "
            f"--optim.lr=...), or from an older checkpoint (--from-step N), or check the data.")

    def _train_step(self, batch: Batch, epoch: int) -> dict[str, Tensor]:
        """Forward and backward of this rank's rows of one step, in ``optim.accum_steps`` equal micro-batches (the
        gradients of all but the last are not reduced across ranks); returns the step's sums for the log (0-dim
        tensors on the device)."""
        accum = self.cfg.optim.accum_steps
        size = len(batch) // accum
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for i in range(accum):
            micro = batch if accum == 1 else batch.rows(i * size, (i + 1) * size)
            with self.parallel.accumulating(self.forward_model, last=i == accum - 1):
                part = self._micro_step(micro, accum)
            self._track_straggler()
            for key, value in part.items():
                sums[key] = sums[key] + value if key in sums else value
        return sums

    def _micro_step(self, batch: Batch, accum: int) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch, its loss weighted ``1 / accum`` (the step's gradient is the
        mean over the step's examples, as without accumulation)."""
        model = self.model
        try:
            with self.autocast():
                output = self.forward_model(*batch.inputs)
                coupled = self.task.objective.batch_coupled and self.parallel.world_size > 1
                target = batch.target
                if coupled:  # a contrastive loss over the global batch, the same on every rank
                    output = self.parallel.gather_output(output)
                    target = None if target is None else self.parallel.gather_output(target)
                loss = model.training_loss(output, target, self.task.objective.loss)
                extra = model.aux_loss()
                total = loss + extra
        except NonFiniteInputError as err:  # activations blew up before the loss: the same divergence
            raise self._diverged(f"non-finite activations ({err})") from None
        if self.device_guard:
            bad = ~torch.isfinite(total.detach())
            self.step_bad = bad if self.step_bad is None else self.step_bad | bad
        else:
            loss_value = float(total.detach())
            if not self.parallel.all_finite(math.isfinite(loss_value)):
                raise self._diverged(f"the loss is {loss_value}" if not math.isfinite(loss_value)
                                     else "another rank's loss is not finite")
        self.scaler.scale(total if accum == 1 else total / accum).backward()
        n = len(batch)
        task_stats = self.task.objective.batch_stats(_detached(output), batch)
        self.last_aux = extra.detach()
        self.replicated = tuple(task_stats) if coupled else ()  # computed over the gathered global batch
        return {"loss": total.detach().to(self.sum_dtype) * n,
                "examples": torch.full((), n, dtype=self.sum_dtype, device=total.device), **task_stats}

    def _update(self) -> None:
        """Clip, check the gradient, step. A non-finite gradient stops training before it reaches the weights and
        the optimizer's moments (fp16 is the exception: its grad scaler skips such steps by design)."""
        self.parallel.after_backward(self.model)
        if self.cfg.optim.clip_grad or not self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            norm = self.parallel.clip_grad_norm(self.model, self.cfg.optim.clip_grad or float("inf"))
            if self.device_guard:  # the same on every rank: the gradients are all-reduced before the norm
                bad = self.step_bad | ~torch.isfinite(norm)
                self.optimizer.found_inf = bad.float()  # the fused kernel leaves weights and moments as they were
                self.skipped += bad
                self.first_skipped = torch.where(bad & (self.first_skipped < 0), self.step, self.first_skipped)
                self.step_bad = None
            elif not self.scaler.is_enabled() and not math.isfinite(float(norm)):
                raise self._diverged(f"the gradient norm is {float(norm)}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.model.after_step(self.step)
        if self.ema is not None:
            self.ema.update(self.model, self.step)

    def _log_probe(self, probed: dict[str, dict[str, Any]]) -> None:
        """The probe's load, and the bases' principal angles to the PCA subspace of their tokens (eigen routers:
        ``ermoe explain`` draws them over training)."""
        self._log_probe_load({n: s["probe_load"] for n, s in probed.items()})
        angles = {n: s for n, s in probed.items() if "principal_angle_deg" in s}
        if angles:
            record: dict[str, Any] = {"kind": "probe_geometry", "step": self.step}
            for n, s in angles.items():
                record.update({n: s["principal_angle_deg_mean"], f"{n}/experts": s["principal_angle_deg"]})
            self.logger.log(record)

    def _log_probe_load(self, counts: dict[str, Tensor]) -> None:
        """Load over training on the fixed probe: CV under the layer's name, then max/mean and Gini."""
        if counts:
            record: dict[str, Any] = {"kind": "probe_load", "step": self.step}
            for n, c in counts.items():
                summary = load_summary(c)
                record.update({n: summary["load_cv"], f"{n}/max_over_mean": summary["max_over_mean"],
                               f"{n}/gini": summary["gini"]})
            self.logger.log(record)

    def segments_so_far(self) -> list[dict[str, Any]]:
        """Every segment of the run up to now: where each started and ended and its training time."""
        current = {"from_step": self.segment_start, "to_step": self.step, "train_time_s": self.segment_time}
        return self.segments + [current]

    def checkpoint(self) -> None:
        """Probe the routing (load, and stability against the previous checkpoint), then save everything; a state
        with non-finite weights or optimizer moments is never saved."""
        if self.device_guard:
            skipped = int(self.skipped)
            if not self.parallel.all_finite(skipped == 0):  # every rank joins the collective, then stops
                if skipped:
                    self._raise_skipped()
                raise self._diverged("another rank skipped a step with a non-finite loss or gradient")
        finite = tensors_finite(_tensors([self.model.state_dict(), self.optimizer.state_dict()["state"]]))
        if not self.parallel.all_finite(finite):
            raise self._diverged("non-finite weights or optimizer moments")
        if self.cfg.bn_recalibration:
            size = self.cfg.optim.batch_size
            with self.autocast():
                recalibrate_batchnorm(self.model, (b.inputs for b in self.task.eval_batches(
                    "train", size, limit=self.cfg.bn_recalibration * size)))
        probed = probe_routing(self.model, self.probe.inputs, ctx=self.autocast)
        current = {n: s["probe_assignment"] for n, s in probed.items()}
        self._log_probe(probed)
        if self.prev_probe is not None:
            self.probe_changed = {n: (changed_share(self.prev_probe[n], current[n]), chance_changed_share(current[n]))
                                  for n in current if n in self.prev_probe}
            record = {"kind": "stability", "step": self.step}
            for n, (changed, chance) in self.probe_changed.items():
                record.update({n: changed, f"{n}/chance": chance})
            self.logger.log(record)
        self.prev_probe = current
        weights = self.parallel.model_state(self.model)  # whole-model states: collectives on every rank
        optimizer = self.parallel.optimizer_state(self.optimizer, self.model)
        ema = None if self.ema is None else self.parallel.model_state(self.ema.module)
        if not self.parallel.main:
            return
        save_checkpoint(self.run.checkpoints, self.step, weights, {
            "step": self.step, "optimizer": optimizer, "scaler": self.scaler.state_dict(),
            "rng": _rng_state(), "probe_assignment": current, "probe_changed": self.probe_changed,
            "train_time_s": self.train_time, "segments": self.segments_so_far(),
            "straggler": {n: float(v) for n, v in self.straggler.items()}, "straggler_steps": self.straggler_steps,
            **({} if ema is None else {"ema": ema})},
            keep=self.cfg.keep_checkpoints)

    def close(self) -> None:
        self.logger.close()


def _detached(output: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """A model's output without its graph: a tensor, or a tuple of them (a dual encoder's two embeddings and
    scale)."""
    return output.detach() if isinstance(output, Tensor) else tuple(o.detach() for o in output)


def tensors_finite(tensors) -> bool:
    """Whether every tensor is finite, read to the host once per device (not once per tensor: a sync each on a
    GPU)."""
    flags: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
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


def setup(cfg: TrainConfig, load_pretrained: bool = True, parallel: Parallel | None = None
          ) -> tuple[Task, RoutedModel, torch.device]:
    """A run's threads and device, its task with the data loaded, and its model (seeded, on the device), with the
    data pipeline adapted to the model. ``load_pretrained=False``: the skeleton only (a checkpoint fills it).
    ``parallel``: a distributed rank's device is its own GPU."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if parallel is not None:
        device = parallel.device(device)
    task = create_task(cfg, device)
    task.load()
    if cfg.optim.accum_steps > 1 and task.objective.batch_coupled:
        raise ConfigError(f"optim.accum_steps: task {cfg.task!r} has a loss over the whole batch (the batch's other "
                          "examples are its negatives): micro-batches would change the loss. Use a smaller "
                          "optim.batch_size, or more processes")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task, load_pretrained, quiet=parallel is not None and not parallel.main).to(device)
    if cfg.model.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except NotImplementedError as err:
            raise ConfigError(str(err)) from None
    task.prepare(model)
    if cfg.bn_recalibration and not trainable_batchnorms(model.train()):
        raise ConfigError(f"bn_recalibration recomputes BatchNorm statistics: model {cfg.model.name!r} has no "
                          "trainable BatchNorm layer (set it to 0)")
    return task, model, device


def resume_target(path: str | Path, from_step: int | None = None) -> tuple[Path, int | None]:
    """``--resume`` takes a run directory or one of its checkpoint directories (``RUN/checkpoints/step_N``, the
    same as ``--resume RUN --from-step N``): ``(run directory, from_step)``."""
    path = Path(path)
    if (path / "manifest.json").exists() and path.parent.name == "checkpoints":
        step = step_of(path)
        if from_step is not None and from_step != step:
            raise CheckpointError(f"--resume names the checkpoint of step {step} and --from-step {from_step}")
        return path.parent.parent, step
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run directory")
    return path, from_step


def train(cfg: TrainConfig, resume: str | Path | None = None, quiet: bool = False,
          from_step: int | None = None) -> Path:
    """Train a new run, or resume one (``resume``: its directory; ``from_step``: an older checkpoint than the
    latest); evaluate at the end; return the run directory.

    On resume, ``cfg`` is the run's config with the overrides to apply: :data:`ermoe.train.run.RESUMABLE` keys take
    effect from the resumed step (logged, and kept in config.yaml's history); a change to any other key is refused.
    One process at a time writes a run directory (:class:`ermoe.train.lock.RunLock`).

    Launched by torchrun (docs/distributed.md), every rank runs this: the same model and data, its share of each
    batch; rank 0 alone writes the run directory and prints.
    """
    parallel = Parallel.from_config(cfg)
    try:
        return _train(cfg, parallel, resume, quiet or not parallel.main, from_step)
    finally:
        parallel.close()


def _train(cfg: TrainConfig, parallel: Parallel, resume: str | Path | None, quiet: bool, from_step: int | None
           ) -> Path:
    if resume is not None:
        root, from_step = resume_target(resume, from_step)
        run = Run(root)
        cfg = dataclasses.replace(cfg, out_dir=str(root.parent), run_name=root.name)  # where it is now (LOCATION)
    elif from_step is not None:
        raise ValueError("from_step applies to a resumed run only")
    else:
        task, model, device = setup(cfg, parallel=parallel)  # every build error comes before the run directory
        run = Run(Path(parallel.broadcast(str(Run.new(cfg).root) if parallel.main else None)))
    with parallel.lock(lambda: RunLock(run.root)):
        state, changes = None, {}
        if resume is not None:
            changes = resume_changes(run.read_config(), cfg)
            ckpt, weights, state = find_checkpoint(run.root, from_step)  # read once, verified
            if parallel.main:
                clean_temporaries(run.checkpoints)
            task, model, device = setup(cfg, load_pretrained=False, parallel=parallel)  # no weights file re-read
            load_weights(model, weights, ckpt)  # the whole model; the trainer shards it
        elif cfg.model.moe_init == "pca":
            batches = [b.inputs for b in task.eval_batches("train", cfg.optim.batch_size)][:cfg.model.moe_init_batches]
            model.init_routers_from_data(batches)
        trainer = Trainer(cfg, run, task, model, device, state, quiet, parallel)
        try:
            finished = run.read_metrics()
            if state is not None and trainer.step >= trainer.last_step and finished and \
                    finished.get("step") == trainer.step:
                if not quiet:
                    print(f"run {run.root} already finished at step {trainer.step}: nothing to do "
                          "(`ermoe eval` re-evaluates it; resume with more --optim.epochs to continue it)")
                return run.root
            if parallel.main:
                run.write_config(cfg, trainer.step, changes)
            if changes:
                trainer.logger.log({"kind": "config_change", "step": trainer.step, "changes": changes})
            trainer.fit()
            metrics = evaluate_run(run, task, model, cfg, trainer.autocast, trainer.probe_changed, parallel,
                                   trainer.mean_straggler())
            if trainer.ema is not None:
                metrics["ema"] = ema_metrics(task, trainer.ema.module, trainer.autocast)
            trained = trainer.step * cfg.optim.batch_size
            metrics.update(step=trainer.step, train_time_s=trainer.train_time,
                           train_img_per_s=trained / trainer.train_time if trainer.train_time else None,
                           segments=trainer.segments_so_far(), world_size=parallel.world_size, ep_size=cfg.ep_size)
            if parallel.main:
                run.write_metrics(metrics)
            trainer.logger.log({"kind": "eval", "step": trainer.step,
                                **{k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}})
        finally:
            trainer.close()
    if not quiet:
        print(results_text(task, metrics))
        print(f"run directory: {run.root} (figures in {run.figures})")
    return run.root


def ema_metrics(task: Task, ema_model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float]:
    """The task's measures (test and validation) of the EMA weights."""
    metrics = task.evaluate(ema_model, autocast)
    metrics.pop(TEST_EXAMPLES, None)
    metrics.pop(VAL_EXAMPLES, None)
    return {k: v for k, v in metrics.items() if k.startswith(("test_", "val_")) and isinstance(v, float)}


def results_text(task: Task | type[Task], metrics: dict[str, Any]) -> str:
    """The task's results table, and the EMA weights' measures beside it when the run kept an EMA."""
    text = task.results_table(metrics)
    if metrics.get("ema"):
        text += "\nEMA weights: " + "   ".join(f"{k} {v:.4f}" for k, v in metrics["ema"].items())
    return text


def evaluate_run(run: Run, task: Task, model: RoutedModel, cfg: TrainConfig, autocast: Callable[[], Any],
                 probe_changed: dict[str, tuple[float, float]], parallel: Parallel | None = None,
                 straggler: dict[str, float] | None = None) -> dict[str, Any]:
    """The task's metrics on the test split, the routing stability between the last two checkpoints (the share of
    probe tokens whose experts changed, the share a memoryless router with the same loads would change, and their
    ratio), parameter counts, and the figures. A distributed rank evaluates like every other (the same forwards);
    rank 0 alone draws."""
    parallel = parallel if parallel is not None else Parallel()
    t0 = time.perf_counter()
    metrics = task.evaluate(model, autocast, probe=task.probe())
    metrics["eval_time_s"] = time.perf_counter() - t0
    for split, key in (("test", TEST_EXAMPLES), ("val", VAL_EXAMPLES)):
        examples = metrics.pop(key, None)  # per-example results: beside metrics.json, not in it
        if examples and parallel.main:
            run.write_examples(examples, split)
    for name, stats in metrics["layers"].items():
        stats.pop("probe_assignment", None)
        stats.pop("probe_load", None)
        changed, chance = probe_changed.get(name, (None, None))
        stats.update(probe_changed=changed, probe_changed_chance=chance,
                     probe_changed_rel=changed / chance if changed is not None and chance else None,
                     train_ep_straggler=(straggler or {}).get(name))
    counts = parallel.param_counts or {"total": sum(p.numel() for p in model.parameters()),
                                       "active": model.active_parameters(),
                                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    metrics.update(task=cfg.task, run=str(run.root), ermoe_version=__version__, params_total=counts["total"],
                   params_active=counts["active"], params_trainable=counts["trainable"])
    if parallel.main:
        task.draw_figures(metrics, run.figures)
    return metrics


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None
             ) -> tuple[TrainConfig, Task, RoutedModel, dict[str, Any], torch.device]:
    """Rebuild a run's task (its data loaded) and model from its config and load a checkpoint: ``checkpoint`` (a
    checkpoint directory) or the latest, falling back to the newest intact one with a warning."""
    run = Run(Path(run_dir))
    cfg = run.read_config()
    if checkpoint is not None:
        ckpt = resolve_checkpoint(Path(checkpoint))
        weights, state = read_checkpoint(ckpt)
    else:
        ckpt, weights, state = find_checkpoint(run.root)
    task, model, device = setup(cfg, load_pretrained=False)
    load_weights(model, weights, ckpt)
    return cfg, task, model, state, device


def evaluate(run_dir: str | Path, checkpoint: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """``ermoe eval``: rebuild the model from the run's config, load a checkpoint (latest by default), evaluate,
    rewrite metrics.json and the figures. Holds the run's lock."""
    run = Run(Path(run_dir))
    with RunLock(run.root):
        cfg, task, model, state, device = load_run(run_dir, checkpoint)
        autocast = autocast_ctx(device, amp_dtype(cfg, device))
        steps = state.get("straggler_steps", 0)
        metrics = evaluate_run(run, task, model, cfg, autocast, state.get("probe_changed", {}),
                               straggler={n: v / steps for n, v in state.get("straggler", {}).items()} if steps else None)
        metrics["step"] = state["step"]
        if state.get("ema") is not None:
            ema = build_ema(model, cfg.optim.ema, state["ema"])
            metrics["ema"] = ema_metrics(task, ema.module, autocast)
        previous = run.read_metrics()
        for key in ("train_time_s", "train_img_per_s", "run_wall_s", "segments"):  # what only training knows
            if previous and key in previous:
                metrics.setdefault(key, previous[key])
        run.write_metrics(metrics)
    if not quiet:
        print(results_text(task, metrics))
    return metrics


def report(run_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """``ermoe report``: redraw the figures and print the table from metrics.json."""
    run = Run(Path(run_dir))
    metrics = run.read_metrics()
    if metrics is None:
        raise FileNotFoundError(f"{run.root / METRICS_FILE} not found: run `ermoe eval {run.root}` first")
    task = task_class(metrics.get("task", "classification"))
    files = task.draw_figures(metrics, run.figures)
    if not quiet:
        print(results_text(task, metrics))
        print("figures: " + ", ".join(str(f) for f in files))
    return metrics
