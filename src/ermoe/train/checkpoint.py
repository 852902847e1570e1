"""Checkpoints: model weights in safetensors plus optimizer, scheduler, RNG and step state, written atomically.

Layout: ``RUN/checkpoints/step_00001234/{model.safetensors, state.pt, manifest.json}`` and ``RUN/checkpoints/latest``
(a one-line text file naming the newest complete checkpoint). A checkpoint is written into a hidden temporary
directory, fsynced and renamed into place; ``latest`` is replaced only afterwards, so a crash at any point leaves the
previous checkpoint intact and ``latest`` pointing to it. The manifest holds each file's SHA-256, so truncation or
corruption is reported as such on load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_write_text

WEIGHTS, STATE, MANIFEST, LATEST = "model.safetensors", "state.pt", "manifest.json", "latest"
# state.pt's layout: 1 (up to commit d7f2353) a flat dict the trainer wrote key by key; 2 the trainer's parts by
# name, {"format_version": 2, "step": N, "components": {name: part.state_dict()}} (ermoe.train.components)
STATE_FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_tensors(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict (of a model, or given) as contiguous CPU tensors (safetensors refuses shared or
    non-contiguous storage)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module | dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``ckpt_dir``, point ``latest`` at it, prune all but the newest ``keep``.
    ``model``: the model, or its (whole, gathered) state dict."""
    from safetensors.torch import save_file

    tmp = begin_checkpoint(ckpt_dir, step)
    try:
        save_file(model_tensors(model), str(tmp / WEIGHTS))
        try:
            torch.save(state, tmp / STATE)
        except RuntimeError as err:  # (torch.save's writer reports a failed write so: "... file write failed")
            raise failed_write(tmp / STATE, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(ckpt_dir, step, tmp, keep)


def failed_write(path: Path, err: Exception) -> OSError:
    """A writer's error (torch.save's RuntimeError) as the OSError it is: ``path``, and the disk full when it has
    less than a megabyte left."""
    try:
        full = shutil.disk_usage(Path(path).parent).free < 2 ** 20
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code) if full else f"the write failed ({err})", str(path))


def begin_checkpoint(ckpt_dir: Path, step: int) -> Path:
    """A new hidden temporary directory under ``ckpt_dir`` to write checkpoint ``step``'s files into (then
    :func:`commit_checkpoint` it)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".step_{step:08d}."))


def commit_checkpoint(ckpt_dir: Path, step: int, tmp: Path, keep: int, **manifest: Any) -> Path:
    """Checkpoint ``step`` from the files written into ``tmp``: a manifest of every file's SHA-256 (``manifest``:
    more entries for it), every file fsynced, ``tmp`` renamed into place, ``latest`` pointed at it, all but the
    newest ``keep`` pruned. ``tmp`` is gone afterwards, whether or not this succeeded."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    try:
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        (tmp / MANIFEST).write_text(json.dumps({"step": step, **manifest,
                                                "files": {f: _sha256(tmp / f) for f in files}}, indent=1))
        for f in [*files, MANIFEST]:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        for d in {(tmp / f).parent for f in files}:
            _fsync_dir(d)
        if final.exists():  # a re-save of the same step (e.g. after resume): move the old one aside first
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(ckpt_dir / LATEST, final.name + "\n")
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).exists())


def step_of(ckpt: Path) -> int:
    """The step a checkpoint directory ``step_NNNNNNNN`` holds."""
    try:
        return int(Path(ckpt).name[len("step_"):])
    except ValueError:
        raise CheckpointError(f"{ckpt} is not a checkpoint directory (step_NNNNNNNN)") from None


def clean_temporaries(ckpt_dir: Path) -> list[Path]:
    """Remove what interrupted writes left behind (``.step_*`` directories, ``.latest.*.tmp`` files); call it only
    while holding the run's lock. Returns what was removed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for p in ckpt_dir.iterdir():
        if p.name.startswith(".step_") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.name.startswith(f".{LATEST}.") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def resolve_checkpoint(path: Path) -> Path:
    """A run directory, a ``checkpoints`` directory or a checkpoint directory -> the checkpoint directory to load:
    the one ``latest`` names (read once). Use :func:`find_checkpoint` for the fallback to an older intact one."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / WEIGHTS).exists():
        return path
    for ckpt_dir in (path / "checkpoints", path):
        latest = ckpt_dir / LATEST
        if latest.exists():
            target = ckpt_dir / latest.read_text().strip()
            if not target.is_dir():
                raise CheckpointError(f"{latest} names {target.name}, which does not exist")
            return target
    raise CheckpointError(f"no checkpoint found in {path} (expected checkpoints/latest or a checkpoint directory)")


