"""Verdict stability: the masking diagnosis of each zoo model in fast and full mode, on 100
and on 1000 test samples. A verdict that flips with the budget or the sample count is noise,
not evidence; the comparisons' significance test (``unmask.defenses.masking.stats``) exists to
prevent it, and this script measures whether it does.

    python -m unmask.bench.perf.verdict_stability [--models a,b] [--eps 0.3] [--device cuda] \
        [--json results/masking/verdict-stability.json]

Prints one row per model: the verdict and the failing checks in each configuration, and
whether the verdict is the same in all four. Uses the suite's surrogate (``mnist-cnn``) for
the transfer check, and the zoo cache (``UNMASK_CACHE``) for the models.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ...defenses.masking import diagnose
from .. import data, zoo
from ..core import Threat, select_device
from ..core.fileio import atomic_write

__all__ = ["main", "stability"]

CONFIGS = ((100, True), (100, False), (1000, True), (1000, False))
DEFAULT_MODELS = ("mnist-cnn", "mnist-cnn-pgdat", "mnist-cnn-fastat", "mnist-cnn-trades",
                  "mnist-cnn-gradreg", "mnist-cnn-quantized", "mnist-cnn-jpeg",
                  "mnist-cnn-lowtemp", "mnist-cnn-noise", "mnist-cnn-probs",
                  "mnist-cnn-badnets", "mnist-cnn-blend")


def stability(name: str, threat: Threat, device: torch.device, surrogate, x, y) -> dict:
    """The four diagnoses of zoo model ``name``: verdict, failing checks and seconds each."""

    model = zoo.load(name, device=device, progress=False)
    runs = {}
    for n, fast in CONFIGS:
        start = time.perf_counter()
        r = diagnose(model, x[:n], y[:n], threat, fast=fast, generator=0, audit_flow=False,
                     surrogate=None if name == "mnist-cnn" else surrogate)
        runs[f"n={n} {'fast' if fast else 'full'}"] = {
            "verdict": r.verdict.value, "failed": [c.name for c in r.failed],
            "seconds": round(time.perf_counter() - start, 1)}
    verdicts = {v["verdict"] for v in runs.values()}
    return {"model": name, "stable": len(verdicts) == 1, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    """Command line of the verdict-stability measurement (see the module docstring); returns the
    exit status.
    """
    p = argparse.ArgumentParser(prog="python -m unmask.bench.perf.verdict_stability",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated zoo names (default: the default suite's)")
    p.add_argument("--eps", type=float, default=0.3, help="Linf radius (default 0.3)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    device = select_device(args.device)
    names = args.models.split(",") if args.models else list(DEFAULT_MODELS)
    x, y = data.load("mnist5k", "test")
    x, y = x[:1000].to(device), y[:1000].to(device)
    threat = Threat("linf", args.eps)
    surrogate = zoo.load("mnist-cnn", device=device, progress=False)
    rows = []
    for name in names:
        row = stability(name, threat, device, surrogate, x, y)
        rows.append(row)
        cells = "; ".join(f"{k}: {v['verdict']}" + (f" ({', '.join(v['failed'])})"
                                                    if v["failed"] else "")
                          for k, v in row["runs"].items())
        print(f"{name}: {'stable' if row['stable'] else 'FLIPS'} | {cells}", flush=True)
    if args.json:

        atomic_write(args.json, json.dumps({"threat": threat.to_dict(), "rows": rows},
                                           indent=2).encode("utf-8"))
    return 0 if all(r["stable"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
