"""The ``unmask`` command line: help, listings, training, and errors for unknown names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unmask.bench import zoo
from unmask.bench.cli.main import main
from unmask.bench.zoo import registry as zoo_registry


def _console_script() -> str:
    beside = Path(sys.executable).with_name("unmask")
    found = str(beside) if beside.exists() else shutil.which("unmask")
    if found is None:
        pytest.fail("the `unmask` console script is not installed (pip install -e .)")
    return found


def _run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kwargs)


def test_console_script_help():
    out = _run([_console_script(), "--help"])
    assert out.returncode == 0, out.stderr
    assert "usage: unmask" in out.stdout
    for sub in ("zoo", "data"):
        assert sub in out.stdout


def test_python_dash_m_help(tmp_path):
    # From another directory: the installed package, not the source tree, answers.
    out = _run([sys.executable, "-m", "unmask.bench", "--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage: unmask" in out.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0
    assert capsys.readouterr().out.startswith("unmask ")


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_zoo_list(capsys, digits_mlp):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert _first_column(out) == zoo.list()
    assert "mnist-cnn" in out and "digits-mlp" in out and "name" in out
    assert str(zoo.cache_dir()) in out
    # A trained entry shows its clean accuracy.
    line = next(s for s in out.splitlines() if s.startswith("digits-mlp"))
    assert f"{zoo.card('digits-mlp')['clean_accuracy']:.4f}" in line


def _first_column(out: str) -> list[str]:
    lines = out.split("\n\n")[0].splitlines()[2:]  # after the header and its rule
    return [line.split()[0] for line in lines if line.strip()]


def test_zoo_list_tag(capsys):
    assert main(["zoo", "list", "--tag", "tiny"]) == 0
    names = _first_column(capsys.readouterr().out)
    assert "digits-mlp" in names and "mnist-cnn" not in names
    assert names == zoo.list(tag="tiny")


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist5k", "digits", "cifar10", "imagefolder"):
        assert name in out
    assert "1x28x28" in out


def test_zoo_train(capsys, digits_mlp):
    assert main(["zoo", "train", "digits-mlp", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    card = zoo.card("digits-mlp")
    assert out.startswith("digits-mlp: clean accuracy")
    assert f"{card['clean_accuracy']:.4f}" in out and card["sha256"][:12] in out


def test_zoo_train_in_a_fresh_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path))
    assert main(["zoo", "train", "digits-mlp", "--device", "cpu"]) == 0
    assert "digits-mlp: clean accuracy" in capsys.readouterr().out
    card = json.loads((tmp_path / "models" / "digits-mlp.json").read_text())
    assert card["clean_accuracy"] >= 0.9


def test_zoo_info(capsys, digits_mlp):
    assert main(["zoo", "info", "digits-mlp"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "digits-mlp" and "sha256" in card


@pytest.mark.parametrize("argv", [["zoo", "train", "mnist-cnnn"], ["zoo", "info", "nope"],
                                  ["zoo", "train", "digits-mlp", "nope"]])
def test_unknown_model_exits_2_and_lists_known(capsys, argv, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be trained when a name is unknown")

    monkeypatch.setattr(zoo_registry, "_train", refuse)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("unmask: error: unknown model")
    assert "Known:" in err and "mnist-cnn" in err and "digits-mlp" in err
    assert "Traceback" not in err


def test_unknown_name_suggests_a_close_match(capsys):
    assert main(["zoo", "train", "mnist-cnnn"]) == 2
    assert "Did you mean mnist-cnn" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["zoo", "explode"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_attack_in_bf16_reports_the_fp32_verdict(capsys, tmp_path, digits_mlp):
    import torch

    from unmask.bench import data

    out_json = tmp_path / "a.json"
    assert main(["attack", "digits-mlp", "--attack", "pgd", "--steps", "5", "--eps", "0.1",
                 "--n", "64", "--precision", "bf16", "--device", "cpu",
                 "--json", str(out_json)]) == 0
    summary = json.loads(out_json.read_text())
    assert summary["precision"] == "bf16" and summary["n"] == 64
    assert "robust accuracy" in capsys.readouterr().out
    # The reported number is the fp32 model's on the examples the bf16 search returned: it is
    # between the fp32 PGD result's and clean accuracy, not the bf16 model's own.
    assert 0.0 <= summary["robust_accuracy"] <= summary["clean_accuracy"]
    x, y = data.load("digits", "test", n=64)
    from unmask.attacks import PGD
    from unmask.bench import Threat

    fp32 = PGD(Threat("linf", 0.1), steps=5)(digits_mlp, x, y, generator=torch.Generator().manual_seed(0))
    assert abs(summary["robust_accuracy"] - fp32.robust_accuracy) <= 0.1


def test_perf_reports_rates_efficiency_and_the_settings(capsys, tmp_path, digits_mlp):
    out_json = tmp_path / "perf.json"
    assert main(["perf", "digits-mlp", "--n", "32", "--steps", "3", "--queries", "10",
                 "--repeats", "2", "--precision", "bf16", "--device", "cpu",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "bf16 autocast" in out and "R_fb" in out and "efficiency" in out
    report = json.loads(out_json.read_text())
    assert report["environment"]["precision"] == "bf16"
    assert report["environment"]["compiled"] is False
    assert report["R_fb"] > 0 and report["R_f"] > 0 and report["batch"] == 32
    rows = {r["attack"]: r for r in report["attacks"]}
    assert set(rows) == {"fgsm", "pgd-3", "apgd-ce-3", "square-10"}
    assert rows["square-10"]["kind"] == "forward" and rows["pgd-3"]["kind"] == "gradient"
    for r in rows.values():
        assert r["evals_per_s"] > 0 and r["efficiency"] > 0
        assert 0.0 <= r["robust_accuracy"] <= 1.0
    # Every PGD step is one gradient evaluation per sample still in play.
    assert 0 < rows["pgd-3"]["evaluations"] <= 3 * 32
    # Cost in passes per sample: the clean pass, then at most one forward and one backward
    # per step (and the start) for the samples still in play; Square one forward per query.
    assert "passes/sample" in out
    for r in rows.values():
        assert r["passes_per_sample"] == (r["forwards"] + r["backwards"]) / 32
    assert 1 <= rows["pgd-3"]["passes_per_sample"] <= 1 + 2 * 4
    assert rows["square-10"]["backwards"] == 0 and rows["square-10"]["passes_per_sample"] <= 1 + 10


def test_variants_script_reports_speedups_and_fp32_verdicts(capsys, tmp_path, digits_mlp):
    from unmask.bench.perf import variants

    out_json = tmp_path / "v.json"
    assert variants.main(["--model", "digits-mlp", "--n", "24", "--steps", "3", "--queries", "8",
                          "--repeats", "2", "--json", str(out_json)]) == 0
    assert "channels_last+bf16" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    v = report["variants"]
    assert set(v) == {"fp32", "channels_last", "channels_last+bf16"}
    assert v["fp32"]["R_fb_speedup"] == 1.0 and v["fp32"]["attacks"]["pgd-3"]["speedup"] == 1.0
    for entry in v.values():
        assert len(entry["R_fb_all"]) == 2 and entry["R_f"] > 0
        for a in entry["attacks"].values():
            assert 0.0 <= a["robust_accuracy_fp32_verdict"] <= 1.0 and a["seconds"] > 0
    # channels_last changes no number (an MLP has no 4-d weights; a conv model's agree to
    # float rounding): same seed, same verdicts.
    for label in ("pgd-3", "square-8"):
        assert (v["channels_last"]["attacks"][label]["robust_accuracy_fp32_verdict"]
                == v["fp32"]["attacks"][label]["robust_accuracy_fp32_verdict"])


def test_device_sweep_script_covers_batch_layout_and_precision(capsys, tmp_path):
    import torch

    from unmask.bench.perf import sweep

    out_json = tmp_path / "sweep.json"
    assert sweep.main(["--width", "4", "--batches", "8,12", "--train-epochs", "0", "--steps",
                       "2", "--repeats", "1", "--device", "cpu", "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    rows = report["rows"]
    assert {(r["batch"], r["layout"], r["precision"]) for r in rows} == {
        (b, layout, p) for b in (8, 12) for layout in ("contiguous", "channels_last")
        for p in ("fp32", "bf16")}
    for r in rows:
        assert r["R_fb"] > 0 and r["pgd_seconds"] > 0 and 0.0 <= r["robust_accuracy"] <= 1.0
        assert r["syncs"] is None  # counted on CUDA only
    assert report["device"] == "cpu" and report["arch"] == "preact-resnet18"
    # Batches larger than the test split repeat its samples; 3 x 32 x 32 from 1 x 28 x 28.
    x = sweep.cifar_sized(torch.rand(2, 1, 28, 28))
    assert x.shape == (2, 3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert "channels_last" in capsys.readouterr().out


def test_diagnose_end_to_end_exit_status_says_the_verdict(zoo_cache, tmp_path, capsys,
                                                          monkeypatch):
    """``unmask diagnose`` from the CLI: the table, the JSON (file and stdout), and an exit
    status a user's CI can gate on: 0 clean, 3 suspicious, 4 masked."""
    import json

    from unmask.bench.cli.defenses import EXIT_CODES

    assert EXIT_CODES == {"clean": 0, "suspicious": 3, "masked": 4}
    out = tmp_path / "r.json"
    code = main(["diagnose", "mnist-cnn", "--n", "32", "--fast", "--json", str(out)])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == EXIT_CODES[report["verdict"]] == 0, text
    assert "verdict: clean" in text and "Verdict." not in text
    assert main(["diagnose", "mnist-cnn-quantized", "--n", "32", "--fast", "--json", "-"]) == 4
    doc = json.loads(capsys.readouterr().out)  # only the JSON on stdout
    assert doc["verdict"] == "masked" and "zero gradients" in {
        c["name"] for c in doc["checks"] if not c["passed"]}

    import unmask.defenses as defenses
    from unmask.bench.cli import defenses as cli_defenses

    real = defenses.diagnose

    def suspicious(*a, **k):
        r = real(*a, **k)
        r.verdict = defenses.Verdict.SUSPICIOUS
        return r

    monkeypatch.setattr(cli_defenses, "diagnose", suspicious)
    assert main(["diagnose", "mnist-cnn", "--n", "16", "--fast"]) == 3
    assert "verdict: suspicious" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["diagnose", "mnist-cnn", "--norm", "l7"])
    assert usage.value.code == 2
    monkeypatch.setattr(cli_defenses, "diagnose", real)
    # The registry from the CLI: every registered check listed; a subset run alone.
    from unmask.defenses.masking import CHECKS

    assert main(["diagnose", "--list-checks"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in CHECKS)
    assert main(["diagnose", "mnist-cnn", "--n", "16", "--fast", "--json", "-",
                 "--checks", "randomness,zero gradients"]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)["checks"]] == [
        "randomness", "zero gradients"]
    assert main(["diagnose", "mnist-cnn", "--checks", "no such check"]) == 2
    assert "unknown check" in capsys.readouterr().err
    assert main(["diagnose"]) == 2
