"""The pytest helper (:func:`unmask.bench.report.testing.assert_robust_accuracy`): the measured value
is compared, masking fails by default, baselines are paired, and the helper, ``unmask attack``
and a suite run give the same number per sample (one evaluation function)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from torch import nn

import unmask.bench.report.testing as testing
from unmask.bench import Threat, data, zoo
from unmask.bench.cli.main import main
from unmask.bench.report import leaderboard as lb
from unmask.bench.report.check import baseline_from_store
from unmask.bench.report.testing import assert_robust_accuracy
from unmask.bench.suite.runner import run_suite
from unmask.bench.suite.spec import load_suite
from unmask.bench.suite.store import Store

README = Path(__file__).resolve().parents[1] / "README.md"


def test_assert_robust_accuracy_compares_the_measured_value(digits_mlp):
    x, y = data.load("digits", "test")
    res = assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.05), "quick",
                                 at_least=0.5, n=48, batch_size=16)
    assert 0.5 <= res.robust_accuracy and res.n == 48 and res.verdict is not None
    with pytest.raises(AssertionError, match="below the required 0.9900"):
        assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.1), "quick",
                               at_least=0.99, n=48, batch_size=16)
    # at_least just above the measured value fails: the interval never excuses a shortfall.
    above = res.robust_accuracy + 0.01
    assert res.ci_high > above  # the old rule (upper end of the interval) would have passed
    with pytest.raises(AssertionError, match=r"(?s)below the required .*95% CI"):
        assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.05), "quick",
                               at_least=above, n=48, batch_size=16)
    as_json = json.loads(json.dumps(res.to_dict()))
    assert as_json["fingerprint"] == zoo.fingerprint(digits_mlp)
    assert len(as_json["outcomes"]) == 48 and as_json["verdict"] == res.verdict


def _readme_example() -> str:
    section = README.read_text().split("### Robustness regression tests", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_fails_an_input_rounding_defense(mnist_cnn, tmp_path, monkeypatch):
    """An input-rounding defense (torch.round on the input) fools the quick attacks: robust
    accuracy equals clean accuracy. The README's test, as written, must fail it (run here with
    n capped at 24 for speed), because the helper diagnoses by default."""
    from unmask.defenses.inference import Quantize

    model = nn.Sequential(Quantize(), mnist_cnn).eval()
    x, y = data.load("mnist5k", "test", n=24)
    unprotected = assert_robust_accuracy(model, (x, y), Threat("linf", 0.1), "quick",
                                         at_least=0.5, n=24, diagnose=False)
    assert unprotected.robust_accuracy == unprotected.clean_accuracy  # the masking artefact
    assert "not protected against masking" in str(unprotected)

    code = _readme_example()
    assert "diagnose=False" not in code and "allow_masked" not in code
    real = testing.assert_robust_accuracy

    def capped(*args, **kwargs):
        kwargs["n"] = min(kwargs.get("n", 500), 24)
        return real(*args, **kwargs)

    monkeypatch.setattr(testing, "assert_robust_accuracy", capped)
    monkeypatch.chdir(tmp_path)  # the example's baseline path is relative
    namespace = {"build_my_model": lambda: model}
    exec(compile(code, str(README), "exec"), namespace)
    test = next(v for k, v in namespace.items() if k.startswith("test_"))
    with pytest.raises(AssertionError, match="calls the model masked"):
        test()
    res = real(model, (x, y), Threat("linf", 0.1), "quick", at_least=0.5, n=24,
               allow_masked=True)
    assert res.verdict == "masked" and "masking verdict masked" in str(res)
    assert "not protected against masking" in str(res)


def test_a_missing_baseline_is_written_and_an_update_rewrites_it(digits_mlp, tmp_path,
                                                                 monkeypatch):
    x, y = data.load("digits", "test", n=48)
    path = tmp_path / "b.json"
    kw = {"attacks": "quick", "at_least": 0.0, "n": 48, "batch_size": 16, "diagnose": False,
          "baseline": path}
    with pytest.raises(AssertionError, match="no baseline at"):
        assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.1), **kw)
    doc = json.loads(path.read_text())
    cell = doc["cells"][0]
    assert doc["source"] == "assert_robust_accuracy" and cell["fingerprint"] == \
        zoo.fingerprint(digits_mlp)
    assert cell["settings"]["attacks"]["eps"] == 0.1 and cell["settings"]["batch_size"] == 16
    assert "torch" in cell["versions"] and len(cell["samples"]["broken_by"]) == 48
    # Another threat is not the baseline's row: missing, and said so.
    with pytest.raises(AssertionError, match="missing from the run"):
        assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.05), **kw)
    monkeypatch.setenv(testing.UPDATE_BASELINES_ENV, "1")
    res = assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.05), **kw)
    assert res.baseline_written == str(path) and res.comparison is None
    assert json.loads(path.read_text())["cells"][0]["eps"] == 0.05
    monkeypatch.delenv(testing.UPDATE_BASELINES_ENV)
    res = assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.05), **kw)
    assert res.comparison.passed
    with pytest.raises(ValueError, match="tolerance"):
        assert_robust_accuracy(digits_mlp, (x, y), Threat("linf", 0.05), **kw, tolerance=5)


SUITE = """
name = "same-number"
dataset = "digits"
n = 48
batch_size = 16
seed = 0
models = ["digits-mlp"]

