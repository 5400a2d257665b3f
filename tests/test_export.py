"""``unmask export``: RobustBench model_info records and per-sample tables from a tiny run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from suite_helpers import tiny_suite

from unmask.bench.cli.main import main
from unmask.bench.report import export, frames
from unmask.bench.report import leaderboard as lb
from unmask.bench.suite.runner import run_suite
from unmask.bench.suite.spec import load_suite
from unmask.bench.suite.store import Store

# A record as RobustBench keeps it (robustbench/model_info/cifar10/Linf/Wang2023Better_WRN-28-10
# .json, abridged to its field names and JSON types): the export must match it field by field.
ROBUSTBENCH_RECORD = json.loads("""{
  "link": "https://arxiv.org/abs/2302.04638", "name": "Better Diffusion Models",
  "authors": "Z. Wang et al.", "additional_data": false, "number_forward_passes": 1,
  "dataset": "cifar10", "venue": "ICML 2023", "architecture": "WideResNet-28-10",
  "eps": "8/255", "clean_acc": "92.44", "reported": "67.31", "autoattack_acc": "67.31",
  "footnote": "It uses additional 20M synthetic images in training.", "unreliable": false
}""")


@pytest.fixture(scope="module")
def run(tmp_path_factory, zoo_cache):
    root = tmp_path_factory.mktemp("export")
    store = root / "r.sqlite"
    run_suite(load_suite(tiny_suite(root / "t.toml")), store=store, progress=False)
    return root, store


def test_field_table_matches_a_robustbench_record():
    assert {k: type(v) for k, v in ROBUSTBENCH_RECORD.items()} == export.ROBUSTBENCH_FIELDS


def test_robustbench_records_have_robustbench_fields_and_types(run, tmp_path):
    _, store = run
    with Store(store, readonly=True) as st:
        df = lb.leaderboard_frame(st, 1)
        paths = export.export_robustbench(st, 1, tmp_path / "model_info")
    assert len(paths) == len(df) == 2  # one per eps; two eps of one norm get their own files
    assert {p.parent.relative_to(tmp_path / "model_info").as_posix() for p in paths} \
        == {"digits/Linf"}
    for path, row in zip(paths, df.to_dict("records")):
        rec = json.loads(path.read_text())
        for field, typ in export.ROBUSTBENCH_FIELDS.items():
            assert type(rec[field]) is typ, (field, rec[field])
        # Percent strings, as RobustBench writes them, of the leaderboard's own numbers.
        assert float(rec["autoattack_acc"]) == pytest.approx(100 * row["robust_accuracy"],
                                                             abs=0.005)
        assert float(rec["clean_acc"]) == pytest.approx(100 * row["clean_accuracy"], abs=0.005)
        assert rec["unreliable"] is (row["masking"] == "masked")
        assert rec["unmask"]["n"] == row["n"] == 48
        assert rec["unmask"]["ci95"][0] <= rec["unmask"]["robust_accuracy"] \
            <= rec["unmask"]["ci95"][1]
        assert rec["eps"] == f"{row['eps']:g}"


def test_eps_is_written_as_a_fraction_of_255_where_it_is_one():
    assert export._eps_text(8 / 255) == "8/255"
    assert export._eps_text(0.3) == "0.3"


def test_masked_rows_are_unreliable(run, tmp_path, monkeypatch):
    _, store = run
    real = frames.leaderboard_frame

    def masked(st, run_id):
        df = real(st, run_id)
        df["masking"] = "masked"
        return df

    monkeypatch.setattr(frames, "leaderboard_frame", masked)
    with Store(store, readonly=True) as st:
        recs = export.robustbench_records(st, 1)
    assert recs and all(r["unreliable"] is True for r in recs)


def test_samples_export_round_trips_through_pandas(run, tmp_path):
    _, store = run
    out = tmp_path / "s.csv"
    with Store(store, readonly=True) as st:
        export.export_samples(st, 1, out)
        df_lb = lb.leaderboard_frame(st, 1)
    df = pd.read_csv(out)
    assert list(df.columns) == ["model", "norm", "eps", "sample", "label", "clean_correct",
                                "robust", "broken_by", "margin"]
    assert len(df) == 2 * 48
    for row in df_lb.to_dict("records"):
        part = df[df["eps"] == row["eps"]]
        assert part["robust"].mean() == pytest.approx(row["robust_accuracy"])
        assert (part["margin"][part["robust"]] >= 0).all()
        assert part["broken_by"][~part["robust"]].notna().all()
    with pytest.raises(ValueError, match="expected one of csv, parquet"):
        with Store(store, readonly=True) as st:
            export.export_samples(st, 1, tmp_path / "s.xlsx")


def test_cli_export(run, tmp_path, capsys):
    _, store = run
    assert main(["export", "1", "--format", "robustbench", "--out", str(tmp_path / "mi"),
                 "--store", str(store)]) == 0
    assert len(list((tmp_path / "mi").rglob("*.json"))) == 2
    assert main(["export", "--format", "csv", "--out", str(tmp_path / "s.csv"),
                 "--store", str(store)]) == 0
    assert (tmp_path / "s.csv").read_text().startswith("model,norm,eps,sample")
    assert main(["export", "7", "--format", "csv", "--store", str(store)]) == 2
    assert "no run 7" in capsys.readouterr().err