def find_checkpoint(run_dir: Path, from_step: int | None = None, map_location: str | torch.device = "cpu",
                    consolidate: bool = True) -> tuple[Path, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The checkpoint to resume a run from, verified and read once: ``(path, weights, state)`` (``consolidate``:
    :func:`read_checkpoint`'s).

    ``from_step``: that step's checkpoint, or an error listing the steps kept. Otherwise the one ``latest`` names;
    when ``latest`` is missing, names a missing directory, or its checkpoint is corrupt, the newest intact
    checkpoint, with a warning naming it and why.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    kept = list_checkpoints(ckpt_dir)
    if from_step is not None:
        wanted = ckpt_dir / f"step_{from_step:08d}"
        if wanted not in kept:
            steps = ", ".join(str(step_of(p)) for p in kept) or "none"
            raise CheckpointError(f"no checkpoint of step {from_step} in {ckpt_dir} (kept steps: {steps})")
        return (wanted, *read_checkpoint(wanted, map_location, consolidate))
    latest = ckpt_dir / LATEST
    named = ckpt_dir / latest.read_text().strip() if latest.exists() else None
    candidates = ([named] if named is not None else []) + [p for p in reversed(kept) if p != named]
    problems = [] if named is not None else [f"{latest} is missing"]
    for ckpt in candidates:
        try:
            weights, state = read_checkpoint(ckpt, map_location, consolidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            warnings.warn(f"resuming from {ckpt} (step {step_of(ckpt)}), the newest intact checkpoint: "
                          + "; ".join(problems), stacklevel=2)
        return ckpt, weights, state
    raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + ("; ".join(problems) or "none was written"))


def read_checkpoint(ckpt: Path, map_location: str | torch.device = "cpu", consolidate: bool = True
                    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Verify a checkpoint directory against its manifest and read it: ``(weights, state)``. A sharded checkpoint
    (:mod:`ermoe.train.shards`) is read whole into this process (as a single-file one would be) unless not
    ``consolidate``: then ``weights`` is None and ``state["shards"]`` its directory, for the trainer to load each
    rank's part (its parts' sharded tensors stay :data:`~ermoe.train.shards.IN_SHARDS`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    manifest_path = ckpt / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST} (incomplete write?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from None
    for fname, digest in files.items():
        fpath = ckpt / fname
        if not fpath.exists():
            raise CheckpointError(f"checkpoint file {fpath} is missing")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"checkpoint file {fpath} is corrupt or truncated (SHA-256 does not match the "
                                  "manifest)")
    try:
        state = upgrade_state(torch.load(ckpt / STATE, map_location=map_location, weights_only=True), ckpt / STATE)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise CheckpointError(f"cannot read {ckpt / STATE}: {err}") from None
    if manifest.get("format") == "sharded":
        if not consolidate:
            return None, {**state, "shards": str(ckpt)}
        return read_consolidated(ckpt, state)
    try:
        weights = load_file(str(ckpt / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {ckpt / WEIGHTS}: {err}") from None
    return weights, state


def trainer_state(step: int, parts: dict[str, Any]) -> dict[str, Any]:
    """What state.pt holds: the trainer's parts by name (format :data:`STATE_FORMAT`)."""
    return {"format_version": STATE_FORMAT, "step": step, "components": parts}


def upgrade_state(state: dict[str, Any], source: Path | str = STATE) -> dict[str, Any]:
    """A checkpoint's state in the current format: format 1 (no ``format_version``: the keys the trainer wrote
    one by one until the trainer was split into parts) converted; a format newer than this ermoe knows refused,
    naming it."""
    version = state.get("format_version", 1)
    if version == STATE_FORMAT:
        return state
    if version != 1:
        raise CheckpointError(f"{source} is checkpoint format {version}; this ermoe reads formats 1 to "
                              f"{STATE_FORMAT}: it was written by a newer ermoe (upgrade: pip install -U ermoe)")
    step = state["step"]
    parts: dict[str, Any] = {
        "position": {"step": step}, "logger": {"step": step}, "guard": {},
        "clock": {"train_time_s": state.get("train_time_s", 0.0), "segments": state.get("segments", [])},
        # (older checkpoints kept each token's argmax expert under "probe_top1": not comparable, not read)
        "routing": {"assignment": state.get("probe_assignment"), "changed": state.get("probe_changed", {})},
        "straggler": {"sums": state.get("straggler", {}), "steps": state.get("straggler_steps", 0)}}
    if "optimizer" in state:
        parts["optimization"] = {"optimizer": state["optimizer"], "scaler": state["scaler"], "schedule_step": step}
    if "rng" in state:
        parts["rng"] = state["rng"]
    if "ema" in state:
        parts["ema"] = {"weights": state["ema"]}
    return trainer_state(step, parts)


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load checkpoint weights into ``model`` (strict), or raise naming the mismatching keys or shapes; nothing is
    loaded then."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    resized = [(k, tuple(weights[k].shape), tuple(t.shape)) for k, t in own.items() if weights[k].shape != t.shape]
    if resized:
        shown = "; ".join(f"{k} is {there} there, {here} here" for k, there, here in resized[:3])
        raise CheckpointError(f"checkpoint {source} does not fit the model built now: {shown}. A size the model "
                              "takes from the data (its classes, its input size) differs from when the checkpoint "
                              "was written: did the data change (a class folder added or removed)?")
    model.load_state_dict(weights)


def load_checkpoint(path: Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read a checkpoint (a run's latest, or a checkpoint directory); with ``model``, load the weights
    into it (strict). Returns (weights, state)."""
    ckpt = resolve_checkpoint(path)
    weights, state = read_checkpoint(ckpt, map_location)
    if model is not None:
        load_weights(model, weights, ckpt)
    return weights, state


# sharded checkpoints (ermoe.train.shards writes them): reading ---------------------------------------------------
SHARDS = "shards"
IN_SHARDS = "in shards"  # state.pt's stand-in for a part's tensors kept in shards/
MODEL, OPTIMIZER, EMA = "model/", "optimizer/", "ema/"


def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint directory is a sharded one."""
    return (Path(ckpt) / SHARDS).is_dir()


@contextlib.contextmanager
def dcp_call(no_dist: bool):
    """Around a DCP save or load: in one process (``no_dist``), without its warning that it assumes one process
    (what was asked)."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", "torch.distributed is .*unavailable or uninitialized")
        yield


def sharded_metadata(ckpt: Path) -> dict[str, Any]:
    """A sharded checkpoint's tensors: ``{key: TensorStorageMetadata}`` (the whole tensor's size and dtype)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = FileSystemReader(str(Path(ckpt) / SHARDS)).read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 - a missing or unreadable .metadata is a broken checkpoint
        raise CheckpointError(f"cannot read the sharded checkpoint {ckpt / SHARDS}: {err}") from None
    return {k: m for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}


def load_dcp(ckpt: Path, tensors: dict[str, torch.Tensor], no_dist: bool) -> None:
    """Fill ``tensors`` (whole or this rank's shards) from a sharded checkpoint, in place (a collective unless
    ``no_dist``)."""
    import torch.distributed.checkpoint as dcp

    try:
        with dcp_call(no_dist):
            dcp.load(tensors, checkpoint_id=Path(ckpt) / SHARDS, no_dist=no_dist)
    except Exception as err:  # noqa: BLE001 - DCP wraps every rank's failure in its own exception
        raise CheckpointError(f"cannot read the sharded checkpoint {ckpt / SHARDS}: {err}") from None


def read_consolidated(ckpt: Path, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A sharded checkpoint as one process holding the whole model reads a single-file one: ``(weights, state)``,
    the optimizer's moments by parameter index and the EMA weights put back into ``state`` (in this process alone,
    whatever job it is in)."""
    meta = sharded_metadata(ckpt)
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    load_dcp(ckpt, tensors, no_dist=True)
    weights = {k[len(MODEL):]: t for k, t in tensors.items() if k.startswith(MODEL)}
    parts = state["components"]
    optimizer = parts.get("optimization", {}).get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("state") == IN_SHARDS:
        index = {name: i for i, name in enumerate(optimizer["param_names"])}
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith(OPTIMIZER):
                name, what = key[len(OPTIMIZER):].rsplit("/", 1)
                per_param.setdefault(index[name], {})[what] = t
        parts["optimization"]["optimizer"] = {"state": dict(sorted(per_param.items())),
                                              "param_groups": optimizer["param_groups"]}
    if parts.get("ema", {}).get("weights") == IN_SHARDS:
        parts["ema"]["weights"] = {k[len(EMA):]: t for k, t in tensors.items() if k.startswith(EMA)}
    return weights, state
