"""Leaderboard, report, regression check and the pytest helper, on tiny digits-mlp runs."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from suite_helpers import WEAK_MODULE, tiny_suite

from unmask.bench import zoo
from unmask.bench.cli.main import main
from unmask.bench.report import frames
from unmask.bench.report import leaderboard as lb
from unmask.bench.report import tables as tb
from unmask.bench.suite.runner import run_suite
from unmask.bench.suite.spec import load_suite
from unmask.bench.suite.store import Store, wilson

EXPLAIN = ('[explain]\nmethods = ["saliency"]\nmetrics = ["deletion_insertion"]\nn = 8\n'
           'maps = 2\n')


# --- reading what the report wrote ------------------------------------------------------------


class _Tables(HTMLParser):
    """Every <table id=...> of a page as {id: (columns, rows)}, a row a list of (text, href);
    every id, href and src of the page; and the page's text."""

    def __init__(self):
        super().__init__()
        self.tables, self.ids, self.links, self.text = {}, set(), [], []
        self._table = self._row = self._cell = None
        self._head = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "table":
            self._table = a.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = ([], [])
        elif tag == "thead":
            self._head = True
        elif tag == "tbody":
            self._head = False
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", None]
        elif tag == "a" and self._cell is not None:
            self._cell[1] = a.get("href")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            cols, rows = self.tables[self._table]
            if self._head:
                cols.extend(t for t, _ in self._row)
            else:
                rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self.lasttag in ("style", "script"):  # the page's CSS and sorter are not its text
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell[0] += data


def _page(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(Path(path).read_text())
    parser.page_text = " ".join(" ".join(parser.text).split())
    return parser


def _text(path: Path) -> str:
    return _page(path).page_text


def _records(page: _Tables, table_id: str) -> list[dict[str, str]]:
    cols, rows = page.tables[table_id]
    return [{c: t for c, (t, _) in zip(cols, r)} for r in rows]


def _md_tables(md: str) -> list[list[dict[str, str]]]:
    """The Markdown tables of ``md`` in order, each a list of {column: cell text} (links
    reduced to their text)."""
    import re

    tables, current, cols = [], None, None
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", c.strip())
                     for c in line.strip("|").split(" | ")]
            cells = [c.strip().strip("|").strip() for c in cells]
            if cols is None:
                cols, current = cells, []
            elif set(line) <= set("|-"):
                continue
            else:
                current.append(dict(zip(cols, cells)))
        elif cols is not None:
            tables.append(current)
            cols, current = None, None
    return tables



@pytest.fixture(scope="module")
def runs(tmp_path_factory, zoo_cache):
    """Run 1: the tiny suite; run 2: the same with a deliberately weakened model under the
    same name."""
    root = tmp_path_factory.mktemp("lb")
    (root / "weakmod.py").write_text(WEAK_MODULE)
    store = root / "r.sqlite"
    good = load_suite(tiny_suite(root / "good.toml", masking=True, extra=EXPLAIN))
    run_suite(good, store=store, progress=False)
    weak = load_suite(tiny_suite(root / "weak.toml",
                                 models='{ name = "weakmod:weak_digits", label = "digits-mlp" }'))
    import sys

    sys.path.insert(0, str(root))
    try:
        run_suite(weak, store=store, progress=False)
    finally:
        sys.path.remove(str(root))
    return root, store


def test_leaderboard_rows_carry_the_evidence(runs):
    _, store = runs
    with Store(store, readonly=True) as st:
        df = lb.leaderboard_frame(st, 1)
    assert list(df["threat"]) == ["linf:0.05", "linf:0.1"]
    for col in ("rank", "clean_accuracy", "after fgsm", "after pgd", "robust_accuracy", "ci_low",
                "ci_high", "masking", "failing_checks", "broken_by", "sal del", "n", "seed",
                "runtime_s", "checkpoint_sha256", "versions"):
        assert col in df.columns, col
    row = df.iloc[0]
    assert row["ci_low"] <= row["robust_accuracy"] <= row["ci_high"]
    assert row["after fgsm"] >= row["after pgd"] >= row["robust_accuracy"]
    assert row["n"] == 48 and row["seed"] == 0
    # the model's fingerprint (weights and structure), not the weights file's hash
    assert row["checkpoint_sha256"] == zoo.fingerprint(zoo.load("digits-mlp", progress=False))
    # the diagnosis ran: a verdict, never "unavailable" or an error standing for one
    assert row["masking"] in ("clean", "suspicious", "masked")
    assert "robust" in row["broken_by"] and "torch" in row["versions"]
    assert isinstance(row["robust_accuracy"], float)
    # the row's number is the worst case over the ensemble and the diagnosis's own attacks,
    # recomputed here from what the store holds
    with Store(store, readonly=True) as st:
        for _, r in df.iterrows():
            m_row = next(m for m in st.rows("masking", 1)
                         if (m["model"], m["norm"], m["eps"]) == ("digits-mlp", r["norm"], r["eps"]))
            report = frames._parse_report(m_row)
            assert report is not None and report.outcomes.n == 24  # [masking] n of 48
            samples = [s for s in st.rows("samples", 1) if s["eps"] == r["eps"]]
            ensemble_broken = {s["sample"] for s in samples if not s["robust"]}
            diagnosis_broken = {i for i, b in enumerate(report.outcomes.broken_by)
                                if b is not None}
            assert r["robust_accuracy"] == (48 - len(ensemble_broken | diagnosis_broken)) / 48
            assert r["robust_accuracy"] <= r["ensemble_robust_accuracy"]
            assert r["worst_case_over"] == "ensemble on 48; diagnosis on the first 24"


