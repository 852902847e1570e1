"""Run configuration: nested dataclasses, loaded from YAML, overridden from the command line, validated.

``load_config(path, overrides)`` reads a YAML file (missing keys keep their defaults), applies ``key.sub=value``
overrides (values parsed as YAML: ``3``, ``0.1``, ``true``, ``[1, 3]``, ``{standardize: true}``), and checks every
key and type; an error names the offending key and what was expected.

The model section is the model's builder's keyword arguments (the registry, ``ermoe.models``, types and checks
them), the data section is checked against what the task's dataset reads (``ermoe.tasks``): nothing here repeats
their rules.

Why not OmegaConf structured configs (tried with 2.4.0): a ``str | list[int]`` field (``model.moe.blocks``:
``every_other`` or ``[1, 3]``) rejects the list; strings are coerced silently (``'yes'`` and ``'false'`` to bools,
``'5'`` to an int), where a wrong type must be an error; and the model section's schema is chosen by
``model.name`` at load time, which would need a generated dataclass per builder. The checker below is small.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.folder import ImageAugment
from ..models import MoESpec, model_parameters, router_has_data_init
from ..tasks import task_class


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an out-of-range value."""


# The main job's model: ViT-tiny's width and heads (192, 3) at depth 4 and patch 7, ERMoE in blocks 1 and 3, sized to
# train on Fashion-MNIST on a 2-core CPU in under 10 minutes.
MAIN_MODEL, MAIN_MODEL_ARGS = "vit_tiny", {"depth": 4, "patch_size": 7, "moe": {}}


@dataclass
class ModelConfig:
    """The model section. In YAML it is flat: besides ``name``, ``moe_init`` and ``moe_init_batches`` every key is a
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
    moe_init_batches: int = 4

    @property
    def moe(self) -> MoESpec | None:
        """The MoE layers' spec, if the model takes one (None: none)."""
        return self.args.get("moe")


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    data_dir: str | None = None
    download: bool = False
    mirror: str | None = None
    img_size: int | None = None  # imagefolder only: the decoded size (224 when null)
    train_limit: int | None = None  # first N training images (quick runs), after the validation split is held out
    test_limit: int | None = None
    # Training images held out as a validation split (0: none), drawn by split_seed: the same for every run.
    val_size: int = 0
    split_seed: int = 0
    # Compute a frozen pretrained stem's features once per image and cache them (ermoe.tasks.features).
    stem_cache: bool = False
    # Brain age (docs/brainage.md): nifti_csv reads `csv`; brain_cohort generates `cohort_size` subjects
    # (`cohort_seed`) once and caches them. Both resample to the MNI grid at `spacing` mm; `test_size` subjects
    # are held out for testing (with val_size for validation) unless the CSV has a split column.
    csv: str | None = None
    spacing: float = 2.0
    cohort_size: int = 600
    cohort_seed: int = 0
    test_size: int = 0
    # Retrieval (docs/retrieval.md): karpathy reads the Karpathy split file `json` with its images under
    # `image_root`; fashion_captions generates `caption_set_size` training canvases (+ 1,000 val, 1,000 test) once.
    json: str | None = None
    image_root: str | None = None
    caption_set_size: int = 10000
    # Off by default: in the 4-epoch main job augmentation cost accuracy (docs/vision.md has the measurement).
    # For volumes: crop_padding = the largest random shift in voxels, hflip = a random left-right flip.
    crop_padding: int = 0
    hflip: bool = False
    # Streamed datasets (imagefolder, brain age; docs/data.md): loader worker processes that decode (0: in the
    # training process), the training augmentation (null: none; {} DeiT's), the centre crop's share of the resized image
    # at evaluation, and whether an undecodable file is left out with a warning instead of stopping the run.
    num_workers: int = 0
    # Brain age: a split's preprocessed volumes are held in memory up to this many GiB, else read per example
    # from the cache (in the loader's workers); the cache itself is built by num_workers processes.
    memory_cap_gb: float = 2.0
    augment: ImageAugment | None = None
    crop_pct: float = 0.875
    skip_corrupt: bool = False


@dataclass
class OptimConfig:
    epochs: int = 5
    max_steps: int | None = None  # stop early after this many steps (the schedule still spans ``epochs``)
    batch_size: int = 128
    eval_batch_size: int = 500
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 200
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.0
    amp: str = "auto"  # auto: bf16 on CUDA GPUs that support it, off on CPU; or bf16, fp16, none


