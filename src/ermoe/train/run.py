"""A run directory and what lives in it: the config with its history of changes, the log, the metrics, the lock.

    RUN/config.yaml       the config that is running now, and ``history``: the steps at which each segment started
                          and what an override on resume changed
    RUN/log.jsonl         one JSON record per line (train, eval, probe_load, stability, config_change)
    RUN/metrics.json      the evaluation (strict JSON: null where a value is undefined)
    RUN/checkpoints/      see :mod:`ermoe.train.checkpoint`
    RUN/.lock             the writer's pid and host while one is running (:mod:`ermoe.train.lock`)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..data.modules import dataset_keys
from ..settings import yaml_load
from .checkpoint import CheckpointError, atomic_write_text
from .config import ConfigError, TrainConfig, config_from_dict, config_to_dict, dump_config

CONFIG_FILE, METRICS_FILE, LOG_FILE = "config.yaml", "metrics.json", "log.jsonl"
# per-example results of a split (Run.write_examples): the test split's, the validation split's
EXAMPLES_FILES = {"test": "test_examples.npz", "val": "val_examples.npz"}

# What an override on resume may change, and the loop applies for real from the step it resumes at: the schedule
# and optimizer settings (the scheduler and the optimizer's groups are rebuilt from the config), the run's length,
# and how it logs, checkpoints and where it runs; and data.skip_corrupt, which leaves out only files that cannot be
# decoded, all of them in the run's data fingerprint (a run stopped by a corrupt file goes on without it). Anything
# else (the model, the data, the seed, the batch size...) would make the run a different run: refused.
RESUMABLE = {
    "optim.lr", "optim.weight_decay", "optim.epochs", "optim.max_steps", "optim.min_lr_ratio", "optim.warmup_steps",
    "optim.clip_grad", "optim.eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "probe_every",
    "progress", "tensorboard", "figures", "threads", "device", "ep_size", "dist_timeout_s", "distributed", "shard",
    "checkpoint_format", "data.num_workers", "data.skip_corrupt",
    "optim.fused", "optim.compile", "model.grad_checkpointing",
}
# Where a run lives, not what it is: a run directory moved or copied elsewhere (another disk, another machine, a
# study's records restored) is the same run. A resumed run takes them from where its directory is now.
LOCATION = ("out_dir", "run_name")
# What a run draws, not what it computes: a run that drew its figures or not is the same run to a study.
DRAWING = ("figures",)


# Configs written before each dataset had its own options held one flat data section with every dataset's keys;
# those a dataset does not read held these values (ermoe.train.config's DataConfig until issue 23).
_LEGACY_DATA_DEFAULTS = {
    "data_dir": None, "download": False, "mirror": None, "img_size": None, "train_limit": None, "test_limit": None,
    "val_size": 0, "split_seed": 0, "stem_cache": False, "csv": None, "spacing": 2.0, "cohort_size": 600,
    "cohort_seed": 0, "test_size": 0, "json": None, "image_root": None, "caption_set_size": 10000,
    "crop_padding": 0, "hflip": False, "num_workers": 0, "memory_cap_gb": 2.0, "augment": None, "crop_pct": 0.875,
    "skip_corrupt": False,
}


def _drop_legacy_data_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """An older run's config with the data keys its dataset does not read dropped where they hold the old flat
    section's defaults (any other value stays, and is an error naming it)."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree
    try:
        keys = set(dataset_keys(data.get("name", "fashion_mnist")))
    except ValueError:
        return tree
    kept = {k: v for k, v in data.items() if k == "name" or k in keys or k not in _LEGACY_DATA_DEFAULTS
            or v != _LEGACY_DATA_DEFAULTS[k]}
    return {**tree, "data": kept}


