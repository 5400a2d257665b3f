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
from unmask.bench.cli import main


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

    monkeypatch.setattr(zoo, "_train", refuse)
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
