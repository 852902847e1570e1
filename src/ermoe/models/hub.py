"""Models in the Hugging Face Hub's layout: a folder of ``model.safetensors``, ``config.json`` (what rebuilds the
model: its registered name and builder arguments, the upcycling that turned it into an MoE, ermoe's version) and a
``README.md`` model card. :func:`save_pretrained` writes one, :func:`from_pretrained` builds the model from a local
folder or a Hub repository id (downloaded by ``huggingface_hub``), :func:`push_to_hub` uploads a folder.

``create_model`` and ``upcycle`` record how a model was built (``model.ermoe_build``), so any model they made can be
saved; ``ermoe export RUN_DIR OUT_DIR`` writes a run's model with a card of its results (:mod:`ermoe.train.export`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_path, atomic_write_text
from ..version import __version__

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
HUB_FORMAT = "ermoe-hub/1"  # config.json's layout; another is refused naming it


class HubError(ValueError):
    """A Hub folder that cannot be built or loaded: what is wrong, named."""


def plain(value: Any) -> Any:
    """``value`` as JSON data: dataclasses as mappings, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def build_record(model: nn.Module) -> dict[str, Any]:
    """How ``model`` was built (``create_model``'s name and arguments, ``upcycle``'s settings): config.json's
    ``model`` and ``upcycle``."""
    record = getattr(model, "ermoe_build", None)
    if record is None:
        raise HubError(f"{type(model).__name__} was not built by ermoe.create_model: save_pretrained needs its "
                       "name and builder arguments (pass build={'name': ..., 'args': {...}})")
    return record


def save_pretrained(model: nn.Module, out_dir: str | Path, card: str | None = None,
                    build: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``out_dir`` in the Hub's layout (weights, config.json, a model card: ``card`` or a short
    one naming the model). ``build``: ``{"name", "args", "upcycle"}`` when the model did not come from
    ``create_model``. Files are written through temporary names: an interrupted save leaves no half-written file."""
    from safetensors.torch import save_file

    build = build if build is not None else build_record(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": HUB_FORMAT, "ermoe_version": __version__, "model": plain({"name": build["name"],
                                                                                  "args": build["args"]}),
              "upcycle": plain(build.get("upcycle"))}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"format": "pt"})
    atomic_write_text(out / CONFIG, json.dumps(config, indent=1) + "\n")
    atomic_write_text(out / CARD, card if card is not None else default_card(config))
    return out


def default_card(config: dict[str, Any]) -> str:
    model = config["model"]
    moe = model["args"].get("moe")
    router = f" with the {moe['router']} router ({moe.get('num_experts')} experts)" if isinstance(moe, dict) else ""
    return (f"---\nlibrary_name: ermoe\ntags: [mixture-of-experts, ermoe]\nlicense: # your licence\n---\n\n"
            f"# {model['name']}{router}\n\nAn ermoe model ({config['ermoe_version']}). Load it with\n\n```python\n"
            f"import ermoe\nmodel = ermoe.models.from_pretrained(\"PATH_OR_REPO\")\n```\n")


def from_pretrained(path_or_repo: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model of a Hub folder (local) or a Hub repository id (``owner/name``, downloaded by
    ``huggingface_hub`` into its cache; offline, only what the cache holds): built from config.json, every weight
    loaded (strict: a missing or extra key is an error naming it)."""
    folder = _local_folder(path_or_repo)
    config = read_config(folder)
    model = build_from_config(config, folder)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(folder / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise HubError(f"cannot read {folder / WEIGHTS}: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise HubError(f"{folder / WEIGHTS} does not fit model {config['model']['name']!r} built from {CONFIG}: "
                       f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def _local_folder(path_or_repo: str | Path) -> Path:
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise HubError(f"{path_or_repo} is not a Hub folder (a directory with {CONFIG} and {WEIGHTS}) nor a "
                       "repository id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise HubError(f"{path_or_repo}: reading from the Hub needs huggingface_hub (pip install ermoe[hub])") from None
    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=[CONFIG, WEIGHTS, CARD]))
    except LocalEntryNotFoundError as err:
        raise HubError(f"{path_or_repo}: not in the local Hub cache and the Hub cannot be reached (offline, or "
                       f"HF_HUB_OFFLINE set): {err}") from None
    except HfHubHTTPError as err:
        raise HubError(f"{path_or_repo}: the Hub refused it: {err}") from None


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise HubError(f"{folder} has no {CONFIG}: not an ermoe Hub folder")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise HubError(f"{path} is not valid JSON: {err}") from None
    fmt = config.get("format")
    if fmt != HUB_FORMAT:
        raise HubError(f"{path}: format {fmt!r}; this ermoe ({__version__}) reads {HUB_FORMAT!r} (written by "
                       f"ermoe {config.get('ermoe_version', 'unknown')})")
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(model.get("args"),
                                                                                                dict):
        raise HubError(f"{path}: 'model' must be {{'name': ..., 'args': {{...}}}}, got {model!r}")
    spec = config.get("upcycle")
    if spec is not None and not (isinstance(spec, dict) and {"router", "num_experts"} <= set(spec)):
        raise HubError(f"{path}: 'upcycle' must be null or upcycle's settings with 'router' and 'num_experts', got "
                       f"{spec!r}")
    return config


def build_from_config(config: dict[str, Any], where: Path | str = CONFIG) -> nn.Module:
    """The model config.json describes (weights not loaded): an unknown model or router, or an argument the
    builder does not take, is an error naming it."""
    from .registry import create_model
    from .upcycling import upcycle

    name, args = config["model"]["name"], dict(config["model"]["args"])
    if "pretrained" in args:
        args["pretrained"] = False  # every weight comes from the folder
    spec = config.get("upcycle")
    try:
        if spec is None:
            return create_model(name, **args)
        model = create_model(name, **{**args, "moe": None})
        spec = dict(spec)
        return upcycle(model, spec.pop("router"), spec.pop("num_experts"), **spec.pop("router_kwargs", {}), **spec)
    except (ValueError, TypeError) as err:
        raise HubError(f"{Path(where) / CONFIG if Path(where).is_dir() else where}: {err}") from None


def push_to_hub(folder: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload a Hub folder to ``repo_id`` (created if needed; private unless told otherwise) with
    ``huggingface_hub``; returns the repository's URL."""
    from huggingface_hub import HfApi

    read_config(Path(folder))
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=[CONFIG, WEIGHTS, CARD])
    return str(url)
