"""The ``unmask`` command line. Tables and ``print`` live here, never in the library.

Commands are small functions registered in ``COMMANDS`` by :func:`command`; each adds its
own sub-parser, so later features (attacks, suites, leaderboards) plug in the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "command"]

Handler = Callable[[argparse.Namespace], int]
# Feature modules that add sub-commands with @command; a missing one is skipped.
COMMAND_MODULES = (
    "unmask.bench.cli_attack",
    "unmask.bench.cli_explain",
    "unmask.bench.cli_gradflow",
    "unmask.bench.cli_backdoor",
    "unmask.bench.cli_defenses",
    "unmask.bench.cli_suite",
    "unmask.bench.cli_perf",
    "unmask.bench.cli_export",
    "unmask.bench.cli_compare",
    "unmask.bench.cli_certify",
)
_COMMANDS: list[tuple[str, Callable[[argparse._SubParsersAction], None]]] = []


def command(name: str):
    """Register ``fn(subparsers)``, which adds the sub-command ``name`` and sets its handler."""

    def deco(fn):
        _COMMANDS.append((name, fn))
        return fn

    return deco


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- zoo -------------------------------------------------------------------------------------


@command("zoo")
def _zoo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list and train the model zoo",
                       description="List the model zoo, or train (and cache) an entry.")
    zsub = p.add_subparsers(dest="zoo_cmd", metavar="{list,train,info}")
    zsub.required = True
    lp = zsub.add_parser("list", help="list zoo entries and whether they are cached")
    lp.add_argument("--tag", help="only entries with this tag")
    lp.set_defaults(handler=_zoo_list)
    tp = zsub.add_parser("train", help="train an entry (cache hit if already trained)")
    tp.add_argument("names", nargs="+", metavar="NAME")
    tp.add_argument("--retrain", action="store_true", help="train again even if cached")
    tp.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    tp.set_defaults(handler=_zoo_train)
    ip = zsub.add_parser("info", help="print an entry's card (JSON)")
    ip.add_argument("name", metavar="NAME")
    ip.set_defaults(handler=_zoo_info)


def _zoo_list(args: argparse.Namespace) -> int:
    from . import zoo

    rows = []
    for e in zoo.entries():
        if args.tag and args.tag not in e.tags:
            continue
        c = zoo.card(e.name)
        fresh = c is not None and c.get("fingerprint") == e.fingerprint()
        acc = f"{c['clean_accuracy']:.4f}" if fresh else ""
        rows.append((e.name, e.dataset, e.recipe, e.base or "", acc, e.description))
    print(_table(rows, ("name", "dataset", "recipe", "base", "clean_acc", "description")))
    print(f"\ncache: {zoo.cache_dir()}")
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    import time

    from . import zoo

    for name in args.names:
        _known(name, zoo.list(), "model")
    for name in args.names:
        start = time.perf_counter()
        _, card = zoo.load_with_card(name, device=args.device, retrain=args.retrain)
        took = time.perf_counter() - start
        print(f"{name}: clean accuracy {card['clean_accuracy']:.4f} on {card['test_samples']} "
              f"test images; trained in {card['train_seconds']:.1f}s; sha256 {card['sha256'][:12]}"
              f" ({'trained' if took > 0.5 * card['train_seconds'] and card['train_seconds'] > 0 else 'cached'}"
              f", {took:.2f}s)")
    return 0


def _zoo_info(args: argparse.Namespace) -> int:
    import json

    from . import zoo

    _known(args.name, zoo.list(), "model")
    c = zoo.card(args.name)
    if c is None:
        print(json.dumps(zoo.get(args.name).config(), indent=2, default=str))
        print(f"\n{args.name} is not trained yet: unmask zoo train {args.name}")
    else:
        print(json.dumps(c, indent=2, sort_keys=True))
    return 0


def _known(name: str, known: Sequence[str], kind: str) -> None:
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CLIError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}")


# --- data ------------------------------------------------------------------------------------


@command("data")
def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list datasets")
    dsub = p.add_subparsers(dest="data_cmd", metavar="{list}")
    dsub.required = True
    lp = dsub.add_parser("list", help="list registered datasets")
    lp.set_defaults(handler=_data_list)


def _data_list(args: argparse.Namespace) -> int:
    from . import data

    rows = []
    for name in data.names():
        d = data.info(name)
        shape = "x".join(map(str, d.shape))
        rows.append((name, shape, d.num_classes or "any", "yes" if d.offline else "no",
                     d.description))
    print(_table(rows, ("name", "shape", "classes", "offline", "description")))
    return 0


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``unmask`` argument parser with one sub-command per command group."""
    from . import __version__

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
    _load_command_modules()
    for _, add in _COMMANDS:
        add(sub)
    return parser


def _load_command_modules() -> None:
    # Feature modules register their sub-commands with @command when imported.
    import importlib

    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


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
