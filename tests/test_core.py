"""Core types: threat models and their projection, input validation, margins, Normalize,
seeding, mode switching, device selection."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from unmask.bench import core
from unmask.bench.core import (
    AttackResult,
    Autocast,
    Norm,
    Normalize,
    Precision,
    ProbabilityOutputWarning,
    Threat,
    check_images,
    check_inputs,
    check_labels,
    check_logits,
    make_generator,
    margin,
    model_mode,
    select_device,
)

# --- Threat ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2", "LINF", "L2", Norm.LINF, Norm.L2])
def test_threat_converts_norm_once(norm):
    t = Threat(norm, 0.1)
    assert isinstance(t.norm, Norm)
    assert t.norm.value == str(getattr(norm, "value", norm)).lower()
    assert isinstance(t.eps, float)


def test_threat_eps_int_becomes_float():
    t = Threat("l2", 1)
    assert t.eps == 1.0 and type(t.eps) is float
    assert t.to_dict() == {"norm": "l2", "eps": 1.0}
    assert str(Threat("linf", 0.25)) == "linf:0.25"


@pytest.mark.parametrize("eps", [-1e-9, -0.1, float("nan"), float("inf"), float("-inf")])
def test_threat_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        Threat("linf", eps)


@pytest.mark.parametrize("eps", ["abc", None, [0.1]])
def test_threat_rejects_non_numeric_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        Threat("linf", eps)


@pytest.mark.parametrize("norm", ["l1", "inf", "", "l-inf", 2, None])
def test_threat_unknown_norm_names_valid_ones(norm):
    with pytest.raises(ValueError) as err:
        Threat(norm, 0.1)
    assert "'linf'" in str(err.value) and "'l2'" in str(err.value)


def test_threat_is_frozen():
    t = Threat("linf", 0.1)
    with pytest.raises(AttributeError):
        t.eps = 0.5


def test_threat_zero_eps_projects_to_clean_input():
    g = make_generator(0)
    x = torch.rand(3, 1, 4, 4, generator=g)
    for norm in ("linf", "l2"):
        t = Threat(norm, 0.0)
        assert torch.equal(t.project(torch.rand(3, 1, 4, 4, generator=g), x), x)


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5, (1,), generator=g))
    c = int(torch.randint(1, 4, (1,), generator=g))
    h = int(torch.randint(1, 7, (1,), generator=g))
    w = int(torch.randint(1, 7, (1,), generator=g))
    x = torch.rand(n, c, h, w, generator=g)
    # Include pixels at the box edges, where clipping matters.
    x[torch.rand(x.shape, generator=g) < 0.2] = 0.0
    x[torch.rand(x.shape, generator=g) < 0.2] = 1.0
    eps = float(torch.rand((), generator=g)) * 2.0
    # Far-away points, points outside the box, and points close by.
    scale = float(torch.rand((), generator=g)) * 3.0
    x_adv = x + torch.randn(x.shape, generator=g) * scale
    return g, x, x_adv, eps


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("seed", range(25))
def test_projection_properties(norm, seed):
    g, x, x_adv, eps = _random_case(seed)
    if norm == "linf":
        eps = min(eps, 1.0)  # an Linf radius above the box's diameter is refused
    t = Threat(norm, eps)
    p = t.project(x_adv.clone(), x)
    assert p.shape == x.shape
    # Inside [0, 1] exactly, inside the ball up to float rounding.
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert bool((t.distance(p, x) <= eps + 1e-5).all())
    assert bool(t.contains(p, x).all())
    # Idempotent.
    assert torch.allclose(t.project(p.clone(), x), p, atol=1e-6)
    # A point already inside (a shrunken feasible point) is unchanged.
    inside = x + 0.5 * (p - x)
    assert torch.allclose(t.project(inside.clone(), x), inside, atol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_linf_projection_is_the_nearest_point(seed):
    # For Linf the intersection of ball and box is a box: the exact projection is the clamp,
    # and no other feasible point is closer.
    g, x, x_adv, eps = _random_case(seed)
    eps = min(eps, 1.0)  # an Linf radius above the box's diameter is refused
    t = Threat("linf", eps)
    p = t.project(x_adv.clone(), x)
    expected = x_adv.clamp(torch.clamp(x - eps, min=0.0), torch.clamp(x + eps, max=1.0))
    assert torch.allclose(p, expected)
    other = t.random_point(x, g)
    assert bool(((x_adv - p).flatten(1).norm(dim=1) <= (x_adv - other).flatten(1).norm(dim=1) + 1e-6).all())


def test_l2_projection_scales_onto_the_sphere():
    x = torch.full((1, 1, 2, 2), 0.5)
    t = Threat("l2", 0.1)
    x_adv = x + torch.tensor([0.3, 0.4, 0.0, 0.0]).view(1, 1, 2, 2)  # norm 0.5, inside the box
    p = t.project(x_adv, x)
    assert torch.allclose(t.distance(p, x), torch.tensor([0.1]), atol=1e-6)
    # The direction is kept.
    assert torch.allclose((p - x).flatten(), torch.tensor([0.06, 0.08, 0.0, 0.0]), atol=1e-6)


def test_projection_is_per_sample():
    x = torch.full((2, 1, 1, 2), 0.5)
    t = Threat("l2", 0.1)
    x_adv = x.clone()
    x_adv[0] += 0.01  # inside
    x_adv[1] += 0.3  # outside
    p = t.project(x_adv, x)
    assert torch.allclose(p[0], x_adv[0])
    assert torch.allclose(t.distance(p, x)[1], torch.tensor(0.1), atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_point_inside_ball_and_seeded(norm):
    x = torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    t = Threat(norm, 0.2)
    p = t.random_point(x, make_generator(7))
    assert bool(t.contains(p, x).all())
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert not torch.equal(p, x)  # it moves
    assert torch.equal(p, t.random_point(x, make_generator(7)))  # same seed, same point
    assert not torch.equal(p, t.random_point(x, make_generator(8)))
    if norm == "linf":
        # Spread over the whole box, not concentrated at the centre.
        assert float((p - x).abs().max()) > 0.15


def test_attack_result_summaries():
    r = AttackResult(
        x_adv=torch.zeros(4, 1, 2, 2),
        success=torch.tensor([True, False, True, False]),
        margin=torch.tensor([-1.0, 2.0, -0.5, 0.1]),
        forwards=torch.tensor([1, 2, 3, 4]),
        backwards=torch.tensor([0, 1, 1, 1]),
        name="test",
    )
    assert r.success_rate == 0.5
    assert r.robust_accuracy == 0.5
    assert r.n_forward == 10 and r.n_backward == 3
    assert torch.equal(r.queries, r.forwards)
    assert r.config == {}


# --- input validation ------------------------------------------------------------------------


def test_check_images_accepts_valid_batch():
    x = torch.rand(2, 3, 4, 4)
    assert check_images(x) is x
    check_images(torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    check_images(torch.ones(1, 1, 2, 2, dtype=torch.float16))


@pytest.mark.parametrize(
    "x, exc, words",
    [
        (torch.rand(3, 4, 4), ValueError, ["N x C x H x W", "(3, 4, 4)"]),
        (torch.rand(2, 1, 3, 4, 4), ValueError, ["N x C x H x W"]),
        (torch.rand(0, 1, 4, 4), ValueError, ["empty"]),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), TypeError, ["floating", "uint8"]),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), TypeError, ["floating", "int64"]),
        (torch.full((2, 1, 4, 4), float("nan")), ValueError, ["finite", "NaN"]),
        (torch.full((2, 1, 4, 4), float("inf")), ValueError, ["finite"]),
        (torch.rand(2, 1, 4, 4) * 255, ValueError, ["[0, 1]"]),
        (torch.rand(2, 1, 4, 4) - 0.5, ValueError, ["[0, 1]"]),
        ([[0.0]], TypeError, ["torch.Tensor", "list"]),
    ],
)
def test_check_images_errors_say_what_was_expected(x, exc, words):
    with pytest.raises(exc) as err:
        check_images(x)
    for word in words:
        assert word in str(err.value)


def test_check_images_single_nan_is_found():
    x = torch.rand(2, 1, 4, 4)
    x[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        check_images(x)


def test_check_labels():
    assert check_labels(torch.tensor([0, 9, 3]), 3, 10).dtype == torch.int64
    assert check_labels(torch.tensor([0, 1], dtype=torch.int32), 2).dtype == torch.int64
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        check_labels(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        check_labels(torch.tensor([[0, 1]]), 2)
    with pytest.raises(ValueError, match="10 classes"):
        check_labels(torch.tensor([0, 10]), 2, 10)
    with pytest.raises(ValueError, match="negative"):
        check_labels(torch.tensor([0, -1]), 2, 10)
    with pytest.raises(TypeError, match="int64"):
        check_labels(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(TypeError, match="int64"):
        check_labels(torch.tensor([True, False]), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_labels([0, 1], 2)


def test_check_inputs_pairs_and_moves_labels():
    x = torch.rand(3, 1, 2, 2)
    x2, y2 = check_inputs(x, torch.tensor([1, 2, 0], dtype=torch.int16), num_classes=3)
    assert x2 is x and y2.dtype == torch.int64 and y2.device == x.device
    with pytest.raises(ValueError, match="match the batch"):
        check_inputs(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 classes"):
        check_inputs(x, torch.tensor([0, 1, 3]), num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_inputs(x * 2, torch.tensor([0, 1, 2]))


def test_check_logits_shapes():
    logits = torch.randn(4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_logits(logits, 4) is logits
    with pytest.raises(ValueError, match="N x K"):
        check_logits(torch.randn(4))
    with pytest.raises(ValueError, match="4 rows .* batch of 5"):
        check_logits(logits, 5)
    with pytest.raises(TypeError, match="tensor of logits"):
        check_logits((logits,))
    with pytest.raises(ValueError, match="'warn', 'raise' or 'ignore'"):
        check_logits(logits, probabilities="maybe")


def test_check_logits_detects_probabilities():
    probs = torch.softmax(torch.randn(6, 10) * 3, dim=1)
    with pytest.warns(ProbabilityOutputWarning, match="probabilities"):
        check_logits(probs, 6)
    with pytest.raises(ValueError, match="probabilities"):
        check_logits(probs, probabilities="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_logits(probs, probabilities="ignore")
        # Logits that merely happen to be non-negative are not probabilities.
        check_logits(torch.rand(6, 10) + 0.5, 6)
        # Log-probabilities are fine for attacks.
        check_logits(torch.log_softmax(torch.randn(6, 10), dim=1), 6)
        # One class: softmax of one column is 1 trivially, nothing to report.
        check_logits(torch.ones(3, 1), 3)


def test_margin_untargeted():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 2])
    m = margin(logits, y)
    # correct with margin 2; misclassified (negative); a tie is not a success (zero).
    assert torch.allclose(m, torch.tensor([2.0, -1.0, 0.0]))
    # Without ties, a negative margin is exactly a misclassification.
    assert torch.equal(m[:2] < 0, logits[:2].argmax(1) != y[:2])


def test_margin_targeted():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 4.0, 0.5]])
    y = torch.tensor([0, 0])
    targets = torch.tensor([1, 1])
    m = margin(logits, y, targets)
    # sample 0: target not reached (3 - 1 = 2 > 0); sample 1: the target wins (1 - 4 = -3).
    assert torch.allclose(m, torch.tensor([2.0, -3.0]))
    # A targeted margin ignores the true label entirely.
    assert torch.allclose(margin(logits, torch.tensor([2, 2]), targets), m)


def test_margin_has_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    margin(logits, torch.tensor([0, 1, 2])).sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


# --- Normalize -------------------------------------------------------------------------------


def test_normalize():
    layer = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 4, 4)
    out = layer(x)
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.5) / 0.5)
    assert torch.allclose(out[:, 1], (x[:, 1] - 0.25) / 0.25)
    assert torch.allclose(out[:, 2], x[:, 2] / 2.0)
    # mean and std are buffers: they follow .to() and live in the state dict.
    assert set(layer.state_dict()) == {"mean", "std"}
    assert list(layer.parameters()) == []
    assert "mean=" in repr(layer)
    # One value for all channels broadcasts.
    assert torch.allclose(Normalize(0.5, 0.5)(x), x * 2 - 1)


def test_normalize_errors():
    with pytest.raises(ValueError, match="one value per channel"):
        Normalize((0.5, 0.5), (0.5,))
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize((0.5,), (-1.0,))


# --- randomness ------------------------------------------------------------------------------


def test_make_generator_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = torch.rand(5, generator=make_generator(3))
    b = torch.rand(5, generator=make_generator(3))
    c = torch.rand(5, generator=make_generator(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    g = make_generator(1)
    assert make_generator(g) is g
    assert torch.equal(torch.rand(3, generator=make_generator(None)),
                       torch.rand(3, generator=make_generator(0)))


@pytest.mark.parametrize("seed", [-1, 1.5, "1", True])
def test_make_generator_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        make_generator(seed)


def test_uniform_normal_follow_generator():
    a = core.uniform((2, 3), make_generator(0))
    b = core.uniform((2, 3), make_generator(0))
    assert torch.equal(a, b) and a.shape == (2, 3) and float(a.min()) >= 0 and float(a.max()) < 1
    n = core.normal((1000,), make_generator(0))
    assert abs(float(n.mean())) < 0.15 and abs(float(n.std()) - 1) < 0.15
    assert core.uniform((2,), make_generator(0), dtype=torch.float64).dtype == torch.float64


# --- model_mode ------------------------------------------------------------------------------


def _mixed_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 2))
    model.train()
    model[2].eval()  # a sub-module in its own mode
    model[0].bias.requires_grad_(False)  # a frozen parameter
    return model


def _snapshot(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def test_model_mode_switches_and_restores():
    model = _mixed_model()
    before = _snapshot(model)
    with model_mode(model) as m:
        assert m is model
        assert not any(mod.training for mod in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert _snapshot(model) == before
    with model_mode(model, train=True, freeze=False):
        assert all(mod.training for mod in model.modules())
        assert model[3].weight.requires_grad and not model[0].bias.requires_grad
    assert _snapshot(model) == before


def test_model_mode_restores_when_the_body_raises():
    model = _mixed_model()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), model_mode(model):
        raise RuntimeError("boom")
    assert _snapshot(model) == before


def test_warn_if_train_mode():
    model = _mixed_model()
    with pytest.warns(UserWarning, match="train mode"):
        core.warn_if_train_mode(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.warn_if_train_mode(model)


# --- devices ---------------------------------------------------------------------------------


def test_select_device_explicit_and_env(monkeypatch):
    monkeypatch.delenv("UNMASK_DEVICE", raising=False)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("UNMASK_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    # An explicit choice beats the environment.
    monkeypatch.setenv("UNMASK_DEVICE", "tpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="cpu, cuda"):
        select_device()


def test_select_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("UNMASK_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device() == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device() == torch.device("cpu")


def test_select_device_refuses_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        select_device("mps")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("gpu0")


def test_parse_enum():
    assert core.parse_enum(Norm, "L2", "norm") is Norm.L2
    with pytest.raises(ValueError, match="unknown norm 'l3'; expected one of 'linf', 'l2'"):
        core.parse_enum(Norm, "l3", "norm")


def test_public_names_exist():
    for name in core.__all__:
        assert hasattr(core, name), name
    assert math.isfinite(Threat("l2", 0.5).eps)


def test_autocast_runs_reduced_precision_and_returns_fp32_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.rand(8, 1, 4, 4)
    fast = Autocast(model, "bf16")
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == (8, 5)
    with torch.no_grad():
        ref = model(x)
    # bf16 keeps 8 bits of mantissa: close to fp32, but not equal (the product ran in bf16).
    assert torch.allclose(out, ref, atol=0.05) and not torch.equal(out, ref)
    assert Autocast(model, Precision.BF16).precision is Precision.BF16
    assert "precision=bf16" in repr(fast)


def test_autocast_rejects_fp32_bad_names_and_non_modules():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="reduced precision"):
        Autocast(model, "fp32")
    with pytest.raises(ValueError, match="'bf16'"):
        Autocast(model, "int8")
    with pytest.raises(TypeError, match="nn.Module"):
        Autocast(lambda x: x, "bf16")


def test_robust_by_majority_counts_ties_and_nan_as_broken():
    from unmask.bench.core import robust_by_majority

    rate = torch.tensor([0.0, 0.49, 0.5, 1.0, float("nan")])
    assert robust_by_majority(rate).tolist() == [True, True, False, False, False]


def test_sample_outcomes_merge_is_the_per_sample_worst_case():
    from unmask.bench.core import SampleOutcomes

    ens = SampleOutcomes(("clean", None, None, "apgd-ce"))
    diag = SampleOutcomes((None, "follow-up:square", None, "diagnosis:pgd"))
    worst = ens.merge(diag)
    assert worst.broken_by == ("clean", "follow-up:square", None, "apgd-ce")
    assert worst.robust_accuracy == 0.25
    assert worst.robust_accuracy <= min(ens.robust_accuracy, diag.robust_accuracy)
    assert worst.counts() == {"clean": 1, "follow-up:square": 1, "apgd-ce": 1}
    assert SampleOutcomes.from_dict(worst.to_dict()) == worst
    rated = SampleOutcomes((None, None), (0.25, 0.0)).merge(SampleOutcomes((None, "eot"), (0.1, 0.75)))
    assert rated.fooled_rate == (0.25, 0.75)
    with pytest.raises(ValueError, match="merge"):
        ens.merge(SampleOutcomes((None,)))


class _NaNLogits(nn.Module):
    """A classifier whose logits are NaN on every input (``rows=None``) or on some rows."""

    def __init__(self, rows=None):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.rows = rows

    def forward(self, x):
        z = self.lin(x.flatten(1))
        if self.rows is None:
            return z * float("nan")
        mask = torch.zeros(z.shape[0], 1, dtype=torch.bool)
        mask[: self.rows] = True
        return torch.where(mask, torch.full_like(z, float("nan")), z)


@pytest.mark.parametrize("rows", [None, 3])
def test_non_finite_logits_are_an_error_in_every_entry_point(rows):
    """A model with NaN logits (all or some) is an error naming the model and the share, in
    the attacks, the ensemble, the diagnosis and the pytest helper: never robust accuracy 1."""
    from unmask.attacks import PGD, Ensemble
    from unmask.bench.core import NonFiniteOutputError
    from unmask.bench.report.testing import assert_robust_accuracy
    from unmask.defenses import diagnose

    torch.manual_seed(0)
    model = _NaNLogits(rows).eval()
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    threat = Threat("linf", 0.1)
    share = "16 of 16 inputs (100%)" if rows is None else "3 of 16 inputs (19%)"
    for run in (lambda: PGD(threat, steps=2)(model, x, y),
                lambda: Ensemble.preset("quick", threat)(model, x, y),
                lambda: diagnose(model, x, y, threat, fast=True, audit_flow=False),
                lambda: assert_robust_accuracy(model, (x, y), threat, attacks="quick",
                                               at_least=0.0, n=16, diagnose=True)):
        with pytest.raises(NonFiniteOutputError, match="_NaNLogits") as err:
            run()
        assert share in str(err.value)


def test_inf_logits_are_an_error_too():
    from unmask.bench.core import NonFiniteOutputError

    z = torch.zeros(4, 3)
    z[2, 1] = float("inf")
    with pytest.raises(NonFiniteOutputError, match="1 of 4 inputs"):
        check_logits(z, 4)
