"""``unmask compare RUN_A RUN_B``: per model and threat, the change in robust accuracy between
two runs, tested on the paired per-sample outcomes (exact McNemar), with a verdict word.

See :mod:`unmask.bench.report.run_compare` for the statistics. ``--store-b`` reads run B from another
store (a colleague's results file); ``--json`` prints the comparison as JSON;
``--fail-on-drop`` exits 1 when a row dropped significantly (for CI).
"""

from __future__ import annotations

import argparse
import json

from ..report.run_compare import DROP, compare_runs
from .base import CLIError, command, table
from .suite import _open_readonly, _store_arg


@command("compare")
def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="compare two runs: robust accuracy changes with a paired test",
        description="Compare two runs of the results store, per model and threat: robust "
                    "accuracy in each, the change (B - A), the samples newly broken and newly "
                    "robust, the exact two-sided McNemar test on the paired per-sample "
                    "outcomes and a verdict (significant drop / significant rise / no "
                    "significant change). Runs on different samples are compared unpaired "
                    "(95% Newcombe interval), and say so.")
    p.add_argument("run_a", type=int, metavar="RUN_A", help="the reference run id")
    p.add_argument("run_b", type=int, metavar="RUN_B", help="the run compared with it")
    _store_arg(p)
    p.add_argument("--store-b", metavar="PATH",
                   help="read RUN_B from this store (default: the same as --store)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the verdict (default 0.05, two-sided)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--fail-on-drop", action="store_true",
                   help="exit 1 when any row dropped significantly")
    p.set_defaults(handler=_compare)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _compare(args: argparse.Namespace) -> int:
    store_a = _open_readonly(args.store)
    store_b = _open_readonly(args.store_b) if args.store_b else None
    try:
        result = compare_runs(store_a, args.run_a, store_b, args.run_b, alpha=args.alpha)
    except ValueError as err:
        raise CLIError(str(err)) from None
    finally:
        store_a.close()
        if store_b is not None:
            store_b.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        rows = []
        for r in result.rows:
            test = (f"p = {r.p_value:.3g}" if r.paired else
                    f"unpaired 95% CI [{100 * r.low:+.1f}, {100 * r.high:+.1f}] pts")
            rows.append((r.model, r.threat, f"{_pct(r.robust_a)} (n={r.n_a})",
                         f"{_pct(r.robust_b)} (n={r.n_b})", f"{100 * r.difference:+.1f} pts",
                         "" if r.newly_broken is None else r.newly_broken,
                         "" if r.newly_robust is None else r.newly_robust, test, r.verdict,
                         "; ".join(r.notes)))
        print(f"run {result.run_a} (A) -> run {result.run_b} (B): robust accuracy per model "
              f"and threat; paired rows: exact two-sided McNemar test on the same samples, "
              f"alpha {result.alpha:g}")
        if rows:
            print(table(rows, ("model", "threat", "A", "B", "change", "newly broken",
                                "newly robust", "test", "verdict", "note")))
        else:
            print("(no model and threat in both runs)")
        for label, keys in (("only in run A", result.only_a), ("only in run B", result.only_b)):
            if keys:
                print(f"{label}: {', '.join(keys)}")
        for note in result.notes:
            print(f"note: {note}")
    drops = [r for r in result.rows if r.verdict == DROP]
    return 1 if args.fail_on_drop and drops else 0
