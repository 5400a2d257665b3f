"""unmask.bench.cli: the ``unmask`` command, one module per command group.

:mod:`.base` holds the command registry, ``CLIError`` and text tables; :mod:`.main` builds the
parser from the registry and is the console script's entry point.
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
