"""Run configuration: nested dataclasses, loaded from YAML, overridden from the command line, validated.

``load_config(path, overrides)`` reads a YAML file (missing keys keep their defaults), applies ``key.sub=value``
overrides (values parsed as YAML: ``3``, ``0.1``, ``true``, ``[1, 3]``, ``{standardize: true}``), and checks every
key and type; an error names the offending key and what was expected.

Every value is checked against its annotation by :mod:`ermoe.settings` (pydantic, strict: no ``'5'`` for an int,
no ``'false'`` for a bool), the one checker of config sections, model builder arguments and router keywords. The
model section is the model's builder's keyword arguments (typed by its signature, ``ermoe.models``); the data
section is the options of the dataset ``data.name`` names (``ermoe.data.modules``); ``task_options`` the task's
Options. Nothing here repeats their rules.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from ..data.modules import DataOptions, FashionMNISTOptions, data_options, dataset_keys
from ..models import MoESpec, model_parameters, router_has_data_init
from ..settings import FORBID_EXTRA, Fraction, NonNegative, Positive, check, finite, yaml_load
from ..tasks import task_class


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an out-of-range value."""


# The main job's model: ViT-tiny's width and heads (192, 3) at depth 4 and patch 7, ERMoE in blocks 1 and 3, sized to
# train on Fashion-MNIST on a 2-core CPU in under 10 minutes.
MAIN_MODEL, MAIN_MODEL_ARGS = "vit_tiny", {"depth": 4, "patch_size": 7, "moe": {}}


@dataclass
class ModelConfig:
    """The model section. In YAML it is flat: besides ``name``, ``moe_init``, ``moe_init_batches`` and
    ``grad_checkpointing`` every key is a
    keyword argument of the model's builder (``ermoe.models.describe(name)``), kept in ``args`` and typed by the
    builder's signature; a key the model does not take, or one the task sets from the data (``num_classes``,
    ``img_size``, ``in_chans`` for classification), is an error. ``moe: null`` is a model without MoE layers.

    The defaults are the main job's model (:data:`MAIN_MODEL_ARGS`); they apply while ``name`` is ``vit_tiny``.
    Another model starts from its own builder's defaults.

    ``moe_init``: data-dependent router initialisation before training (``pca``: eigen bases from the features).
    """

    name: str = MAIN_MODEL
    args: dict[str, Any] = field(default_factory=lambda: {**MAIN_MODEL_ARGS, "moe": MoESpec()})
    moe_init: Literal["random", "pca"] = "random"
    moe_init_batches: Positive = 4
    # Recompute the blocks' activations in backward instead of keeping them (ViT blocks, the text tower's blocks,
    # 3D CNN stages: ermoe.models.checkpointing); a model without it is an error.
    grad_checkpointing: bool = False
    # Weights to start from (docs/upcycling.md): a safetensors / PyTorch state dict / ermoe run directory, or
    # {submodule: path} (the dual encoder's towers); what matches by name and shape is loaded, the rest reported.
    init_checkpoint: str | dict[str, str] | None = None
    # A dense run (or its weights) whose FFNs the MoE layers start from (ermoe.upcycle; moe.placement replace).
    upcycle_from: str | None = None
    # ERMoE's bases when upcycling: split (the default) or shared (ermoe.upcycle).
    upcycle_bases: Literal["split", "shared"] | None = None

    @property
    def moe(self) -> MoESpec | None:
        """The MoE layers' spec, if the model takes one (None: none)."""
        return self.args.get("moe")