[[threats]]
norm = "linf"
eps = [0.08, 0.15]

[attacks]
preset = "quick"

[masking]
fast = true
follow_up = false
surrogate = "none"
n = 48
"""


def test_suite_cli_and_helper_give_the_same_number_per_sample(tmp_path, capsys, zoo_cache):
    """One evaluation function: on the same samples, batch size, seed and attacks, a suite
    run, ``unmask attack`` and the pytest helper give the identical robust accuracy and
    per-sample outcomes, and the same model fingerprint."""
    (tmp_path / "s.toml").write_text(SUITE)
    summary = run_suite(load_suite(tmp_path / "s.toml"), store=tmp_path / "r.sqlite",
                        progress=False)
    model = zoo.load("digits-mlp", device="cpu", progress=False)
    with Store(tmp_path / "r.sqlite", readonly=True) as st:
        cells = [c for c in st.rows("cells", summary.run_id) if c["attack"] == "worst-case"]
        samples = st.rows("samples", summary.run_id)
        rows = lb.leaderboard_frame(st, summary.run_id)
        base = baseline_from_store(st, summary.run_id)
    differs = 0
    for cell in cells:
        eps = cell["eps"]
        suite_by = [s["broken_by"] for s in sorted(samples, key=lambda s: s["sample"])
                    if s["eps"] == eps]
        out = tmp_path / f"attack-{eps:g}.json"
        assert main(["attack", "digits-mlp", "--attack", "quick", "--eps", str(eps), "--n",
                     "48", "--batch-size", "16", "--seed", "0", "--device", "cpu", "--json",
                     str(out)]) == 0
        cli = json.loads(out.read_text())
        assert f"model fingerprint {cli['fingerprint'][:12]}" in capsys.readouterr().out
        kw = {"attacks": "quick", "at_least": 0.0, "n": 48, "batch_size": 16, "seed": 0}
        plain = assert_robust_accuracy(model, "digits", Threat("linf", eps), diagnose=False,
                                       **kw)
        assert cli["robust_accuracy"] == cell["robust_accuracy"] == plain.robust_accuracy
        assert cli["samples"]["broken_by"] == suite_by == list(plain.outcomes.broken_by)
        assert cli["fingerprint"] == cell["checkpoint_sha256"] == plain.fingerprint
        # With the diagnosis (the default) the helper's number is the leaderboard row's: the
        # worst case over the ensemble and the diagnosis's attacks, per sample.
        diagnosed = assert_robust_accuracy(model, "digits", Threat("linf", eps), **kw)
        row = rows[rows["eps"] == eps].iloc[0]
        worst = next(c for c in base["cells"] if c["attack"] == "worst-case"
                     and c["eps"] == eps)
        assert diagnosed.ensemble_robust_accuracy == cell["robust_accuracy"]
        assert diagnosed.robust_accuracy == row["robust_accuracy"] == worst["robust_accuracy"]
        assert list(diagnosed.outcomes.broken_by) == worst["samples"]["broken_by"]
        # The comparison has power: another seed changes per-sample outcomes.
        other = assert_robust_accuracy(model, "digits", Threat("linf", eps), diagnose=False,
                                       **{**kw, "seed": 1})
        differs += list(other.outcomes.broken_by) != suite_by
    assert differs >= 1
    capsys.readouterr()
