"""Models by name: ``create_model(name, **kwargs)`` and ``list_models()``, backed by registered builders.

A family registers one builder per name with :func:`register_model` (timm's ``@register_model`` pattern). The
builder's keyword-only signature is the model's whole interface: its annotations type-check a run's config
(:func:`model_parameters`), and a keyword it does not take is an error that names it, never silently dropped.

Any timm ``VisionTransformer`` name (``vit_base_patch16_224``, with an optional ``.tag``) resolves to the
``timm_vit`` builder with the name as its first argument. The families (``vit.py``, ``single_gate.py``,
``deepmoe.py``) register when ``ermoe.models`` is imported.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..registry import Registry
from ..settings import check


@dataclass(frozen=True)
class ModelEntry:
    """A registered model. ``extends(args)``: for a builder that forwards ``**kwargs`` to another model, the name
    of that model given the arguments (its parameters are accepted too, less ``excludes``)."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    description: str
    extends: Callable[[dict[str, Any]], str] | None = None
    excludes: tuple[str, ...] = ()


_MODELS: Registry[ModelEntry] = Registry("model")
TIMM_VIT = "timm_vit"


def register_model(name: str, *, family: str, description: str,
                   extends: Callable[[dict[str, Any]], str] | None = None, excludes: tuple[str, ...] = ()) -> Callable:
    """Decorator: register ``builder`` under ``name``."""
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS.register(ModelEntry(name, builder, family, description, extends, excludes))
        return builder
    return wrap


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (of one family if given). Any timm ``VisionTransformer`` name is accepted as well."""
    return [n for n, e in _MODELS.items() if n != TIMM_VIT and (family is None or e.family == family)]


def model_families() -> dict[str, list[str]]:
    """family -> its registered names."""
    out: dict[str, list[str]] = {}
    for name, entry in _MODELS.items():
        out.setdefault(entry.family, []).append(name)
    return out


def is_timm_vit(name: str) -> bool:
    """Whether timm knows ``name`` (tag allowed) as a model of its vision_transformer module."""
    try:
        from timm.models import is_model_in_modules
    except ImportError:  # pragma: no cover
        return False
    return is_model_in_modules(name.split(".")[0], ["vision_transformer"])


def resolve(name: str) -> tuple[ModelEntry, tuple[Any, ...]]:
    """The registry entry for ``name`` and the positional arguments its builder takes (a timm name for timm ViTs)."""
    if name in _MODELS and name != TIMM_VIT:
        return _MODELS[name], ()
    if is_timm_vit(name):
        return _MODELS[TIMM_VIT], (name,)
    raise ValueError(f"unknown model {name!r}; choose one of {list_models()} or a timm VisionTransformer name "
                     "(e.g. vit_base_patch16_224)")


def model_parameters(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments model ``name`` takes, with their type annotations (resolved), those a task supplies
    from its data included. ``args``: the arguments given, for builders whose accepted keywords depend on them."""
    entry, positional = resolve(name)
    params = _keyword_params(entry.builder, skip=len(positional))
    if entry.extends is not None:
        inherited = model_parameters(entry.extends(args or {}))
        params = {**{k: v for k, v in inherited.items() if k not in entry.excludes}, **params}
    return params


def _keyword_params(builder: Callable, skip: int) -> dict[str, Any]:
    hints = typing.get_type_hints(builder)
    sig = inspect.signature(builder)
    return {p.name: hints.get(p.name, Any) for i, p in enumerate(sig.parameters.values())
            if i >= skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_model_args(name: str, args: dict[str, Any], where: str = "create_model") -> None:
    """Raise ``ValueError`` naming every keyword model ``name`` does not take."""
    accepted = model_parameters(name, args)
    unknown = [k for k in args if k not in accepted]
    if unknown:
        entry, _ = resolve(name)
        hint = (" (a timm ViT's architecture is fixed by its name; only these apply)" if entry.name == TIMM_VIT
                else "")
        keys = ", ".join(repr(k) for k in unknown)
        raise ValueError(f"{where}: model {name!r} takes no argument {keys}{hint}; it takes: "
                         f"{', '.join(accepted)}")


def create_model(name: str = "vit_tiny", **kwargs: Any) -> nn.Module:
    """Build model ``name`` (one of :func:`list_models`, or a timm ViT name) with the builder's keyword arguments.

    Every model is an :class:`ermoe.models.RoutedModel`. A keyword the model does not take, or a value of the wrong
    type for its annotation (checked as a config value is, :mod:`ermoe.settings`), raises ``ValueError`` naming it. See each builder's docstring (``ermoe.models.registry.describe(name)``) for its arguments.
    """
    check_model_args(name, kwargs)
    accepted = model_parameters(name, kwargs)
    # every argument as strictly as a config value (ermoe.settings): '4' is no depth, a dict for a dataclass is
    # checked as that dataclass
    kwargs = {k: check(v, accepted[k], f"create_model({name!r}): {k}") for k, v in kwargs.items()}
    entry, positional = resolve(name)
    model = entry.builder(*positional, **kwargs)
    model.ermoe_build = {"name": name, "args": kwargs, "upcycle": None}  # how to rebuild it (ermoe.models.hub)
    return model


def describe(name: str) -> str:
    """A registered model's description and its builder's docstring."""
    entry, _ = resolve(name)
    return f"{entry.name} ({entry.family}): {entry.description}\n\n{inspect.getdoc(entry.builder) or ''}"