def _masking_row(model, verdict, *, report="{}", failing=(), after=None, n=10):
    return {"model": model, "norm": "linf", "eps": 0.1, "verdict": verdict,
            "failing": list(failing), "next_attack": "square", "robust_accuracy_before": None,
            "robust_accuracy_after": after, "n": n, "wall_seconds": 1.0, "report": report}


def test_masked_models_are_marked_and_not_ranked(tmp_path):
    from test_store import _cell, _run

    with Store(tmp_path / "r.sqlite") as st:
        run_id = _run(st, config={"models": [{"name": "a"}, {"name": "b"}, {"name": "c"},
                                             {"name": "d"}]})
        with st.unit(run_id, "u") as tx:
            tx.add_cells([_cell("a", robust=2), _cell("b", robust=8), _cell("c", robust=5),
                          _cell("d", robust=9)])
            tx.add_masking(_masking_row("a", "clean"))
            tx.add_masking(_masking_row("c", "suspicious", failing=["convergence"]))
            tx.add_masking(_masking_row("b", "masked", failing=["black-box beats white-box"],
                                        after=0.1))
        st.set_status(run_id, "interrupted")
        df = lb.leaderboard_frame(st, run_id)
        # d: highest number, but its diagnosis never ran (interrupted): not ranked, says why
        assert list(df["model"]) == ["c", "a", "d", "b"]
        assert list(df["rank"].astype(object).where(df["rank"].notna(), None)) == \
            [1, 2, None, None]
        assert "did not finish (run interrupted)" in df.set_index("model").loc["d", "rank_note"]
        md = lb.render(st, run_id, "md")
        ranked, apart = _md_tables(md)[:2]
        assert [r["model"] for r in ranked] == ["c", "a"]
        assert ranked[0]["verdict"] == "suspicious: convergence"
        # listed apart, unranked, each with its reason
        why = {r["model"]: (r["verdict"], r["not ranked because"]) for r in apart}
        assert why["b"] == ("masked: black-box beats white-box",
                            "masked: the number is not evidence of robustness")
        assert why["d"][0] == "not diagnosed" and "did not finish (run interrupted)" in why["d"][1]
        html = lb.render(st, run_id, "html")
        assert '<tr class="masked">' in html
        assert "search precision" not in md  # fp32: nothing to say
        lb.write_report(st, run_id, tmp_path / "rep")
    # the follow-up, naming its sample count, is on the row's evidence page
    assert "follow-up on 10 samples: 0.100" in _text(tmp_path / "rep/evidence/b-linf_0.1.html")


def test_masking_off_never_ranks_and_says_why(tmp_path):
    from test_store import _cell, _run

    with Store(tmp_path / "r.sqlite") as st:
        run_id = _run(st, config={"models": [{"name": "a"}], "masking": {"enabled": False}})
        with st.unit(run_id, "u") as tx:
            tx.add_cells([_cell("a", robust=9)])
        st.set_status(run_id, "finished")
        df = lb.leaderboard_frame(st, run_id)
        assert df["rank"].isna().all()
        assert "masking is off" in df["rank_note"].iloc[0]
        assert "masking is off" in lb.render(st, run_id, "md")


def test_verdict_legend_says_what_each_verdict_means(tmp_path):
    from test_store import _cell, _run

    from unmask.defenses import VERDICT_MEANING

    assert set(VERDICT_MEANING) == {"clean", "suspicious", "masked"}
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _run(st, config={"models": [{"name": "a"}]})
        with st.unit(run_id, "u") as tx:
            tx.add_cells([_cell("a", robust=2)])
        for fmt in ("md", "html"):
            text = lb.render(st, run_id, fmt)
            legend = [line for line in text.splitlines() if "Verdicts: " in line]
            assert len(legend) == 1, fmt  # one line
            for verdict, meaning in VERDICT_MEANING.items():
                assert f"{verdict}: {meaning}" in legend[0].replace("&#x27;", "'")


def test_a_reduced_precision_search_is_stated_in_the_header(tmp_path):
    from test_store import _cell, _run

    with Store(tmp_path / "r.sqlite") as st:
        run_id = _run(st, config={"models": [{"name": "a"}],
                                  "attacks": {"preset": "standard", "precision": "bf16"}})
        with st.unit(run_id, "u") as tx:
            tx.add_cells([_cell("a", robust=2)])
        for fmt in ("md", "html"):
            assert "attack search precision: bf16" in lb.render(st, run_id, fmt)


def test_formats_and_report(runs, tmp_path):
    _, store = runs
    with Store(store, readonly=True) as st:
        csv = lb.render(st, 1, "csv")
        df = pd.read_csv(pd.io.common.StringIO(csv))
        assert df["robust_accuracy"].dtype.kind == "f"
        assert "\\begin{tabular}" in lb.render(st, 1, "latex")
        with pytest.raises(ValueError, match="md, csv"):
            lb.render(st, 1, "xlsx")
        paths = lb.write_report(st, 1, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.html", "report.html",
            "explanations.csv", "backdoor.csv", "robust_vs_eps_linf.png",
            "explain_digits-mlp.png", "digits-mlp-linf_0.05.html",
            "digits-mlp-linf_0.1.html"} <= names
    html = (tmp_path / "out" / "report.html").read_text()
    for src in __import__("re").findall(r'<img src="([^"]+)"', html):
        assert (tmp_path / "out" / src).stat().st_size > 1000, src
    assert 'id="leaderboard-linf_0.05"' in html and 'id="leaderboard-linf_0.1"' in html
    assert "Masking diagnosis" in (tmp_path / "out/evidence/digits-mlp-linf_0.1.html").read_text()


