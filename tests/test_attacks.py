"""Correctness tests of the evasion attacks.

The contract every attack keeps (ball, box, best iterate, costs, same seed same result) is
generated from the attack registry in ``test_registries.py``, whose factories these tests reuse.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_registries import ATTACK_FACTORIES as FACTORIES  # the registry's contract factories
from torch import nn

from unmask.attacks import (
    APGD,
    BPDA,
    EOT,
    FGSM,
    PGD,
    BranchPGD,
    Brightness,
    Compose,
    Ensemble,
    GaussianNoise,
    RandomAffine,
    Square,
    Transfer,
    success_rate,
)
from unmask.attacks.apgd import checkpoint_intervals
from unmask.attacks.base import Attack, Tracker, compaction_points
from unmask.attacks.square import p_schedule
from unmask.bench import Threat
from unmask.bench.core import AttackResult
from unmask.bench.core.training import seeded_init


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Quantize(nn.Module):
    """Non-differentiable input quantiser (zero gradient almost everywhere)."""

    def __init__(self, levels: int = 2) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)

    def bpda_approximation(self, x):
        return x


class InputNoise(nn.Module):
    """Randomised defense: Gaussian noise on the input (uses the global RNG, as users' do)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x):
        return (x + self.std * torch.randn_like(x)).clamp(0, 1)


def _surrogate(model):
    return model


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_model_mode_and_flags_restored_also_on_error(name, digits_mlp, digits_test):
    x, y = digits_test
    x, y = x[:8], y[:8]
    bn_model = nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16),
                             nn.ReLU(), nn.Linear(16, 10))
    bn_model.train()
    flags_before = [p.requires_grad for p in bn_model.parameters()]
    attack = FACTORIES[name](Threat("linf", 0.1), bn_model)
    with pytest.warns(UserWarning, match="train mode"):
        attack(bn_model, x, y, generator=_gen())
    assert bn_model.training and all(m.training for m in bn_model.modules())
    assert [p.requires_grad for p in bn_model.parameters()] == flags_before

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.pre = nn.Identity()
            self.net = digits_mlp

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom")
            return self.net(self.pre(x))

    model = Exploding()
    model.train(False)
    model.net.normalize.train(True)  # an odd mix of modes must come back exactly
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    attack = FACTORIES[name](Threat("linf", 0.1), digits_mlp)
    if name == "bpda":
        attack = BPDA(PGD(Threat("linf", 0.1), steps=5), approximations=["pre"])
    if name == "branch-pgd":
        attack = BranchPGD(Threat("linf", 0.1), branch="pre", branches=["pre"], steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        attack(model, x, y, generator=_gen())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_bad_inputs_give_clear_errors(digits_mlp, digits_test):
    x, y = digits_test
    x, y = x[:4], y[:4]
    with pytest.raises(ValueError, match="eps must be >= 0"):
        Threat("linf", -0.1)
    with pytest.raises(ValueError, match="unknown norm"):
        Threat("l7", 0.1)
    attack = PGD(Threat("linf", 0.1), steps=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(digits_mlp, x * 3, y)
    with pytest.raises(ValueError, match="shape"):
        attack(digits_mlp, x, y[:3])
    with pytest.raises(ValueError, match="different from the true class"):
        attack(digits_mlp, x, y, targets=y.clone())
    with pytest.raises(ValueError, match="targets must have shape"):
        attack(digits_mlp, x, y, targets=y[:2])
    with pytest.raises(ValueError, match="steps must be a positive int"):
        PGD(Threat("linf", 0.1), steps=0)
    with pytest.raises(ValueError, match="unknown loss"):
        PGD(Threat("linf", 0.1), loss="hinge")
    with pytest.raises(TypeError, match="gradient attack"):
        EOT(Square(Threat("linf", 0.1)))
    with pytest.raises(ValueError, match="preset"):
        Ensemble.preset("ultra", Threat("linf", 0.1))
    with pytest.raises(ValueError, match="one threat model"):
        Ensemble([FGSM(Threat("linf", 0.1)), FGSM(Threat("linf", 0.2))])
    with pytest.raises(ValueError, match="no preprocessing module"):
        BPDA(PGD(Threat("linf", 0.1)))(digits_mlp, x, y)


def test_probability_outputs_are_reported(digits_mlp, digits_test):
    from unmask.bench import ProbabilityOutputWarning

    x, y = digits_test
    probs = nn.Sequential(digits_mlp, nn.Softmax(dim=1))
    with pytest.warns(ProbabilityOutputWarning):
        PGD(Threat("linf", 0.1), steps=2)(probs, x[:4], y[:4])


# --- correctness on models with known answers -------------------------------------------------


def _linear(in_features: int, classes: int, seed: int = 0) -> nn.Module:
    with seeded_init(seed):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, classes)).eval()


