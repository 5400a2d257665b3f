"""The report as files: the main table in Markdown, CSV and HTML, the explanation and
backdoor tables (Markdown sections, CSV files, HTML tables), one evidence page per model and
threat, and the self-contained HTML report that links them.

Every page is self-contained: inline CSS, a small inline script that sorts a table when its
column header is clicked (and opens every ``<details>`` block before printing), no network,
no external script. The pages fit a 1280-pixel window without horizontal scrolling (long
cells wrap) and print cleanly (``@media print``).

An evidence page (``evidence/<model>-<norm>_<eps>.html``) holds what the main table leaves
out: every masking check of the stored diagnosis with its value, rule, evidence and cost
(with the check's family and cost from :data:`unmask.defenses.masking.CHECKS`), the adaptive
re-checks, the attack cascade (which attack broke how many samples, the diagnosis's and the
follow-up's share), the gradient-flow summary, the attribution figure of the model, its
explanation and backdoor metrics, and the provenance in a ``<details>`` block.

Usage::

    with Store("results/unmask.sqlite", readonly=True) as st:
        write_report(st, run_id, Path("results"))     # report.html, evidence/, tables
        write_screenshots(Path("results"))            # figures/report_*.png (Playwright)
"""

from __future__ import annotations

import html
import json
import os
import shutil
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ...defenses.masking import CHECKS
from ..core.fileio import safe_name
from ..suite.store import WORST_CASE, Store, unit_key
from . import frames
from . import tables as tb
from .curve_report import robust_vs_eps_figures, write_curves_csv
from .plotting import _figure, _save, write_text

__all__ = ["CSS", "SORT_SCRIPT", "page", "html_table", "render_markdown", "render_html",
           "main_csv", "evidence_page", "write_report", "write_screenshots", "header_lines",
           "SCREENSHOTS"]

CSS = """
:root { --line: #d0d4d9; --muted: #5a6270; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       margin: 0 auto; padding: 1em 24px 3em; max-width: 1200px; }
h1 { font-size: 1.6em; margin: 0.4em 0; } h2 { font-size: 1.25em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
a { color: #0b5cad; }
.meta { color: var(--muted); font-size: 0.9em; }
.meta p { margin: 0.15em 0; }
.legend { color: var(--muted); font-size: 0.85em; margin: 0.4em 0 1em; }
.legend p { margin: 0.2em 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.88em; margin: 0.6em 0 0.4em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border-bottom: 1px solid var(--line); padding: 0.35em 0.5em; text-align: left;
         vertical-align: top; overflow-wrap: break-word; }
td.wrap-any { overflow-wrap: anywhere; }
th { background: #f2f4f7; font-weight: 600; overflow-wrap: normal; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #9aa1ab; font-size: 0.8em; }
table.sortable th[aria-sort="ascending"]::after { content: " \\2191"; color: #1d2330; }
table.sortable th[aria-sort="descending"]::after { content: " \\2193"; color: #1d2330; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.num { text-align: right; }
tr.masked td { background: #fde8e8; }
tr.suspicious td { background: #fff6dc; }
tr.error td, tr.other td { background: #f1f1f1; }
tr.fail td { background: #fde8e8; }
tr.skip td { color: var(--muted); }
.verdict-clean { color: #17653a; } .verdict-suspicious { color: #8a5a00; }
.verdict-masked, .verdict-error { color: #a3161a; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em;
           margin: 0.6em 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto;
                                         border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.85em; }
details { margin: 0.8em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f7f9; padding: 0.6em; white-space: pre-wrap; overflow-wrap: anywhere;
      font-size: 0.8em; max-height: 40em; overflow-y: auto; }
code { overflow-wrap: anywhere; }
nav { font-size: 0.9em; margin-bottom: 0.5em; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  nav, table.sortable th::after { display: none; content: none; }
  a { color: inherit; text-decoration: none; }
  tr, figure { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
  pre { max-height: none; overflow: visible; }
  tr.masked td, tr.suspicious td, tr.fail td { -webkit-print-color-adjust: exact;
                                                print-color-adjust: exact; }
}
"""

# Sorts a table.sortable by the clicked column (numbers by data-sort when present, else the
# cell text), toggling ascending and descending; opens every <details> before printing.
SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (t) {
  var heads = t.querySelectorAll('thead th');
  heads.forEach(function (th, i) {
    th.tabIndex = 0;
    function go() {
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      heads.forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      function key(r) {
        var c = r.cells[i], v = c.hasAttribute('data-sort') ? c.getAttribute('data-sort')
                                                             : c.textContent.trim();
        var n = Number(v);
        return (v !== '' && !isNaN(n)) ? n : v.toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), c;
        if (typeof x === 'number' && typeof y === 'number') c = x - y;
        else if (typeof x === 'number') c = -1; else if (typeof y === 'number') c = 1;
        else c = x < y ? -1 : x > y ? 1 : 0;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener('click', go);
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') go(); });
  });
});
window.addEventListener('beforeprint', function () {
  document.querySelectorAll('details').forEach(function (d) { d.open = true; });
});
"""

_E = html.escape


def page(title: str, body: str) -> str:
    """A self-contained HTML page: inline CSS and the inline sorter, no network."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_E(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{SORT_SCRIPT}</script>\n</body></html>\n")