def test_cli_leaderboard_report_and_runs(runs, tmp_path, capsys):
    _, store = runs
    assert main(["leaderboard", "--store", str(store), "--run", "1"]) == 0
    out = capsys.readouterr().out
    assert "| rank | model |" in out and "digits-mlp" in out
    assert main(["leaderboard", "--store", str(store), "--out", str(tmp_path / "l.csv")]) == 0
    assert (tmp_path / "l.csv").read_text().startswith("rank,overlaps_above,model,threat")
    assert main(["leaderboard", "--store", str(store), "--runs"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["report", "--store", str(store), "--run", "1", "--out-dir",
                 str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").exists()
    assert main(["report", "--store", str(store), "--run", "1", "--out-dir",
                 str(tmp_path / "rep"), "--screenshots", "--browser", "/nonexistent/chromium"]) == 2
    err = capsys.readouterr().err
    assert "no Chromium at /nonexistent/chromium" in err or "Playwright" in err
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 100)
    assert main(["leaderboard", "--store", str(bad)]) == 2
    assert "not an SQLite database" in capsys.readouterr().err


def test_cli_run_with_report_writes_the_report(tmp_path, capsys, zoo_cache):
    suite = tiny_suite(tmp_path / "s.toml")
    out = tmp_path / "rep"
    assert main(["run", str(suite), "--store", str(tmp_path / "r.sqlite"), "--no-progress",
                 "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "finished" in printed and f"wrote {out / 'report.html'}" in printed
    # the summary prints the report's main table: masking off, so nothing is ranked
    assert "not ranked at linf:0.05:" in printed and "ranked at linf:0.1:" not in \
        printed.replace("not ranked at", "") and "masking is off" in printed
    md = (out / "leaderboard.md").read_text()
    # masking off: no row is ranked; each is listed apart with the reason, one per eps
    apart = [r for t in _md_tables(md) for r in t]
    assert [r["model"] for r in apart] == ["digits-mlp"] * 2
    assert all("masking is off" in r["not ranked because"] for r in apart)
    assert md.count("No model is ranked at linf:") == 2


def test_check_passes_against_itself_and_fails_on_a_weakened_model(runs, tmp_path, capsys):
    _, store = runs
    baseline = tmp_path / "baselines" / "default.json"
    assert main(["check", "--store", str(store), "--run", "1", "--baseline", str(baseline)]) == 2
    assert "--write" in capsys.readouterr().err
    assert main(["check", "--store", str(store), "--run", "1", "--baseline", str(baseline),
                 "--write"]) == 0
    doc = json.loads(baseline.read_text())
    assert doc["kind"] == "unmask-baseline" and doc["seed"] == 0 and len(doc["cells"]) == 6
    capsys.readouterr()
    assert main(["check", "--store", str(store), "--run", "1", "--baseline", str(baseline)]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["check", "--store", str(store), "--run", "2", "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "newly broken" in out and "the model changed" in out


def _samples(model, broken_by):
    return [{"model": model, "norm": "linf", "eps": 0.1, "sample": i, "label": 0,
             "clean_correct": int(b != "clean"), "robust": int(b is None), "broken_by": b,
             "margin": 1.0 if b is None else -1.0} for i, b in enumerate(broken_by)]


def _fake_report(verdict, outcomes, *, rankable, follow_up=None):
    from types import SimpleNamespace

    from unmask.bench.core import SampleOutcomes

    return SimpleNamespace(verdict=verdict, outcomes=SampleOutcomes(tuple(outcomes)),
                           rankable=rankable, follow_up=follow_up)


def test_one_robust_number_is_the_worst_case_over_every_attack(tmp_path, monkeypatch):
    """Ensemble on 10 samples; the diagnosis and its follow-up on the first 6 broke three
    samples the ensemble left standing: the row's number counts them, names the follow-up in
    "broken by", states what it was merged over, and the follow-up's own figure names its
    attack and sample count."""
    from test_store import _cell, _run

    ensemble = [None, None, None, None, None, None, None, None, "pgd", "clean"]
    diagnosis = [None, "diagnosis:square", "follow-up:EOT-APGD", "follow-up:EOT-APGD", None,
                 "diagnosis:pgd"]
    follow = {"attack": "EOT-APGD", "before": 0.833, "after": 0.5, "n": 6,
              "broken_by": {"EOT-APGD": 2}}
    reports = {"a": _fake_report("suspicious", diagnosis, rankable=True, follow_up=follow),
               "b": _fake_report("masked", diagnosis, rankable=False, follow_up=follow),
               "c": _fake_report("masked", diagnosis, rankable=True, follow_up=follow)}
    monkeypatch.setattr(frames, "_parse_report",
                        lambda row: None if row is None else reports[row["model"]])
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _run(st, config={"models": [{"name": k} for k in reports]})
        with st.unit(run_id, "u") as tx:
            for k in reports:
                tx.add_cells([_cell(k, robust=8)])
                tx.add_samples(_samples(k, ensemble))
                tx.add_masking(_masking_row(k, reports[k].verdict, report="{...}", n=6,
                                            after=0.5))
        df = lb.leaderboard_frame(st, run_id).set_index("model")
        md = lb.render(st, run_id, "md")
        lb.write_report(st, run_id, tmp_path / "rep")
    for k in reports:
        row = df.loc[k]
        # samples 1, 2, 3 and 5 join the broken ones: 4 of 10 robust, never above the
        # ensemble (0.8) nor above what the diagnosis left on its 6 samples
        assert row["robust_accuracy"] == 0.4 and row["ensemble_robust_accuracy"] == 0.8
        assert (row["ci_low"], row["ci_high"]) == wilson(4, 10)
        assert row["broken_by"] == ("clean 1, pgd 1, diagnosis:square 1, "
                                    "diagnosis:pgd 1, follow-up:EOT-APGD 2, robust 4")
        assert row["worst_case_over"] == ("ensemble on 10; diagnosis and follow-up on the "
                                          "first 6")
    assert "follow-up EOT-APGD on 6 samples: 0.833 -> 0.500" in _text(
        tmp_path / "rep/evidence/a-linf_0.1.html")
    # masked without passing adaptive re-checks: shown with the merged number, not ranked;
    # masked but rankable (the adaptive attack's re-checks passed): ranked, marked adaptive;
    # a and c have the same number, so they share the rank
    assert pd.isna(df.loc["b", "rank"]) and "masked" in df.loc["b", "rank_note"]
    assert df.loc["c", "rank"] == 1 and bool(df.loc["c", "adaptive"])
    assert df.loc["a", "rank"] == 1 and not bool(df.loc["a", "adaptive"])
    ranked, apart = _md_tables(md)[:2]
    verdicts = {r["model"]: r["verdict"] for r in ranked}
    assert verdicts["c"].endswith("adaptive re-checks pass") and "adaptive" not in verdicts["a"]
    assert [(r["model"], r["verdict"]) for r in apart] == [("b", "masked")]
    assert "0.400 [" in md


def test_a_failing_diagnosis_is_an_error_and_never_ranked(tmp_path, monkeypatch, zoo_cache):
    from unmask.bench.suite import runner

    def boom(*args, **kwargs):
        raise RuntimeError("boom in the diagnosis")

    store = tmp_path / "r.sqlite"
    suite = load_suite(tiny_suite(tmp_path / "s.toml", masking=True))
    monkeypatch.setattr(runner, "diagnose", boom)
    summary = run_suite(suite, store=store, progress=False)
    assert summary.status == "finished"  # the attack cells are stored; the run went on
    with Store(store, readonly=True) as st:
        df = lb.leaderboard_frame(st, summary.run_id)
        md = lb.render(st, summary.run_id, "md")
        sections = st.rows("sections", summary.run_id)
    assert len(df) == 2 and df["rank"].isna().all()
    assert (df["masking"] == "error: RuntimeError: boom in the diagnosis").all()
    assert "error: RuntimeError: boom in the diagnosis" in md
    assert "unavailable" not in md
    assert {(s["section"], s["status"]) for s in sections} == {("masking", "error")}
    # an error is not a finished unit: the resumed run diagnoses again and clears it
    monkeypatch.undo()
    resumed = run_suite(store=store, resume=summary.run_id, progress=False)
    assert resumed.units_run == 2 and resumed.units_skipped == 2
    with Store(store, readonly=True) as st:
        df = lb.leaderboard_frame(st, summary.run_id)
        assert st.rows("sections", summary.run_id) == []
    assert set(df["masking"]) <= {"clean", "suspicious", "masked"}


def test_baseline_records_the_rows_one_number(runs):
    """The regression baseline compares the number the leaderboard reports: the worst case
    over the ensemble, the diagnosis and its follow-up, per sample."""
    from unmask.bench.report.check import baseline_from_store

    _, store = runs
    with Store(store, readonly=True) as st:
        df = lb.leaderboard_frame(st, 1)
        base = baseline_from_store(st, 1)
    worst = {(c["norm"], c["eps"]): c for c in base["cells"] if c["attack"] == "worst-case"}
    for row in df.to_dict("records"):
        cell = worst[(row["norm"], row["eps"])]
        assert cell["robust_accuracy"] == pytest.approx(row["robust_accuracy"])
        assert sum(cell["samples"]["robust"]) == cell["robust"]


# --- the tables, the evidence pages and the links (issue 19) ----------------------------------

MAIN_COLUMNS = ["rank", "model", "defense", "clean", "robust [95% CI]", "verdict", "n", "cost"]


def _handmade(st, run_id=None):
    """A run with every kind of row: ranked clean rows with a tie and overlapping intervals,
    a randomised row, a masked row with a follow-up, a failed cell; a backdoored model."""
    from test_store import _run

    run_id = _run(st, config={"models": [{"name": m} for m in "abcdefg"],
                              "attacks": {"preset": "quick", "draws": 32}})
    with st.unit(run_id, "u") as tx:
        cells = []
        for model, robust in (("a", 90), ("b", 90), ("c", 60), ("d", 58), ("e", 30), ("f", 20)):
            cell = _cell100(model, robust)
            if model == "e":
                cell.update(stochastic=1, robust_accuracy_std=0.021)
            cells.append(cell)
            tx.add_masking(_masking_row(model, "masked" if model == "f" else "clean", n=100,
                                        failing=["randomness"] if model == "f" else (),
                                        after=0.1 if model == "f" else None))
        tx.add_cells(cells)
        # every metric evaluate_backdoor stores, one of them not measured (None)
        tx.add_backdoor("a", {"poisoned": 250, "poison_rate": 0.05, "clean_accuracy": 0.97,
                              "reference_accuracy": 0.98, "clean_accuracy_cost": 0.01,
                              "attack_success_rate": 0.99, "spectral_flagged": 300,
                              "spectral_precision": 0.7, "spectral_recall": 0.84,
                              "spectral_auroc": 0.81, "clustering_flagged": 120,
                              "clustering_precision": 0.9, "clustering_recall": 0.43,
                              "clustering_auroc": 0.66, "strip_frr": 0.05, "strip_far": 0.2,
                              "fine_pruning_prune_ratio": None,
                              "fine_pruning_clean_accuracy": 0.95,
                              "fine_pruning_attack_success_rate": 0.12, "target": 0})
        tx.add_explanations([{"model": m, "method": "saliency", "metric": k, "value": v, "n": 8}
                             for m in "ab" for k, v in (("deletion_auc", 0.2),
                                                        ("trigger_lift", 23.698))])
    st.add_section(run_id, "g", "attack", "error", "RuntimeError: boom in the attack",
                   detail="linf:0.1")
    st.set_status(run_id, "finished")
    return run_id


def _cell100(model, robust):
    from test_store import _cell

    cell = _cell(model, robust=robust, n=100)
    cell.update(clean_correct=95, clean_accuracy=0.95, attacked=95, broken=95 - robust,
                forwards=2000, backwards=1000)
    return cell


def test_main_table_ranks_ties_and_marks_overlapping_intervals(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _handmade(st)
        md = lb.render(st, run_id, "md")
        main = pd.read_csv(pd.io.common.StringIO(lb.render(st, run_id, "csv")))
    ranked, apart = _md_tables(md)[:2]
    assert list(ranked[0]) == MAIN_COLUMNS  # no certified column: the run has none
    # a and b are tied (90/100): one rank; c's interval is clear of theirs; d's overlaps c's
    assert [(r["rank"], r["model"]) for r in ranked] == [
        ("1", "a"), ("1", "b"), ("3", "c"), ("4 ≈", "d"), ("5", "e")]
    assert ranked[4]["robust [95% CI]"].endswith("†")  # randomised: the legend says what
    assert "strict majority of 32 fresh draws" in md
    assert ranked[0]["cost"] == "30 passes · 0.1 s"  # (2000 + 1000) / 100 per sample
    # masked and failed rows are listed apart with the reason, never ranked
    why = {r["model"]: r for r in apart}
    assert set(why) == {"f", "g"}
    assert why["f"]["verdict"] == "masked: randomness"
    assert why["g"]["verdict"] == "error" and "boom in the attack" in why["g"][
        "not ranked because"]
    assert list(main["rank"].fillna(0).astype(int)) == [1, 1, 3, 4, 5, 0, 0]
    assert list(main["overlaps_above"]) == [False, False, False, True, False, False, False]
    assert list(main.columns) == [c for c in tb.MAIN_CSV_COLUMNS
                                  if not c.startswith("certified") and c != "evidence"]
    # run-wide facts once in the header, never a column
    assert md.count("seed 0") == 1 and "| seed |" not in md and "| versions |" not in md


def test_each_table_has_its_columns_and_legends(runs, tmp_path):
    _, store = runs
    with Store(store, readonly=True) as st:
        lb.write_report(st, 1, tmp_path / "out")
    out = tmp_path / "out"
    report, board = _page(out / "report.html"), _page(out / "leaderboard.html")
    for threat in ("linf_0.05", "linf_0.1"):
        for page in (report, board):
            cols, rows = page.tables[f"leaderboard-{threat}"]
            assert cols == MAIN_COLUMNS and len(rows) == 1
    md = _md_tables((out / "leaderboard.md").read_text())
    assert [list(t[0]) for t in md[:2]] == [MAIN_COLUMNS, MAIN_COLUMNS]
    csv = pd.read_csv(out / "leaderboard.csv")
    assert list(csv.columns) == [c for c in tb.MAIN_CSV_COLUMNS if not c.startswith("certified")]
    # Markdown, HTML and CSV alike: the same rows with the same values
    for i, threat in enumerate(("linf_0.05", "linf_0.1")):
        html_rows = _records(report, f"leaderboard-{threat}")
        assert html_rows == md[i] == _records(board, f"leaderboard-{threat}")
        row, line = csv.iloc[i], html_rows[0]
        assert (str(row["rank"]), row["model"], f"{row['clean_accuracy']:.3f}") == (
            line["rank"], line["model"], line["clean"])
        assert line["robust [95% CI]"] == (f"{row['robust_accuracy']:.3f} [{row['ci_low']:.3f}, "
                                           f"{row['ci_high']:.3f}]")
    assert report.tables["explanations"][0] == ["model", "method", "deletion AUC ↓",
                                                "insertion AUC ↑", "n"]
    assert list(pd.read_csv(out / "explanations.csv").columns) == [
        "model", "method", "deletion_auc", "insertion_auc", "n"]
    # each metric's direction and range in the legend
    assert "deletion AUC ↓: lower is better; range [0, 1]" in report.page_text
    assert "insertion AUC ↑: higher is better; range [0, 1]" in report.page_text
    assert "backdoor" not in report.tables  # no backdoored model: no empty table
    evidence = _page(out / "evidence/digits-mlp-linf_0.1.html")
    assert evidence.tables["checks"][0] == ["check", "result", "value", "rule", "evidence",
                                            "family / kind", "passes", "source"]
    assert evidence.tables["cascade"][0] == ["#", "attack", "attacked", "broken",
                                             "robust after", "forwards", "backwards", "seconds"]
    # every masking check of the stored report, with its rule
    with Store(store, readonly=True) as st:
        m_row = next(m for m in st.rows("masking", 1) if m["eps"] == 0.1)
    stored = json.loads(m_row["report"])["checks"]
    rows = _records(evidence, "checks")
    assert [r["check"] for r in rows] == [c["name"] for c in stored]
    assert [r["rule"] for r in rows] == [c["rule"] for c in stored]
    for r, c in zip(rows, stored):
        assert r["result"] == ("pass" if c["passed"] else f"FAIL → {c['severity']}") \
            if not c["skipped"] else r["result"] == f"skipped: {c['skipped']}"
        if isinstance(c["value"], float):
            assert r["value"] == f"{c['value']:.4g}"
        for key in c["evidence"]:
            assert f"{key}: " in r["evidence"]
    assert "Provenance" in evidence.page_text and "provenance" in evidence.ids


def test_backdoor_table_and_empty_columns(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _handmade(st)
        lb.write_report(st, run_id, tmp_path / "out")
    out = tmp_path / "out"
    report = _page(out / "report.html")
    cols, rows = report.tables["backdoor"]
    # "backdoor" (the trigger in words; a zoo recipe only) and the fine-pruning ratio are
    # empty here: not shown
    assert cols == ["model", "target", "poison rate ↓", "clean acc. ↑", "reference acc. ↑",
                    "clean-acc. cost ↓", "ASR ↓", "poisoned samples"]
    assert [t for t, _ in rows[0]] == ["a", "0", "0.050", "0.970", "0.980", "0.010", "0.990",
                                       "250"]
    # detection, STRIP and fine-pruning in a table of their own (a run with every defense
    # still fits 1280 px)
    cols, rows = report.tables["backdoor-defenses"]
    assert cols == ["model", "spectral AUROC ↑", "spectral precision ↑", "spectral recall ↑",
                    "clustering AUROC ↑", "clustering precision ↑", "clustering recall ↑",
                    "STRIP FRR ↓", "STRIP FAR ↓", "clean acc. after fine-pruning ↑",
                    "ASR after fine-pruning ↓", "spectral flagged", "clustering flagged"]
    assert [t for t, _ in rows[0]] == ["a", "0.810", "0.700", "0.840", "0.660", "0.900",
                                       "0.430", "0.050", "0.200", "0.950", "0.120", "300",
                                       "120"]
    csv = pd.read_csv(out / "backdoor.csv")
    assert list(csv.columns[:4]) == ["model", "backdoor", "target", "poison_rate"]
    assert csv.loc[0, "fine_pruning_attack_success_rate"] == 0.12
    assert "ASR ↓: lower is better; range [0, 1]" in report.page_text
    assert "trigger lift ↑: higher is better; range [0, 1/trigger area], 1 = chance" in \
        report.page_text


def test_certified_column_only_when_the_run_has_one(tmp_path, monkeypatch):
    real = frames.leaderboard_frame

    def with_bounds(store, run_id):
        df = real(store, run_id)
        df["certified"] = [0.85 if m == "a" else None for m in df["model"]]
        df["gap"] = [0.05 if m == "a" else None for m in df["model"]]
        df["exact"] = [m == "a" for m in df["model"]]
        return df

    monkeypatch.setattr(frames, "leaderboard_frame", with_bounds)
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _handmade(st)
        md = lb.render(st, run_id, "md")
        lb.write_report(st, run_id, tmp_path / "out")
    ranked = _md_tables(md)[0]
    assert list(ranked[0]) == ["rank", "model", "defense", "clean", "robust [95% CI]",
                               "verdict", "certified", "n", "cost"]
    assert ranked[0]["certified"] == "0.850 (exact)" and ranked[1]["certified"] == ""
    assert "gap to the attack's number 0.050" in _text(tmp_path / "out/evidence/a-linf_0.1.html")


def _where(col: str, value, row: dict) -> tuple[str, str, str] | None:
    """Where the old table's column ``col`` is shown now: (place, column, text), or None
    when the old table showed nothing for this value. Places: main (the row of the main or
    the not-ranked table, in a named column), header, evidence (the row's page),
    explanations, backdoor."""
    from unmask.bench.report.frames import _EXPLAIN_COLUMNS
    from unmask.explain import METHODS

    def f3(v):
        return f"{float(v):.3f}"

    unranked = pd.isna(row.get("rank"))
    simple = {
        "rank": ("main", "rank", lambda v: str(int(v))),
        "model": ("main", "model", str),
        "clean_accuracy": ("main", "clean", f3),
        "robust_accuracy": ("main", "robust [95% CI]", f3),
        "ci_low": ("main", "robust [95% CI]", f3), "ci_high": ("main", "robust [95% CI]", f3),
        "n": ("main", "n", lambda v: str(int(v))),
        "runtime_s": ("main", "cost", lambda v: f"{v:.1f} s"),
        "certified": ("main", "certified", f3),
        "exact": ("main", "certified", lambda v: "(exact)" if v else None),
        "adaptive": ("main", "verdict", lambda v: "adaptive" if v else None),
        "rank_note": ("main", "not ranked because", lambda v: v if unranked else None),
        "status": ("main", "not ranked because",
                   lambda v: None if v == "ok" else v.removeprefix("error: ")),
        "masking": ("main", "verdict", lambda v: {"not run": "not diagnosed"}.get(
            v, "error" if v.startswith("error") else v)),
        "seed": ("header", "", lambda v: f"seed {v}"),
        "versions": ("header", "", str),
        "threat": ("evidence", "", lambda v: f"at {v}"),
        "norm": ("evidence", "", str), "eps": ("evidence", "", lambda v: f":{v:g}"),
        "ensemble_robust_accuracy": ("evidence", "", f3),
        "worst_case_over": ("evidence", "", str),
        "robust_accuracy_std": ("evidence", "", lambda v: f"±{v:.3f}"
                                if not pd.isna(row.get("draws")) else None),
        "draws": ("evidence", "", lambda v: f"majority of {int(v)} draws"),
        "failing_checks": ("evidence", "", str),
        "masking_follow_up": ("evidence", "", f3),
        "follow_up": ("evidence", "", str),
        "broken_by": ("evidence", "", str),
        "forwards": ("evidence", "", lambda v: f"{int(v):,} forward"),
        "backwards": ("evidence", "", lambda v: f"{int(v):,} backward"),
        "stochastic": ("evidence", "", lambda v: f"randomised model {'yes' if v else 'no'}"),
        "checkpoint_sha256": ("evidence", "", str),
        "source": ("evidence", "", str),
        "gap": ("evidence", "", f3),
        "backdoor_asr": ("backdoor", "ASR ↓", f3),
    }
    if col.startswith("after "):
        return ("cascade", col[len("after "):], f3(value))
    short_metric = {v: k for k, v in _EXPLAIN_COLUMNS.items()}
    short_method = {m.short: m.name for m in METHODS.values()}
    method, _, metric = col.partition(" ")
    if method in short_method and metric in short_metric:
        return ("explanations", f"{short_method[method]}|{short_metric[metric]}", f3(value))
    if col not in simple:
        raise AssertionError(
            f"leaderboard_frame has a column {col!r} this test does not place: show it in the "
            "main table, its own table or the evidence page, and add it to _where")
    if col == "masking" and row.get("status", "ok") != "ok":  # the cell failed: no verdict
        return (("evidence", "", "No diagnosis") if value == "not run" else
                ("main", "not ranked because", value.removeprefix("error: ")))
    place, column, fmt = simple[col]
    text = fmt(value)
    return None if text is None else (place, column, text)


def _check_reachable(out: Path, df: pd.DataFrame) -> int:
    """Every value of every column of ``df`` is where :func:`_where` says; returns the number
    of values checked."""
    from unmask.bench.report.tables import EXPLAIN_METRICS, evidence_name

    report = _page(out / "report.html")
    header = " ".join(report.page_text.split(" Robust accuracy: ")[:1])
    checked = 0
    for row in df.to_dict("records"):
        model, threat = row["model"], row["threat"]
        t = threat.replace(":", "_")
        main = [r for tid in (f"leaderboard-{t}", f"not-ranked-{t}") if tid in report.tables
                for r in _records(report, tid) if r.get("model") == model]
        assert len(main) == 1, (model, threat)
        evidence = _page(out / "evidence" / evidence_name(model, threat))
        for col, value in row.items():
            if value is None or (not isinstance(value, str) and pd.isna(value)) or value == "":
                continue
            where = _where(col, value, row)
            if where is None:
                continue
            place, column, text = where
            if place == "main":
                assert text in main[0][column], (col, model, text, main[0])
            elif place == "header":
                for part in text.split(", "):
                    assert part in header, (col, part)
            elif place == "evidence":
                assert text in evidence.page_text, (col, model, text)
            elif place == "cascade":
                attack = {r["attack"]: r for r in _records(evidence, "cascade")}
                assert attack[column]["robust after"] == text, (col, model)
            elif place == "explanations":
                method, metric = column.split("|")
                names = {"saliency": "saliency", "integrated_gradients": "Integrated Gradients"}
                rows = [r for r in _records(report, "explanations")
                        if r["model"] == model and r["method"] == names[method]]
                assert rows[0][EXPLAIN_METRICS[metric].header] == text, (col, model)
            elif place == "backdoor":
                rows = [r for r in _records(report, "backdoor") if r["model"] == model]
                assert rows[0][column] == text, (col, model)
            checked += 1
    return checked


def test_every_number_of_the_old_table_is_still_reachable(runs, tmp_path, monkeypatch):
    """Column by column against leaderboard_frame: each value is in the main table, its own
    table or the row's evidence page, on a real suite run (with a backdoor result added) and
    on a hand-made run with a randomised, a masked, a failed row and a certified bound."""
    _, store = runs
    copy = tmp_path / "copy.sqlite"
    shutil.copy(store, copy)
    with Store(copy) as st:
        with st.unit(1, "backdoor/digits-mlp") as tx:
            tx.add_backdoor("digits-mlp", {"attack_success_rate": 0.875, "target": 0})
        lb.write_report(st, 1, tmp_path / "suite")
        df = lb.leaderboard_frame(st, 1)
    assert {"after fgsm", "sal del", "backdoor_asr", "checkpoint_sha256"} <= set(df.columns)
    assert _check_reachable(tmp_path / "suite", df) >= 2 * 25
    real = frames.leaderboard_frame

    def with_bounds(store, run_id):
        out = real(store, run_id)
        out["certified"] = [0.85 if m == "a" else None for m in out["model"]]
        out["gap"] = [0.05 if m == "a" else None for m in out["model"]]
        out["exact"] = [m == "a" for m in out["model"]]
        return out

    monkeypatch.setattr(frames, "leaderboard_frame", with_bounds)
    with Store(tmp_path / "h.sqlite") as st:
        run_id = _handmade(st)
        lb.write_report(st, run_id, tmp_path / "hand")
        df = frames.leaderboard_frame(st, run_id)
    assert {"draws", "robust_accuracy_std", "certified", "masking_follow_up"} <= set(df.columns)
    assert _check_reachable(tmp_path / "hand", df) >= 6 * 20


def _local_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link, target file, fragment) of every href/src of a page or a Markdown file."""
    import re

    text = path.read_text()
    links = (re.findall(r"\]\(([^)]+)\)", text) if path.suffix == ".md"
             else _page(path).links)
    out = []
    for link in links:
        assert not link.startswith(("http:", "https:", "//")), (path, link)  # no network
        file, _, fragment = link.partition("#")
        out.append((link, (path.parent / file).resolve() if file else path, fragment))
    return out


def test_no_dead_links_and_no_network(runs, tmp_path):
    _, store = runs
    with Store(store, readonly=True) as st:
        lb.write_report(st, 1, tmp_path / "out")
    out = tmp_path / "out"
    pages = [out / "report.html", out / "leaderboard.html", out / "leaderboard.md",
             *sorted((out / "evidence").glob("*.html"))]
    assert len(pages) == 5
    evidence_links = set()
    for page in pages:
        if page.suffix == ".html":
            html = page.read_text()
            assert "<script src" not in html and "<link" not in html  # self-contained
        for link, target, fragment in _local_links(page):
            assert target.exists(), (page.name, link)
            if fragment:
                assert fragment in _page(target).ids, (page.name, link)
            if "evidence/" in link:
                evidence_links.add(target.name)
    # the main table links every row to its evidence page
    assert evidence_links == {"digits-mlp-linf_0.05.html", "digits-mlp-linf_0.1.html"}


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not found (Debian package 'chromium'; .ci/run "
                    "installs it)")
    pytest.importorskip("playwright.sync_api",
                        reason="Playwright's Python package drives Chromium (dev extra)")
    return browser


def test_report_in_headless_chromium(runs, tmp_path):
    """In a real browser at 1280 px: every page renders without horizontal scrolling, its
    images load, a click on a column header reorders the rows, every evidence link
    resolves; the screenshots are written."""
    from playwright.sync_api import sync_playwright

    from unmask.bench.report.html import write_screenshots

    browser_path = _chromium()
    _, store = runs
    with Store(store, readonly=True) as st:
        lb.write_report(st, 1, tmp_path / "suite")
    with Store(tmp_path / "h.sqlite") as st:
        run_id = _handmade(st)
        lb.write_report(st, run_id, tmp_path / "hand")
    widths = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for out in (tmp_path / "suite", tmp_path / "hand"):
                for path in [out / "report.html", out / "leaderboard.html",
                             *sorted((out / "evidence").glob("*.html"))]:
                    page.goto(path.as_uri())
                    page.wait_for_load_state("load")
                    assert page.locator("h1").count() == 1, path
                    widths[path] = page.evaluate("document.documentElement.scrollWidth")
                    assert widths[path] <= page.evaluate("window.innerWidth"), (path, widths)
                    assert page.evaluate("[...document.images].every(i => i.complete && "
                                         "i.naturalWidth > 0)"), path
                # every link of the main tables opens a page about that row
                page.goto((out / "report.html").as_uri())
                links = page.eval_on_selector_all(
                    "table.sortable a", "as => as.map(a => [a.textContent, a.href])")
                assert links
                for text, href in links:
                    page.goto(href)
                    assert page.locator("h1").inner_text().startswith(text), href
            # clicking a column header reorders the rows (numbers as numbers)
            page.goto((tmp_path / "hand" / "report.html").as_uri())
            table = "[id='leaderboard-linf_0.1']"

            def column(i):
                return page.eval_on_selector_all(
                    f"{table} tbody tr", f"rs => rs.map(r => r.cells[{i}].textContent)")

            assert column(1) == ["a", "b", "c", "d", "e"]
            page.click(f"{table} th:has-text('robust')")
            assert column(1) == ["e", "d", "c", "a", "b"]  # ascending by robust accuracy
            page.click(f"{table} th:has-text('robust')")
            assert column(1)[:3] == ["a", "b", "c"]
            page.click(f"{table} th:has-text('model')")
            assert column(1) == ["a", "b", "c", "d", "e"]
            page.click(f"{table} th:has-text('model')")
            assert column(1) == ["e", "d", "c", "b", "a"]
            assert page.get_attribute(f"{table} th:has-text('model')",
                                      "aria-sort") == "descending"
            # printable: the print stylesheet applies and opens every details block
            page.emulate_media(media="print")
            page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
            assert page.evaluate("[...document.querySelectorAll('nav')].every(n => "
                                 "getComputedStyle(n).display === 'none')")
        finally:
            browser.close()
    shots = write_screenshots(tmp_path / "suite", executable=browser_path)
    assert [p.name for p in shots] == ["report_main_table.png", "report_evidence.png"]
    for p in shots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    print(f"scroll widths at 1280 px: max {max(widths.values())} over {len(widths)} pages")
