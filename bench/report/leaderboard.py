"""The leaderboard of a run: :func:`render` (Markdown, CSV, HTML, LaTeX) and
:func:`write_report` (every table, figure and evidence page), built from the results store.

The frame behind every view is :func:`~unmask.bench.report.frames.leaderboard_frame`; the tables a
reader sees are in :mod:`unmask.bench.report.tables`, the pages in :mod:`unmask.bench.report.html`.

Usage::

    with Store("results/unmask.sqlite", readonly=True) as st:
        print(render(st, st.latest_run().run_id, "md"))
        write_report(st, run_id, Path("results"))   # tables, evidence/, report.html
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..suite.store import Store
from . import frames
from . import html as rh
from . import tables as tb
from .frames import leaderboard_frame, row_outcomes, sections_frame, verdict_legend
from .html import write_report as _write
from .plotting import write_text

FORMATS = ("md", "csv", "html", "latex")

__all__ = ["FORMATS", "leaderboard_frame", "render", "write_report", "write_text", "sections_frame",
           "row_outcomes", "verdict_legend"]


def render(store: Store, run_id: int, fmt: str = "md", *, evidence_dir: str | None = None
           ) -> str:
    """The main table of ``run_id`` as Markdown (with the explanation and backdoor tables),
    CSV (:data:`unmask.bench.report.tables.MAIN_CSV_COLUMNS`), a self-contained HTML page or LaTeX.
    ``evidence_dir``: link each model to its evidence page there (relative; the pages are
    written by :func:`write_report`, so the default is no links)."""
    if fmt == "csv":
        return rh.main_csv(store, run_id, evidence_dir=evidence_dir)
    if fmt == "md":
        return rh.render_markdown(store, run_id, evidence_dir=evidence_dir)
    if fmt == "html":
        return rh.render_html(store, run_id, evidence_dir=evidence_dir)
    if fmt == "latex":
        df = frames.leaderboard_frame(store, run_id)
        parts = []
        for threat, ranked, apart in tb.main_tables(df, defenses=tb.defense_texts(store, run_id),
                                                    evidence_dir=None):
            for t in (ranked, apart):
                if t.rows:
                    part = pd.DataFrame([[c.text for c in r] for r in t.rows], columns=t.columns)
                    part.insert(0, "threat", threat)
                    parts.append(part)
        if not parts:
            return "% no results\n"
        return pd.concat(parts, ignore_index=True).fillna("").to_latex(index=False, escape=True)
    raise ValueError(f"unknown format {fmt!r}; expected {', '.join(FORMATS)}")


def write_report(store: Store, run_id: int, out_dir: Path) -> list[Path]:
    """Write the report of ``run_id`` under ``out_dir``: ``leaderboard.{md,csv,html}`` (the
    main table), ``explanations.csv``, ``backdoor.csv``, ``figures/*.png``,
    ``evidence/<model>-<threat>.html`` and ``report.html``
    (:func:`unmask.bench.report.html.write_report`); returns the paths written."""

    return _write(store, run_id, Path(out_dir))
