"""``unmask certify MODEL``: proven lower bounds of a model's robust accuracy (a zoo name,
``module:function``, a checkpoint with ``--arch``, or a ``robustbench:`` spec).

Runs IBP, CROWN and the exact MILP (``unmask.defenses.certified.certify``, the methods of a
suite's ``[certify]`` section) on the first ``--n`` test images of the model's dataset and
prints, per method, the certified robust accuracy, how many samples were proven robust,
broken (misclassified, or a verified MILP counterexample) or left unknown, and the time per
sample. A model with a layer the bounds do not support exits with ``not supported: <layer>``.

Usage: ``unmask certify mnist-mlp-ibp03 --eps 0.3 --methods crown milp --time-limit 10``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...defenses.certified import BoundMethod, certify
from ..core import Norm, Threat
from ..core.fileio import atomic_write
from .attack import add_model_source_args, load_model, test_data
from .base import CLIError, command, known, table


@command("certify")
def _certify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certify", help="certified robust accuracy of a model (IBP, CROWN, exact MILP)",
        description="Proven lower bounds of robust accuracy on the first N test images: IBP, "
                    "CROWN and exact verification by MILP (Linf only, needs highspy). A sample "
                    "is certified (proven robust), broken (misclassified, or a MILP "
                    "counterexample verified on the model) or unknown.")
    add_model_source_args(p)
    p.add_argument("--eps", type=float, required=True, help="radius of the threat ball")
    p.add_argument("--norm", default="linf", choices=[n.value for n in Norm],
                   help="default linf")
    p.add_argument("--methods", nargs="+", default=[m.value for m in BoundMethod],
                   help=f"any of {' '.join(m.value for m in BoundMethod)} (default: all)")
    p.add_argument("--n", type=int, default=100, help="test images (default 100)")
    p.add_argument("--time-limit", type=float, default=10.0,
                   help="MILP seconds per sample; a timeout leaves it unknown (default 10)")
    p.add_argument("--json", metavar="PATH", help="also write the per-sample results as JSON")
    p.set_defaults(handler=_certify)


def _certify(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise CLIError(f"--n must be a positive number of images, got {args.n}")
    for m in args.methods:
        known(m, [v.value for v in BoundMethod], "method")
    try:
        threat = Threat(args.norm, args.eps)
    except ValueError as err:
        raise CLIError(str(err)) from None
    loaded = load_model(args)
    model = loaded.model
    x, y = test_data(loaded.dataset, args.n)
    x, y = x.to(loaded.device), y.to(loaded.device)
    rows, results = [], []
    for m in args.methods:
        res = certify(model, x, y, threat, method=m, time_limit=args.time_limit)
        results.append(res.to_dict())
        rows.append([m, f"{res.certified_accuracy:.3f}", res.status.count("certified"),
                     res.status.count("broken"), res.status.count("unknown"),
                     f"{res.seconds_per_sample * 1000:.1f} ms"])
    print(table(rows, ["method", "certified", "proven", "broken", "unknown", "time/sample"]))
    print(f"\n{args.model} at {threat} on {args.n} test images: certified robust accuracy is a "
          "proven lower bound; an attack's robust accuracy is an upper bound.")
    if args.json:

        atomic_write(Path(args.json), json.dumps(results, indent=1).encode())
        print(f"results: {args.json}")
    return 0
