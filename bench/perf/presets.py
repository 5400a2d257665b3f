"""Two ensemble presets side by side on the masking benchmark's models.

    python -m unmask.bench.perf.presets --n 100 --eps 0.3 --json results/perf/presets-masking.json

For every model of :data:`unmask.bench.perf.masking_benchmark.ENTRIES` (the published
defenses that mask gradients, and the honest models), runs each preset (default ``standard``
and ``adaptive``) on the same samples with the same seed and records the robust accuracy
(the ensemble's own verdict, for a randomised model by majority over fresh draws), the
forward+backward passes per sample, the wall time and the per-attack costs. The property it
checks, :func:`violations`: the cheaper preset never reports a higher robust accuracy than
the reference (``standard``) on any of these models: where gradients mislead, its budget
must grow until it is as strong.

``--hopeless`` instead measures, on each model, whether a margin rule could drop samples
before the targeted stage (:func:`hopeless_evidence`):

    python -m unmask.bench.perf.presets --hopeless --models mnist-cnn-pgdat,mnist-cnn-trades \
        --n 500 --json results/perf/hopeless.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...attacks import APGD, PRESETS, APGDTMalt, Ensemble
from .. import data, zoo
from ..core import Threat
from ..core.fileio import atomic_write
from ..zoo.registry import versions
from .masking_benchmark import ENTRIES

__all__ = ["run_presets", "violations", "markdown_table", "hopeless_evidence", "main"]


def run_presets(models: Sequence[str], presets: Sequence[str], threat: Threat, *, n: int = 100,
                seed: int = 0, progress: Callable[[str], None] | None = None,
                checkpoint: Callable[[list[dict[str, Any]]], None] | None = None
                ) -> list[dict[str, Any]]:
    """One row per model: per preset its robust accuracy, passes per sample, seconds and
    per-attack costs, on the first ``n`` test samples of the model's dataset. ``checkpoint``
    receives the rows so far after every model (nothing measured is lost to a crash)."""
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; registered: {', '.join(PRESETS.names())}")
    say = progress or (lambda msg: None)
    rows = []
    for name in models:
        model = zoo.load(name, device="cpu", progress=False)
        x, y = data.load(zoo.get(name).dataset, "test", n=n)
        row: dict[str, Any] = {"model": name}
        for preset in presets:
            start = time.perf_counter()
            res = Ensemble.preset(preset, threat)(model, x, y, generator=seed)
            seconds = time.perf_counter() - start
            passes = sum(c.forwards + c.backwards for c in res.costs.values()) / len(y)
            row[preset] = {"robust_accuracy": res.robust_accuracy, "passes_per_sample": passes,
                           "seconds": seconds, "stochastic": res.stochastic,
                           "costs": {k: c.to_dict() for k, c in res.costs.items()}}
            say(f"{name:<24} {preset:<10} robust {res.robust_accuracy:.3f}  "
                f"{passes:8,.0f} passes/sample  {seconds:6.1f} s")
        rows.append(row)
        if checkpoint:
            checkpoint(rows)
    return rows


def violations(rows: Sequence[dict[str, Any]], reference: str, candidate: str,
               tolerance: float = 0.0) -> list[str]:
    """The models on which ``candidate`` reports a robust accuracy above ``reference``'s by
    more than ``tolerance``."""
    return [r["model"] for r in rows
            if r[candidate]["robust_accuracy"] > r[reference]["robust_accuracy"] + tolerance]


def markdown_table(rows: Sequence[dict[str, Any]], presets: Sequence[str]) -> str:
    """The rows as a Markdown table: robust accuracy and passes per sample per preset."""
    head = "| model | " + " | ".join(f"{p} robust | {p} passes/sample" for p in presets) + " |"
    sep = "|---|" + "---:|---:|" * len(presets)
    lines = [head, sep]
    for r in rows:
        cells = [f"{r[p]['robust_accuracy']:.2f} | {r[p]['passes_per_sample']:,.0f}"
                 for p in presets]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hopeless_evidence(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
                      seed: int = 0) -> dict[str, Any]:
    """Would dropping "hopeless" samples before the targeted stage lose breaks? Runs APGD-CE
    (100 steps), then :class:`~unmask.attacks.APGDTMalt` without refinement on its survivors,
    and returns, for the samples the targeted stage broke, their margin after APGD-CE and its
    percentile among the survivors (0 = closest to the boundary). A break at a high percentile
    means a margin rule would have dropped a sample that was not hopeless."""
    ce = APGD(threat, steps=100)(model, x, y, generator=seed)
    surv = (~ce.success & (ce.forwards > 1)).nonzero().flatten()  # attacked, and survived
    out: dict[str, Any] = {"n": int(len(y)), "survivors": int(len(surv))}
    if len(surv) < 2:
        return {**out, "broken_by_targeted": 0, "percentiles_of_broken": [],
                "margins_of_broken": []}
    targeted = APGDTMalt(threat, refine_restarts=0)(model, x[surv], y[surv], generator=seed)
    margins = ce.margin[surv]
    pct = margins.argsort().argsort().float() / (len(surv) - 1)
    broken = targeted.success
    rows = sorted(zip(pct[broken].tolist(), margins[broken].tolist()))
    return {**out, "broken_by_targeted": int(broken.sum()),
            "percentiles_of_broken": [round(p, 3) for p, _ in rows],
            "margins_of_broken": [round(v, 4) for _, v in rows],
            "survivor_margin_quartiles": torch.quantile(
                margins, torch.tensor([0.25, 0.5, 0.75])).tolist()}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring); exit status 1 when the candidate preset (the
    last of ``--presets``) reports more than the first on any model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="standard,adaptive",
                        help="comma-separated; the first is the reference")
    parser.add_argument("--models", default=",".join(e.name for e in ENTRIES),
                        help="comma-separated zoo names (default: the masking benchmark's)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--hopeless", action="store_true",
                        help="instead: the evidence for dropping hopeless samples early "
                             "(hopeless_evidence) on each of --models")
    args = parser.parse_args(argv)
    threat = Threat(args.norm, args.eps)
    if args.hopeless:
        found = {}
        for name in [m for m in args.models.split(",") if m]:
            model = zoo.load(name, device="cpu", progress=False)
            x, y = data.load(zoo.get(name).dataset, "test", n=args.n)
            found[name] = hopeless_evidence(model, x, y, threat, seed=args.seed)
            print(name, json.dumps(found[name]))
        if args.json:
            atomic_write(args.json, json.dumps({"threat": threat.to_dict(), "n": args.n,
                                                "models": found}, indent=2).encode())
        return 0
    presets = [p for p in args.presets.split(",") if p]
    if len(presets) < 2:
        parser.error("--presets needs at least two names (the first is the reference)")
    def keep(rows: list[dict[str, Any]]) -> None:
        if args.json:
            out = {"threat": threat.to_dict(), "n": args.n, "seed": args.seed,
                   "presets": presets, "rows": rows,
                   "violations": violations(rows, presets[0], presets[-1]),
                   "environment": {"threads": torch.get_num_threads(), "versions": versions()}}
            atomic_write(args.json, json.dumps(out, indent=2).encode())

    try:
        rows = run_presets([m for m in args.models.split(",") if m], presets, threat, n=args.n,
                           seed=args.seed, progress=lambda msg: print(msg, flush=True),
                           checkpoint=keep)
    except ValueError as err:
        parser.error(str(err))
    bad = violations(rows, presets[0], presets[-1])
    print("\n" + markdown_table(rows, presets))
    print(f"\n{presets[-1]} above {presets[0]} on: {', '.join(bad) or 'no model'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
