"""The ``unmask`` command line. Tables and ``print`` live here, never in the library.

Every command module registers its sub-command with :func:`~unmask.bench.cli.base.command`;
this module imports them all (the import order is the order of ``unmask --help``) and builds
the parser from the registry.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from . import (  # noqa: F401 - each registers its sub-commands
    attack,
    backdoor,
    certify,
    compare,
    defenses,
    explain,
    export,
    gradflow,
    perf,
    suite,
    zoo,
)
from .base import COMMANDS, CLIError

__all__ = ["main", "build_parser"]


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``unmask`` argument parser with one sub-command per command group."""
    parser = argparse.ArgumentParser(
        prog="unmask",
        description="Adversarial robustness and interpretability benchmarks for PyTorch: "
                    "robustness numbers with the evidence that they are not gradient masking.",
    )
    parser.add_argument("--version", action="version", version=f"unmask {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS.names():
        COMMANDS.get(name)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unmask`` command: parse ``argv`` (default ``sys.argv[1:]``), set the
    log level from ``-v``, run the sub-command; returns the exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except CLIError as err:
        print(f"unmask: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if err.args else str(err)
        print(f"unmask: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unmask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