@dataclass
class OptimConfig:
    __pydantic_config__ = FORBID_EXTRA
    epochs: Positive = 5
    max_steps: Positive | None = None  # stop early after this many steps (the schedule still spans ``epochs``)
    batch_size: Positive = 128
    eval_batch_size: Positive = 500
    lr: finite(gt=0) = 5e-4
    min_lr_ratio: Fraction = 0.01
    weight_decay: finite(ge=0) = 0.05
    betas: Annotated[list[finite(ge=0, lt=1)], Field(min_length=2, max_length=2)] = field(
        default_factory=lambda: [0.9, 0.999])
    warmup_steps: NonNegative = 200
    clip_grad: finite(gt=0) | None = 1.0
    label_smoothing: finite(ge=0, lt=1) = 0.0
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on CUDA GPUs that support it, else off
    # Gradient accumulation: each step's batch (each rank's share) in this many equal micro-batches, a backward
    # each, one optimizer step (docs/runs.md: the same gradient as the whole batch, except through BatchNorm and
    # auxiliary losses, which see micro-batches).
    accum_steps: Positive = 1
    # PyTorch's fused AdamW (one kernel for every parameter): null = where every parameter is on a CUDA device.
    # With it the non-finite guard runs on the device (a step with a non-finite loss or gradient is skipped there
    # and reported at the next log line: no host sync per step).
    fused: bool | None = None
    # torch.compile of the training forward with this backend ("inductor": code generation; "aot_eager": the graphs
    # without it, a check); null: eager. The MoE layers' NaN scan of their input is off in compiled code (the
    # non-finite guard still stops the run). Evaluation runs eager.
    compile: str | None = None
    # An exponential moving average of the weights with this decay (timm's ModelEmaV3, e.g. 0.9998), evaluated
    # beside the raw weights at the end; null: none.
    ema: finite(gt=0, lt=1) | None = None

    def __post_init__(self) -> None:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"optim.batch_size must be divisible by optim.accum_steps ({self.accum_steps}), got "
                             f"{self.batch_size}")


@dataclass
class TrainConfig:
    task: str = "classification"
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs"
    run_name: str | None = None
    log_every: Positive = 50
    checkpoint_every: NonNegative = 0  # steps; 0: at the end of every epoch only
    keep_checkpoints: Positive = 2
    probe_size: Positive = 256  # test examples whose routing is tracked across checkpoints (stability)
    probe_every: NonNegative = 0  # steps; also log the probe's load (CV, max/mean, Gini) between checkpoints
    threads: Positive | None = None
    # Training batches over which BatchNorm statistics are recomputed before every checkpoint (precise BN,
    # ermoe.train.precise_bn); 0 keeps the running averages. Only for models with BatchNorm layers.
    bn_recalibration: NonNegative = 0
    # Distributed runs (torchrun, docs/distributed.md): the expert-parallel size (experts sharded over that many
    # ranks; the world size is torchrun's) and the timeout of every collective (a failed rank stops its peers).
    ep_size: Positive = 1
    dist_timeout_s: finite(gt=0) = 600.0
    # How the data-parallel side holds the weights: ddp (a whole copy per process, gradients all-reduced) or fsdp
    # (FSDP2's fully_shard: weights, gradients, optimizer moments and the EMA copy sharded over the processes, each
    # ViT block a unit; beside expert parallelism, every weight but the experts). docs/distributed.md.
    shard: Literal["ddp", "fsdp"] = "ddp"
    # How checkpoints are written (ermoe.train.checkpoint, ermoe.train.shards): single (the whole model in one
    # safetensors file, written by rank 0) or sharded (torch.distributed.checkpoint: every rank writes what it
    # holds); auto: sharded under shard: fsdp, else single. Either resumes at any world size.
    checkpoint_format: Literal["auto", "single", "sharded"] = "auto"
    # Join torchrun's process group even as its only process (torchrun --nproc_per_node=1): every collective then
    # runs (NCCL on a GPU), as it would on more processes. With several processes the group is always joined.
    distributed: bool = False
    tensorboard: bool = True
    progress: bool = True
    # The run's own figures (expert heatmaps, loads) drawn at evaluation; `ermoe report RUN` draws them from
    # metrics.json any time. Studies leave them out: 40% of a quick study's time, and their reports draw their own.
    figures: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    # The options of the dataset data.name names (ermoe.data.modules): Fashion-MNIST's by default.
    data: DataOptions = field(default_factory=FashionMNISTOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The task's own settings (its Options dataclass, e.g. brain age's loss); none for classification.
    task_options: dict[str, Any] = field(default_factory=dict)

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are written sharded (``checkpoint_format``, ``auto`` resolved)."""
        return self.checkpoint_format == "sharded" or (self.checkpoint_format == "auto" and self.shard == "fsdp")


def _check(value: Any, annotation: Any, key: str) -> Any:
    """:func:`ermoe.settings.check`, its error a :class:`ConfigError`."""
    try:
        return check(value, annotation, key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# The model section's keys that the loop reads (not the builder's arguments).
LOOP_MODEL_KEYS = ("moe_init", "moe_init_batches", "grad_checkpointing", "init_checkpoint", "upcycle_from",
                   "upcycle_bases")


def _build_model(values: Any, key: str) -> ModelConfig:
    """The model section: ``name``, the loop's keys, and the builder's arguments checked against its signature."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping of model settings, got {values!r}")
    values = dict(values)
    name = _check(values.pop("name", MAIN_MODEL), str, f"{key}.name")
    loop = {k: values.pop(k) for k in LOOP_MODEL_KEYS if k in values}
    raw = merge_settings(MAIN_MODEL_ARGS, values) if name == MAIN_MODEL else values
    try:
        accepted = model_parameters(name, raw)
    except ValueError as err:
        raise ConfigError(f"{key}.name: {err}") from None
    args = {}
    for arg, value in raw.items():
        if arg not in accepted:
            raise ConfigError(f"{key}.{arg} does not apply to model {name!r}; it takes: {', '.join(accepted)}")
        args[arg] = _check(value, accepted[arg], f"{key}.{arg}")
    hints = typing.get_type_hints(ModelConfig, include_extras=True)
    loop = {k: _check(v, hints[k], f"{key}.{k}") for k, v in loop.items()}
    return ModelConfig(name=name, args=args, **loop)


