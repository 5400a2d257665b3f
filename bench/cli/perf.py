"""``unmask perf``: attack throughput as a ratio to the model's raw forward+backward speed."""

from __future__ import annotations

import argparse

import torch

from ...attacks import APGD, FGSM, PGD, Square
from ..core import Autocast, Precision, Threat
from ..perf.harness import measure
from .attack import add_model_args, load_model_and_data
from .base import command


@command("perf")
def _perf_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perf", help="attack throughput vs the model's raw speed",
                       description="Measure R_fb (forward+backward img/s), R_f (forward img/s) "
                                   "and each attack's evaluations/s and efficiency, interleaved "
                                   "in one process.")
    add_model_args(p, n=256)
    p.set_defaults(eps=0.1)
    p.add_argument("--steps", type=int, default=20, help="PGD/APGD steps (default 20)")
    p.add_argument("--queries", type=int, default=500, help="Square queries (default 500)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--channels-last", action="store_true",
                   help="run the model in channels_last memory format (see docs/performance.md)")
    p.add_argument("--precision", default="fp32", choices=[v.value for v in Precision],
                   help="run the model under autocast; robust accuracy stays the fp32 model's")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (dynamic shapes); the first call compiles")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(handler=_perf)


def _perf(args: argparse.Namespace) -> int:

    threat = Threat(args.norm, args.eps)
    model, _, x, y = load_model_and_data(args)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    judge, fast = model, model
    if args.precision != "fp32":
        fast = Autocast(fast, args.precision)
    if args.compile:
        fast = torch.compile(fast, dynamic=True)
    attacks = {"fgsm": FGSM(threat), f"pgd-{args.steps}": PGD(threat, steps=args.steps),
               f"apgd-ce-{args.steps}": APGD(threat, steps=args.steps),
               f"square-{args.queries}": Square(threat, queries=args.queries)}
    report = measure(fast, x, y, attacks, repeats=args.repeats, seed=args.seed,
                     judge=judge if fast is not judge else None,
                     environment={"precision": args.precision, "compiled": args.compile})
    layout = "".join([", channels_last" if args.channels_last else "",
                      f", {args.precision} autocast" if args.precision != "fp32" else "",
                      ", torch.compile" if args.compile else ""])
    print(f"{args.model} {threat}, {len(y)} samples{layout}\n")
    print(report.table())
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(report.to_json())
    return 0
