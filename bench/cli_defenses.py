"""``unmask diagnose``: the gradient-masking diagnosis of a zoo model as a table (or JSON)."""

from __future__ import annotations

import argparse

from .cli import command
from .cli_attack import add_model_args, load_model_and_data


@command("diagnose")
def _diagnose_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="gradient-masking diagnosis of a zoo model",
                       description="Run the gradient-masking checks on a zoo model and print "
                                   "each check, its evidence and the verdict.")
    add_model_args(p, n=500)
    p.add_argument("--fast", action="store_true", help="smaller budgets (for CI)")
    p.add_argument("--follow-up", action="store_true",
                   help="run the recommended adaptive attack and report robust accuracy "
                        "before and after")
    p.add_argument("--surrogate", help="a zoo model for the transfer check")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(handler=_diagnose)


def _diagnose(args: argparse.Namespace) -> int:
    import torch

    from ..defenses import diagnose
    from . import zoo
    from .core import Threat

    threat = Threat(args.norm, args.eps)
    model, card, x, y = load_model_and_data(args)
    surrogate = zoo.load(args.surrogate, device=args.device) if args.surrogate else None
    report = diagnose(model, x, y, threat, follow_up=args.follow_up, fast=args.fast,
                      generator=torch.Generator().manual_seed(args.seed), surrogate=surrogate)
    print(f"{args.model} ({threat}, {report.n} samples, {report.seconds:.1f}s)\n")
    print(report.table())
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(report.to_json())
    return 0
