"""``unmask diagnose``: the gradient-masking diagnosis of a model as a table (or JSON).

The exit status says the verdict, so a CI job can gate on it: 0 clean, 3 suspicious, 4 masked
(2 is a usage error, 1 any other error).
"""

from __future__ import annotations

import argparse
import sys

import torch

from ...defenses import diagnose
from ...defenses.masking import CHECKS
from ..core import Threat
from ..core.fileio import atomic_write
from ..core.text import text_table
from .attack import add_model_args, load_model, load_model_and_data
from .base import CLIError, command

# The verdict as the exit status; 1 and 2 stay Python's and argparse's (error, usage).
EXIT_CODES = {"clean": 0, "suspicious": 3, "masked": 4}


@command("diagnose")
def _diagnose_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="gradient-masking diagnosis of a model (zoo, "
                                        "module:function or checkpoint)",
                       description="Run the gradient-masking checks on a model and print "
                                   "each check, its evidence and the verdict.",
                       epilog="exit status: 0 clean, 3 suspicious, 4 masked (2 usage error, "
                              "1 other error), so a CI job can gate on the verdict")
    add_model_args(p, n=500, optional_model=True)  # --list-checks needs no model
    p.add_argument("--fast", action="store_true", help="smaller budgets (for CI)")
    p.add_argument("--follow-up", action="store_true",
                   help="run the recommended adaptive attack and report robust accuracy "
                        "before and after")
    p.add_argument("--surrogate", help="a model for the transfer check (zoo name or "
                                       "module:function)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-': only "
                                                  "the JSON, on stdout)")
    p.add_argument("--checks", metavar="NAME[,NAME...]",
                   help="run only these registered checks (see --list-checks)")
    p.add_argument("--list-checks", action="store_true",
                   help="list the registered checks (family, kind, verdict on failure, cost) "
                        "and exit")
    p.set_defaults(handler=_diagnose)


def _usage(message: str) -> int:
    """A usage error: the message on stderr, exit status 2 (as argparse's own)."""

    print(f"unmask diagnose: error: {message}", file=sys.stderr)
    return 2


def _list_checks() -> int:
    rows = [(c.name, c.family, c.kind.value, c.severity.value, c.cost) for c in CHECKS.values()]
    print(text_table(rows, ("check", "family", "kind", "fails as", "cost")))
    return 0


def _diagnose(args: argparse.Namespace) -> int:

    if args.list_checks:
        return _list_checks()
    if not args.model:
        return _usage("a MODEL is required (a zoo name, module:function or checkpoint), unless "
                      "--list-checks")
    checks = None
    if args.checks:
        checks = [c.strip() for c in args.checks.split(",") if c.strip()]
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            return _usage(f"unknown check(s) {', '.join(unknown)}; registered: "
                          f"{', '.join(CHECKS)}")
    try:
        threat = Threat(args.norm, args.eps)
    except ValueError as err:
        raise CLIError(str(err)) from None
    model, card, x, y = load_model_and_data(args)
    surrogate = None
    if args.surrogate:
        surrogate = load_model(argparse.Namespace(
            model=args.surrogate, arch=None, model_kwargs=None, dataset=args.dataset,
            device=args.device)).model
    report = diagnose(model, x, y, threat, follow_up=args.follow_up, fast=args.fast,
                      generator=torch.Generator().manual_seed(args.seed), surrogate=surrogate,
                      checks=checks)
    if args.json == "-":
        print(report.to_json())
    else:
        print(f"{args.model} ({threat}, {report.n} samples, {report.seconds:.1f}s)\n")
        print(report.table())
        if args.json:

            atomic_write(args.json, report.to_json().encode("utf-8"))
    return EXIT_CODES[report.verdict.value]
