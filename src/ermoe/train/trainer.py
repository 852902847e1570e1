"""The training loop, written once for every task (``ermoe train`` / ``ermoe eval`` / ``ermoe report``).

What differs between applications lives in the task (:mod:`ermoe.tasks`); what differs between models lives behind
the model protocol (:mod:`ermoe.models.protocol`). Here: the run directory, the optimizer and schedule, AMP, the
non-finite guard, logging, the routing probes (load over training, stability between checkpoints), checkpoints and
exact resume.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..version import __version__
from ..analysis.diagnostics import TEST_EXAMPLES, VAL_EXAMPLES
from ..data import fingerprint
from ..data.images import CorruptDatasetError
from ..data.loader import worker_death
from ..job_errors import peer_lost
from ..models import RoutedModel, create_model, upcycle
from ..moe import NonFiniteInputError
from ..routing.oracle import oracle_routers, routed_by
from ..tasks import Batch, Task, TaskSetup, build_task, task_class
from .checkpoint import (CheckpointError, clean_temporaries, find_checkpoint, list_checkpoints, load_weights,
                         read_checkpoint, resolve_checkpoint, save_checkpoint, step_of, trainer_state)
from .components import (EMA, Component, Logger, NonFiniteGuard, NonFiniteLossError, Optimization, Position,
                         RandomState, RoutingMonitor, RunClock, StragglerMeter, amp_dtype, autocast_ctx)
from .config import ConfigError, TrainConfig
from .init_weights import LoadReport, init_from_checkpoint, load_matching, read_weights
from .lock import RunLock
from .parallel import Parallel
from .precise_bn import recalibrate_batchnorm, trainable_batchnorms
from .run import METRICS_FILE, Run, resume_changes
from .shards import load_shards, save_sharded_checkpoint, shard_tensors
from . import whole_state

__all__ = ["NonFiniteLossError", "Trainer", "build_model", "create_task", "evaluate", "load_run", "report", "setup",
           "task_setup", "train"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    """One run's training: a loop over the components of :mod:`ermoe.train.components`, which keep what a
    checkpoint restores (``state``: a checkpoint's state, format 2, to resume from)."""

    def __init__(self, cfg: TrainConfig, run: Run, task: Task, model: RoutedModel, device: torch.device,
                 state: dict[str, Any] | None = None, quiet: bool = False, parallel: Parallel | None = None) -> None:
        self.cfg, self.run, self.task, self.model, self.device, self.quiet = cfg, run, task, model, device, quiet
        self.parallel = parallel = parallel if parallel is not None else Parallel()
        o = cfg.optim
        share = o.batch_size // parallel.world_size
        if share % o.accum_steps:
            raise ConfigError(f"optim.accum_steps={o.accum_steps} must divide each rank's share of optim.batch_size "
                              f"({share} = {o.batch_size} / {parallel.world_size} processes)")
        self.position = Position(task.num_train // o.batch_size, o.epochs, o.max_steps)
        self.ema = EMA(model, o.ema, parallel, cfg.sharded_checkpoints) if o.ema is not None else None  # (whole)
        self.forward_model = parallel.prepare(model)  # experts sharded, DDP around the rest (in a job)
        if self.ema is not None:
            self.ema.shard()
        if o.compile is not None:  # the training forward only (evaluation and probes run eager)
            warnings.warn(f"optim.compile={o.compile!r}: the MoE layers do not scan their inputs for NaN in compiled "
                          "code (the non-finite guard still stops the run)", stacklevel=2)
            self.forward_model = torch.compile(self.forward_model, backend=o.compile)
        self.optimization = Optimization(model, o, self.position.total, device, parallel, cfg.sharded_checkpoints)
        self.autocast = self.optimization.autocast
        self.logger = Logger(run if parallel.main else None, cfg.tensorboard, self.position)
        self.oracles = oracle_routers(model)  # found once: the step routes them by each batch's groups
        probe = task.probe()
        self.routing = RoutingMonitor(model, probe.inputs, self.autocast, self.logger,
                                      task.oracle_groups(probe) if self.oracles else None)
        self.straggler = StragglerMeter(model, parallel)
        self.clock = RunClock(self.position)
        scaled = self.optimization.scaler.is_enabled()
        self.guard = NonFiniteGuard(bool(self.optimizer.defaults.get("fused")) and not scaled, scaled, device,
                                    run.checkpoints, self.position, parallel)
        self.parts: dict[str, Component] = {
            "position": self.position, "clock": self.clock, "optimization": self.optimization, "rng": RandomState(),
            "routing": self.routing, "straggler": self.straggler, "guard": self.guard, "logger": self.logger,
            **({"ema": self.ema} if self.ema is not None else {})}
        # the log's sums accumulate on the device in float64 (MPS has none: float32 there)
        self.sum_dtype = torch.float32 if device.type == "mps" else torch.float64
        self.last_aux: Tensor = torch.zeros(())
        self.replicated: tuple[str, ...] = ()
        if state is not None:
            self.load_state_dict(state)

    @property
    def step(self) -> int:
        return self.position.step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimization.optimizer

    def state_dict(self) -> dict[str, Any]:
        """``{name: component state}``: collectives on every rank (the whole model's expert moments)."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state["components"]
        if set(parts) != set(self.parts):
            raise CheckpointError(f"the checkpoint holds the parts {sorted(parts)}; this run's trainer has "
                                  f"{sorted(self.parts)}")
        for name, part in self.parts.items():  # (in order: the position first)
            part.load_state_dict(parts[name])
        if "shards" in state:  # a sharded checkpoint: the weights, moments and EMA weights, each rank its part
            load_shards(Path(state["shards"]), self.model, self.optimizer,
                        self.ema.module if self.ema is not None else None, self.parallel)

    def fit(self) -> None:
        """Train from the current step to the last one."""
        cfg, model, position = self.cfg, self.model, self.position
        model.on_train_start(position.total)
        progress = None
        if cfg.progress and not self.quiet and self.parallel.main:
            from tqdm.auto import tqdm
            progress = tqdm(total=position.last, initial=position.step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        checked_grads = False
        model.train()
        window: dict[str, Tensor] = {}  # sums over the log window, on the device: read once per window
        window_t0 = time.perf_counter()
        batches = self.task.train_batches(position.step, position.last, self.parallel.rank, self.parallel.world_size)
        try:
            t0 = time.perf_counter()
            for batch in batches:
                epoch = position.epoch
                stats = self._train_step(batch, epoch)
                if not checked_grads and model.experts_active:
                    warn_gradless_routing(model)
                    checked_grads = True
                self._update()
                self.clock.add(time.perf_counter() - t0)
                for key, value in stats.items():
                    value = value.detach().to(self.sum_dtype)
                    window[key] = window[key] + value if key in window else value
                step = position.step
                if step % cfg.log_every == 0 or step == position.last:
                    record = self._log_window(window, epoch, time.perf_counter() - window_t0)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")
                    window, window_t0 = {}, time.perf_counter()
                if progress is not None:
                    progress.update(1)
                end_of_epoch = step % position.steps_per_epoch == 0
                if step == position.last or end_of_epoch or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    self.checkpoint()
                elif cfg.probe_every and step % cfg.probe_every == 0:
                    with self.parallel.gathered(model):
                        self.routing.log(step)
                if end_of_epoch and step != position.last:
                    with self.parallel.gathered(model):
                        record = self.task.quick_eval(model, self.autocast)
                    self.logger.log({"kind": "eval", "step": step, "epoch": epoch, **record})
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

    def _log_window(self, window: dict[str, Tensor], epoch: int, elapsed: float) -> dict[str, Any]:
        """The log line of a window of steps: every rank's sums, read to the host in one transfer (with the
        skipped-step count of the device guard)."""
        sums = self.parallel.sum_stats({**window, **self.guard.log_sums(self.sum_dtype)}, replicated=self.replicated)
        if sums.pop("skipped_steps", 0):
            self.guard.raise_skipped()
        seen = sums.pop("examples")
        record = {"kind": "train", "step": self.step, "epoch": epoch, **{k: v / seen for k, v in sums.items()},
                  "lr": self.optimization.scheduler.get_last_lr()[0], "aux_loss": float(self.last_aux),
                  "img_per_s": seen / max(elapsed, 1e-9)}
        self.logger.log(record)
        return record

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
            # an oracle's groups through forward and backward (a recomputed forward routes again); read for one only
            groups = self.task.oracle_groups(micro) if self.oracles else None
            with (self.parallel.accumulating(self.forward_model, last=i == accum - 1),
                  routed_by(self.model, groups, self.oracles)):
                part = self._micro_step(micro, accum)
            self.straggler.track()
            for key, value in part.items():
                sums[key] = sums[key] + value if key in sums else value
        return sums

    def _micro_step(self, batch: Batch, accum: int) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch, its loss weighted ``1 / accum`` (the step's gradient is the
        mean over the step's examples, as without accumulation)."""
        try:
            with self.autocast():
                output = self.forward_model(*batch.inputs)
                coupled = self.task.objective.batch_coupled and self.parallel.world_size > 1
                target = batch.target
                if coupled:  # a contrastive loss over the global batch, the same on every rank
                    output = self.parallel.gather_output(output)
                    target = None if target is None else self.parallel.gather_output(target)
                loss = self.model.training_loss(output, target, self.task.objective.loss)
                extra = self.model.aux_loss()
                total = loss + extra
        except NonFiniteInputError as err:  # activations blew up before the loss: the same divergence
            raise self.guard.diverged(f"non-finite activations ({err})") from None
        self.guard.check_loss(total)
        self.optimization.scaler.scale(total if accum == 1 else total / accum).backward()
        n = len(batch)
        task_stats = self.task.objective.batch_stats(_detached(output), batch)
        self.last_aux = extra.detach()
        self.replicated = tuple(task_stats) if coupled else ()  # computed over the gathered global batch
        return {"loss": total.detach().to(self.sum_dtype) * n,
                "examples": torch.full((), n, dtype=self.sum_dtype, device=total.device), **task_stats}

    def _update(self) -> None:
        """Clip, check the gradient, step. A non-finite gradient stops training before it reaches the weights and
        the optimizer's moments (fp16 is the exception: its grad scaler skips such steps by design)."""
        opt = self.optimization
        self.parallel.after_backward(self.model)
        if self.cfg.optim.clip_grad or not opt.scaler.is_enabled():
            opt.scaler.unscale_(opt.optimizer)
            self.guard.check_gradient(self.parallel.clip_grad_norm(self.model, self.cfg.optim.clip_grad or math.inf),
                                      opt.optimizer)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        self.position.step += 1
        self.model.after_step(self.step)
        if self.ema is not None:
            self.ema.update(self.model, self.step)

    def checkpoint(self) -> None:
        """Check, probe the routing (load, and stability against the previous checkpoint), save every part; a state
        with non-finite weights or optimizer moments is never saved."""
        self.guard.check_before_saving(self.model, self.optimizer)
        with self.parallel.gathered(self.model):
            if self.cfg.bn_recalibration:
                size = self.cfg.optim.batch_size
                batches = list(self.task.eval_batches("train", size, limit=self.cfg.bn_recalibration * size))
                with self.autocast():
                    recalibrate_batchnorm(self.model, [b.inputs for b in batches],
                                          groups=[self.task.oracle_groups(b) for b in batches])
            self.routing.at_checkpoint(self.step)
        if self.cfg.sharded_checkpoints:  # every rank writes its tensors (ermoe.train.shards)
            ema = self.ema.module if self.ema is not None else None
            save_sharded_checkpoint(self.run.checkpoints, self.step,
                                    shard_tensors(self.model, self.optimizer, ema, self.parallel),
                                    trainer_state(self.step, self.state_dict()), self.cfg.keep_checkpoints,
                                    self.parallel)
            return
        weights = whole_state.model_state(self.parallel, self.model)  # whole-model states: collectives on every rank
        parts = self.state_dict()
        if self.parallel.main:
            save_checkpoint(self.run.checkpoints, self.step, weights, trainer_state(self.step, parts),
                            keep=self.cfg.keep_checkpoints)

    def close(self) -> None:
        self.logger.close()


def _detached(output: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """A model's output without its graph: a tensor, or a tuple of them (a dual encoder's two embeddings and
    scale)."""
    return output.detach() if isinstance(output, Tensor) else tuple(o.detach() for o in output)


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
          from_step: int | None = None, accept_data_change: bool = False) -> Path:
    """Train a new run, or resume one (``resume``: its directory; ``from_step``: an older checkpoint than the
    latest); evaluate at the end; return the run directory. A resumed run's data must be the data it started with
    (:mod:`ermoe.data.fingerprint`) unless ``accept_data_change`` (logged).

    On resume, ``cfg`` is the run's config with the overrides to apply: :data:`ermoe.train.run.RESUMABLE` keys take
    effect from the resumed step (logged, and kept in config.yaml's history); a change to any other key is refused.
    One process at a time writes a run directory (:class:`ermoe.train.lock.RunLock`).

    Launched by torchrun (docs/distributed.md), every rank runs this: the same model and data, its share of each
    batch; rank 0 alone writes the run directory and prints.
    """
    parallel = Parallel.from_config(cfg)
    try:
        return _train(cfg, parallel, resume, quiet or not parallel.main, from_step, accept_data_change)
    finally:
        parallel.close()


def _train(cfg: TrainConfig, parallel: Parallel, resume: str | Path | None, quiet: bool, from_step: int | None,
           accept_data_change: bool = False) -> Path:
    if resume is not None:
        root, from_step = resume_target(resume, from_step)
        run = Run(root)
        cfg = dataclasses.replace(cfg, out_dir=str(root.parent), run_name=root.name)  # where it is now (LOCATION)
    elif from_step is not None:
        raise ValueError("from_step applies to a resumed run only")
    else:
        task, model, device = setup(cfg, parallel=parallel)  # every build error comes before the run directory
        run = Run(Path(parallel.broadcast(str(Run.new(cfg).root) if parallel.main else None)))
    try:
        with parallel.lock(lambda: RunLock(run.root)):
            state, changes, data_changes = None, {}, []
            if resume is not None:
                changes = resume_changes(run.read_config(), cfg)
                # read once, verified; a sharded checkpoint's tensors are read by the trainer, each rank its part
                ckpt, weights, state = find_checkpoint(run.root, from_step, consolidate=False)
                if parallel.main:
                    clean_temporaries(run.checkpoints)
                task, model, device = setup(cfg, load_pretrained=False, parallel=parallel)  # no weights file re-read
                # (every rank compares, so that all stop together; rank 0 writes)
                data_changes = fingerprint.check(run.root, task.batches, accept_data_change, write=parallel.main)
                if weights is not None:
                    load_weights(model, weights, ckpt)  # the whole model; the trainer shards it
            else:
                if parallel.main:
                    fingerprint.record(run.root, task.batches)  # what a resume and an evaluation compare with
                if cfg.model.moe_init == "pca":
                    batches = [b.inputs for b in task.eval_batches("train", cfg.optim.batch_size)]
                    model.init_routers_from_data(batches[:cfg.model.moe_init_batches])
            trainer = Trainer(cfg, run, task, model, device, state, quiet, parallel)
            try:
                finished = run.read_metrics()
                if state is not None and trainer.step >= trainer.position.last and finished and \
                        finished.get("step") == trainer.step:
                    if not quiet:
                        print(f"run {run.root} already finished at step {trainer.step}: nothing to do "
                              "(`ermoe eval` re-evaluates it; resume with more --optim.epochs to continue it)")
                    return run.root
                if parallel.main:
                    run.write_config(cfg, trainer.step, changes)
                if changes:
                    trainer.logger.log({"kind": "config_change", "step": trainer.step, "changes": changes})
                if data_changes:
                    trainer.logger.log({"kind": "data_change", "step": trainer.step, "changes": data_changes})
                    warnings.warn(f"going on over changed data from step {trainer.step} (--accept-data-change): "
                                  + "; ".join(data_changes) + ". The resumed run is no longer the one it would "
                                  "have been", stacklevel=2)
                trainer.fit()
                with parallel.gathered(model):
                    metrics = evaluate_run(run, task, model, cfg, trainer.autocast, trainer.routing.changed, parallel,
                                           trainer.straggler.mean())
                if trainer.ema is not None:
                    metrics["ema"] = ema_metrics(task, trainer.ema.module, trainer.autocast)
                trained, seconds = trainer.step * cfg.optim.batch_size, trainer.clock.total
                metrics.update(step=trainer.step, train_time_s=seconds,
                               train_img_per_s=trained / seconds if seconds else None,
                               segments=trainer.clock.segments_so_far(), world_size=parallel.world_size,
                               ep_size=cfg.ep_size)
                if parallel.main:
                    run.write_metrics(metrics)
                trainer.logger.log({"kind": "eval", "step": trainer.step,
                                    **{k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}})
            finally:
                trainer.close()
    except (OSError, CorruptDatasetError) as err:  # a failed write (a full disk), a file that cannot be decoded:
        err.add_note(resume_advice(run))          # say how the run goes on
        raise
    except RuntimeError as err:
        if peer_lost(err) is not None:  # a peer process of the job stopped: the job goes on from here too
            err.add_note(resume_advice(run))
        raise
    if not quiet:
        print(results_text(task, metrics))
        print(f"run directory: {run.root} " + (f"(figures in {run.figures})" if cfg.figures else
                                                "(figures: false; `ermoe report` draws them)"))
    return run.root


def resume_advice(run: Run) -> str:
    """How a run that stopped on an error goes on once its cause is fixed: resumed from its last checkpoint, or, with
    none written yet, started again."""
    kept = list_checkpoints(run.checkpoints)
    if kept:
        return (f"the run keeps its checkpoint of step {step_of(kept[-1])}: once the cause is fixed, go on with "
                f"`ermoe train --resume {run.root}`")
    return (f"no checkpoint was written yet, so there is nothing to resume: once the cause is fixed, start the run "
            f"again (its directory {run.root} can be removed)")


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


def training_layer_stats(metrics: dict[str, Any], probe_changed: dict[str, tuple[float, float]],
                         straggler: dict[str, float] | None) -> None:
    """Per routing layer of ``metrics``, what training measured in place of the probe's raw assignments: the
    stability between the last two checkpoints (changed, what a memoryless router would change, their ratio) and
    the straggler factor (None where training did not measure them)."""
    for name, stats in metrics["layers"].items():
        stats.pop("probe_assignment", None)
        stats.pop("probe_load", None)
        changed, chance = probe_changed.get(name, (None, None))
        stats.update(probe_changed=changed, probe_changed_chance=chance,
                     probe_changed_rel=changed / chance if changed is not None and chance else None,
                     train_ep_straggler=(straggler or {}).get(name))


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
    training_layer_stats(metrics, probe_changed, straggler)
    counts = parallel.param_counts or {"total": sum(p.numel() for p in model.parameters()),
                                       "active": model.active_parameters(),
                                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    metrics.update(task=cfg.task, run=str(run.root), ermoe_version=__version__, params_total=counts["total"],
                   params_active=counts["active"], params_trainable=counts["trainable"])
    if parallel.main and cfg.figures:
        task.draw_figures(metrics, run.figures)
    return metrics


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, accept_data_change: bool = False
             ) -> tuple[TrainConfig, Task, RoutedModel, dict[str, Any], torch.device]:
    """Rebuild a run's task (its data loaded, and checked to be the data the run started with unless
    ``accept_data_change``: :mod:`ermoe.data.fingerprint`) and model from its config and load a checkpoint:
    ``checkpoint`` (a checkpoint directory) or the latest, falling back to the newest intact one with a warning."""
    run = Run(Path(run_dir))
    cfg = run.read_config()
    if checkpoint is not None:
        ckpt = resolve_checkpoint(Path(checkpoint))
        weights, state = read_checkpoint(ckpt)
    else:
        ckpt, weights, state = find_checkpoint(run.root)
    task, model, device = setup(cfg, load_pretrained=False)
    fingerprint.check(run.root, task.batches, accept_data_change, what="evaluation", write=False)
    load_weights(model, weights, ckpt)
    return cfg, task, model, state, device


def evaluate(run_dir: str | Path, checkpoint: str | Path | None = None, quiet: bool = False,
             accept_data_change: bool = False) -> dict[str, Any]:
    """``ermoe eval``: rebuild the model from the run's config, load a checkpoint (latest by default), evaluate,
    rewrite metrics.json and the figures. Holds the run's lock. Its data must be the run's (``load_run``)."""
    run = Run(Path(run_dir))
    with RunLock(run.root):
        cfg, task, model, state, device = load_run(run_dir, checkpoint, accept_data_change)
        autocast = autocast_ctx(device, amp_dtype(cfg.optim.amp, device))
        parts = state["components"]
        straggler = StragglerMeter(model, Parallel())
        straggler.load_state_dict(parts["straggler"])
        metrics = evaluate_run(run, task, model, cfg, autocast, parts["routing"]["changed"],
                               straggler=straggler.mean() or None)
        metrics["step"] = state["step"]
        if "ema" in parts:
            ema = EMA(model, cfg.optim.ema, Parallel())
            ema.load_state_dict(parts["ema"])
            metrics["ema"] = ema_metrics(task, ema.module, autocast)
        previous = run.read_metrics()
        for key in ("train_time_s", "train_img_per_s", "run_wall_s", "segments"):  # what only training knows
            if previous and key in previous:
                metrics.setdefault(key, previous[key])
        run.write_metrics(metrics)
    if not quiet:
        print(results_text(task, metrics))
    return metrics


def evaluate_pretrained(folder: str | Path, cfg: TrainConfig, quiet: bool = False) -> dict[str, Any]:
    """``ermoe eval HUB_FOLDER [--data.name=... overrides]``: a model saved in the Hub's layout (``ermoe export``,
    ``ermoe.save_pretrained``, an EMoE release converted by ``ermoe.load_emoe_release``) on the test split of the
    config's data (and its validation split), printed and returned; nothing is written. The data must be what the
    model was built for (classes, image size, channels): a difference is an error naming it."""
    from ..models.hub import from_pretrained, read_config

    device = resolve_device(cfg.device)
    task = create_task(cfg, device)
    task.load()
    args = read_config(Path(folder))["model"]["args"]
    wrong = [f"{k}: the model's {args[k]!r}, the data's {v!r}" for k, v in task.model_args().items()
             if k in args and args[k] != v]
    if wrong:
        raise ConfigError(f"{folder} was built for other data than {cfg.data.name!r}: " + "; ".join(wrong))
    model = from_pretrained(folder).to(device)
    task.prepare(model)
    metrics = task.evaluate(model, autocast_ctx(device, amp_dtype(cfg.optim.amp, device)), probe=task.probe())
    metrics.pop(TEST_EXAMPLES, None)
    metrics.pop(VAL_EXAMPLES, None)
    training_layer_stats(metrics, {}, None)  # (no training: no stability between checkpoints, no straggler)
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
