"""``unmask gradflow MODEL``: where in a model the input gradient vanishes or explodes.

Audits ``--n`` test images of the model's dataset (the first ``n``: deterministic), prints
the per-module gradient table and a one-line summary, and writes the depth profile as PNG.

Usage: ``unmask gradflow mnist-cnn --out gradflow.png --n 256 --loss ce``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ...explain.gradflow import AuditLoss, audit
from ..core.fileio import atomic_write as _atomic_write
from .attack import add_model_source_args, load_model, test_data
from .base import CLIError, command


@command("gradflow")
def _gradflow_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gradflow", help="gradient-flow audit: where the input gradient vanishes or explodes",
        description="Hook every module of a model (zoo, module:function or checkpoint), run one forward/backward pass of the "
                    "loss and print, per module, the gradient norm w.r.t. its output and input, "
                    "the gain, the share of exact zeros, NaN/Inf counts and dead ReLU units; "
                    "name the module where the gradient collapses or explodes.")
    add_model_source_args(p)
    p.add_argument("--out", help="figure path (PNG): gradient norm over depth, log scale")
    p.add_argument("--n", type=int, default=256, help="test images to audit (default 256)")
    p.add_argument("--loss", default="ce", choices=[v.value for v in AuditLoss],
                   help="loss whose gradient is audited (default ce)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(handler=_gradflow)


def _gradflow(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise CLIError(f"--n must be a positive number of images, got {args.n}")
    loaded = load_model(args)
    model = loaded.model
    x, y = test_data(loaded.dataset, args.n)
    x, y = x.to(loaded.device), y.to(loaded.device)
    start = time.perf_counter()
    report = audit(model, x, y, loss=args.loss)
    took = time.perf_counter() - start
    print(report.table())
    print(f"\n{args.model} ({report.n} samples, {report.loss} loss, {took:.2f}s): {report.summary}")
    if args.out:
        report.plot(args.out, title=f"{args.model} ({report.loss} loss): {report.summary}")
        print(f"figure: {args.out}")
    if args.json:

        _atomic_write(Path(args.json), report.to_json().encode())
        print(f"report: {args.json}")
    return 0
