"""pytest-benchmark benchmarks of the attacks and attributions on mnist-cnn.

Disabled by default (each body runs once as a smoke test). To measure and keep the JSON:

    pytest tests/test_benchmarks.py --benchmark-enable --benchmark-json results/benchmarks.json

``test_reference_forward_backward`` times the model's raw forward+backward on the same batch,
so every attack's throughput can be read as a ratio to it (``unmask perf`` does that directly).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unmask.attacks import APGD, EOT, FGSM, PGD, GaussianNoise, Square
from unmask.bench import Threat

BATCH = 64
THREAT = Threat("linf", 0.1)


@pytest.fixture(scope="module")
def batch(mnist_test):
    x, y = mnist_test
    return x[:BATCH], y[:BATCH]


def test_reference_forward_backward(benchmark, mnist_cnn, batch):
    x, y = batch

    def step():
        xr = x.clone().requires_grad_(True)
        loss = F.cross_entropy(mnist_cnn(xr), y, reduction="sum")
        return torch.autograd.grad(loss, xr)[0]

    grad = benchmark(step)
    assert grad.shape == x.shape


ATTACKS = {
    "fgsm": lambda: FGSM(THREAT),
    "pgd-10": lambda: PGD(THREAT, steps=10),
    "apgd-10": lambda: APGD(THREAT, steps=10),
    "square-100": lambda: Square(THREAT, queries=100),
    "eot-pgd-5x4": lambda: EOT(PGD(THREAT, steps=5), transform=GaussianNoise(0.05), samples=4,
                               eval_draws=4),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_benchmark(benchmark, name, mnist_cnn, batch):
    x, y = batch
    attack = ATTACKS[name]()
    result = benchmark(lambda: attack(mnist_cnn, x, y, generator=torch.Generator().manual_seed(0)))
    benchmark.extra_info.update(forwards=result.n_forward, backwards=result.n_backward,
                                robust_accuracy=result.robust_accuracy)
    assert bool(THREAT.contains(result.x_adv, x).all())


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_attribution_benchmark(benchmark, method, mnist_cnn, batch):
    from unmask.explain import attribute

    x, y = batch
    options = {"n_steps": 16} if method == "integrated_gradients" else {"samples": 8}
    attr = benchmark(lambda: attribute(mnist_cnn, x, y, method, **options))
    assert attr.shape == x.shape