def flatten_config(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``: the config's sections are one level deep."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def config_changes(stored: TrainConfig, requested: TrainConfig) -> dict[str, dict[str, Any]]:
    """``{key: {"from": old, "to": new}}`` for every flattened setting ``requested`` changes, the :data:`LOCATION`
    keys aside: a run directory moved or copied is the same run."""
    old, new = flatten_config(config_to_dict(stored)), flatten_config(config_to_dict(requested))
    return {k: {"from": old.get(k), "to": new.get(k)} for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in LOCATION}


def resume_changes(stored: TrainConfig, requested: TrainConfig) -> dict[str, dict[str, Any]]:
    """:func:`config_changes`; a change to a key that cannot be applied on resume is a :class:`ConfigError` naming
    it."""
    changes = config_changes(stored, requested)
    refused = [k for k in changes if k not in RESUMABLE]
    if refused:
        detail = ", ".join(f"{k} ({changes[k]['from']!r} -> {changes[k]['to']!r})" for k in refused)
        raise ConfigError(f"cannot change on resume: {detail}. These would make it a different run: start a new "
                          f"one. On resume only these apply: {', '.join(sorted(RESUMABLE))}")
    return changes


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None, so ``json.dumps(..., allow_nan=False)`` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


@dataclasses.dataclass
class Run:
    """A run directory."""

    root: Path

    @classmethod
    def new(cls, cfg: TrainConfig) -> "Run":
        """A fresh directory under ``out_dir``, created atomically, never an existing one (``-2``, ``-3``, ...)."""
        out = Path(cfg.out_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out_dir {out} is a file, not a directory")
        moe = cfg.model.moe
        base = cfg.run_name or "-".join([cfg.data.name, cfg.model.name, *([moe.router] if moe else []),
                                         f"seed{cfg.seed}"])
        out.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            root = out / (base if n == 1 else f"{base}-{n}")
            try:
                root.mkdir()
                return cls(root)
            except FileExistsError:
                n += 1

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def _config_tree(self) -> dict[str, Any]:
        path = self.root / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{self.root} is not a run directory: {CONFIG_FILE} not found")
        try:
            tree = yaml_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping")
        return tree

    def read_config(self) -> TrainConfig:
        """The config the run is running with (its latest segment's)."""
        tree = self._config_tree()
        tree.pop("history", None)
        return config_from_dict(_drop_legacy_data_keys(tree))

    def history(self) -> list[dict[str, Any]]:
        """The segments of the run: the step each started at, when, and what an override changed."""
        path = self.root / CONFIG_FILE
        return self._config_tree().get("history", []) if path.exists() else []

    def write_config(self, cfg: TrainConfig, step: int, changes: dict[str, Any] | None = None) -> None:
        """Record the config a segment starting at ``step`` runs with, appending to the history."""
        entry = {"step": step, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if changes:
            entry["changes"] = changes
        history = self.history() + [entry]
        atomic_write_text(self.root / CONFIG_FILE,
                          dump_config(cfg) + yaml.safe_dump({"history": history}, sort_keys=False))

    def read_log(self) -> list[dict[str, Any]]:
        """The log's records. A torn last line (a crash mid-write) is dropped with a warning; a bad line elsewhere
        is an error naming the file and line."""
        path = self.root / LOG_FILE
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines):
                    warnings.warn(f"{path}: dropping its torn last line {number} (written when the run was "
                                  "interrupted)", stacklevel=2)
                    continue
                raise CheckpointError(f"{path}: line {number} is not JSON; the log is corrupt") from None
        return records

    def truncate_log(self, step: int) -> None:
        """Drop log records beyond ``step`` (written after the checkpoint we resume from): they will be redone."""
        if (self.root / LOG_FILE).exists():
            keep = [r for r in self.read_log() if r.get("step", 0) <= step]
            atomic_write_text(self.root / LOG_FILE, "".join(json.dumps(r) + "\n" for r in keep))

    def read_metrics(self) -> dict[str, Any] | None:
        path = self.root / METRICS_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_text(self.root / METRICS_FILE, json.dumps(strict_json(metrics), indent=1, allow_nan=False))

    def write_examples(self, arrays: dict[str, Any], split: str = "test") -> None:
        """The per-example results of ``split`` (one row per example; ``EXAMPLES_FILES``), written atomically and
        compressed (the per-example expert loads are small counts: 640 KB -> about 50 KB for 5,000 images x 2
        layers)."""
        import os
        import tempfile

        import numpy as np

        path = self.root / EXAMPLES_FILES[split]
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_examples(self, split: str = "test") -> dict[str, Any] | None:
        """The per-example results of ``split``, or None for a run evaluated before they were recorded."""
        import zipfile

        import numpy as np

        path = self.root / EXAMPLES_FILES[split]
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # empty: EOFError; a bad archive
            raise CheckpointError(f"{path} is corrupt ({err}): `ermoe eval {self.root}` writes it again") from None
