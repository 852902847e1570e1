"""Classes found by the name a config gives (``data.name``, ``task``): one registry per kind."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one ``kind`` (e.g. ``"dataset"``) registered under their ``name`` attribute."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._by_name: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: register ``cls`` under ``cls.name``; a name taken twice is an error."""
        if cls.name in self._by_name:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        self._by_name[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> T:
        """The class registered as ``name``; an unknown name is an error listing the known ones."""
        if name not in self._by_name:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._by_name[name]
