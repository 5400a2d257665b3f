"""A small explicit registry filled by decorators (``@register_model``, ``@register_attack``).

Registries are objects, not module globals hidden in functions, so tests can isolate them
with :meth:`Registry.isolated` and contract tests can be generated from their contents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Maps names to entries. Unknown names raise ``KeyError`` listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Register ``entry`` under ``name`` and return it; ``ValueError`` for an empty name or a
        name already taken (unless ``replace``).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str, **kwargs) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            self.add(name, obj, **kwargs)
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry of ``name``; ``KeyError`` listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    @contextmanager
    def isolated(self) -> Iterator[Registry[T]]:
        """Within the block, additions and removals are undone afterwards (for tests)."""
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries = saved

    def remove(self, name: str) -> None:
        """Forget ``name`` (no error when it is not registered)."""
        self._entries.pop(name, None)
