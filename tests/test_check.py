"""Regression checks (``unmask check``, :mod:`unmask.bench.report.check`): paired per sample, with
the model's fingerprint and the evaluation settings recorded in the baseline.

The scenario of issue 18 is built for real: a small MNIST-like model (digits-mlp) behind a
contrast-squashing preprocessing whose steepness ``k`` decides its robustness; weakening the
preprocessing (k = 8 -> 5) drops robust accuracy by about 8 points on the same 200 samples,
many newly broken and none fixed. ``unmask check`` (in-process CLI) and the pytest helper
must fail it; an unchanged model must pass 20 reruns of 20."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from unmask.bench import Threat, data
from unmask.bench.cli.main import main
from unmask.bench.report.check import (
    BASELINE_SCHEMA,
    TOLERANCE,
    baseline_from_store,
    compare,
    format_result,
    mcnemar,
    newcombe,
    read_baseline,
)
from unmask.bench.report.testing import assert_robust_accuracy
from unmask.bench.suite.store import Store, wilson

REGMOD = '''
import torch
from torch import nn
from unmask.bench import zoo


class Squash(nn.Module):
    """Contrast squashing: a sigmoid of steepness ``k`` rescaled to map [0, 1] onto [0, 1].
    Pixels near 0 and 1 move less under a perturbation the steeper it is."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = float(k)

    def forward(self, x):
        lo = torch.sigmoid(torch.tensor(-self.k / 2))
        hi = torch.sigmoid(torch.tensor(self.k / 2))
        return (torch.sigmoid(self.k * (x - 0.5)) - lo) / (hi - lo)


def squashed(k: float = 8.0) -> nn.Module:
    return nn.Sequential(Squash(k), zoo.load("digits-mlp", device="cpu", progress=False)).eval()
