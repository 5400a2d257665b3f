"""Shared helpers of the suite, store and leaderboard tests: tiny suites on digits-mlp."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from unmask.defenses.masking import CheckResult, MaskingReport

TINY = """
name = "tiny"
dataset = "digits"
n = 48
batch_size = 16
seed = 0
models = [{models}]

[[threats]]
norm = "linf"
eps = [0.05, 0.1]

[attacks]
preset = "quick"

[masking]
enabled = {masking}
fast = true
n = 24
{extra}
"""

WEAK_MODULE = '''
import torch
from unmask.bench import zoo


def weak_digits(std=0.6):
    """digits-mlp with seeded noise on its weights: a deliberately weakened model."""
    model = zoo.load("digits-mlp", device="cpu", progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std * p.std())
    return model
'''


def tiny_suite(path: Path, *, models: str = '"digits-mlp"', masking: bool = False,
               extra: str = "") -> Path:
    path.write_text(textwrap.dedent(TINY.format(models=models, masking=str(masking).lower(),
                                                extra=extra)))
    return path


def cell_table(store, run_id: int) -> list[tuple]:
    """The run's numbers without wall times (what must not depend on sharding or resuming)."""
    cols = ("model", "norm", "eps", "attack", "position", "n", "clean_correct", "robust",
            "clean_accuracy", "robust_accuracy", "ci_low", "ci_high", "attacked", "broken",
            "forwards", "backwards", "checkpoint_sha256")
    return [tuple(r[c] for c in cols) for r in store.rows("cells", run_id)]


def sample_table(store, run_id: int) -> list[tuple]:
    cols = ("model", "norm", "eps", "sample", "label", "clean_correct", "robust", "broken_by",
            "margin")
    return [tuple(r[c] for c in cols) for r in store.rows("samples", run_id)]

# User models that are broken in the ways a suite must survive (issue 18): a builder that
# raises, an output of the wrong shape, NaN logits, NaN logits only off the data's grid (so
# the attacks, not the first pass, meet them), a forward that fails after its first call, and
# a randomised model (digits-mlp behind Gaussian input noise, a fresh seeded instance per call).
BROKEN_MODULE = '''
import torch
from torch import nn
from unmask.bench import zoo


def raises():
    raise RuntimeError("cannot build this model")


class _Wrap(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.model = zoo.load("digits-mlp", device="cpu", progress=False)
        self.how = how
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = self.model(x)
        if self.how == "shape":
            return z[:, :3].unsqueeze(1)
        if self.how == "nan":
            return z * float("nan")
        if self.how == "nan_off_grid":
            off = ((x * 16 - (x * 16).round()).abs() > 1e-4).flatten(1).any(1)
            return torch.where(off[:, None], torch.full_like(z, float("nan")), z)
        if self.how == "fails_later" and self.calls > 1:
            raise RuntimeError("forward failed on call %d" % self.calls)
        return z


def wrong_shape():
    return _Wrap("shape")


def nan_logits():
    return _Wrap("nan")


def nan_off_grid():
    return _Wrap("nan_off_grid")


def fails_later():
    return _Wrap("fails_later")


def good():
    return _Wrap("good")


def quantized(bits=2):
    from unmask.defenses import InputQuantization

    return InputQuantization(zoo.load("digits-mlp", device="cpu", progress=False), bits=bits)


def noisy(std=0.3):
    from unmask.defenses import RandomNoise

    return RandomNoise(zoo.load("digits-mlp", device="cpu", progress=False), std=std, seed=0)
'''


def stored_masking_report(row) -> MaskingReport:
    """A stored ``masking`` row's report, checked for its schema versions (the suite
    tests call this on what their masking runs stored)."""
    report = json.loads(row["report"])
    assert report["schema_version"] == MaskingReport.SCHEMA_VERSION
    assert {c["schema_version"] for c in report["checks"]} == {CheckResult.SCHEMA_VERSION}
    parsed = MaskingReport.from_dict(report)
    assert parsed.verdict.value == row["verdict"] and parsed.n == row["n"]
    assert parsed.outcomes is not None and parsed.outcomes.n == row["n"]
    return parsed
