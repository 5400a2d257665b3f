"""What every command module shares: the command registry, ``CLIError`` and text tables.

Each command module registers a function ``add(subparsers)`` with ``@command(name)``; it adds
its sub-parser and sets the handler. :mod:`unmask.bench.cli.main` imports every command module
and builds the parser from :data:`COMMANDS`, in registration order.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Sequence

from ..core.registry import Registry
from ..core.text import text_table as table

__all__ = ["COMMANDS", "command", "CLIError", "table", "known"]

AddParser = Callable[[argparse._SubParsersAction], None]

#: Sub-commands by name; each value adds its sub-parser (``add(subparsers)``).
COMMANDS: Registry[AddParser] = Registry("command")


def command(name: str) -> Callable[[AddParser], AddParser]:
    """Register ``fn(subparsers)``, which adds the sub-command ``name`` and sets its handler."""
    return COMMANDS.register(name)


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def known(name: str, names: Sequence[str], kind: str) -> None:
    """Raise :class:`CLIError` unless ``name`` is one of ``names``, suggesting close matches."""
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CLIError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(names)}")