def html_table(table: tb.Table, *, sortable: bool = True, caption: bool = False) -> str:
    """``table`` as an HTML table (sortable by a click on a column header)."""
    if not table.rows:
        return "<p>(none)</p>"
    cls = " class=\"sortable\"" if sortable else ""
    numeric = [i for i, c in enumerate(table.columns)
               if all(r[i].sort is not None and not isinstance(r[i].sort, str) or not r[i].text
                      for r in table.rows) and c not in ("model", "method")]
    num_attr = " class=\"num\""
    head = "".join(f"<th scope=\"col\"{num_attr if i in numeric else ''}>{_E(c)}</th>"
                   for i, c in enumerate(table.columns))
    body = []
    for row, rcls in zip(table.rows, table.classes or [""] * len(table.rows)):
        cells = []
        for i, c in enumerate(row):
            attrs = ""
            if c.sort is not None:
                attrs += f" data-sort=\"{_E(str(c.sort))}\""
            if c.title:
                attrs += f" title=\"{_E(c.title)}\""
            if i in numeric:
                attrs += " class=\"num\""
            text = _E(c.text)
            if c.href and c.text:
                text = f"<a href=\"{_E(c.href)}\">{text}</a>"
            cells.append(f"<td{attrs}>{text}</td>")
        body.append(f"<tr class=\"{_E(rcls)}\">{''.join(cells)}</tr>")
    cap = f"<caption>{_E(table.caption)}</caption>" if caption and table.caption else ""
    return (f"<table id=\"{_E(table.id)}\"{cls}>{cap}<thead><tr>{head}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def _legend(lines: list[str]) -> str:
    if not lines:
        return ""
    return "<div class=\"legend\">" + "".join(f"<p>{_E(x)}</p>" for x in lines) + "</div>"


def _frame_table(df: pd.DataFrame, table_id: str) -> tb.Table:
    t = tb.Table(table_id, [str(c) for c in df.columns])
    for r in df.itertuples(index=False):
        t.rows.append([tb.Cell("" if tb._missing(v) else (f"{v:.4g}" if isinstance(v, float)
                                                          else str(v))) for v in r])
        t.classes.append("")
    return t


# --- header -----------------------------------------------------------------------------------


def header_lines(store: Store, run_id: int) -> list[str]:
    """The run-wide facts, once: suite, run, date, dataset, seed, device, commit, versions
    (and the attack search precision when it is not fp32)."""

    run = store.run(run_id)
    config = run.config if isinstance(run.config, dict) else {}
    lines = frames._header_lines(store, run_id)
    date = datetime.fromtimestamp(run.started, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = f"dataset {config.get('dataset', '?')} ({config.get('split', 'test')}), " \
           f"n={config.get('n', '?')}"
    attacks = config.get("attacks") or {}
    ensemble = attacks.get("preset") or ", ".join(a.get("name", "?") for a in
                                                  attacks.get("attacks", []) or [])
    lines.insert(1, f"started {date}; {data}; attacks: {ensemble or '?'}")
    return lines


_INTRO = ("Robust accuracy: per sample the worst case over every attack that ran on it (the "
          "attack ensemble, the masking diagnosis's own attacks and its follow-up), with its "
          "95% Wilson interval. Only rows whose masking diagnosis finished are ranked; masked "
          "rows are listed apart unless the adaptive attack's re-checks passed. Each model "
          "links to its evidence page: every masking check, the attack cascade, provenance.")


def _threat_title(threat: str) -> str:
    norm, _, eps = str(threat).partition(":")
    return f"{ {'linf': 'Linf', 'l2': 'L2'}.get(norm, norm)}, eps = {eps}" if eps else threat


def _context(store: Store, run_id: int, evidence_dir: str | None):
    df = frames.leaderboard_frame(store, run_id)
    defenses = tb.defense_texts(store, run_id)
    return df, defenses, tb.main_tables(df, defenses=defenses, evidence_dir=evidence_dir)


def main_csv(store: Store, run_id: int, *, evidence_dir: str | None = None) -> str:
    """The main table as CSV (:data:`~unmask.bench.report.tables.MAIN_CSV_COLUMNS`; ``evidence``
    only with ``evidence_dir``)."""

    main = tb.main_frame(frames.leaderboard_frame(store, run_id),
                         defenses=tb.defense_texts(store, run_id), evidence_dir=evidence_dir)
    if evidence_dir is None and "evidence" in main:
        main = main.drop(columns="evidence")
    return main.to_csv(index=False)


def _evidence_of_models(main: list, first_only: bool = True) -> dict[str, str]:
    out: dict[str, str] = {}
    for _, ranked, apart in main:
        for t in (ranked, apart):
            col = t.columns.index("model")
            for row in t.rows:
                if row[col].href and row[col].text not in out:
                    out[row[col].text] = row[col].href
    return out


def render_markdown(store: Store, run_id: int, *, evidence_dir: str | None = None) -> str:
    """The leaderboard as Markdown: the run's facts once, per threat the ranked table and the
    models listed apart, the legends, the explanation and backdoor tables and what did not
    run."""

    df, defenses, main = _context(store, run_id, evidence_dir)
    links = evidence_dir is not None
    text = ["# unmask leaderboard", ""] + [f"- {h}" for h in header_lines(store, run_id)]
    text += ["", _INTRO]
    if not main:
        text += ["", "(no results)"]
    for threat, ranked, apart in main:
        text += ["", f"## {_threat_title(threat)}", "",
                 tb.markdown(ranked, links=links) if ranked.rows else
                 f"No model is ranked at {threat}."]
        if apart.rows:
            text += ["", f"Not ranked at {threat}:", "", tb.markdown(apart, links=links)]
    text += ["", frames.verdict_legend(), "", tb.marker_legend(tb.table_draws(df), tb.certified_legend(df))]
    evidence = _evidence_of_models(main) if links else None
    expl = tb.explanations_frame(store, run_id)
    if len(expl):
        t = tb.explanations_table(expl, evidence=evidence)
        text += ["", "## Explanation metrics", "", "One row per model and attribution method.",
                 "", tb.markdown(t, links=links), ""] + [f"- {x}" for x in t.legend]
    bd = tb.backdoor_frame(store, run_id, defenses=defenses)
    if len(bd):
        text += ["", "## Backdoor results"]
        for t in tb.backdoor_tables(bd, evidence=evidence):
            text += ["", tb.markdown(t, links=links), ""] + [f"- {x}" for x in t.legend]
    missing = frames.sections_frame(store, run_id)
    if len(missing):
        text += ["", "## Not run", "", tb.markdown(_frame_table(missing, "not-run"))]
    return "\n".join(text) + "\n"


def _main_html(main: list) -> str:
    parts = []
    for threat, ranked, apart in main:
        parts.append(f"<h2 id=\"threat-{_E(safe_name(threat))}\">Leaderboard: "
                     f"{_E(_threat_title(threat))}</h2>")
        parts.append(html_table(ranked) if ranked.rows else
                     f"<p>No model is ranked at {_E(threat)}.</p>")
        if apart.rows:
            parts.append(f"<h3>Not ranked at {_E(threat)}</h3>")
            parts.append(html_table(apart))
    return "\n".join(parts) if parts else "<p>(no results)</p>"


def render_html(store: Store, run_id: int, *, evidence_dir: str | None = None) -> str:
    """The main table alone as a self-contained HTML page (``leaderboard.html``)."""

    df, _, main = _context(store, run_id, evidence_dir)
    meta = "".join(f"<p>{_E(h)}</p>" for h in header_lines(store, run_id))
    body = (f"<h1>unmask leaderboard</h1><div class=\"meta\">{meta}</div><p>{_E(_INTRO)}</p>"
            + _main_html(main)
            + _legend([frames.verdict_legend(), tb.marker_legend(tb.table_draws(df), tb.certified_legend(df))]))
    return page("unmask leaderboard", body)


# --- evidence pages ---------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        if len(v) > 40:
            return "[" + ", ".join(_fmt(x) for x in v[:40]) + f", ... ({len(v)} in all)]"
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _facts(items: list[tuple[str, str]]) -> str:
    return "<dl class=\"facts\">" + "".join(f"<dt>{_E(k)}</dt><dd>{v}</dd>" for k, v in items
                                           if v not in (None, "")) + "</dl>"


def _checks_table(checks: list[dict[str, Any]], table_id: str) -> str:
    t = tb.Table(table_id, ["check", "result", "value", "rule", "evidence", "family / kind",
                            "passes", "source"])
    for c in checks:
        skipped = c.get("skipped")
        if skipped:
            result, cls = f"skipped: {skipped}", "skip"
        elif c.get("passed"):
            result, cls = "pass", ""
        else:
            result, cls = f"FAIL → {c.get('severity', '?')}", "fail"
        reg = CHECKS.get(c.get("name"))
        family = f"{reg.family} / {c.get('kind', '')}" if reg is not None else c.get("kind", "")
        cost = c.get("cost") or {}
        passes = "" if not cost else f"{cost.get('forward', 0):,} fwd + " \
                                     f"{cost.get('backward', 0):,} bwd"
        value = c.get("value")
        t.rows.append([tb.Cell(str(c.get("name", "?")),
                               title=reg.cost if reg is not None else None),
                       tb.Cell(result), tb.Cell(_fmt(value), sort=value if isinstance(
                           value, (int, float)) and not isinstance(value, bool) else None),
                       tb.Cell(str(c.get("rule", ""))), tb.Cell(_fmt(c.get("evidence") or {})),
                       tb.Cell(family), tb.Cell(passes), tb.Cell(str(c.get("source", "")))])
        t.classes.append(cls)
    return html_table(t)


def _parse_broken_by(text: str) -> list[tuple[str, int]]:
    out = []
    for part in str(text or "").split(", "):
        label, _, count = part.rpartition(" ")
        if label and count.isdigit():
            out.append((label, int(count)))
    return out


def _who(label: str) -> str:
    if label == "clean":
        return "misclassified without attack"
    if label == "robust":
        return "survived every attack"
    if label.startswith("diagnosis:"):
        return "the masking diagnosis's own attack"
    if label.startswith("follow-up:"):
        return "the follow-up (adaptive) attack"
    return "attack ensemble"


def _cascade(row: dict[str, Any], cells: list[dict[str, Any]], report: dict[str, Any] | None
             ) -> str:
    n = row.get("n")
    parts = []
    t = tb.Table("cascade", ["#", "attack", "attacked", "broken", "robust after", "forwards",
                             "backwards", "seconds"])
    for c in sorted(cells, key=lambda c: c["position"]):
        if c["attack"] == WORST_CASE:
            continue
        t.rows.append([tb.Cell(str(c["position"] + 1), sort=c["position"]),
                       tb.Cell(c["attack"]), tb.Cell(str(c["attacked"]), sort=c["attacked"]),
                       tb.Cell(str(c["broken"]), sort=c["broken"]),
                       tb.Cell(f"{c['robust_accuracy']:.3f}", sort=c["robust_accuracy"]),
                       tb.Cell(f"{c['forwards']:,}", sort=c["forwards"]),
                       tb.Cell(f"{c['backwards']:,}", sort=c["backwards"]),
                       tb.Cell(f"{c['wall_seconds']:.1f}", sort=c["wall_seconds"])])
        t.classes.append("")
    parts.append("<p>The ensemble runs each attack only on the samples still robust "
                 "(AutoAttack's cascade); 'robust after' is the robust accuracy once the "
                 "cascade reached that attack.</p>")
    parts.append(html_table(t, sortable=False))
    follow = (report or {}).get("follow_up")
    if follow:
        fu = tb.Table("follow-up", ["follow-up attack", "samples", "robust before", "robust after",
                                    "broken by"])
        fu.rows.append([tb.Cell(str(follow.get("attack", "?"))), tb.Cell(str(follow.get("n", ""))),
                        tb.Cell(_fmt(follow.get("before"))), tb.Cell(_fmt(follow.get("after"))),
                        tb.Cell(_fmt(follow.get("broken_by") or {}))])
        fu.classes.append("")
        parts.append("<h3>Follow-up after the diagnosis</h3>")
        parts.append(html_table(fu, sortable=False))
    if row.get("follow_up"):
        parts.append(f"<p>{_E(str(row['follow_up']))}.</p>")
    counts = _parse_broken_by(row.get("broken_by", ""))
    if counts and n:
        w = tb.Table("broken-by", ["broken by", "samples", "share", "who"])
        for label, k in counts:
            w.rows.append([tb.Cell(label), tb.Cell(str(k), sort=k),
                           tb.Cell(f"{k / n:.1%}", sort=k / n), tb.Cell(_who(label))])
            w.classes.append("")
        parts.append("<h3>Who broke which samples (worst case per sample)</h3>")
        parts.append(f"<p>Merged over {_E(str(row.get('worst_case_over') or ''))}: "
                     f"<code>{_E(str(row['broken_by']))}</code>.</p>")
        parts.append(html_table(w))
        fshare = sum(k for label, k in counts if label.startswith("follow-up:"))
        dshare = sum(k for label, k in counts if label.startswith("diagnosis:"))
        parts.append(f"<p>The diagnosis's own attacks broke {dshare} of {n} samples "
                     f"({dshare / n:.1%}) and the follow-up {fshare} of {n} ({fshare / n:.1%}) "
                     "that the ensemble had left standing.</p>")
    return "\n".join(parts)


def _metrics_block(frame: pd.DataFrame, model: str, title: str, to_tables) -> str:
    if frame.empty or "model" not in frame:
        return ""
    sub = frame[frame["model"] == model]
    if sub.empty:
        return ""
    return f"<h2>{_E(title)}</h2>" + "".join(html_table(t) + _legend(t.legend)
                                             for t in to_tables(sub.reset_index(drop=True)))


def evidence_page(store: Store, run_id: int, row: dict[str, Any], *,
                  defenses: dict[str, tuple[str, str]], main_row: dict[str, Any],
                  figures: dict[str, str], explanations: pd.DataFrame, backdoor: pd.DataFrame,
                  back: str = "../report.html") -> str:
    """The evidence page of one leaderboard row (``row``: a record of
    :func:`~unmask.bench.report.leaderboard.leaderboard_frame`, ``main_row`` its record of
    :func:`~unmask.bench.report.tables.main_frame`)."""
    run = store.run(run_id)
    model, threat = row["model"], row["threat"]
    norm, eps = row.get("norm"), row.get("eps")
    cells = [c for c in store.rows("cells", run_id)
             if c["model"] == model and c["norm"] == norm and c["eps"] == eps]
    m_row = next((m for m in store.rows("masking", run_id)
                  if m["model"] == model and m["norm"] == norm and m["eps"] == eps), None)
    report = None
    if m_row is not None:
        try:
            report = json.loads(m_row["report"])
        except (TypeError, json.JSONDecodeError):
            report = None
    units = {u["unit"]: u["wall_seconds"] for u in store.rows("units", run_id)}
    verdict, why = tb._verdict_and_reason(row)
    anchor = f"threat-{safe_name(threat)}"
    parts = [f"<nav><a href=\"{_E(back)}#{_E(anchor)}\">← report</a></nav>",
             f"<h1>{_E(model)} at {_E(threat)}</h1>"]
    rank = main_row.get("rank")
    rank_text = (f"{int(rank)}" + (f" {tb.OVERLAP_MARK} (interval overlaps the rank above)"
                                   if main_row.get("overlaps_above") else "")
                 if not tb._missing(rank) else f"not ranked: {row.get('rank_note', '')}")
    robust = ""
    if not tb._missing(row.get("robust_accuracy")):
        robust = (f"{row['robust_accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] "
                  f"(95% Wilson interval over {row.get('worst_case_over', '')})")
    draws = row.get("draws")
    facts = [
        ("defense", _E(defenses.get(model, ("", ""))[1] or defenses.get(model, ("", ""))[0])),
        ("verdict", f"<b class=\"verdict-{_E(verdict.split(' ')[0])}\">{_E(verdict)}</b>"
                    + (f": {_E(why)}" if why else "")),
        ("failing checks", _E(str(row.get("failing_checks") or ""))),
        ("rank", _E(rank_text)),
        ("clean accuracy", _E(tb._num(row.get("clean_accuracy")))),
        ("robust accuracy", _E(robust)),
        ("ensemble alone", _E(tb._num(row.get("ensemble_robust_accuracy")))),
        ("after the follow-up (diagnosis samples)", _E(tb._num(row.get("masking_follow_up")))),
        ("randomised model", _E(f"yes: robust on a majority of {int(draws)} draws; per-draw "
                                f"spread ±{row.get('robust_accuracy_std', 0):.3f}")
         if not tb._missing(draws) else "no" if "stochastic" in row else ""),
    ]
    if "certified" in row and not tb._missing(row.get("certified")):
        facts.append(("certified lower bound", _E(
            f"{row['certified']:.3f}" + (f"; gap to the attack's number {row['gap']:.3f}"
                                         if not tb._missing(row.get("gap")) else "")
            + ("; exact" if not tb._missing(row.get("exact")) and bool(row.get("exact"))
               else ""))))
    if row.get("status", "ok") != "ok":
        facts.append(("error", _E(str(row["status"]))))
    parts.append(_facts(facts))
    # masking checks
    parts.append("<h2>Masking diagnosis</h2>")
    if report is not None:
        parts.append(_facts([
            ("verdict", _E(str(report.get("verdict", "")))),
            ("recommended next attack", _E(str(report.get("recommended_attack") or ""))),
            ("diagnosed on", _E(f"{report.get('n', '')} samples in "
                                f"{report.get('seconds', 0):.1f} s")),
        ]))
        parts.append(_checks_table(report.get("checks", []), "checks"))
        adaptive = report.get("adaptive")
        if adaptive:
            status = ("passed: the row is ranked on the adaptive attack's number"
                      if adaptive.get("passed") else
                      f"not passed{': ' + adaptive['reason'] if adaptive.get('reason') else ''}")
            parts.append(f"<h3>Re-checks against the adaptive attack "
                         f"({_E(str(adaptive.get('attack') or 'none'))})</h3>"
                         f"<p>{_E(status)}; failed: "
                         f"{_E(', '.join(adaptive.get('failed') or []) or 'none')}</p>")
            if adaptive.get("checks"):
                parts.append(_checks_table(adaptive["checks"], "adaptive-checks"))
    elif m_row is None:
        parts.append(f"<p>No diagnosis: {_E(str(row.get('rank_note') or row.get('masking')))}"
                     "</p>")
    else:
        parts.append("<p>The stored diagnosis is not a full report (an older row).</p>")
    # gradient flow
    if report is not None and (report.get("gradient_flow") or report.get("collapse_at")):
        parts.append("<h2>Gradient flow</h2>")
        parts.append(_facts([("summary", _E(str(report.get("gradient_flow") or ""))),
                             ("gradient dies at", _E(str(report.get("collapse_at") or "")))]))
    # attack cascade
    parts.append("<h2>Attack cascade</h2>")
    parts.append(_cascade(row, cells, report) if cells else
                 "<p>No attack ran (see the error above).</p>")
    # figures
    fig = figures.get(model)
    if fig:
        parts.append("<h2>Attributions</h2>")
        parts.append(f"<figure><img src=\"{_E(fig)}\" alt=\"attribution maps of {_E(model)}\">"
                     "<figcaption>First column: clean inputs; then the maps of each method "
                     "(absolute attribution summed over channels).</figcaption></figure>")
    parts.append(_metrics_block(explanations, model, "Explanation metrics",
                                lambda f: [tb.explanations_table(f)]))
    parts.append(_metrics_block(backdoor, model, "Backdoor results", tb.backdoor_tables))
    # provenance
    worst = next((c for c in cells if c["attack"] == WORST_CASE), None)
    attack_s = units.get(unit_key("attack", model, threat),
                         worst["wall_seconds"] if worst is not None else 0.0)
    masking_s = units.get(unit_key("masking", model, threat), 0.0)
    prov = [
        ("run", _E(f"{run_id} of suite {run.suite}{' (quick)' if run.quick else ''}, "
                   f"{run.status}")),
        ("started", _E(datetime.fromtimestamp(run.started, tz=timezone.utc)
                       .strftime("%Y-%m-%d %H:%M:%S UTC"))),
        ("seed", _E(str(run.seed))), ("n", _E(str(row.get("n", "")))),
        ("model source", _E(str(row.get("source") or ""))),
        ("checkpoint sha256 (fingerprint of weights and structure)",
         f"<code>{_E(str(row.get('checkpoint_sha256') or ''))}</code>"),
        ("ensemble passes", _E(f"{int(row['forwards']):,} forward + {int(row['backwards']):,} "
                               "backward") if not tb._missing(row.get("forwards")) else ""),
        ("runtime", _E(f"{row['runtime_s']:.1f} s (attacks {attack_s:.1f} s, diagnosis "
                       f"{masking_s:.1f} s)")
         if not tb._missing(row.get("runtime_s")) else ""),
        ("device", _E(f"{run.device} x {run.world_size}")),
        ("commit", f"<code>{_E(run.git_commit or 'unknown')}</code>"),
        ("versions", _E(", ".join(f"{k} {v}" for k, v in sorted(run.versions.items())))),
    ]
    parts.append("<details id=\"provenance\"><summary>Provenance</summary>" + _facts(prov)
                 + "</details>")
    if m_row is not None:
        parts.append("<details id=\"report-json\"><summary>Stored diagnosis report (JSON)"
                     f"</summary><pre>{_E(tb.details_json(m_row['report']))}</pre></details>")
    return page(f"{model} at {threat}: unmask evidence", "\n".join(p for p in parts if p))


# --- the report -------------------------------------------------------------------------------


def write_report(store: Store, run_id: int, out_dir: Path) -> list[Path]:
    """Write under ``out_dir``: ``leaderboard.{md,csv,html}`` (the main table),
    ``explanations.csv``, ``backdoor.csv``, ``curves.csv`` (when the run has security
    curves), ``figures/*.png``, ``evidence/*.html`` (one page
    per model and threat) and ``report.html``; returns the paths written."""

    out_dir = Path(out_dir)
    evidence_dir = "evidence"
    df = frames.leaderboard_frame(store, run_id)
    defenses = tb.defense_texts(store, run_id)
    main = tb.main_tables(df, defenses=defenses, evidence_dir=evidence_dir)
    main_df = tb.main_frame(df, defenses=defenses, evidence_dir=evidence_dir)
    expl = tb.explanations_frame(store, run_id)
    bd = tb.backdoor_frame(store, run_id, defenses=defenses)
    written = [
        write_text(out_dir / "leaderboard.md",
                   render_markdown(store, run_id, evidence_dir=evidence_dir)),
        write_text(out_dir / "leaderboard.csv", main_df.to_csv(index=False)),
        write_text(out_dir / "leaderboard.html",
                   render_html(store, run_id, evidence_dir=evidence_dir)),
        write_text(out_dir / "explanations.csv", expl.to_csv(index=False)),
        write_text(out_dir / "backdoor.csv", bd.to_csv(index=False)),
    ]
    figures = _plots(store, run_id, df, out_dir / "figures")
    written += [p for p, _ in figures]

    curves_csv = write_curves_csv(store, run_id, out_dir / "curves.csv")
    written += [curves_csv] if curves_csv is not None else []
    model_figs = {}
    for p, caption in figures:
        if caption.startswith("Attribution maps of "):
            model_figs[caption[len("Attribution maps of "):]] = \
                os.path.relpath(p, out_dir / evidence_dir)
    for row, mrow in zip(df.to_dict("records"), main_df.to_dict("records")):
        text = evidence_page(store, run_id, row, defenses=defenses, main_row=mrow,
                             figures=model_figs, explanations=expl, backdoor=bd)
        written.append(write_text(out_dir / mrow["evidence"], text))
    evidence = _evidence_of_models(main)
    parts = ["<h1>unmask report</h1><div class=\"meta\">"]
    parts += [f"<p>{_E(h)}</p>" for h in header_lines(store, run_id)]
    parts.append(f"</div><p>{_E(_INTRO)}</p>")
    parts.append(_main_html(main))
    parts.append(_legend([frames.verdict_legend(), tb.marker_legend(tb.table_draws(df), tb.certified_legend(df))]))
    parts.append("<h2 id=\"explanations-section\">Explanation metrics</h2>")
    if len(expl):
        t = tb.explanations_table(expl, evidence=evidence)
        parts.append("<p>One row per model and attribution method (also "
                     "<code>explanations.csv</code>).</p>" + html_table(t) + _legend(t.legend))
    else:
        parts.append("<p>No explanation metrics in this run.</p>")
    parts.append("<h2 id=\"backdoor-section\">Backdoor results</h2>")
    if len(bd):
        parts.append("<p>Also <code>backdoor.csv</code>.</p>")
        for t in tb.backdoor_tables(bd, evidence=evidence):
            parts.append(html_table(t, caption=True) + _legend(t.legend))
    else:
        parts.append("<p>No backdoored model in this run.</p>")
    missing = frames.sections_frame(store, run_id)
    parts.append("<h2 id=\"not-run-section\">Not run</h2><p>Sections the suite asked for that "
                 "could not run here, with the reason.</p>")
    parts.append(html_table(_frame_table(missing, "not-run")) if len(missing)
                 else "<p>(none)</p>")
    parts.append("<h2 id=\"figures\">Figures</h2>")
    if curves_csv is not None:
        parts.append("<p>The security curves' data (robust accuracy against eps, an upper "
                     "bound per point): <a href=\"curves.csv\">curves.csv</a>.</p>")
    for p, caption in figures:
        rel = os.path.relpath(p, out_dir)
        parts.append(f"<figure><img src=\"{_E(rel)}\" alt=\"{_E(caption)}\">"
                     f"<figcaption>{_E(caption)}</figcaption></figure>")
    written.append(write_text(out_dir / "report.html", page("unmask report", "\n".join(parts))))
    return written


# --- screenshots ------------------------------------------------------------------------------

SCREENSHOTS = ("report_main_table.png", "report_evidence.png")


def _browser(executable: str | None) -> str:
    if executable is not None:
        if not Path(executable).is_file():
            raise ValueError(f"no Chromium at {executable}: give the path of its executable")
        return str(executable)
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise ValueError("no Chromium found: install the Debian package 'chromium' or pass "
                         "the browser's path")
    return found


def write_screenshots(report_dir: Path, out_dir: Path | None = None, *,
                      executable: str | None = None, width: int = 1280) -> list[Path]:
    """Screenshots of a written report at ``width`` pixels: the main table of
    ``report.html`` and the evidence page of its first ranked row (else its first row), as
    ``figures/report_main_table.png`` and ``figures/report_evidence.png`` under
    ``out_dir`` (default: ``report_dir``). Drives the system Chromium through Playwright
    (``pip install playwright``; it never downloads a browser here)."""
    report_dir = Path(report_dir)
    out = Path(out_dir or report_dir) / "figures"
    report = report_dir / "report.html"
    if not report.exists():
        raise ValueError(f"no report at {report}; write it first (unmask report)")
    try:
        # Deferred: optional dependency (dev extra): only the screenshots need it.
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ValueError("screenshots need Playwright's Python package (pip install "
                         "playwright, or the dev extra); it drives the system Chromium and "
                         "downloads nothing") from None
    browser_path = _browser(executable)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            pg = browser.new_page(viewport={"width": width, "height": 900})
            pg.goto(report.resolve().as_uri())
            # the header and the first threat's tables, up to the legend
            box_top = pg.evaluate("document.querySelector('h1').getBoundingClientRect().top")
            end = pg.evaluate("(() => { const l = document.querySelector('div.legend');"
                              " return l ? l.getBoundingClientRect().bottom + window.scrollY"
                              " : 900; })()")
            shot = out / SCREENSHOTS[0]
            pg.screenshot(path=str(shot), full_page=True,
                          clip={"x": 0, "y": max(0, box_top - 10), "width": width,
                                "height": min(max(400, end + 10), 4000)})
            paths.append(shot)
            href = pg.evaluate("(() => { const a = document.querySelector("
                               "'table.sortable tbody tr td a[href^=\"evidence/\"]');"
                               " return a ? a.getAttribute('href') : null; })()")
            if href:
                pg.goto((report_dir / href).resolve().as_uri())
                shot = out / SCREENSHOTS[1]
                # the summary, the masking checks and the attack cascade
                height = pg.evaluate("(() => { const h = document.querySelector("
                                     "'#broken-by + p') || document.querySelector('#broken-by')"
                                     " || document.querySelector('#cascade') || document"
                                     ".querySelector('#checks'); return h ? h."
                                     "getBoundingClientRect().bottom + window.scrollY + 20"
                                     " : 1400; })()")
                pg.screenshot(path=str(shot), full_page=True,
                              clip={"x": 0, "y": 0, "width": width,
                                    "height": min(max(600, height), 4000)})
                paths.append(shot)
        finally:
            browser.close()
    return paths


def _plots(store: Store, run_id: int, df: pd.DataFrame, fig_dir: Path) -> list[tuple[Path, str]]:
    """The report's figures: robust accuracy vs eps, who broke what, attack cost, maps."""
    out: list[tuple[Path, str]] = []
    if "robust_accuracy" in df:
        df = df[df["robust_accuracy"].notna()]  # rows of failed cells have no numbers
    if df.empty:
        return out
    # robust accuracy vs eps, per norm: the security curves (unmask.bench.report.curve_report)

    out += robust_vs_eps_figures(store, run_id, df, fig_dir)
    # who broke what + attack cost, per threat
    cells = store.rows("cells", run_id)
    for threat, group in df.groupby("threat", sort=False):
        models = group["model"].tolist()
        norm, eps = group["norm"].iloc[0], group["eps"].iloc[0]
        per = {m: [c for c in cells if c["model"] == m and c["norm"] == norm
                   and c["eps"] == eps and c["attack"] != WORST_CASE] for m in models}
        attacks = []
        for m in models:
            for c in sorted(per[m], key=lambda c: c["position"]):
                if c["attack"] not in attacks:
                    attacks.append(c["attack"])
        fig = _figure(fig_dir)
        ax = fig.add_subplot(1, 1, 1)
        left = [0.0] * len(models)
        n = group["n"].tolist()
        segments = [("clean", [(nn_ - cc) / nn_ for nn_, cc in
                               zip(n, (group["clean_accuracy"] * group["n"]).round())])]
        for a in attacks:
            segments.append((a, [next((c["broken"] / c["n"] for c in per[m] if c["attack"] == a),
                                      0.0) for m in models]))
        if "ensemble_robust_accuracy" in group:  # what the diagnosis and follow-up added
            segments.append(("diagnosis and follow-up",
                             (group["ensemble_robust_accuracy"] - group["robust_accuracy"])
                             .clip(lower=0).tolist()))
        segments.append(("robust", group["robust_accuracy"].tolist()))
        for label, widths in segments:
            ax.barh(models, widths, left=left, label=label)
            left = [lft + w for lft, w in zip(left, widths)]
        ax.set_xlabel("share of samples")
        ax.set_title(f"Who broke what at {threat} (misclassified clean, broken by each "
                     "attack, robust)")
        ax.legend(fontsize=7, loc="lower right")
        ax.invert_yaxis()
        p = _save(fig, fig_dir / f"broken_by_{safe_name(threat)}.png")
        out.append((p, f"Attack ensemble breakdown at {threat}"))
        fig = _figure(fig_dir)
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / max(1, len(attacks))
        for i, a in enumerate(attacks):
            vals = [next((c["forwards"] + c["backwards"] for c in per[m] if c["attack"] == a), 0)
                    for m in models]
            ax.bar([j + i * width for j in range(len(models))], [max(v, 1) for v in vals],
                   width=width, label=a)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("forward + backward passes")
        ax.set_title(f"Attack cost at {threat}")
        ax.legend(fontsize=7)
        p = _save(fig, fig_dir / f"attack_cost_{safe_name(threat)}.png")
        out.append((p, f"Attack cost (model passes) at {threat}"))
    # explanation maps
    maps = store.rows("explanation_maps", run_id)
    by_model: dict[str, list] = defaultdict(list)
    for m in maps:
        by_model[m["model"]].append(m)
    for model, entries in by_model.items():
        inputs = json.loads(entries[0]["inputs"])
        k = len(inputs)
        if not k:
            continue
        # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1.6 * (1 + len(entries)), 1.6 * k), dpi=100)
        axes = fig.subplots(k, 1 + len(entries), squeeze=False)
        for i in range(k):
            axes[i][0].imshow(inputs[i], cmap="gray", vmin=0, vmax=1)
            for j, e in enumerate(entries):
                axes[i][j + 1].imshow(json.loads(e["maps"])[i], cmap="inferno")
                if i == 0:
                    axes[i][j + 1].set_title(e["method"], fontsize=8)
            if i == 0:
                axes[i][0].set_title("input", fontsize=8)
        for row in axes:
            for ax in row:
                ax.set_axis_off()
        p = _save(fig, fig_dir / f"explain_{safe_name(model)}.png")
        out.append((p, f"Attribution maps of {model}"))
    return out
