"""Starting a model from weights on disk (``model.init_checkpoint``, ``model.upcycle_from``; docs/upcycling.md).

:func:`read_weights` reads a safetensors file, a PyTorch state dict (``.pt``/``.pth``/``.bin``; timm's training
checkpoints keep it under ``state_dict`` or ``model``, DDP prefixes ``module.``), or an ermoe run or checkpoint
directory (single-file or sharded); :func:`ermoe.models.weights.load_matching` loads what matches by name and shape and reports the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.weights import LoadReport, load_matching
from .checkpoint import WEIGHTS, CheckpointError, is_sharded, read_checkpoint, resolve_checkpoint

_NESTED = ("state_dict", "model", "module")


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict of tensors from a weights file or an ermoe run / checkpoint directory (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.is_dir():
        ckpt = resolve_checkpoint(path)
        if is_sharded(ckpt):
            return read_checkpoint(ckpt)[0]
        path = ckpt / WEIGHTS
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {path} as safetensors: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt or foreign file
        raise CheckpointError(f"cannot read {path} as a PyTorch state dict ({_first_line(err)}): the weights file "
                              "must be a .safetensors file, a torch.save'd state dict (.pt, .pth, .bin), or an ermoe "
                              "run or checkpoint directory") from None
    while isinstance(state, dict) and len(state) and not all(isinstance(v, Tensor) for v in state.values()):
        nested = next((state[k] for k in _NESTED if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (looked under {', '.join(_NESTED)})")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _first_line(err: Exception) -> str:
    """An error's first line, with what it is when that says nothing (pickle's bare opcode, "101")."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if len(text) < 12 else text


def init_from_checkpoint(model: nn.Module, spec: str | Path | dict[str, str]) -> list[LoadReport]:
    """``model.init_checkpoint``: one path for the whole model, or ``{submodule: path}`` (the dual encoder's
    ``image`` and ``text`` towers); returns a report per path."""
    targets = spec.items() if isinstance(spec, dict) else [("", spec)]
    reports = []
    for name, path in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"model.init_checkpoint: the model has no submodule {name!r}") from None
        label = f"init_checkpoint {path}" + (f" -> {name}" if name else "")
        reports.append(load_matching(module, read_weights(path), label))
    return reports
