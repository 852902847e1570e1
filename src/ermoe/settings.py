"""Settings checked against their type annotations, strictly: one rule set for config sections, model builder
arguments and router keywords.

pydantic v2 validates in strict JSON mode: a value read from YAML or the command line is serialised to JSON and
validated against its annotation with ``strict=True``, which is exactly the rule set of ermoe's configs:

- no coercion of strings: ``'5'`` is not an int, ``'false'`` not a bool (YAML's ``3e-4`` is read as the number it
  is by :func:`yaml_load`, as YAML 1.2 says);
- a bool is not a number, a float is not an int, an int is a float;
- unions (``str | list[int]``), literals and ``X | None`` as written;
- a dataclass takes a mapping of its fields (strict Python mode would demand an instance), runs its
  ``__post_init__`` checks, and refuses a key it has no field for (ermoe's settings dataclasses declare
  ``__pydantic_config__ = FORBID_EXTRA``).

Why not tyro (torchtitan's choice): it builds a command-line parser from dataclasses, while ermoe's model section is
chosen by ``model.name`` at load time (the builder's signature is its schema) and its configs are YAML files with
overrides merged in; pydantic checks that mix without owning the parser. Why not OmegaConf (tried, 2.4.0): it turns
``'yes'``/``'false'`` into bools and ``'5'`` into ints, and rejects ``str | list[int]``.

An error is one line: ``optim.batch_size: expected int, got str 'big'``; a dataclass's own check keeps its message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError

FORBID_EXTRA = ConfigDict(extra="forbid")

# Field constraints, checked where a value is read (``optim.lr must be > 0, got -1``)
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


def finite(**bounds: float) -> Any:
    """A finite float within ``bounds`` (pydantic's ``gt``, ``ge``, ``lt``, ``le``)."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds)]


Fraction = finite(ge=0, le=1)
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}

_EXPECTED = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "float",
             "float_parsing": "float", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
             "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping",
             "none_required": "null"}


_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}  # pydantic's names of union members in a location


@functools.lru_cache(maxsize=None)
def _adapter(annotation: Any) -> TypeAdapter | None:
    """pydantic's validator for ``annotation``; None for a type it cannot check (a tensor, a module class)."""
    try:
        return TypeAdapter(annotation)
    except PydanticSchemaGenerationError:
        return None


def type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _described(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"a {type(obj).__name__} ({obj!r}) is not a setting (numbers, strings, lists, mappings)")

    return json.dumps(value, default=default)


def check(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as ``annotation`` requires it, strictly (a dataclass is built from a mapping of its fields);
    ``ValueError`` naming ``key`` and what was expected otherwise. A type pydantic cannot check passes as it is."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if isinstance(value, dict) and any(dataclasses.is_dataclass(a) for a in arms):
        # a mapping for a union with a dataclass member (MoESpec | dict | None) is that dataclass: its checks, its
        # unknown keys refused (the dict member would take anything)
        annotation = next(a for a in arms if dataclasses.is_dataclass(a))
    adapter = None if annotation is Any else _adapter(annotation)
    if adapter is None:
        return value
    try:
        text = _json(value)
    except TypeError as err:
        raise ValueError(f"{key}: {err}") from None
    try:
        return adapter.validate_json(text, strict=True)
    except ValidationError as err:
        raise ValueError(_message(err, value, annotation, key)) from None


def _fields(loc: tuple) -> list[str | int]:
    """An error location's field names and list indices, without pydantic's union-member tags (``str``,
    ``list[int]``, a dataclass's name)."""
    return [p for p in loc if isinstance(p, int) or (re.fullmatch(r"[a-z_][a-z0-9_]*", str(p)) and p not in _TAGS)]


def _path(key: str, parts: list[str | int]) -> str:
    out = key
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _walk(value: Any, annotation: Any, parts: list[str | int]) -> tuple[Any, Any]:
    """The value and the annotation at ``parts`` inside ``value`` / ``annotation`` (Any where unknown)."""
    for part in parts:
        arms = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)] or [annotation]
        hints = typing.get_type_hints(arms[0]) if dataclasses.is_dataclass(arms[0]) else {}
        annotation = hints.get(part, Any) if isinstance(part, str) else (typing.get_args(annotation) or (Any,))[0]
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None, Any
    return value, annotation


def _message(err: ValidationError, value: Any, annotation: Any, key: str) -> str:
    errors = err.errors(include_url=False)
    own = [e for e in errors if e["type"] == "value_error"]
    if own:  # a dataclass's own check (__post_init__): its message, prefixed by where unless it names it
        text = str(own[0]["ctx"]["error"]) if "ctx" in own[0] else own[0]["msg"]
        where = _path(key, _fields(own[0]["loc"]))
        return text if not where or text.startswith(where) else f"{where}: {text}"
    extra = [e for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    if extra:
        return f"unknown config key {_path(key, _fields(extra[0]['loc']))!r}"
    if len(errors) != 1:  # a union none of whose members took the value: name the union where it stands
        paths = [_fields(e["loc"]) for e in errors]
        common = paths[0][:min(len(p) for p in paths)]
        while common and not all(p[:len(common)] == common for p in paths):
            common = common[:-1]
        here, tp = _walk(value, annotation, common)
        return f"{_path(key, common)}: expected {type_name(tp)}, got {_described(here)}"
    e = errors[0]
    where = _path(key, _fields(e["loc"]))
    if e["type"] in _BOUNDS:
        name, sign = _BOUNDS[e["type"]]
        return f"{where} must be {sign} {e['ctx'][name]:g}, got {e['input']!r}"
    if e["type"] == "finite_number":
        return f"{where} must be a finite number, got {e['input']!r}"
    if e["type"] in ("too_short", "too_long"):
        return f"{where} must hold {e['ctx'].get('min_length') or e['ctx'].get('max_length')} values, got {e['input']!r}"
    if e["type"] == "literal_error":
        _, tp = _walk(value, annotation, _fields(e["loc"]))
        arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        choices = [c for arm in arms if typing.get_origin(arm) is typing.Literal for c in typing.get_args(arm)]
        return f"{where}: expected one of {choices or e['ctx']['expected']}, got {e['input']!r}"
    _, tp = _walk(value, annotation, _fields(e["loc"]))
    expected = type_name(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else \
        _EXPECTED.get(e["type"], e["msg"])
    return f"{where}: expected {expected}, got {_described(e['input'])}"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) with YAML 1.2's floats: ``3e-4`` and ``1e5`` are numbers, not strings, and
    YAML's rule that a mapping's keys are unique: a key given twice is an error naming both lines (PyYAML would keep
    the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ("<<: *base" brings keys that ours may override)
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class names it
                    break
                if first is not None:  # (one line, no marks: a config error's message is read in one go)
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found the key {key!r} twice (lines {first.line + 1} and "
                                    f"{key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """YAML text as Python values (safe: plain data only)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
