"""Leaderboard, report, regression check and the pytest helper, on tiny digits-mlp runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from suite_helpers import WEAK_MODULE, tiny_suite

from unmask.bench import leaderboard as lb
from unmask.bench import zoo
from unmask.bench.cli import main
from unmask.bench.runner import run_suite
from unmask.bench.store import Store, wilson
from unmask.bench.suite import load_suite

EXPLAIN = ('[explain]\nmethods = ["saliency"]\nmetrics = ["deletion_insertion"]\nn = 8\n'
           'maps = 2\n')


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
            report = lb._parse_report(m_row)
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
        assert "b (masked, not ranked)" in md and "black-box beats white-box" in md
        assert "d (not ranked)" in md
        assert "follow-up on 10 samples: 0.100" in md  # names its sample count
        html = lb.render(st, run_id, "html")
        assert '<tr class="masked">' in html
        assert "search precision" not in md  # fp32: nothing to say


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
            "robust_vs_eps_linf.png", "explain_digits-mlp.png"} <= names
    html = (tmp_path / "out" / "report.html").read_text()
    for src in __import__("re").findall(r'<img src="([^"]+)"', html):
        assert (tmp_path / "out" / src).stat().st_size > 1000, src
    assert 'id="leaderboard"' in html and "Masking diagnosis" in html


def test_cli_leaderboard_report_and_runs(runs, tmp_path, capsys):
    _, store = runs
    assert main(["leaderboard", "--store", str(store), "--run", "1"]) == 0
    out = capsys.readouterr().out
    assert "| rank | model |" in out and "digits-mlp" in out
    assert main(["leaderboard", "--store", str(store), "--out", str(tmp_path / "l.csv")]) == 0
    assert (tmp_path / "l.csv").read_text().startswith("rank,model,threat")
    assert main(["leaderboard", "--store", str(store), "--runs"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["report", "--store", str(store), "--run", "1", "--out-dir",
                 str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").exists()
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
    assert (out / "leaderboard.md").read_text().count("digits-mlp") == 2  # one row per eps


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


def test_report_renders_in_headless_chromium(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not found (Debian package 'chromium'; .ci/run "
                    "installs it)")
    _, store = runs
    with Store(store, readonly=True) as st:
        lb.write_report(st, 1, tmp_path / "out")
    report = (tmp_path / "out" / "report.html").resolve()
    # The DOM after load: every <img> complete with a natural width, the table rendered.
    probe = tmp_path / "out" / "probe.html"
    probe.write_text(report.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load', () => {"
        "const imgs = [...document.images];"
        "const ok = imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"
        "const rows = document.querySelectorAll('#leaderboard tbody tr').length;"
        "document.title = 'PROBE ' + (ok ? 'images-ok' : 'images-broken') + ' rows=' + rows;"
        "});</script></body>"))
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu",
              "--allow-file-access-from-files"]
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert "PROBE images-ok rows=2" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "out" / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,2000",
                    report.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    Path(tmp_path / "out" / "probe.html").unlink()


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
    monkeypatch.setattr(lb, "_parse_report",
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
    assert "follow-up EOT-APGD on 6 samples: 0.833 -> 0.500" in md
    # masked without passing adaptive re-checks: shown with the merged number, not ranked;
    # masked but rankable (the adaptive attack's re-checks passed): ranked, marked adaptive
    assert pd.isna(df.loc["b", "rank"]) and "masked" in df.loc["b", "rank_note"]
    assert df.loc["c", "rank"] == 2 and bool(df.loc["c", "adaptive"])
    assert df.loc["a", "rank"] == 1 and not bool(df.loc["a", "adaptive"])
    assert "c (adaptive)" in md and "b (masked, not ranked)" in md
    assert "0.400 [" in md


def test_a_failing_diagnosis_is_an_error_and_never_ranked(tmp_path, monkeypatch, zoo_cache):
    from unmask.bench import integrations

    def boom(*args, **kwargs):
        raise RuntimeError("boom in the diagnosis")

    store = tmp_path / "r.sqlite"
    suite = load_suite(tiny_suite(tmp_path / "s.toml", masking=True))
    monkeypatch.setattr(integrations, "diagnose", boom)
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
    from unmask.bench.check import baseline_from_store

    _, store = runs
    with Store(store, readonly=True) as st:
        df = lb.leaderboard_frame(st, 1)
        base = baseline_from_store(st, 1)
    worst = {(c["norm"], c["eps"]): c for c in base["cells"] if c["attack"] == "worst-case"}
    for row in df.to_dict("records"):
        cell = worst[(row["norm"], row["eps"])]
        assert cell["robust_accuracy"] == pytest.approx(row["robust_accuracy"])
        assert sum(cell["samples"]["robust"]) == cell["robust"]
