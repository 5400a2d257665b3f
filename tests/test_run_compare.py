"""``unmask compare RUN_A RUN_B``: a planted difference gives the expected counts, exact
McNemar p-value and verdict; identical runs give p = 1; other samples fall back to an
unpaired, labelled interval."""

from __future__ import annotations

import json
import math

import pytest

from unmask.bench.cli.main import main
from unmask.bench.report.run_compare import DROP, NO_CHANGE, RISE, compare_runs
from unmask.bench.suite.store import WORST_CASE, Store, wilson


def _run(store: Store, robust: list[int], *, labels: list[int] | None = None,
         model: str = "m", fingerprint: str = "f" * 64) -> int:
    """A finished run with one model at linf:0.1 whose per-sample robustness is ``robust``
    (every sample classified correctly clean; broken ones by "pgd")."""
    n = len(robust)
    labels = labels if labels is not None else [i % 10 for i in range(n)]
    config = {"name": "t", "dataset": "digits", "models": [model], "n": n,
              "threats": [{"norm": "linf", "eps": [0.1]}], "masking": {"enabled": False}}
    run_id = store.start_run(suite="t", config=config, config_hash="h", seed=0, quick=False,
                             git_commit=None, versions={"torch": "x"}, device="cpu")
    k = sum(robust)
    lo, hi = wilson(k, n)
    cell = {"model": model, "norm": "linf", "eps": 0.1, "n": n, "clean_correct": n,
            "clean_accuracy": 1.0, "stochastic": 0, "checkpoint_sha256": fingerprint,
            "model_source": "zoo", "attack": WORST_CASE, "position": 1, "robust": k,
            "robust_accuracy": k / n, "ci_low": lo, "ci_high": hi, "robust_accuracy_std": 0.0,
            "attacked": n, "broken": n - k, "forwards": 0, "backwards": 0, "wall_seconds": 0.0}
    samples = [{"model": model, "norm": "linf", "eps": 0.1, "sample": i, "label": labels[i],
                "clean_correct": 1, "robust": r, "broken_by": None if r else "pgd",
                "margin": 1.0 if r else -1.0} for i, r in enumerate(robust)]
    with store.unit(run_id, "attack/m/linf:0.1") as tx:
        tx.add_cells([cell])
        tx.add_samples(samples)
    store.set_status(run_id, "finished")
    return run_id


@pytest.fixture
def planted(tmp_path):
    """Run A: samples 0-29 of 40 robust. Run B: 0-9 broken (10 newly broken), 35 robust (1
    newly robust)."""
    path = tmp_path / "r.sqlite"
    a = [int(i < 30) for i in range(40)]
    b = [int(10 <= i < 30 or i == 35) for i in range(40)]
    with Store(path) as st:
        run_a, run_b = _run(st, a), _run(st, b)
        run_same = _run(st, a)
    return path, run_a, run_b, run_same


def test_planted_drop_gives_the_exact_mcnemar_p_and_counts(planted):
    path, run_a, run_b, _ = planted
    with Store(path, readonly=True) as st:
        result = compare_runs(st, run_a, st, run_b)
    (row,) = result.rows
    assert row.paired and row.test.startswith("paired McNemar")
    assert (row.newly_broken, row.newly_robust) == (10, 1)
    assert row.newly_broken_ids == list(range(10)) and row.newly_robust_ids == [35]
    # Exact two-sided binomial test of 1 success in 11 trials at 1/2: 2 * (1 + 11) / 2^11.
    assert row.p_value == pytest.approx(2 * (1 + 11) / 2 ** 11, rel=1e-12)
    assert row.difference == pytest.approx((21 - 30) / 40)
    assert (row.robust_a, row.robust_b) == (30 / 40, 21 / 40)
    assert row.verdict == DROP
    # reversed: the same test, a rise
    with Store(path, readonly=True) as st:
        back = compare_runs(st, run_b, st, run_a).rows[0]
    assert (back.newly_broken, back.newly_robust, back.verdict) == (1, 10, RISE)
    assert back.p_value == pytest.approx(row.p_value)
    # a stricter alpha than the p-value: no significant change
    with Store(path, readonly=True) as st:
        strict = compare_runs(st, run_a, st, run_b, alpha=0.01).rows[0]
    assert strict.verdict == NO_CHANGE


def test_identical_runs_give_p_one(planted):
    path, run_a, _, run_same = planted
    with Store(path, readonly=True) as st:
        (row,) = compare_runs(st, run_a, st, run_same).rows
    assert row.p_value == 1.0 and row.difference == 0.0
    assert (row.newly_broken, row.newly_robust, row.verdict) == (0, 0, NO_CHANGE)


def test_other_samples_fall_back_to_a_labelled_unpaired_interval(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as st:
        run_a = _run(st, [int(i < 30) for i in range(40)])
        run_b = _run(st, [int(i < 5) for i in range(60)])  # another n: cannot pair
    with Store(path, readonly=True) as st:
        (row,) = compare_runs(st, run_a, st, run_b).rows
    assert not row.paired and row.p_value is None and row.newly_broken is None
    assert row.test == "unpaired 95% Newcombe interval"
    assert any("not the same samples" in n for n in row.notes)
    assert row.high < 0 and row.verdict == DROP  # 75% -> 8%: beyond any interval
    assert row.difference == pytest.approx(5 / 60 - 30 / 40)
    assert row.low < row.difference < row.high


def test_cli_compare_table_json_and_fail_on_drop(planted, capsys):
    path, run_a, run_b, run_same = planted
    assert main(["compare", str(run_a), str(run_b), "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "significant drop" in out and "p = 0.0117" in out and "-22.5 pts" in out
    assert main(["compare", str(run_a), str(run_b), "--store", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (row,) = doc["rows"]
    assert (row["newly_broken"], row["newly_robust"], row["verdict"]) == (10, 1, DROP)
    assert math.isclose(row["p_value"], 24 / 2048)
    assert main(["compare", str(run_a), str(run_b), "--store", str(path),
                 "--fail-on-drop"]) == 1
    assert main(["compare", str(run_a), str(run_same), "--store", str(path),
                 "--fail-on-drop"]) == 0
    capsys.readouterr()
    assert main(["compare", str(run_a), "99", "--store", str(path)]) == 2
    assert "no run 99" in capsys.readouterr().err