'''

STRONG, WEAK = 8.0, 5.0
N, EPS = 200, 0.1
SUITE = """
name = "scenario"
dataset = "digits"
n = {n}
seed = {seed}
models = [{{ name = "regmod:squashed", label = "net", kwargs = {{ k = {k} }} }}]

[[threats]]
norm = "linf"
eps = [{eps}]

[attacks]
preset = "quick"

[masking]
fast = true
follow_up = false
surrogate = "none"
n = {n}
"""


@pytest.fixture(scope="module")
def regmod(tmp_path_factory, zoo_cache):
    root = tmp_path_factory.mktemp("regmod")
    (root / "regmod.py").write_text(textwrap.dedent(REGMOD))
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("regmod")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("regmod", None)


@pytest.fixture(scope="module")
def scenario(regmod, tmp_path_factory):
    """Runs 1 and 3: the model as released; run 2: its preprocessing weakened (same samples,
    same label, a suite run each, through the CLI); run 4: the released model at another
    seed."""
    root = tmp_path_factory.mktemp("scenario")
    store = root / "r.sqlite"
    for i, (k, seed) in enumerate(((STRONG, 0), (WEAK, 0), (STRONG, 0), (STRONG, 1))):
        suite = root / f"run{i + 1}.toml"
        suite.write_text(SUITE.format(n=N, k=k, eps=EPS, seed=seed))
        assert main(["run", str(suite), "--store", str(store)]) == 0
    return root, store


def _worst(doc):
    return next(c for c in doc["cells"] if c["attack"] == "worst-case")


# --- the scenario of the issue -----------------------------------------------------------------


def test_weakened_preprocessing_fails_unmask_check(scenario, capsys):
    root, store = scenario
    baseline = root / "baselines" / "net.json"
    check = ["check", "--store", str(store), "--baseline", str(baseline)]
    assert main([*check, "--run", "1", "--write"]) == 0
    assert json.loads(baseline.read_text())["schema"] == BASELINE_SCHEMA
    with Store(store, readonly=True) as st:
        before, after = _worst(baseline_from_store(st, 1)), _worst(baseline_from_store(st, 2))
    assert before["samples"]["ids"] == after["samples"]["ids"] == list(range(N))
    r1, r2 = before["samples"]["robust"], after["samples"]["robust"]
    broken = [i for i, a, b in zip(before["samples"]["ids"], r1, r2) if a and not b]
    fixed = [i for i, a, b in zip(before["samples"]["ids"], r1, r2) if b and not a]
    drop = (sum(r1) - sum(r2)) / N
    # The scenario itself: a real drop of about 8 points, many newly broken, none fixed...
    assert 0.05 < drop < 0.12 and len(broken) >= 10 and not fixed
    # ...that comparing the runs as independent samples calls noise.
    assert newcombe(sum(r2), N, sum(r1), N)[2] > 0

    capsys.readouterr()
    assert main([*check, "--run", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "the model changed" in out  # the fingerprint, reported
    # The drop fails on its own, with the model change allowed:
    assert main([*check, "--run", "2", "--allow-changed"]) == 1
    out = capsys.readouterr().out
    assert "significant drop" in out and f"{len(broken)} newly broken, 0 newly robust" in out
    by = dict(zip(after["samples"]["ids"], after["samples"]["broken_by"]))
    assert "newly broken: " + ", ".join(f"{i} ({by[i]})" for i in broken[:5]) in out
    assert "(allowed)" in out


def test_unchanged_model_passes_unmask_check_on_a_rerun(scenario, capsys):
    root, store = scenario
    baseline = root / "rerun.json"
    check = ["check", "--store", str(store), "--baseline", str(baseline)]
    assert main([*check, "--run", "1", "--write"]) == 0
    capsys.readouterr()
    assert main([*check, "--run", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "the model changed" not in out
    assert "0 newly broken, 0 newly robust" in out
    # Another seed is a changed setting: reported, and a failure unless allowed.
    assert main([*check, "--run", "4"]) == 1
    out = capsys.readouterr().out
    assert "settings changed: seed: 0 -> 1" in out and "--allow-changed" in out
    assert main([*check, "--run", "4", "--allow-changed"]) == 0


def _helper(model, *, baseline, seed=0, data_arg=None, diagnose=True, **kw):
    x, y = data.load("digits", "test", n=N)
    return assert_robust_accuracy(model, data_arg if data_arg is not None else (x, y),
                                  Threat("linf", EPS), "quick", at_least=0.5, n=N, seed=seed,
                                  diagnose=diagnose, baseline=baseline, **kw)


def test_weakened_preprocessing_fails_the_pytest_helper(regmod, tmp_path):
    path = tmp_path / "baselines" / "net.json"
    with pytest.raises(AssertionError, match="no baseline at .*commit the file"):
        _helper(regmod.squashed(STRONG), baseline=path)  # the first run writes it
    same = _helper(regmod.squashed(STRONG), baseline=path)
    assert same.comparison.passed and same.verdict == "clean"
    weak = regmod.squashed(WEAK)
    with pytest.raises(AssertionError) as err:
        _helper(weak, baseline=path)
    assert "the model changed" in str(err.value) and "significant drop" in str(err.value)
    # at_least (0.5) holds for the weakened model: only the paired comparison catches it.
    with pytest.raises(AssertionError) as err:
        _helper(weak, baseline=path, allow_changed=True)
    message = str(err.value)
    assert "significant drop" in message and "newly broken: " in message
    assert "below the required" not in message and "0 newly robust" in message


@pytest.mark.filterwarnings("ignore::unmask.bench.zoo.ThreadCountWarning")
def test_an_unchanged_model_passes_20_reruns_of_20(regmod, tmp_path):
    """Reruns at the baseline's seed are deterministic, so what may vary is what the seed does
    not fix: a fresh model instance, the thread count, the data given by name or as tensors in
    another memory layout. Reruns at 20 other seeds (a changed setting, allowed) then show the
    paired test and the tolerance absorb the attacks' own randomness."""
    path = tmp_path / "net.json"
    with pytest.raises(AssertionError, match="no baseline"):
        _helper(regmod.squashed(STRONG), baseline=path, diagnose=False)
    x, y = data.load("digits", "test", n=N)
    threads = torch.get_num_threads()
    passed = 0
    try:
        for i in range(20):
            torch.set_num_threads(1 + i % 2)
            given = "digits" if i % 2 else (x.clone().to(memory_format=torch.channels_last),
                                            y.clone())
            res = _helper(regmod.squashed(STRONG), baseline=path, diagnose=False,
                          data_arg=given)
            passed += res.comparison.passed
    finally:
        torch.set_num_threads(threads)
    assert passed == 20
    for seed in range(1, 21):
        res = _helper(regmod.squashed(STRONG), baseline=path, diagnose=False, seed=seed,
                      allow_changed=True)
        assert res.comparison.passed, format_result(res.comparison)
        settings = next(d for d in res.comparison.differences if d.quantity == "settings")
        assert f"seed: 0 -> {seed}" in settings.note and not settings.failed
        robust = next(d for d in res.comparison.differences if d.quantity == "robust_accuracy")
        assert -robust.difference <= TOLERANCE
    with pytest.raises(AssertionError, match="settings changed: seed: 0 -> 1"):
        _helper(regmod.squashed(STRONG), baseline=path, diagnose=False, seed=1)


# --- the comparison itself ----------------------------------------------------------------------


def test_mcnemar_is_the_exact_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for b in range(0, 25, 3):
        for c in range(0, 25, 4):
            if b + c:
                assert mcnemar(b, c) == pytest.approx(
                    stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9, abs=1e-12)
    assert mcnemar(0, 0) == 1.0
    with pytest.raises(ValueError, match="non-negative int"):
        mcnemar(-1, 3)


def _doc(robust, *, n=200, fingerprint="aaaa", settings=None, versions=None, labels=None,
         schema=BASELINE_SCHEMA, broken_by=None):
    k = sum(robust)
    cell = {"model": "m", "norm": "linf", "eps": 0.1, "attack": "worst-case", "n": n,
            "clean_correct": n, "robust": k, "clean_accuracy": 1.0, "robust_accuracy": k / n,
            "ci_low": 0.0, "ci_high": 1.0,
            "samples": {"ids": list(range(n)), "clean_correct": [1] * n, "robust": robust,
                        "broken_by": broken_by or [None if r else "pgd" for r in robust]}}
    if labels is not None:
        cell["samples"]["labels"] = labels
    if schema >= 3:
        cell.update(fingerprint=fingerprint,
                    settings=settings or {"seed": 0, "attacks": {"steps": 20}},
                    versions=versions or {"torch": "2.0"})
    else:
        cell["checkpoint_sha256"] = fingerprint
    return {"schema": schema, "kind": "unmask-baseline", "cells": [cell], "masking": []}


def test_exact_check_fails_on_one_changed_sample_either_way():
    """CI's rerun of the committed numbers: one sample newly broken, or one newly robust (a
    weaker attack), fails with --exact; the statistical check lets both pass."""
    base = [1] * 120 + [0] * 80
    drop = [0] + base[1:]
    rise = base[:120] + [1] + base[121:]
    for cur in (drop, rise):
        assert compare(_doc(base), _doc(cur)).passed
        res = compare(_doc(base), _doc(cur), exact=True)
        row = next(d for d in res.differences if d.quantity == "robust_accuracy")
        assert not res.passed and row.failed and "exact check" in row.note
    assert compare(_doc(base), _doc(list(base)), exact=True).passed


def test_paired_check_catches_a_real_drop_the_unpaired_rule_let_through():
    """The issue's numbers: the same 200 samples, 0.600 -> 0.520 with 16 newly broken and none
    fixed. Compared as independent samples the drop is within noise; paired (exact McNemar,
    p = 3e-5) it fails and names the samples."""
    base = [1] * 120 + [0] * 80
    cur = [0] * 16 + [1] * 104 + [0] * 80
    assert newcombe(104, 200, 120, 200)[2] > 0  # the old, unpaired rule: "within noise"
    assert mcnemar(16, 0) == pytest.approx(2 * 0.5 ** 16)
    # A tolerance too wide to decide it: the paired test alone must catch it.
    dropped = compare(_doc(base), _doc(cur), tolerance=0.2)
    assert not dropped.passed
    row = next(d for d in dropped.differences if d.quantity == "robust_accuracy")
    assert row.failed and "16 newly broken, 0 newly robust" in row.note
    assert row.newly_broken == list(range(16)) and row.newly_robust == []
    assert row.p_value == pytest.approx(mcnemar(16, 0))
    assert "newly broken: 0 (pgd), 1 (pgd), 2 (pgd)" in row.note
    assert compare(_doc(base), _doc(list(base))).passed
    # Noise: 3 newly broken and 2 newly robust is neither significant nor beyond tolerance;
    # both lists are named.
    noisy = [0, 0, 0] + base[3:120] + [1, 1] + base[122:]
    res = compare(_doc(base), _doc(noisy))
    row = next(d for d in res.differences if d.quantity == "robust_accuracy")
    assert res.passed and row.newly_robust == [120, 121] and "newly robust: 120, 121" in row.note
    # Beyond tolerance without significance: a small n, a big drop (3 of 10, p = 0.25).
    small = compare(_doc([1] * 10, n=10), _doc([0, 0, 0] + [1] * 7, n=10))
    row = next(d for d in small.differences if d.quantity == "robust_accuracy")
    assert not small.passed and row.p_value > 0.05 and "tolerance" in row.note
    assert compare(_doc([1] * 10, n=10), _doc([0, 0, 0] + [1] * 7, n=10), tolerance=0.5).passed
    # A significant rise fails too, unless only drops count.
    assert not compare(_doc(cur), _doc(base)).passed
    assert compare(_doc(cur), _doc(base), only_drops=True).passed
    assert json.loads(json.dumps(dropped.to_dict()))["passed"] is False


def test_check_tolerance_is_statistical_for_unpaired_baselines():
    # 80/100 vs 75/100 is noise; 80/100 vs 50/100 is not; the same gap passes at n=20
    # and fails at n=2000.
    assert newcombe(75, 100, 80, 100)[2] > 0
    assert newcombe(50, 100, 80, 100)[2] < 0
    assert newcombe(15, 20, 16, 20)[2] > 0
    assert newcombe(1500, 2000, 1600, 2000)[2] < 0

    def base(robust, n):
        lo, hi = wilson(robust, n)
        return {"cells": [{"model": "m", "norm": "linf", "eps": 0.1, "attack": "worst-case",
                           "n": n, "clean_correct": n, "robust": robust, "clean_accuracy": 1.0,
                           "robust_accuracy": robust / n, "ci_low": lo, "ci_high": hi}],
                "masking": [{"model": "m", "norm": "linf", "eps": 0.1, "verdict": "clean"}]}

    assert compare(base(80, 100), base(75, 100)).passed
    assert not compare(base(80, 100), base(50, 100)).passed
    assert not compare(base(50, 100), base(80, 100)).passed
    assert compare(base(50, 100), base(80, 100), only_drops=True).passed
    worse = base(80, 100)
    worse["masking"][0]["verdict"] = "masked"
    res = compare(base(80, 100), worse)
    assert not res.passed and res.failures[0].quantity == "masking"
    gone = base(80, 100)
    gone["cells"] = []
    assert compare(base(80, 100), gone).missing


def test_changed_fingerprint_settings_or_samples_fail_unless_allowed():
    robust = [1] * 150 + [0] * 50
    base = _doc(robust)
    for current, quantity, said in (
            (_doc(robust, fingerprint="bbbb"), "fingerprint", "the model changed"),
            (_doc(robust, settings={"seed": 0, "attacks": {"steps": 10}}), "settings",
             "settings changed: attacks.steps: 20 -> 10"),
            (_doc(robust, labels=[1] * 200), "samples", "not the same samples")):
        if quantity == "samples":
            base = _doc(robust, labels=[0] * 200)
        res = compare(base, current)
        assert not res.passed, quantity
        fail = next(d for d in res.failures if d.quantity == quantity)
        assert said in fail.note and "--allow-changed" in fail.note
        allowed = compare(base, current, allow_changed=True)
        assert allowed.passed and any(d.quantity == quantity and "(allowed)" in d.note
                                      for d in allowed.differences)
    # Library versions: a note, never a failure by themselves.
    res = compare(_doc(robust), _doc(robust, versions={"torch": "2.1"}))
    assert res.passed and any('torch: "2.0" -> "2.1"' in n for n in res.notes)


def test_old_baselines_are_read_with_a_clear_message(tmp_path):
    robust = [1] * 150 + [0] * 50
    # Schema 2: paired, but its hash covered the weights only: not compared, and said so.
    old = _doc(robust, schema=2, fingerprint="weights-only")
    res = compare(old, _doc(robust, fingerprint="structural"))
    assert res.passed and any("schema 2" in n and "rewrite it with --write" in n
                              for n in res.notes)
    dropped = compare(old, _doc([0] * 20 + robust[20:]))
    assert not dropped.passed and dropped.failures[0].newly_broken == list(range(20))
    # Schema 1: no per-sample outcomes: compared unpaired, with a note.
    one = _doc(robust, schema=1)
    del one["cells"][0]["samples"], one["schema"]
    res = compare(one, _doc(robust))
    assert res.passed and any("compared unpaired" in n for n in res.notes)
    # The committed baseline of the default suite is read (whatever its schema).
    committed = Path(__file__).resolve().parents[1] / "results" / "baselines" / "default.json"
    doc = read_baseline(committed)
    assert compare(doc, doc).passed
    # Errors name what is wrong.
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**_doc(robust), "schema": BASELINE_SCHEMA + 1}))
    with pytest.raises(ValueError, match="newer than this unmask reads"):
        read_baseline(newer)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cells": []}))
    with pytest.raises(ValueError, match="not an unmask baseline"):
        read_baseline(other)
    with pytest.raises(ValueError, match="tolerance must be a share"):
        compare(_doc(robust), _doc(robust), tolerance=5)
