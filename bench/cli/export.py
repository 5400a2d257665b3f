"""``unmask export``: a run's results in formats other tools read.

* ``--format robustbench``: one RobustBench ``model_info`` JSON per model and threat, under
  ``OUT/<dataset>/<Linf|L2>/`` (see :mod:`unmask.bench.report.export`);
* ``--format csv|parquet``: the per-sample outcomes (sample id, label, robust, the attack that
  broke it, margin) as one table for pandas;
* ``--format curves``: the security curves (model, threat_norm, eps, robust_accuracy, n, ...;
  see :mod:`unmask.bench.report.curve_report`) as CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..report import export
from ..report.curve_report import write_curves_csv
from .base import CLIError, command
from .suite import _open_readonly, _store_arg


@command("export")
def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run (RobustBench model_info, per-sample CSV/Parquet)",
                       description="Export a run of the store: RobustBench-style model_info "
                                   "JSON files, or the per-sample outcomes as CSV or Parquet.")
    p.add_argument("run", nargs="?", type=int, metavar="RUN",
                   help="run id (default: the latest)")
    p.add_argument("--format", choices=("robustbench", *export.SAMPLE_FORMATS, "curves"),
                   required=True)
    p.add_argument("--out", metavar="PATH",
                   help="folder for robustbench (default: export/model_info), file for csv and "
                        "parquet (default: export/samples.<format>) and curves (default: "
                        "export/curves.csv)")
    _store_arg(p)
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    with _open_readonly(args.store) as st:
        try:
            run_id = args.run if args.run is not None else st.latest_run().run_id
            if args.format == "robustbench":
                out = Path(args.out or "export/model_info")
                paths = export.export_robustbench(st, run_id, out)
                for path in paths:
                    print(path)
                print(f"wrote {len(paths)} model_info files under {out}", file=sys.stderr)
            elif args.format == "curves":

                out = Path(args.out or "export/curves.csv")
                if write_curves_csv(st, run_id, out) is None:
                    raise CLIError(f"run {run_id} has no security curves (a suite's [curves] "
                                   "section computes them)")
                print(f"wrote {out}", file=sys.stderr)
            else:
                out = Path(args.out or f"export/samples.{args.format}")
                export.export_samples(st, run_id, out, args.format)
                print(f"wrote {out}", file=sys.stderr)
        except ValueError as err:
            raise CLIError(str(err)) from None
    return 0
