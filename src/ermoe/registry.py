"""What a config names (``model.name``, ``data.name``, ``task``, ``moe.router``, a study's ``kind``), found by that
name: one registry per kind, filled by a decorator (``@register_router`` on a class with a ``name``,
``@register_model(name, ...)`` on a builder), read like a mapping; the one registration mechanism of ermoe."""

from __future__ import annotations

from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T", bound=Any)


class Registry(Generic[T]):
    """Entries of one ``kind`` (e.g. ``"dataset"``: classes; ``"study kind"``: instances) registered under their
    ``name`` attribute."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._by_name: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Register ``cls`` under ``cls.name`` (as a class decorator, or called on an instance); a name taken twice is
        an error."""
        if cls.name in self._by_name:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        self._by_name[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return list(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._by_name.items())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def get(self, name: str) -> T:
        """The class registered as ``name``; an unknown name is an error listing the known ones."""
        if name not in self._by_name:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._by_name[name]
