"""Shared helpers of the suite, store and leaderboard tests: tiny suites on digits-mlp."""

from __future__ import annotations

import textwrap
from pathlib import Path

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
