"""The EMoE authors' released checkpoints (``anzheCheng/EMoE`` on the Hub: ImageNet-1k ViT-B/16, ViT-L/16, ViT-H/14)
as ermoe models. Their layout, read from their public code (which ships no licence: only names and the formula are
used here, no code):

- ``vit.*``: a timm ViT (frozen in their training);
- after each of the last N blocks an adapter branch ``branches.{i}``: ``router.basis.Q`` (D x r), ``router.gamma``
  (r), ``router.masks`` (E x r), ``router.bias`` (E), ``experts.{e}.down.weight`` (H x D) and ``.up.weight``
  (D x H) with GELU between and no biases, ``alpha`` (scalar); ``router.basis.P`` and ``.log_lambda`` are not read
  by the routing and are left out (named in the report).

Routing of the patch tokens (the class token passes unchanged), EMoE eqs. (1)-(2):
z = Q^T h, e = z^2 / (sum z^2 + 1e-6), logits_k = sum_r e_r gamma_r softmax_k(masks)_kr + bias_k,
p = softmax(logits / tau); ``soft`` mode: h + alpha sum_k p_k expert_k(h); ``top1`` / ``top2``: the chosen experts
weighted by their probabilities, not renormalised.

That is ermoe's ``emoe`` router (``pi`` = masks transposed, softmax over experts; gate ``prob``; eps 1e-6) in the
``post-block`` placement of a timm ViT with bias-free MLP experts of width H and a learned alpha: nothing new is
needed, only the key map (:func:`release_key_map`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MODES = {"soft": None, "top1": 1, "top2": 2}  # top_k (None: every expert)
_BRANCH = re.compile(r"branches\.(\d+)\.")
UNUSED = ("router.basis.P", "router.basis.log_lambda")


class ReleaseError(ValueError):
    """A checkpoint that is not the EMoE authors' layout, or not of the ViT asked for."""


def read_release(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a release: a ``.safetensors`` file, a folder holding ``model.safetensors`` (the Hub
    layout their ``PyTorchModelHubMixin`` writes), or a PyTorch state dict file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ReleaseError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def release_shape(state: dict[str, Tensor]) -> dict[str, int]:
    """Branches, experts, basis rank, model width and expert width of a release, from its tensors' shapes."""
    branches = sorted({int(m.group(1)) for k in state if (m := _BRANCH.match(k))})
    if not branches or not any(k.startswith("vit.") for k in state):
        raise ReleaseError("not an EMoE release: it needs vit.* and branches.{i}.* keys")
    if branches != list(range(len(branches))):
        raise ReleaseError(f"branches must be numbered 0..N-1, got {branches}")
    try:
        q, masks, down = (state[f"branches.0.{k}"] for k in ("router.basis.Q", "router.masks", "experts.0.down.weight"))
    except KeyError as err:
        raise ReleaseError(f"not an EMoE release: {err.args[0]} is missing") from None
    return {"branches": len(branches), "experts": masks.shape[0], "rank": q.shape[1], "dim": q.shape[0],
            "hidden": down.shape[0], "classes": state["vit.head.weight"].shape[0]}


def release_key_map(state: dict[str, Tensor], depth: int) -> tuple[dict[str, Tensor], list[str]]:
    """The release's tensors under the names of the ermoe model of :func:`load_emoe_release` (``depth`` blocks,
    a ``post-block`` branch after each of the last N), and the keys left out (not read by the routing)."""
    shape = release_shape(state)
    first = depth - shape["branches"]
    out, unused = {}, []
    for key, value in state.items():
        if key.startswith("vit."):
            name = key[4:]
            m = re.match(r"blocks\.(\d+)\.(.*)", name)
            if m and int(m.group(1)) >= first:
                name = f"blocks.{m.group(1)}.block.{m.group(2)}"
            out[name] = value
    for i in range(shape["branches"]):
        src, dst = f"branches.{i}.", f"blocks.{first + i}.branch.moe."
        out[dst + "router.basis.weight"] = state[src + "router.basis.Q"]
        out[dst + "router.gamma"] = state[src + "router.gamma"]
        out[dst + "router.pi"] = state[src + "router.masks"].t().contiguous()
        out[dst + "router.bias"] = state[src + "router.bias"]
        out[dst + "alpha"] = state[src + "alpha"].reshape(())
        for mine, theirs in (("w1", "down"), ("w2", "up")):
            out[dst + f"experts.{mine}"] = torch.stack([state[src + f"experts.{e}.{theirs}.weight"]
                                                         for e in range(shape["experts"])])
        unused += [src + k for k in UNUSED if src + k in state]
    known = {f"branches.{i}.{k}" for i in range(shape["branches"])
             for k in ("router.basis.Q", "router.gamma", "router.masks", "router.bias", "alpha", *UNUSED)}
    known |= {f"branches.{i}.experts.{e}.{p}.weight" for i in range(shape["branches"])
              for e in range(shape["experts"]) for p in ("down", "up")}
    extra = sorted(k for k in state if k.startswith("branches.") and k not in known)
    if extra:
        raise ReleaseError(f"keys an EMoE release does not have: {extra[:5]}")
    return out, unused


def release_model_args(state: dict[str, Tensor], mode: str = "soft", tau: float = 1.0) -> dict[str, Any]:
    """``create_model`` arguments (besides the ViT's name) of the ermoe model equal to a release."""
    if mode not in MODES:
        raise ReleaseError(f"mode must be one of {list(MODES)}, got {mode!r}")
    shape = release_shape(state)
    return {"num_classes": shape["classes"], "pretrained": False, "global_pool": "token",  # timm's, as theirs
            "moe": {"router": "emoe", "num_experts": shape["experts"], "top_k": MODES[mode] or shape["experts"],
                    "placement": "post-block", "blocks": f"last:{shape['branches']}", "hidden_dim": shape["hidden"],
                    "learn_alpha": True,
                    "router_kwargs": {"rank": shape["rank"], "tau": tau, "pi_norm": "softmax", "gate": "prob",
                                      "eps": 1e-6}}}


def load_emoe_release(path: str | Path | dict[str, Tensor], vit: str = "vit_base_patch16_224", mode: str = "soft",
                      tau: float = 1.0, **vit_args: Any) -> nn.Module:
    """The ermoe model equal to an EMoE release (a path, or its state dict) on timm's ``vit`` (``vit_args``: more
    of its arguments, e.g. ``img_size``), every weight loaded; an error names a release of another width than
    ``vit`` or any key that does not fit.

    The branch after the last block changes patch tokens only, which a class-token head never reads: it is loaded
    as the release has it, and the warning ermoe gives for such a layer is not repeated here."""
    import warnings

    from .registry import create_model

    state = read_release(path) if not isinstance(path, dict) else path
    shape = release_shape(state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the MoE layer in the last block routes patch tokens only")
        model = create_model(vit, **release_model_args(state, mode, tau), **vit_args)
    if model.embed_dim != shape["dim"]:
        raise ReleaseError(f"the release is {shape['dim']} wide (its basis Q is {shape['dim']} x {shape['rank']}); "
                           f"{vit} is {model.embed_dim} wide: give the ViT it was trained on")
    mapped, _ = release_key_map(state, len(model.blocks))
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ReleaseError(f"the release does not fit {vit} with {shape['branches']} branches: missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.eval()
