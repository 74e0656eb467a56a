"""A small typed registry: plug-ins are chosen by name; unknown names list the known ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from slimlm.errors import SlimLMError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to plug-ins (classes or functions); a registered class learns its ``name``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = item
            if isinstance(item, type):
                item.name = name  # type: ignore[attr-defined]
            return item

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise SlimLMError(f"unknown {self.kind} '{name}'; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