def test_fgsm_equals_closed_form_on_linear_model():
    model = _linear(16, 3)
    g = _gen(3)
    x = 0.3 + 0.4 * torch.rand(10, 1, 4, 4, generator=g)  # interior: no clipping at eps 0.05
    y = torch.randint(0, 3, (10,), generator=g)
    x_req = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x_req), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_req)
    expected = x + 0.05 * grad.sign()
    r = FGSM(Threat("linf", 0.05))(model, x, y)
    clean_ok = model(x).argmax(1) == y
    # Correct samples move to the closed-form optimum unless the start was already adversarial.
    moved = clean_ok
    torch.testing.assert_close(r.x_adv[moved], expected[moved], rtol=0, atol=1e-6)
    # L2 (FGM): x + eps * grad / ||grad||.
    r2 = FGSM(Threat("l2", 0.1))(model, x, y)
    g2 = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(r2.x_adv[moved], (x + 0.1 * g2)[moved], rtol=0, atol=1e-6)


def test_l2_pgd_finds_minimal_distance_of_binary_linear_classifier():
    # f(x) = w.x + b, two classes: the minimal L2 distance to the boundary is |margin| / ||w||
    # (logit difference (w1 - w0).x + (b1 - b0) over ||w1 - w0||).
    model = _linear(16, 2, seed=1)
    lin = model[1]
    g = _gen(5)
    x = 0.4 + 0.2 * torch.rand(32, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
        w = lin.weight[1] - lin.weight[0]
        diff = x.flatten(1) @ w + (lin.bias[1] - lin.bias[0])
        dist = diff.abs() / w.norm()
    # Keep samples whose boundary point lies inside [0, 1] (the box never binds).
    boundary = x.flatten(1) - (diff / w.norm() ** 2)[:, None] * w[None]
    inside = ((boundary >= 0) & (boundary <= 1)).all(1) & (dist > 0.01)
    assert inside.sum() >= 8
    for i in inside.nonzero().flatten()[:8].tolist():
        xi, yi, d = x[i:i + 1], y[i:i + 1], float(dist[i])
        above = PGD(Threat("l2", 1.05 * d), steps=50, step_size=0.1 * d)(model, xi, yi)
        below = PGD(Threat("l2", 0.95 * d), steps=50, step_size=0.1 * d)(model, xi, yi)
        assert bool(above.success.all()), f"sample {i}: PGD failed above the minimal distance"
        assert not bool(below.success.any()), f"sample {i}: success below the minimal distance"


def test_host_reads_only_at_compaction_points(monkeypatch, digits_mlp, digits_test):
    """The step loop must not synchronise: host reads happen only at the fixed points."""
    x, y = digits_test
    steps = 120
    counts = {"n": 0}
    original = torch.Tensor.__bool__

    def counting_bool(self):
        counts["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    for name in ("item", "tolist", "cpu", "numpy"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    PGD(Threat("linf", 0.02), steps=steps, step_size=0.001)(digits_mlp, x[:32], y[:32])
    pgd_reads = counts["n"]
    budget = len(compaction_points(steps)) + 25  # plus validation before the loop
    assert pgd_reads <= budget < steps
    counts["n"] = 0
    APGD(Threat("linf", 0.02), steps=steps)(digits_mlp, x[:32], y[:32])
    assert counts["n"] <= len(compaction_points(steps)) + len(checkpoint_intervals(steps)) + 25


def test_early_exit_broken_samples_stop_costing(digits_mlp, digits_test):
    x, y = digits_test
    r = PGD(Threat("linf", 0.3), steps=40, random_start=False)(digits_mlp, x[:64], y[:64])
    broken = r.success & (r.backwards > 0)
    robust = ~r.success
    assert broken.any()
    # A sample broken at step s is carried at most to the next compaction point.
    assert int(r.backwards[broken].min()) < 40
    if robust.any():
        assert bool((r.backwards[robust] == 40).all())
    # The total cost tracks the robust share, not N x steps.
    assert r.n_backward < 0.5 * 64 * 40


def test_schedules_follow_the_papers():
    assert checkpoint_intervals(100) == [22, 19, 16, 13, 10, 7, 6, 6]
    assert sum(checkpoint_intervals(100)) <= 100
    assert p_schedule(0.8, 0, 5000) == 0.8
    assert p_schedule(0.8, 50, 5000) == pytest.approx(0.2)  # iteration 100 of 10,000
    assert p_schedule(0.8, 4999, 5000) == pytest.approx(0.8 / 512)
    pts = compaction_points(40)
    assert 1 in pts and 40 in pts and len(pts) < 40


# --- strength on the zoo's standard model -----------------------------------------------------


@pytest.fixture(scope="module")
def mnist_batch(mnist_test):
    x, y = mnist_test
    return x[:200], y[:200]


def test_pgd40_breaks_standard_mnist_cnn(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    r = PGD(Threat("linf", 0.3), steps=40)(mnist_cnn, x, y, generator=_gen())
    assert r.robust_accuracy <= 0.02


def test_apgd_at_least_as_strong_as_pgd_same_budget(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    threat = Threat("linf", 0.1)
    pgd = PGD(threat, steps=20)(mnist_cnn, x, y, generator=_gen())
    apgd = APGD(threat, steps=20)(mnist_cnn, x, y, generator=_gen())
    assert apgd.robust_accuracy <= pgd.robust_accuracy + 0.01
    assert pgd.robust_accuracy > 0.05  # the comparison is not trivial at this eps


def test_square_breaks_standard_mnist_cnn(mnist_cnn, mnist_test):
    x, y = mnist_test
    r = Square(Threat("linf", 0.3), queries=5000)(mnist_cnn, x[:100], y[:100], generator=_gen())
    assert r.robust_accuracy <= 0.10
    # Score-based: forward passes only, query counts per sample.
    assert r.n_backward == 0 and int(r.queries.max()) <= 5000


def test_targeted_pgd_reaches_targets(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    x, y = x[:50], y[:50]
    targets = (y + 1) % 10
    r = PGD(Threat("linf", 0.3), steps=40, loss="margin")(mnist_cnn, x, y, targets=targets)
    pred = mnist_cnn(r.x_adv).argmax(1)
    assert torch.equal(pred == targets, r.success)
    assert r.success_rate >= 0.9


# --- masking: gradient attacks fooled, adaptive attacks not ------------------------------------


def test_bpda_and_square_see_through_input_quantisation(mnist_cnn, mnist_test):
    x, y = mnist_test
    x, y = x[:100], y[:100]
    model = nn.Sequential(Quantize(4), mnist_cnn).eval()
    threat = Threat("linf", 0.3)
    plain = PGD(threat, steps=20)(model, x, y, generator=_gen())
    bpda = BPDA(PGD(threat, steps=20))(model, x, y, generator=_gen())
    square = Square(threat, queries=300)(model, x, y, generator=_gen())
    # Masked: the quantiser's gradient is zero, so plain PGD looks robust; the standard
    # model underneath is not, and both adaptive attacks show it.
    assert plain.robust_accuracy >= 0.8
    assert bpda.robust_accuracy <= 0.05
    assert square.robust_accuracy <= 0.10
    assert bpda.config["approximated"] == ["0"]


def test_eot_stronger_than_pgd_on_stochastic_model(mnist_cnn, mnist_test):
    x, y = mnist_test
    x, y = x[:100], y[:100]
    model = nn.Sequential(InputNoise(0.5), mnist_cnn).eval()
    threat = Threat("linf", 0.15)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the model's own noise in this test only
        pgd = PGD(threat, steps=10)(model, x, y, generator=_gen())
        eot = EOT(PGD(threat, steps=10), samples=10, eval_draws=16)(model, x, y, generator=_gen())
        pgd_rate = success_rate(model, pgd.x_adv, y, draws=16)
        eot_rate = success_rate(model, eot.x_adv, y, draws=16)
    assert float(eot_rate.mean()) >= float(pgd_rate.mean()) + 0.03
    assert eot.expected_success is not None
    assert torch.equal(eot.success, eot.expected_success >= 0.5)


def test_eot_transforms_are_batched_seeded_and_in_range():
    x = torch.rand(6, 3, 16, 16, generator=_gen())
    t = Compose([RandomAffine(20, (0.9, 1.1), 0.1), Brightness(0.1), GaussianNoise(0.05)])
    a, b = t(x, _gen(2)), t(x, _gen(2))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.equal(t(x, _gen(3)), a)
    # Per-sample parameters: identical inputs get different transformations.
    same = x[:1].repeat(4, 1, 1, 1)
    out = RandomAffine(30)(same, _gen())
    assert not torch.equal(out[0], out[1])
    # Differentiable.
    xr = x.clone().requires_grad_(True)
    RandomAffine(20)(xr, _gen()).sum().backward()
    assert xr.grad is not None and float(xr.grad.abs().sum()) > 0


def test_transfer_from_itself_equals_white_box(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    x, y = x[:64], y[:64]
    threat = Threat("linf", 0.1)
    white = PGD(threat, steps=10)(mnist_cnn, x, y, generator=_gen())
    transfer = Transfer(PGD(threat, steps=10), surrogate=mnist_cnn)(mnist_cnn, x, y,
                                                                    generator=_gen())
    assert torch.equal(white.success, transfer.success)
    assert transfer.n_backward == 0 and transfer.config["surrogate_backwards"] > 0


# --- the worst-case ensemble ---------------------------------------------------------------


def test_ensemble_is_the_per_sample_worst_case(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    x, y = x[:100], y[:100]
    threat = Threat("linf", 0.1)
    attacks = [FGSM(threat), PGD(threat, steps=10)]
    result = Ensemble(attacks)(mnist_cnn, x, y, generator=_gen())
    fgsm = FGSM(threat)(mnist_cnn, x, y)
    assert result.n == 100
    assert result.robust_accuracy <= fgsm.robust_accuracy + 1e-9
    with torch.no_grad():
        pred = mnist_cnn(result.x_adv).argmax(1)
    assert torch.equal(result.robust, pred == y)  # robust exactly where x_adv is still correct
    for i, who in enumerate(result.broken_by):
        assert (who is None) == bool(result.robust[i])
        if who not in (None, "clean"):
            assert who in ("fgsm", "pgd")
    assert bool(threat.contains(result.x_adv, x).all())
    # PGD only ran on what FGSM left standing.
    assert result.costs["pgd"].attacked == result.costs["fgsm"].attacked - result.costs["fgsm"].broken
    d = result.to_dict()
    assert d["robust_accuracy"] == result.robust_accuracy and "costs" in d


def test_ensemble_standard_preset_and_stochastic_reporting(digits_mlp, digits_test):
    x, y = digits_test
    x, y = x[:32], y[:32]
    threat = Threat("linf", 0.05)
    ens = Ensemble.preset("standard", threat)
    assert [a.label for a in ens.attacks] == ["apgd-ce", "apgd-t", "square"]
    noisy = nn.Sequential(InputNoise(0.2), digits_mlp).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        res = Ensemble.preset("quick", threat, draws=8)(noisy, x, y, generator=_gen())
    assert res.stochastic and res.success_rate is not None
    assert res.robust_accuracy_draws is not None and res.robust_accuracy_draws.shape == (8,)
    assert 0.0 <= res.robust_accuracy_std < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = Ensemble.preset("quick", threat)(digits_mlp, x, y)
    assert not det.stochastic and det.robust_accuracy_std == 0.0


class FoolsOnlyUnderAutocast(nn.Module):
    """Classifies like ``inner`` in fp32; under autocast every logit vector is reversed, so
    any search run in reduced precision 'breaks' every sample the fp32 model gets right."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out.flip(1) if torch.is_autocast_enabled(x.device.type) else out


def test_ensemble_reduced_precision_search_is_judged_in_fp32(digits_mlp, digits_test):
    x, y = digits_test
    x, y = x[:40], y[:40]
    threat = Threat("linf", 0.1)
    attacks = [FGSM(threat), PGD(threat, steps=10)]
    fp32 = Ensemble(attacks)(digits_mlp, x, y, generator=_gen())
    bf16 = Ensemble(attacks, precision="bf16")(digits_mlp, x, y, generator=_gen())
    assert bf16.config["precision"] == "bf16" and "precision" not in fp32.config
    with torch.no_grad():
        correct = digits_mlp(bf16.x_adv).argmax(1) == y
    assert torch.equal(bf16.robust, correct)  # every verdict is the fp32 model's
    assert bool(threat.contains(bf16.x_adv, x).all())
    assert abs(bf16.robust_accuracy - fp32.robust_accuracy) <= 0.1

    # A candidate that fools only the reduced-precision model is rejected and the sample is
    # attacked again in fp32: a rounding artefact never costs a break.
    liar = FoolsOnlyUnderAutocast(digits_mlp).eval()
    res = Ensemble(attacks, precision="bf16")(liar, x, y, generator=_gen())
    assert res.costs["fgsm"].rejected == res.costs["fgsm"].attacked > 0
    assert res.costs["pgd"].rejected == res.costs["pgd"].attacked
    # FGSM has no randomness: its fp32 retry is exactly the fp32 ensemble's FGSM.
    assert res.costs["fgsm"].broken == fp32.costs["fgsm"].broken
    with torch.no_grad():
        assert torch.equal(res.robust, digits_mlp(res.x_adv).argmax(1) == y)
    assert abs(res.robust_accuracy - fp32.robust_accuracy) <= 0.1
    assert res.to_dict()["costs"]["pgd"]["rejected"] == res.costs["pgd"].attacked

    # Score-based search stays in fp32 (bf16 rounding swamps the margin differences it
    # compares): nothing to reject, and the same result as the fp32 ensemble's.
    square = [Square(threat, queries=30)]
    sq16 = Ensemble(square, precision="bf16")(liar, x, y, generator=_gen())
    sq32 = Ensemble(square)(digits_mlp, x, y, generator=_gen())
    assert sq16.costs["square"].rejected == 0
    assert torch.equal(sq16.robust, sq32.robust) and torch.equal(sq16.x_adv, sq32.x_adv)


def test_ensemble_rejects_unknown_precision():
    with pytest.raises(ValueError, match="'bf16'"):
        Ensemble([FGSM(Threat("linf", 0.1))], precision="int8")


class _LyingAttack(Attack):
    """Claims to break every sample: half with a point outside the ball, half with a point
    the model still classifies correctly. Neither may count."""

    name = "liar"

    def run(self, model, x, y, *, targets=None, generator=None, oracle=None):
        n = x.shape[0]
        far = (x + 3 * self.threat.eps).clamp(0, 1)  # outside the ball (where not clipped)
        x_adv = torch.where((torch.arange(n) % 2 == 0).view(-1, 1, 1, 1), far, x)
        return AttackResult(x_adv=x_adv, success=torch.ones(n, dtype=torch.bool),
                            margin=torch.full((n,), -1.0), forwards=torch.ones(n, dtype=torch.long),
                            backwards=torch.zeros(n, dtype=torch.long), name=self.name)


def test_ensemble_recheck_every_candidate_in_the_ball_and_in_fp32(mnist_cnn, mnist_test):
    """The worst case counts an adversarial example only after re-checking it: inside the
    threat ball and [0, 1], and misclassified by the model itself."""
    x, y = mnist_test
    x, y = x[:16], y[:16]
    threat = Threat("linf", 0.01)  # too small to break this model: every claimed break is a lie
    res = Ensemble([_LyingAttack(threat)])(mnist_cnn, x, y, generator=0)
    assert bool(res.robust.eq(res.clean_correct).all())
    assert res.costs["liar"].broken == 0
    assert bool(threat.contains(res.x_adv, x).all())


# --- the shared restart / early-exit bookkeeping ----------------------------------------------


def _tracker(margins):
    m = torch.tensor(margins)
    return Tracker(torch.zeros(len(m), 1, 1, 1), m)


def test_tracker_runs_restart_on_the_samples_still_robust():
    tracker = _tracker([1.0, 1.0, 1.0, 1.0])
    seen = []
    for run, idx in tracker.runs(torch.arange(4), range(3)):
        seen.append((run, idx.tolist()))
        tracker.margin[idx[0]] = -1.0  # each run breaks its first sample
    assert seen == [(0, [0, 1, 2, 3]), (1, [1, 2, 3]), (2, [2, 3])]
    # Stops as soon as nothing is left, without asking for more runs.
    tracker = _tracker([1.0, 1.0])
    runs = []
    for run, idx in tracker.runs(torch.arange(2), iter(range(10))):
        runs.append(run)
        tracker.margin[idx] = -1.0
    assert runs == [0]


def test_tracker_shrink_keeps_rows_aligned_and_passes_none_through():
    tracker = _tracker([1.0, -1.0, 2.0, 0.5])
    idx = torch.tensor([0, 1, 2, 3])
    state = torch.arange(4.0) * 10
    new_idx, (new_state, none) = tracker.shrink(idx, state, None)
    assert new_idx.tolist() == [0, 2, 3] and new_state.tolist() == [0.0, 20.0, 30.0]
    assert none is None
    # Nothing broken: the same tensors come back, untouched.
    same_idx, (same_state,) = tracker.shrink(new_idx, new_state)
    assert same_idx is new_idx and same_state is new_state
    tracker.margin[:] = -1.0
    empty, _ = tracker.shrink(new_idx, new_state)
    assert empty.numel() == 0
