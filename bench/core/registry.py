"""A small explicit registry filled by decorators (``@register_model``, ``@register_attack``).

Every kind of name in unmask is one :class:`Registry`: attacks, ensemble presets, masking checks,
zoo entries, architectures, datasets, training recipes, attribution methods and explanation
metrics. Registries are objects, not module globals hidden in functions, so tests can isolate
them with :meth:`Registry.isolated`, contract tests are generated from their contents
(``tests/test_registries.py``), and the CLI's ``--help``, the suite validation and the docs list
names from them instead of from hand-kept lists.

Usage::

    PRESETS: Registry[Callable] = Registry("ensemble preset")

    @PRESETS.register("quick")
    def quick(threat): ...

    PRESETS.names()        # ['quick', ...]
    PRESETS.get("quick")   # the entry; an unknown name raises UnknownNameError naming the known
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(KeyError, ValueError):
    """An unknown name: a ``KeyError`` for lookups and a ``ValueError`` for bad user input, its
    message naming the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to entries.

    Args:
        kind: what the names name, in words (``"attack"``); used in every error message.
        order: optional sort key of an entry; :meth:`names` lists by it, then in registration
            order (the masking report's order by check family). Default: alphabetical.

    Names are listed by :meth:`names` (and iteration, :meth:`items`, :meth:`values`) in that
    order. An entry may have aliases (``"ig"`` for ``"integrated_gradients"``): :meth:`get` and
    :meth:`resolve` accept them, :meth:`names` lists only the canonical names.
    """

    def __init__(self, kind: str, *, order: Callable[[T], Any] | None = None) -> None:
        self.kind = kind
        self._order = order
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, entry: T, *, replace: bool = False, aliases: Iterable[str] = ()
            ) -> T:
        """Register ``entry`` under ``name`` (and ``aliases``); a taken name is a ValueError
        unless ``replace``."""
        aliases = tuple(aliases)
        for n in (name, *aliases):
            if not isinstance(n, str) or not n:
                raise ValueError(f"a {self.kind} name must be a non-empty string, got {n!r}")
        if not replace and (name in self._entries or name in self._aliases):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        for a in aliases:
            if a in self._entries or self._aliases.get(a, name) != name:
                raise ValueError(f"{self.kind} alias {a!r} is already taken")
        self._entries[name] = entry
        self._aliases.update((a, name) for a in aliases)
        return entry

    def register(self, name: str, **kwargs) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            self.add(name, obj, **kwargs)
            return obj

        return deco

    def resolve(self, name: str) -> str:
        """The canonical name of ``name`` (itself or the name it is an alias of)."""
        if isinstance(name, str) and name in self._entries:
            return name
        if isinstance(name, str) and name in self._aliases:
            return self._aliases[name]
        known = ", ".join(self.names()) or "(none)"
        extra = (f" (aliases: {', '.join(f'{a}={n}' for a, n in sorted(self._aliases.items()))})"
                 if self._aliases else "")
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}{extra}")

    def get(self, name: str) -> T:
        """The entry of ``name`` (or of the name it is an alias of)."""
        return self._entries[self.resolve(name)]

    __getitem__ = get

    def names(self) -> list[str]:
        """The registered (canonical) names, in the registry's order."""
        if self._order is None:
            return sorted(self._entries)
        order = self._order
        return [n for _, _, n in sorted((order(e), i, n)
                                        for i, (n, e) in enumerate(self._entries.items()))]

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in the registry's order."""
        return [(n, self._entries[n]) for n in self.names()]

    def values(self) -> list[T]:
        """The entries in the registry's order."""
        return [self._entries[n] for n in self.names()]

    def aliases(self) -> dict[str, str]:
        """``alias -> canonical name``."""
        return dict(sorted(self._aliases.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"

    @contextmanager
    def isolated(self) -> Iterator[Registry[T]]:
        """Within the block, additions and removals are undone afterwards (for tests)."""
        saved, saved_aliases = dict(self._entries), dict(self._aliases)
        try:
            yield self
        finally:
            self._entries, self._aliases = saved, saved_aliases

    def remove(self, name: str) -> None:
        """Remove ``name`` and its aliases (no error when it is not registered)."""
        self._entries.pop(name, None)
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}

    def clear(self) -> None:
        """Remove every entry (to rebuild a registry, e.g. after reloading its modules)."""
        self._entries.clear()
        self._aliases.clear()
