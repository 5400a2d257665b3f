"""``unmask run``, ``unmask leaderboard``, ``unmask report`` and ``unmask check``.

* ``unmask run [SUITE] [--quick] [--resume RUN_ID] [--store PATH]``: run a suite (the shipped
  default when omitted) into the results store, with progress bars and a summary;
* ``unmask leaderboard [--run ID] [--format md|csv|html|latex] [--out FILE]``: the table of a
  run (the latest by default) on stdout or into a file;
* ``unmask report [--run ID] [--out-dir results] [--screenshots]``: the main table
  (leaderboard.{md,csv,html}), explanations.csv, backdoor.csv, figures, one evidence page per
  model and threat and the HTML report (with ``--screenshots`` also PNGs of it);
* ``unmask check --baseline FILE [--run ID] [--write]``: compare a run with a baseline within
  the statistical tolerance of both runs' binomial intervals; exit 1 on a regression.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .. import data
from ..report import check as chk
from ..report import leaderboard as lb
from ..report import tables as tb
from ..report.html import write_screenshots
from ..report.leaderboard import leaderboard_frame
from ..suite.runner import probe_model, run_suite
from ..suite.spec import load_suite, resolve_user_model
from ..suite.store import Store, StoreError, default_path
from ..zoo.resolve import ModelSourceError
from .base import CLIError, command, table

_STORE_HELP = ("results store (SQLite); default $UNMASK_STORE, else results/unmask.sqlite "
               "in the working directory")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="PATH", help=_STORE_HELP)


# --- run ---------------------------------------------------------------------------------------


@command("run")
def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a benchmark suite into the results store",
        description="Run a benchmark suite (a TOML file; the shipped default suite when "
                    "omitted): every model x threat under the attack ensemble, the masking "
                    "diagnosis, explanations and backdoor metrics, each finished unit "
                    "committed to the results store. Under torchrun the samples are sharded "
                    "over the ranks.")
    p.add_argument("suite", nargs="?", metavar="SUITE",
                   help="suite file, or the name of a shipped suite (default: default)")
    p.add_argument("--quick", action="store_true",
                   help="the suite's smoke variant: fewer samples, the quick ensemble, a fast "
                        "masking diagnosis (under a minute with trained models)")
    p.add_argument("--resume", type=int, metavar="RUN_ID",
                   help="resume an interrupted run: finished cells are skipped and failed ones "
                        "run again; with a SUITE, an edited suite that changes only the models")
    p.add_argument("--skip", action="append", default=[], metavar="MODEL",
                   help="with --resume: drop MODEL (its key) from the run (repeatable)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the suite's, else best)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--check-only", action="store_true",
                   help="validate the suite file and print what it would run")
    p.add_argument("--report", nargs="?", const="results", default=None, metavar="DIR",
                   help="when the run finishes, also write what `unmask report` writes "
                        "(leaderboard files, figures, report.html) to DIR (default: results)")
    _store_arg(p)
    p.set_defaults(handler=_run)


def _install_sigterm() -> None:
    def _raise(signum, frame):  # pragma: no cover - exercised through a subprocess
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread
        pass


def _check_models(suite, batch: int = 8) -> list[str]:
    """Import and call every user builder once and run it on one batch of the suite's data
    (output shape, finite logits, class count); every problem, not the first one."""

    user = [m for m in suite.models if m.is_user]
    if not user:
        return []
    try:
        x, y = data.load(suite.dataset, suite.split, n=min(batch, suite.n), **suite.data_options)
    except (ValueError, FileNotFoundError) as err:
        return [f"dataset {suite.dataset}: {err}"]
    problems = []
    for spec in user:
        try:
            model = resolve_user_model(spec)
            probe_model(model, x.to(next(model.parameters(), x).device), y, spec.key)
        except ModelSourceError as err:
            problems.append(f"{spec.key}: {err}")
        except Exception as err:  # the builder's or the forward's own error, reported as is
            problems.append(f"{spec.key}: {type(err).__name__}: {err}")
        else:
            print(f"  {spec.key}: built and probed on {len(y)} {suite.dataset} samples: ok")
    return problems


def _run(args: argparse.Namespace) -> int:
    suite = None
    if args.skip and args.resume is None:
        raise CLIError("--skip drops models from a resumed run: give --resume RUN_ID")
    if args.resume is not None:
        if args.quick:
            raise CLIError("--resume continues a stored run with its own settings; give no "
                           "--quick with it")
        if args.suite:  # an edited suite: only its models may differ from the stored one
            suite = load_suite(args.suite)
    else:
        suite = load_suite(args.suite)
        if args.quick:
            suite = suite.quick()
    if args.check_only:
        if suite is None:
            raise CLIError("--check-only validates a SUITE file; give one")
        print(f"suite {suite.name} ({suite.source}): the file is valid")
        print(f"  dataset {suite.dataset} ({suite.split}), n={suite.n}, batch {suite.batch_size}, "
              f"seed {suite.seed}")
        print(f"  models: {', '.join(m.key for m in suite.models)}")
        print(f"  threats: {', '.join(f'{n}:{e:g}' for n, e in suite.threat_list())}")
        att = suite.attacks.preset or ", ".join(a["name"] for a in suite.attacks.attacks)
        print(f"  attacks: {att}; masking {'on' if suite.masking.enabled else 'off'}; "
              f"explain {'on' if suite.explain.enabled else 'off'}; "
              f"backdoor {'on' if suite.backdoor.enabled else 'off'}")
        c = suite.certify
        print("  certify: " + (f"{', '.join(c.methods)} (MILP limit {c.time_limit:g} s/sample"
                               f"{f', first {c.n} samples' if c.n else ''})" if c.enabled
                               else "off"))
        problems = _check_models(suite)
        if problems:
            print(f"\n{len(problems)} problem(s) with the suite's models:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
        return 0
    _install_sigterm()
    rank = int(os.environ.get("RANK", "0"))
    progress = not args.no_progress and sys.stderr.isatty() or (
        not args.no_progress and os.environ.get("UNMASK_PROGRESS") == "1")
    if not progress and not args.no_progress:
        # No terminal for progress bars (a log file, CI): a line per saved unit instead.

        for name in ("unmask.bench.suite.runner", "unmask.bench.zoo"):  # saved units, training
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
    try:
        summary = run_suite(suite, store=args.store, resume=args.resume, device=args.device,
                            progress=progress, skip=tuple(args.skip))
    except StoreError as err:
        raise CLIError(str(err)) from None
    except ValueError as err:  # a resume the stored run cannot take (skip, edited suite)
        if args.resume is None:
            raise
        raise CLIError(str(err)) from None
    except KeyboardInterrupt as err:
        if rank == 0:
            run_id = getattr(err, "run_id", None)
            if run_id is None:  # before the run was recorded: nothing to resume
                print("unmask: interrupted before the run started; nothing was saved",
                      file=sys.stderr)
            else:
                where = "" if args.store is None else f" --store {args.store}"
                print(f"unmask: run {run_id} interrupted; finished cells are saved. Resume "
                      f"with: unmask run --resume {run_id}{where}", file=sys.stderr)
        return 130
    if rank != 0:
        return 0
    _print_summary(summary)
    if args.report is not None:

        with _open_readonly(summary.store) as st:
            for path in lb.write_report(st, summary.run_id, Path(args.report)):
                print(f"wrote {path}")
    return 0


def _print_summary(summary) -> None:
    with Store(summary.store, readonly=True) as st:
        df = leaderboard_frame(st, summary.run_id)
        main = tb.main_tables(df, defenses=tb.defense_texts(st, summary.run_id),
                              evidence_dir=None)
    print(f"\nrun {summary.run_id} {summary.status} in {summary.wall_seconds:.1f}s: "
          f"{summary.units_run} units run, {summary.units_skipped} skipped "
          f"(store {summary.store})")
    for threat, ranked, apart in main:  # the report's main table, per threat
        for title, t in ((f"ranked at {threat}", ranked), (f"not ranked at {threat}", apart)):
            if t.rows:
                print(f"\n{title}:")
                print(table([[c.text for c in r] for r in t.rows], t.columns))
    for model, section, reason in summary.unavailable:
        print(f"unavailable: {model} {section}: {reason}")
    for model, section, reason in summary.errors:
        print(f"error: {model} {section}: {reason}")
    print("\nnext: unmask leaderboard   |   unmask report   |   unmask check --baseline FILE")


# --- leaderboard ------------------------------------------------------------------------------


def _open_readonly(path):
    try:
        return Store(default_path(path), readonly=True)
    except StoreError as err:
        raise CLIError(str(err)) from None


@command("leaderboard")
def _leaderboard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="the leaderboard of a run (latest by default)",
                       description="Print (or write) the leaderboard of a run: one row per "
                                   "model and threat, ranked by worst-case robust accuracy; "
                                   "masked models are marked and never ranked.")
    p.add_argument("--run", type=int, metavar="ID", help="run id (default: the latest)")
    p.add_argument("--format", choices=lb.FORMATS, default=None,
                   help="output format (default: md, or the --out file's suffix)")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--runs", action="store_true", help="list the runs in the store instead")
    _store_arg(p)
    p.set_defaults(handler=_leaderboard)


def _leaderboard(args: argparse.Namespace) -> int:
    with _open_readonly(args.store) as st:
        if args.runs:
            rows = [(r.run_id, r.suite + (" (quick)" if r.quick else ""), r.status, r.seed,
                     f"{r.wall_seconds:.1f}s" if r.wall_seconds is not None else "",
                     r.device, r.world_size, (r.git_commit or "")[:12]) for r in st.runs()]
            print(table(rows, ("run", "suite", "status", "seed", "wall", "device", "ranks",
                                "commit")))
            return 0
        run_id = args.run if args.run is not None else st.latest_run().run_id
        fmt = args.format
        if fmt is None and args.out:
            suffix = Path(args.out).suffix.lstrip(".").lower()
            fmt = {"tex": "latex", "htm": "html", "markdown": "md"}.get(suffix, suffix)
            if fmt not in ("md", "csv", "html", "latex"):
                fmt = "md"
        text = lb.render(st, run_id, fmt or "md")
    if args.out:
        lb.write_text(Path(args.out), text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


# --- report -----------------------------------------------------------------------------------


@command("report")
def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the leaderboard files, figures and HTML report",
                       description="Write the main table (leaderboard.{md,csv,html}), "
                                   "explanations.csv, backdoor.csv, figures/*.png, "
                                   "evidence/<model>-<threat>.html and report.html for a run "
                                   "(the latest by default).")
    p.add_argument("--run", type=int, metavar="ID", help="run id (default: the latest)")
    p.add_argument("--out-dir", default="results", metavar="DIR",
                   help="where to write (default: results)")
    p.add_argument("--screenshots", action="store_true",
                   help="also write figures/report_main_table.png and "
                        "figures/report_evidence.png (1280 px wide) with the system Chromium "
                        "driven by Playwright (pip install playwright; no browser download)")
    p.add_argument("--browser", metavar="PATH",
                   help="with --screenshots: the Chromium executable (default: chromium on "
                        "PATH)")
    _store_arg(p)
    p.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    with _open_readonly(args.store) as st:
        run_id = args.run if args.run is not None else st.latest_run().run_id
        paths = lb.write_report(st, run_id, Path(args.out_dir))
    if args.screenshots:

        try:
            paths += write_screenshots(Path(args.out_dir), executable=args.browser)
        except ValueError as err:
            raise CLIError(str(err)) from None
    for p in paths:
        print(f"wrote {p}")
    return 0


# --- check ------------------------------------------------------------------------------------


@command("check")
def _check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="compare a run with a robustness baseline (CI regression "
                                     "test)",
                       description="Compare a run (the latest by default) with a baseline "
                                   "on the same samples, paired: a row fails on a significant "
                                   "drop (exact McNemar test on the newly broken and newly "
                                   "robust samples, p < 0.05) or a drop beyond the tolerance, "
                                   "and names the newly broken and newly robust samples; a "
                                   "changed model fingerprint (weights and structure), other "
                                   "samples or changed settings (seed, batch size, attack "
                                   "budget, diagnosis) fail unless --allow-changed. Exit 1 and "
                                   "print the differences on a regression. Docs: docs/ci.md.")
    p.add_argument("--baseline", required=True, metavar="FILE", help="baseline JSON")
    p.add_argument("--run", type=int, metavar="ID", help="run id (default: the latest)")
    p.add_argument("--write", action="store_true",
                   help="write the run as the new baseline FILE instead of comparing")
    p.add_argument("--only-drops", action="store_true",
                   help="fail only when a number drops (an improvement passes)")
    p.add_argument("--tolerance", type=float, default=None, metavar="SHARE",
                   help="fail on a drop larger than this share of the samples even when not "
                        "significant (default 0.05, i.e. 5 points; see docs/ci.md)")
    p.add_argument("--exact", action="store_true",
                   help="fail on any per-sample change, up or down (for a deterministic rerun "
                        "of committed numbers; a weaker attack shows as a rise)")
    p.add_argument("--allow-changed", action="store_true",
                   help="compare even when the model's fingerprint, the samples or the "
                        "settings changed (the change is still reported)")
    p.add_argument("--all-attacks", action="store_true",
                   help="compare every attack's robust accuracy, not only clean and worst case")
    _store_arg(p)
    p.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    with _open_readonly(args.store) as st:
        run_id = args.run if args.run is not None else st.latest_run().run_id
        current = chk.baseline_from_store(st, run_id)
    if args.write:
        chk.write_baseline(current, Path(args.baseline))
        print(f"wrote baseline {args.baseline} from run {run_id} "
              f"({len(current['cells'])} cells)")
        return 0
    try:
        baseline = chk.read_baseline(Path(args.baseline))
    except FileNotFoundError:
        raise CLIError(f"no baseline at {args.baseline}; write one with: unmask check "
                       f"--baseline {args.baseline} --write") from None
    tolerance = chk.TOLERANCE if args.tolerance is None else args.tolerance
    if not 0 <= tolerance <= 1:
        raise CLIError(f"--tolerance must be a share in [0, 1] (0.05 = 5 points), got "
                       f"{tolerance}")
    result = chk.compare(baseline, current, only_drops=args.only_drops,
                         all_attacks=args.all_attacks, tolerance=tolerance,
                         allow_changed=args.allow_changed, exact=args.exact)
    print(chk.format_result(result))
    return 0 if result.passed else 1