@dataclass
class TrainConfig:
    task: str = "classification"
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs"
    run_name: str | None = None
    log_every: int = 50
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch only
    keep_checkpoints: int = 2
    probe_size: int = 256  # test examples whose routing is tracked across checkpoints (stability)
    probe_every: int = 0  # steps; also log the probe's load (CV, max/mean, Gini) between checkpoints
    threads: int | None = None
    # Training batches over which BatchNorm statistics are recomputed before every checkpoint (precise BN,
    # ermoe.train.precise_bn); 0 keeps the running averages. Only for models with BatchNorm layers.
    bn_recalibration: int = 0
    # Distributed runs (torchrun, docs/distributed.md): the expert-parallel size (experts sharded over that many
    # ranks; the world size is torchrun's) and the timeout of every collective (a failed rank stops its peers).
    ep_size: int = 1
    dist_timeout_s: float = 600.0
    tensorboard: bool = True
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The task's own settings (its Options dataclass, e.g. brain age's loss); none for classification.
    task_options: dict[str, Any] = field(default_factory=dict)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if isinstance(value, dict) and any(dataclasses.is_dataclass(a) for a in arms):
            # A mapping for a dataclass (e.g. model.moe) is checked as that dataclass: its own error, not a plain dict.
            return _coerce(value, next(a for a in arms if dataclasses.is_dataclass(a)), key)
        for arm in arms:
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is ModelConfig:
        return _build_model(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")

    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_model(values: Any, key: str) -> ModelConfig:
    """The model section: ``name``, the loop's two keys, and the builder's arguments checked against its signature."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping of model settings, got {values!r}")
    values = dict(values)
    name = _coerce(values.pop("name", MAIN_MODEL), str, f"{key}.name")
    loop = {k: values.pop(k) for k in ("moe_init", "moe_init_batches") if k in values}
    raw = _merge(MAIN_MODEL_ARGS, values) if name == MAIN_MODEL else values
    try:
        accepted = model_parameters(name, raw)
    except ValueError as err:
        raise ConfigError(f"{key}.name: {err}") from None
    args = {}
    for arg, value in raw.items():
        if arg not in accepted:
            raise ConfigError(f"{key}.{arg} does not apply to model {name!r}; it takes: {', '.join(accepted)}")
        try:
            args[arg] = _coerce(value, accepted[arg], f"{key}.{arg}")
        except ValueError as err:  # a MoESpec's own validation
            raise ConfigError(err if isinstance(err, ConfigError) else f"{key}.{arg}: {err}") from None
    return _build(ModelConfig, {"name": name, "args": args, **loop}, key)


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own checks (__post_init__)
        raise ConfigError(err if not prefix or str(err).startswith(prefix) else f"{prefix}: {err}") from None


def _check_ranges(cfg: TrainConfig) -> None:
    def require(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {what}, got {value!r}")

    m, d, o = cfg.model, cfg.data, cfg.optim
    _check_device(cfg.device)
    for key, value in [("log_every", cfg.log_every), ("keep_checkpoints", cfg.keep_checkpoints),
                       ("probe_size", cfg.probe_size), ("optim.epochs", o.epochs), ("optim.batch_size", o.batch_size),
                       ("optim.eval_batch_size", o.eval_batch_size), ("model.moe_init_batches", m.moe_init_batches)]:
        require(value >= 1, key, "a positive integer", value)
    require(cfg.checkpoint_every >= 0, "checkpoint_every", ">= 0", cfg.checkpoint_every)
    require(cfg.probe_every >= 0, "probe_every", ">= 0", cfg.probe_every)
    require(cfg.bn_recalibration >= 0, "bn_recalibration", ">= 0", cfg.bn_recalibration)
    if m.moe_init == "pca" and not (m.moe is not None and router_has_data_init(m.moe.router)):
        router = "no MoE layers" if m.moe is None else f"router {m.moe.router!r}"
        raise ConfigError(f"model.moe_init: pca sets the bases of eigen routers (emoe, ermoe) from the data; model "
                          f"{m.name!r} with {router} has none")
    task = _check_data(cfg)
    for key in task.model_data_args:
        if key in m.args:
            raise ConfigError(f"model.{key} is set from the data by task {cfg.task!r}, not in the config")
    for key, value in [("data.train_limit", d.train_limit), ("data.test_limit", d.test_limit),
                       ("optim.max_steps", o.max_steps), ("data.img_size", d.img_size), ("threads", cfg.threads)]:
        require(value is None or value >= 1, key, "a positive integer or null", value)
    for key, value in [("optim.lr", o.lr), ("optim.weight_decay", o.weight_decay), ("optim.min_lr_ratio",
                       o.min_lr_ratio), ("optim.label_smoothing", o.label_smoothing)] + \
            [(f"optim.betas[{i}]", b) for i, b in enumerate(o.betas)] + [("optim.clip_grad", o.clip_grad or 1.0)]:
        require(math.isfinite(value), key, "a finite number", value)
    require(d.crop_padding >= 0, "data.crop_padding", ">= 0", d.crop_padding)
    require(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    require(0 < d.crop_pct <= 1, "data.crop_pct", "in (0, 1]", d.crop_pct)
    require(d.memory_cap_gb >= 0 and math.isfinite(d.memory_cap_gb), "data.memory_cap_gb", "a finite number >= 0",
            d.memory_cap_gb)
    if d.augment is not None and d.augment.mixes:
        require(o.batch_size % 2 == 0, "optim.batch_size", "even with data.augment's mixup / CutMix (pairs of rows)",
                o.batch_size)
        require(cfg.task == "classification", "data.augment's mixing", "used by image classification only",
                cfg.task)
    require(d.val_size >= 0 and d.test_size >= 0, "data.val_size and data.test_size", ">= 0",
            (d.val_size, d.test_size))
    require(o.lr > 0, "optim.lr", "> 0", o.lr)
    require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", o.min_lr_ratio)
    require(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two values in [0, 1)", o.betas)
    require(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)
    require(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", "> 0 or null", o.clip_grad)
    require(0 <= o.label_smoothing < 1, "optim.label_smoothing", "in [0, 1)", o.label_smoothing)
    require(o.amp in ("auto", "bf16", "fp16", "none"), "optim.amp", "auto, bf16, fp16 or none", o.amp)


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
    """The task reads the dataset, and every data key set away from its default applies to that dataset. Returns
    the task's class."""
    try:
        task = task_class(cfg.task)
    except ValueError as err:
        raise ConfigError(f"task: {err}") from None
    if task.Options is None:
        if cfg.task_options:
            raise ConfigError(f"task_options do not apply to task {cfg.task!r} (it takes none)")
    else:
        try:
            _build(task.Options, cfg.task_options, "task_options")
        except ValueError as err:  # the options' own checks (__post_init__)
            raise ConfigError(err if isinstance(err, ConfigError) else f"task_options: {err}") from None
    d = cfg.data
    if d.name not in task.datasets:
        raise ConfigError(f"data.name must be one of {list(task.datasets)} for task {cfg.task!r}, got {d.name!r}")
    applicable = task.data_keys.get(d.name, ())
    defaults = dataclasses.asdict(DataConfig())
    for key, value in dataclasses.asdict(d).items():
        if key != "name" and key not in applicable and value != defaults[key]:
            raise ConfigError(f"data.{key} does not apply to dataset {d.name!r} (it reads: {', '.join(applicable)})")
    if d.mirror is not None and not d.download:
        raise ConfigError("data.mirror applies only with data.download: true")
    if d.stem_cache:
        if not cfg.model.args.get("stem"):
            raise ConfigError(f"data.stem_cache caches a frozen stem's features: model {cfg.model.name!r} has none "
                              "(set model.stem)")
        if d.crop_padding or d.hflip:
            raise ConfigError("data.stem_cache precomputes the features of unaugmented images: data.crop_padding "
                              "and data.hflip do not apply with it")
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
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
        _set_dotted(tree, key, value)
        i += 1
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    cfg = _build(TrainConfig, values or {})
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
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        values = _merge(_switch_dataset(values, extra), extra)
    return config_from_dict(values)


def _switch_dataset(values: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """An override of ``data.name`` to another dataset than the file's starts the data section from that dataset's
    defaults: the file's data keys it does not read are dropped, with one printed line naming them (a key given on
    the command line that does not apply stays an error)."""
    file_data, new = values.get("data"), (extra.get("data") or {}).get("name") if isinstance(extra.get("data"),
                                                                                              dict) else None
    if not isinstance(file_data, dict) or new is None or new == file_data.get("name", DataConfig.name):
        return values
    try:
        applicable = task_class(extra.get("task", values.get("task", TrainConfig.task))).data_keys.get(new)
    except ValueError:
        return values  # an unknown task: its own error follows
    if applicable is None:
        return values  # a dataset the task does not read: its own error follows
    dropped = [k for k in file_data if k != "name" and k not in applicable]
    if dropped:
        print(f"data.name={new}: the config file's data keys {', '.join(dropped)} do not apply to it and were "
              "dropped", file=sys.stderr)
    return {**values, "data": {k: v for k, v in file_data.items() if k not in dropped}}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data, the model section flat as in YAML (what ``config_from_dict`` reads back)."""
    out = dataclasses.asdict(cfg)
    model = out["model"]
    out["model"] = {"name": model["name"], **model["args"], "moe_init": model["moe_init"],
                    "moe_init_batches": model["moe_init_batches"]}
    return out


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