def _build_data(values: Any, key: str) -> DataOptions:
    """The data section: the options of the dataset ``name`` names, checked against their annotations; a key the
    dataset does not read is an error naming the keys it reads."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping of data settings, got {values!r}")
    values = dict(values)
    name = _check(values.pop("name", FashionMNISTOptions.name), str, f"{key}.name")
    try:
        options = data_options(name)
    except ValueError as err:
        raise ConfigError(f"{key}.name: {err}") from None
    keys = dataset_keys(name)
    for k in values:
        if k not in keys:
            raise ConfigError(f"{key}.{k} does not apply to dataset {name!r} (it reads: {', '.join(keys)})")
    return _check(values, options, key)


def build_section(cls: type, values: Any, prefix: str = "") -> Any:
    """A dataclass section (or a whole config: TrainConfig, a study's) from a mapping: unknown keys named with the
    valid ones, every value checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in names:
            full = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    if cls is not TrainConfig:
        return _check(values, cls, prefix)
    sections = {"model": _build_model, "data": _build_data}
    kwargs = {k: sections[k](v, k) if k in sections else _check(v, hints[k], k) for k, v in values.items()}
    return cls(**kwargs)


def _check_start(m: ModelConfig) -> None:
    """``model.init_checkpoint`` / ``upcycle_from`` / ``upcycle_bases`` and what they need of the rest."""
    if m.init_checkpoint is not None and m.upcycle_from is not None:
        raise ConfigError("model.init_checkpoint and model.upcycle_from both set the weights: give one (upcycle_from "
                          "loads the dense run's weights itself)")
    if m.upcycle_bases is not None and (m.upcycle_from is None or m.moe is None or m.moe.router != "ermoe"):
        raise ConfigError("model.upcycle_bases chooses ERMoE's eigen bases when upcycling: it needs "
                          "model.upcycle_from and moe.router ermoe")
    if m.upcycle_from is None:
        return
    if m.moe is None:
        raise ConfigError("model.upcycle_from turns a dense run's FFNs into MoE layers: the model needs a moe section")
    if m.moe.resolved_placement() != "replace":
        raise ConfigError(f"model.upcycle_from replaces the dense FFNs: moe.placement must be replace, not "
                          f"{m.moe.resolved_placement()!r}")
    if m.moe.hidden_dim is not None:
        raise ConfigError("model.upcycle_from: the experts take the dense FFN's width; leave moe.hidden_dim null")
    if m.moe.router == "emoe" and m.moe_init != "pca":
        raise ConfigError("model.upcycle_from with router emoe: its shared basis comes from the features' PCA; set "
                          "model.moe_init: pca")
    if m.moe.router == "ermoe" and m.moe_init == "pca":
        raise ConfigError("model.upcycle_from with router ermoe: the bases come from the dense FFN's SVD; "
                          "model.moe_init: pca would replace them")


def _check_ranges(cfg: TrainConfig) -> None:
    """The rules across sections (each section's own are its fields' constraints and its ``__post_init__``)."""
    m, o = cfg.model, cfg.optim
    _check_device(cfg.device)
    if m.moe_init == "pca" and not (m.moe is not None and router_has_data_init(m.moe.router)):
        router = "no MoE layers" if m.moe is None else f"router {m.moe.router!r}"
        raise ConfigError(f"model.moe_init: pca sets the bases of eigen routers (emoe, ermoe) from the data; model "
                          f"{m.name!r} with {router} has none")
    _check_start(m)
    task = _check_data(cfg)
    for key in task.model_data_args:
        if key in m.args:
            raise ConfigError(f"model.{key} is set from the data by task {cfg.task!r}, not in the config")
    if o.compile is not None and m.grad_checkpointing:
        raise ConfigError("model.grad_checkpointing with optim.compile: torch.compile cannot trace a checkpoint whose "
                          "recomputation restores the block's buffers (ermoe.models.checkpointing); use one of them")
    if o.compile is not None:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if o.compile not in backends:
            raise ConfigError(f"optim.compile must be null or a torch.compile backend ({', '.join(backends)}), "
                              f"got {o.compile!r}")


def _check_device(name: str) -> None:
    """``auto``, ``cpu``, ``cuda[:N]`` or ``mps``, and present on this machine."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps, got {name!r}") from None
    if device.type == "cpu" and device.index in (None, 0):
        return
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"device {name!r}: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA GPU(s), numbered from 0")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r}: MPS is not available on this machine")
        return
    raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps, got {name!r}")


def _check_data(cfg: TrainConfig) -> type:
    """The task exists, takes its options, and reads the dataset. Returns the task's class."""
    try:
        task = task_class(cfg.task)
    except ValueError as err:
        raise ConfigError(f"task: {err}") from None
    if task.Options is None:
        if cfg.task_options:
            raise ConfigError(f"task_options do not apply to task {cfg.task!r} (it takes none)")
    else:
        build_section(task.Options, cfg.task_options, "task_options")
    d = cfg.data
    if d.name not in task.datasets:
        raise ConfigError(f"data.name must be one of {list(task.datasets)} for task {cfg.task!r}, got {d.name!r}")
    try:
        d.check_run(cfg.optim.batch_size, cfg.model.name, cfg.model.args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return task


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--a.b=1', '--c', 'x']`` (leading dashes optional) -> ``{'a': {'b': 1}, 'c': 'x'}``."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i].lstrip("-")
        if "=" in arg:
            key, raw = arg.split("=", 1)
        elif i + 1 < len(args):
            key, raw = arg, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {args[i]!r} has no value (use --key=value)")
        try:
            value = yaml_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
        _set_dotted(tree, key, value)
        i += 1
    return tree


def merge_settings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, nested mappings merged key by key (what an override or a study's budget
    does to a config tree)."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if nested else value
    return out


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    cfg = build_section(TrainConfig, values or {})
    _check_ranges(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file")
        try:
            values = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        values = merge_settings(_switch_dataset(values, extra), extra)
    return config_from_dict(values)


def _switch_dataset(values: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """An override of ``data.name`` to another dataset than the file's starts the data section from that dataset's
    defaults: the file's data keys it does not read are dropped, with one printed line naming them (a key given on
    the command line that does not apply stays an error)."""
    file_data, new = values.get("data"), (extra.get("data") or {}).get("name") if isinstance(extra.get("data"),
                                                                                              dict) else None
    if not isinstance(file_data, dict) or new is None or new == file_data.get("name", FashionMNISTOptions.name):
        return values
    try:
        applicable = dataset_keys(new)
    except ValueError:
        return values  # an unknown dataset: its own error follows
    dropped = [k for k in file_data if k != "name" and k not in applicable]
    if dropped:
        print(f"data.name={new}: the config file's data keys {', '.join(dropped)} do not apply to it and were "
              "dropped", file=sys.stderr)
    return {**values, "data": {k: v for k, v in file_data.items() if k not in dropped}}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data, the model and data sections flat as in YAML (what ``config_from_dict`` reads back)."""
    out = dataclasses.asdict(cfg)
    model = out["model"]
    out["model"] = {"name": model["name"], **model["args"], **{k: model[k] for k in LOOP_MODEL_KEYS}}
    out["data"] = cfg.data.to_dict()
    return out


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
