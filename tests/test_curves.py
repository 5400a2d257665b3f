"""Security curves: the per-sample minimum-eps search finds the analytic minimum eps of a
linear model, equals one full ensemble run per eps at a fraction of the calls, respects the
cascade's bracket; the report caps it per sample by the row (never above the row at a suite
eps); the suite section runs, resumes and is stored additively."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from suite_helpers import tiny_suite
from torch import nn

from unmask.attacks import APGD, Ensemble
from unmask.bench.core import Threat
from unmask.bench.report.curve_report import (
    CSV_COLUMNS,
    curves_frame,
    line_styles,
    write_curves_csv,
)
from unmask.bench.suite.curves import curve_grid, curve_points, curve_selection, min_eps_search
from unmask.bench.suite.spec import SuiteError, load_suite, parse_suite
from unmask.bench.suite.store import WORST_CASE, Store, wilson

GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


class _Sum(nn.Module):
    """Two classes: class 0 iff the pixel sum exceeds 1. Under Linf, a class-0 input with all
    four pixels at v is flipped exactly from eps = v - 0.25 on (and a class-1 input at v from
    eps = 0.25 - v): the minimum eps is known in closed form."""

    def forward(self, x):
        s = x.flatten(1).sum(1) - 1.0
        return torch.stack([s, -s], dim=1)


def _data():
    # class 0 at v: eps* = v - 0.25; class 1 at v: eps* = 0.25 - v; v = 0.2 with label 0 is
    # misclassified clean.
    values = [(0.263, 0), (0.32, 0), (0.37, 0), (0.43, 0), (0.51, 0), (0.58, 0), (0.2, 0),
              (0.12, 1), (0.22, 1)]
    x = torch.stack([torch.full((1, 2, 2), v) for v, _ in values])
    y = torch.tensor([label for _, label in values])
    expected = [0.05, 0.1, 0.15, 0.2, 0.3, None, 0.0, 0.15, 0.05]
    return x, y, expected


def _build(threat):
    return Ensemble([APGD(threat, steps=20)])


def test_grid_keeps_the_suite_eps_and_rejects_nonsense():
    assert curve_grid([0.3], points=3) == (0.1, 0.2, 0.3)
    assert curve_grid([0.1, 0.25], points=2) == (0.1, 0.125, 0.25)
    assert curve_grid([0.3], explicit=[0.2, 0.05]) == (0.05, 0.2, 0.3)
    with pytest.raises(ValueError, match="positive int"):
        curve_grid([0.3], points=0)
    with pytest.raises(ValueError, match="empty"):
        curve_grid([0.0], points=4)


def test_search_finds_the_analytic_minimum_eps_and_equals_one_run_per_eps():
    model = _Sum()
    x, y, expected = _data()
    res = min_eps_search(model, x, y, "linf", GRID, build=_build, seed=0)
    assert res.broken_at == expected
    # One full ensemble run per grid eps (the expensive way) gives the same curve.
    for eps, robust in curve_points(res.broken_at, GRID)[1:]:
        full = _build(Threat("linf", eps))(model, x, y, generator=0)
        assert int(full.robust.sum()) == robust, eps
    assert curve_points(res.broken_at, GRID)[0] == (0.0, 8)  # clean accuracy 8 of 9
    # Bisection: at most ceil(log2(len(GRID) + 1)) = 3 rounds, fewer calls than the 6 runs
    assert res.calls <= 3 * 4 and res.forwards > 0


def test_the_cascade_brackets_the_search():
    model = _Sum()
    x, y, expected = _data()
    n = len(expected)
    # the cascade at 0.15 broke sample 5 (nothing found it on the grid by itself) and left
    # sample 0 robust (its true minimum is 0.05): both are taken as given, not searched.
    broken = {0.15: [i == 5 for i in range(n)]}
    robust = {0.15: [i == 0 for i in range(n)]}
    res = min_eps_search(model, x, y, "linf", GRID, build=_build, broken=broken,
                         robust=robust, clean_correct=[e != 0.0 for e in expected])
    assert res.broken_at[5] == 0.15  # broken by the cascade there: at most 0.15
    assert res.broken_at[0] == 0.2   # robust at 0.15 by the cascade: searched above only
    assert res.broken_at[1:5] == expected[1:5] and res.broken_at[6:] == expected[6:]
    with pytest.raises(ValueError, match="not on the grid"):
        min_eps_search(model, x, y, "linf", GRID, build=_build, broken={0.12: [False] * n})
    with pytest.raises(ValueError, match="ascending positive"):
        min_eps_search(model, x, y, "linf", (0.2, 0.1), build=_build)


def test_selection_of_ranked_models():
    assert curve_selection(("ranked",), "m", {0.3: "clean"}) == (True, "", True)
    assert curve_selection(("ranked",), "m", {0.1: "clean", 0.3: "masked"})[0::2] == (False,
                                                                                     True)
    assert curve_selection(("ranked",), "m", {0.3: None}) == (
        False, "no finished masking diagnosis, so not ranked", False)
    assert curve_selection(("all",), "m", {0.3: "masked"})[0]
    assert curve_selection(("a", "m"), "m", {})[0] and not curve_selection(("a",), "m", {})[0]


def _hand_run(st: Store, robust: list[int], broken_at: list[float | None]) -> int:
    """A run of model m at linf 0.1 with the row's per-sample robustness ``robust`` (all clean
    correct but sample 0) and a stored curve search ``broken_at`` on GRID[:2]."""
    n = len(robust)
    config = {"name": "t", "dataset": "digits", "models": ["m"], "n": n,
              "threats": [{"norm": "linf", "eps": [0.1]}]}
    run_id = st.start_run(suite="t", config=config, config_hash="h", seed=0, quick=False,
                          git_commit=None, versions={}, device="cpu")
    k = sum(robust)
    lo, hi = wilson(k, n)
    with st.unit(run_id, "attack/m/linf:0.1") as tx:
        tx.add_cells([{"model": "m", "norm": "linf", "eps": 0.1, "n": n,
                       "clean_correct": n - 1, "clean_accuracy": (n - 1) / n, "stochastic": 0,
                       "attack": WORST_CASE, "position": 0, "robust": k,
                       "robust_accuracy": k / n, "ci_low": lo, "ci_high": hi, "attacked": n,
                       "broken": n - k, "forwards": 0, "backwards": 0, "wall_seconds": 0.0}])
        tx.add_samples([{"model": "m", "norm": "linf", "eps": 0.1, "sample": i, "label": 0,
                         "clean_correct": int(i != 0), "robust": r,
                         "broken_by": None if r else ("clean" if i == 0 else "apgd-ce"),
                         "margin": 0.0} for i, r in enumerate(robust)])
    with st.unit(run_id, "curve/m/linf") as tx:
        tx.add_curve({"model": "m", "norm": "linf", "grid": [0.05, 0.1], "broken_at": broken_at,
                      "n": n, "attacks": [], "forwards": 0, "backwards": 0,
                      "wall_seconds": 0.0})
    return run_id


def test_report_caps_the_curve_by_the_row_per_sample(tmp_path):
    # the row: samples 0 (clean), 1, 2 broken at 0.1 (5 of 8 robust); the search missed 1 and
    # 2 (6 robust at 0.1 by itself: above the row) and broke 5 at 0.05, which the row missed
    robust = [0, 0, 0, 1, 1, 1, 1, 1]
    broken_at = [0.0, None, None, None, None, 0.05, None, None]
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _hand_run(st, robust, broken_at)
        frame = curves_frame(st, run_id)
        path = write_curves_csv(st, run_id, tmp_path / "curves.csv")
    got = {e: (r, c) for e, r, c in zip(frame["eps"], frame["robust"], frame["capped"])}
    assert got == {0.0: (7, 0), 0.05: (6, 0), 0.1: (4, 2)}
    # never above the row at the suite's eps: the row has 5 robust, the curve 4 (sample 5,
    # broken by the search, is an adversarial example the row's attacks missed)
    assert frame[frame["eps"] == 0.1]["suite_eps"].item()
    assert (frame["bound"] == "upper").all()
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == CSV_COLUMNS and len(lines) == 4
    # the same file from the CLI; a run without curves is an error that says so
    from unmask.bench.cli.main import main

    out = tmp_path / "cli.csv"
    assert main(["export", str(run_id), "--format", "curves", "--out", str(out),
                 "--store", str(tmp_path / "r.sqlite")]) == 0
    assert out.read_text() == path.read_text()
    with Store(tmp_path / "r.sqlite") as st:
        bare = st.start_run(suite="t", config={}, config_hash="h", seed=0, quick=False,
                            git_commit=None, versions={}, device="cpu")
    assert main(["export", str(bare), "--format", "curves", "--out", str(out),
                 "--store", str(tmp_path / "r.sqlite")]) == 2


def test_old_store_without_the_curves_table(tmp_path):
    path = tmp_path / "old.sqlite"
    with Store(path):
        pass
    with sqlite3.connect(path) as conn:  # a store written before the table was added
        conn.execute("DROP TABLE curves")
    with Store(path, readonly=True) as st:
        assert st.rows("curves", 1) == []
    with Store(path) as st:  # a writable open adds it
        assert "curves" in st._tables()


def test_line_styles_are_distinct_for_a_dozen_models_and_more():
    styles = line_styles(40)
    keys = {(s["color"], s["linestyle"], s["marker"]) for s in styles}
    assert len(keys) == 40
    assert len({s["color"] for s in styles[:10]}) == 10


CURVES = ('[curves]\nmodels = ["digits-mlp"]\npoints = 4\n'
          'attacks = [{ name = "apgd", steps = 10 }]\n')


def test_suite_runs_stores_and_resumes_the_curves(tmp_path):
    from unmask.bench.report.leaderboard import leaderboard_frame, write_report
    from unmask.bench.suite.runner import run_suite

    suite = load_suite(tiny_suite(tmp_path / "s.toml", extra=CURVES))
    assert suite.curves.enabled and suite.curves.points == 4
    summary = run_suite(suite, store=tmp_path / "r.sqlite", progress=False)
    assert summary.status == "finished" and not summary.errors
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        (row,) = st.rows("curves", summary.run_id)
        grid = json.loads(row["grid"])
        assert grid == [0.025, 0.05, 0.075, 0.1]
        assert len(json.loads(row["broken_at"])) == 48 and row["forwards"] > 0
        frame = curves_frame(st, summary.run_id)
        board = leaderboard_frame(st, summary.run_id)
        for eps in (0.05, 0.1):  # equal to the row at the suite's eps, or below it
            curve = frame[frame["eps"] == eps]["robust_accuracy"].item()
            assert curve <= board[board["eps"] == eps]["robust_accuracy"].item() + 1e-12
        assert frame["robust"].iloc[-1] < frame["robust"].iloc[0]  # the model breaks
        assert list(frame["robust"]) == sorted(frame["robust"], reverse=True)
        written = write_report(st, summary.run_id, tmp_path / "out")
    assert tmp_path / "out" / "curves.csv" in written
    assert tmp_path / "out" / "figures" / "robust_vs_eps_linf.png" in written
    again = run_suite(resume=summary.run_id, store=tmp_path / "r.sqlite", progress=False)
    assert again.units_run == 0 and again.units_skipped >= 1


def test_ranked_selection_in_the_runner(tmp_path, digits_mlp):
    """``models = "ranked"`` reads the stored masking verdicts: a masked model gets no curve
    (finished: resuming cannot change it), a missing diagnosis no curve yet (not finished),
    a clean one a curve."""
    import dataclasses

    from unmask.bench import data
    from unmask.bench.suite.runner import _Dist, _Loaded, _Runner, run_suite
    from unmask.bench.suite.spec import CurveSpec

    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    first = run_suite(suite, store=tmp_path / "r.sqlite", progress=False)
    ranked = dataclasses.replace(
        suite, curves=CurveSpec(enabled=True, points=2, attacks=({"name": "apgd", "steps": 5},)),
        masking=dataclasses.replace(suite.masking, enabled=True))
    x, y = data.load("digits", "test", n=suite.n)
    spec = suite.models[0]
    loaded = _Loaded(digits_mlp, None, "zoo")
    with Store(tmp_path / "r.sqlite") as st:
        samples = [{k: v for k, v in r.items() if k != "run_id"}
                   for r in st.rows("samples", first.run_id)]
        outcomes = {}
        for verdicts in ({0.05: "clean", 0.1: "masked"}, {0.05: "clean"},
                         {0.05: "clean", 0.1: "suspicious"}):
            run_id = st.start_run(suite="t", config=ranked.to_dict(), config_hash="h", seed=0,
                                  quick=False, git_commit=None, versions={}, device="cpu")
            with st.unit(run_id, "attack") as tx:
                tx.add_samples(samples)
                for eps, verdict in verdicts.items():
                    tx.add_masking({"model": spec.key, "norm": "linf", "eps": eps,
                                    "verdict": verdict, "failing": [], "n": 24,
                                    "wall_seconds": 0.0, "report": "{}"})
            runner = _Runner(ranked, st, run_id, set(), _Dist(torch.device("cpu")),
                             torch.device("cpu"), False)
            runner._curve(spec, loaded, "linf", x, y)
            outcomes[verdicts.get(0.1)] = (len(st.rows("curves", run_id)),
                                           "curve/digits-mlp/linf" in runner.done)
    assert outcomes == {"masked": (0, True), None: (0, False), "suspicious": (1, True)}


def test_curves_section_validation_and_config_hash():
    base = {"name": "t", "dataset": "digits", "models": ["digits-mlp"],
            "threats": [{"norm": "linf", "eps": [0.1]}]}
    plain = parse_suite(base)
    assert "curves" not in plain.to_dict()  # off: earlier runs keep their config hash
    on = parse_suite({**base, "curves": {"points": 3}})
    assert on.curves.enabled and parse_suite(on.to_dict()).to_dict() == on.to_dict()
    for curves, key, words in [
        ({"eps": {"l2": [1.0]}}, "curves.eps.l2", "no 'l2' threat"),
        ({"eps": [0.1, -1]}, "curves.eps.linf[1]", ">= 0"),
        ({"models": ["nope"]}, "curves.models[0]", "not one of the suite's models"),
        ({"models": ["ranked", "digits-mlp"]}, "curves.models", "stand alone"),
        ({"attacks": [{"name": "apgd", "stepz": 3}]}, "curves.attacks[0].stepz", "options"),
        ({"pionts": 3}, "curves.pionts", "did you mean 'points'"),
    ]:
        with pytest.raises(SuiteError) as info:
            parse_suite({**base, "curves": curves})
        assert info.value.key == key and words in str(info.value), (curves, str(info.value))
    with pytest.raises(SuiteError, match="masking diagnosis, which is off"):
        parse_suite({**base, "masking": {"enabled": False}, "curves": {"enabled": True}})
