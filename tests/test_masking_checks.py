"""Every registered masking check is proven able to fire, and able to pass.

For each check in ``unmask.defenses.masking.CHECKS`` there is a positive control (a model
built in seconds on which that check must fail) and a negative control (the standard
``mnist-cnn`` at a threat where it is partly robust, on which it must pass). The tests are
generated from the registry: a check registered without controls fails
``test_every_registered_check_has_controls``. The test of the tests patches each check to
always pass and asserts that its own positive-control test then fails, so no check can be
silently disabled.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch
from torch import Tensor, nn

from unmask.bench import Threat
from unmask.defenses import masking
from unmask.defenses.masking import CHECKS, FAMILIES, Outcome, Verdict, run_check

POSITIVE_THREAT = Threat("linf", 0.3)
# The standard model is partly robust at Linf 0.1 (PGD leaves about 70% standing), so every
# attack comparison has survivors to compare on.
NEGATIVE_THREAT = Threat("linf", 0.1)


# --- building blocks of the controls -------------------------------------------------------


class _LyingGradient(torch.autograd.Function):
    """Forward: the identity. Backward: the gradient times a per-sample sign, plus noise
    scaled by the gradient's mean magnitude (zero noise: only the sign lies)."""

    @staticmethod
    def forward(ctx, x: Tensor, sign: Tensor, noise: Tensor) -> Tensor:
        ctx.save_for_backward(sign, noise)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sign, noise = ctx.saved_tensors
        shape = (-1, *([1] * (grad.dim() - 1)))
        scale = grad.flatten(1).abs().mean(1).view(shape)
        return grad * sign.view(shape) + scale * noise, None, None


class GradientGate(nn.Module):
    """``model`` with its input gradient multiplied, per sample, by ``gate(x)`` in {+1, -1}:
    the forward pass is exactly ``model``'s, only the gradient lies where the gate says so."""

    def __init__(self, model: nn.Module, gate) -> None:
        super().__init__()
        self.model, self.gate = model, gate

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            sign = self.gate(x).to(x.dtype)
        return self.model(_LyingGradient.apply(x, sign, torch.zeros_like(x)))


def reversed_everywhere(x: Tensor) -> Tensor:
    return -torch.ones(x.shape[0], device=x.device)


def reversed_off_grid(x: Tensor) -> Tensor:
    """+1 on the 8-bit image grid (clean MNIST images), -1 off it: a one-step attack from the
    clean image sees the true gradient, an iterative one from a random start does not."""
    on = ((x * 255 - (x * 255).round()).abs() < 1e-3).flatten(1).all(1)
    return torch.where(on, 1.0, -1.0)


def reversed_far_from_binary(x: Tensor) -> Tensor:
    """-1 when the mean distance of the pixels to {0, 1} exceeds 0.1: small perturbations of
    a (nearly binary) MNIST digit see the true gradient, large ones a reversed gradient."""
    far = torch.minimum(x, 1 - x).flatten(1).mean(1) > 0.1
    return torch.where(far, -1.0, 1.0)


class NoisyGradient(nn.Module):
    """A deterministic forward pass whose input gradient is drowned in fresh noise (``std``
    times the gradient's mean magnitude) drawn from an owned, seeded generator: sign-gradient
    steps are a random walk with a small drift, so the attack needs many steps and restarts."""

    def __init__(self, model: nn.Module, std: float = 20.0, seed: int = 0) -> None:
        super().__init__()
        self.model, self.std = model, std
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.g).to(x.device) * self.std
        return self.model(_LyingGradient.apply(x, torch.ones(x.shape[0], device=x.device), noise))


class Quantize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * 3) / 3


class Detached(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).detach()


class Scaled(nn.Module):
    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) * self.scale


class SeededInputNoise(nn.Module):
    def __init__(self, std: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        self.std, self.g = std, torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.std * torch.randn(x.shape, generator=self.g)).clamp(0, 1)


class InnerOptimisation(nn.Module):
    """A defense that "purifies" its input with a gradient step at inference time."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.model(z).logsumexp(1).sum(), z)
        return self.model((x + 0.01 * g.sign()).clamp(0, 1))


# --- the controls: check name -> (positive control, its threat, needs the surrogate) -------

def _positive(name: str, cnn: nn.Module) -> nn.Module:
    builders = {
        "probability outputs": lambda: nn.Sequential(cnn, nn.Softmax(1)),
        # Tiny noise (logits differ by ~1e-3): any randomness must fire it, not just a lot.
        "randomness": lambda: nn.Sequential(SeededInputNoise(std=1e-3), cnn),
        "autograd in forward": lambda: InnerOptimisation(cnn),
        "broken graph": lambda: Detached(cnn),
        "zero gradients": lambda: nn.Sequential(Quantize(), cnn),
        "saturation ratio": lambda: Scaled(cnn, 1000.0),
        "unstable loss": lambda: nn.Sequential(Quantize(), cnn),
        "one-step beats iterative": lambda: GradientGate(cnn, reversed_off_grid),
        "black-box beats white-box": lambda: GradientGate(cnn, reversed_everywhere),
        "transfer beats white-box": lambda: GradientGate(cnn, reversed_everywhere),
        "unbounded attack": lambda: GradientGate(cnn, reversed_everywhere),
        "monotone in eps": lambda: GradientGate(cnn, reversed_far_from_binary),
        "noise beats attack": lambda: GradientGate(cnn, reversed_everywhere),
        "incomplete optimisation": lambda: NoisyGradient(cnn),
        "convergence": lambda: NoisyGradient(cnn),
        "binarization test": lambda: GradientGate(cnn, reversed_everywhere),
    }
    return builders[name]().eval()


CONTROLLED = ("probability outputs", "randomness", "autograd in forward", "broken graph",
              "zero gradients", "saturation ratio", "unstable loss", "one-step beats iterative",
              "black-box beats white-box", "transfer beats white-box", "unbounded attack",
              "monotone in eps", "noise beats attack", "incomplete optimisation", "convergence",
              "binarization test")


@pytest.fixture(scope="module")
def batch(mnist_test):
    x, y = mnist_test
    return x[:32], y[:32]


def assert_fires(name: str, cnn: nn.Module, batch) -> None:
    """The positive-control test of check ``name`` (also called by the test of the tests)."""
    model = _positive(name, cnn)
    r = run_check(name, model, *batch, POSITIVE_THREAT, fast=True, generator=0, surrogate=cnn)
    assert r.skipped is None, f"{name}: skipped ({r.skipped})"
    assert not r.passed, f"{name} did not fire on its positive control: value {r.value}"
    missing = set(CHECKS[name].evidence) - set(r.evidence)
    assert not missing, f"{name}: evidence lacks the declared keys {missing}"


# --- the generated contract ---------------------------------------------------------------


def test_every_registered_check_has_controls():
    """A check added to the registry without a positive control fails here."""
    assert set(CHECKS) == set(CONTROLLED), (
        f"registered without controls: {set(CHECKS) - set(CONTROLLED)}; "
        f"controls for unregistered checks: {set(CONTROLLED) - set(CHECKS)}")


@pytest.mark.parametrize("name", list(CHECKS))
def test_registration_is_complete(name):
    c = CHECKS[name]
    assert c.family in FAMILIES and c.source and c.rule and c.cost
    assert c.severity in (Verdict.SUSPICIOUS, Verdict.MASKED)
    module = sys.modules[c.module]
    for t in c.thresholds:
        value = getattr(module, t)  # a named constant in the check's own module
        assert isinstance(value, (int, float)), (name, t)
        assert getattr(masking, t) == value  # and exported by the package


@pytest.mark.parametrize("name", list(CHECKS))
def test_positive_control_fires(name, mnist_cnn, batch):
    assert_fires(name, mnist_cnn, batch)


@pytest.fixture(scope="module")
def negative_results(mnist_cnn, batch):
    """Every check on the standard model at Linf 0.1, sharing one context (as in diagnose)."""
    ctx = masking.Context(mnist_cnn, *batch, NEGATIVE_THREAT,
                          budget=masking.Budget.for_mode(True), generator=0, surrogate=mnist_cnn)
    return {r.name: r for r in masking.run_checks(ctx)}, ctx


@pytest.mark.parametrize("name", list(CHECKS))
def test_negative_control_passes(name, negative_results):
    results, ctx = negative_results
    r = results[name]
    assert r.skipped is None, f"{name}: skipped ({r.skipped})"
    assert r.passed, f"{name} fired on the standard model: value {r.value}, {r.evidence}"
    assert r.cost is not None and set(r.cost) == {"forward", "backward"}


def test_negative_control_has_survivors(negative_results):
    """The negative control is meaningful: PGD leaves samples for the comparisons."""
    _, ctx = negative_results
    assert 0.3 <= len(ctx.survivors) / ctx.n_att <= 0.95


@pytest.mark.parametrize("name", list(CHECKS))
def test_of_the_tests_a_check_forced_to_pass_fails_its_positive_control(name, mnist_cnn, batch):
    """Patch the check to always pass: its positive-control test must now fail."""
    forced = dataclasses.replace(CHECKS[name], fn=lambda ctx: Outcome(0.0, True))
    with CHECKS.isolated():
        CHECKS.add(name, forced, replace=True)
        with pytest.raises(AssertionError, match="did not fire"):
            assert_fires(name, mnist_cnn, batch)


def test_costs_are_measured_in_passes(mnist_cnn, batch):
    """The cost on each result is the sample rows the model served: PGD-10 on 32 samples
    with a random start is at most 32 x 11 forward passes and 32 x 10 backward passes."""
    r = run_check("convergence", mnist_cnn, *batch, NEGATIVE_THREAT, fast=True)
    # The first check to need the reference PGD pays for it: PGD-10, then PGD-20 x 2 restarts
    # on the survivors.
    assert r.cost["backward"] > 0 and r.cost["forward"] >= r.cost["backward"]
    assert r.cost["backward"] <= 32 * 10 + 32 * 20 * 2
    none = run_check("randomness", mnist_cnn, *batch, NEGATIVE_THREAT, fast=True)
    assert none.cost == {"forward": 0, "backward": 0}


def test_unknown_check_names_are_refused(mnist_cnn, batch):
    with pytest.raises(ValueError, match="unknown masking check"):
        run_check("no such check", mnist_cnn, *batch, NEGATIVE_THREAT)
    with pytest.raises(ValueError, match="already registered"):
        masking.check("randomness", family="outputs", kind=masking.MaskingKind.STOCHASTIC,
                      severity=Verdict.MASKED, source="s", rule="r", cost="c")(lambda ctx: None)


def test_docs_table_lists_every_registered_check_as_registered():
    """docs/masking.md's table of checks says what the registry says (name, kind, verdict)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "masking.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 5 and cells[0] in CHECKS:
            rows[cells[0]] = cells
    assert set(rows) == set(CHECKS)
    for name, cells in rows.items():
        c = CHECKS[name]
        assert c.kind.value.startswith(cells[1]), (name, cells[1])
        assert c.severity.value in cells[2], (name, cells[2])


def test_output_checks_run_when_no_sample_is_correct(mnist_cnn, batch):
    """The output checks read the clean passes only: they run, and fire, on a model that gets
    every sample wrong; the checks that attack correctly classified samples are skipped and
    say why."""
    x, _ = batch
    model = nn.Sequential(mnist_cnn, nn.Softmax(1)).eval()
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10
    ctx = masking.Context(model, x, wrong, POSITIVE_THREAT, budget=masking.Budget.for_mode(True))
    results = {r.name: r for r in masking.run_checks(ctx)}
    for name, c in CHECKS.items():
        if c.family == "outputs":  # by family, not by the flag under test
            assert results[name].skipped is None, name
        else:
            assert results[name].skipped == "no correctly classified sample", name
    assert not results["probability outputs"].passed


# Second negative controls, where the standard model alone leaves a wrong rule standing.
EXTRA_NEGATIVES = {
    # Small logits (temperature 1e5) are the opposite of saturation: the CE gradient is
    # large relative to the margin's. A rule on the product instead of the ratio fires here.
    "saturation ratio": lambda cnn: Scaled(cnn, 1e-5),
}


def assert_extra_negative(name: str, cnn: nn.Module, batch) -> None:
    model = EXTRA_NEGATIVES[name](cnn).eval()
    r = run_check(name, model, *batch, NEGATIVE_THREAT, fast=True, generator=0)
    assert r.skipped is None and r.passed, f"{name} fired on its second negative: {r.value}"


@pytest.mark.parametrize("name", sorted(EXTRA_NEGATIVES))
def test_extra_negative_control_passes(name, mnist_cnn, batch):
    assert_extra_negative(name, mnist_cnn, batch)
