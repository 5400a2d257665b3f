"""Tests of the training recipes, the inference-time defenses and their zoo entries.

The recipes are checked on the 8 x 8 digits with a tiny MLP (seconds); the adversarially
trained zoo entries take minutes each, so only their registration and configuration are
tested here (their measured numbers are on their cards). The masking controls wrap the
session's ``mnist-cnn``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from unmask.attacks import BPDA, EOT, PGD, success_rate
from unmask.attacks.bpda import find_preprocessing
from unmask.bench import Threat, data, zoo
from unmask.bench.core import ProbabilityOutputWarning, check_logits
from unmask.bench.core.training import RECIPES, predict, seeded_init
from unmask.bench.zoo.archs import MLP, SmallCNN
from unmask.defenses import (
    JPEG,
    AdversarialLoss,
    FastAdversarialLoss,
    GradientPenaltyLoss,
    InputQuantization,
    JPEGCompression,
    LowTemperature,
    PGDAdversarialLoss,
    ProbabilityOutput,
    Quantize,
    RandomNoise,
    TradesLoss,
    adversarial_training,
    robustness_metrics,
)
from unmask.defenses.adversarial import train_with_loss

DIGITS_EPS = 0.1


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int = 0) -> MLP:
    with seeded_init(seed):
        return MLP(in_features=64, hidden=64)


@pytest.fixture(scope="module")
def digits_train():
    return data.load("digits", "train")


# --- training recipes -----------------------------------------------------------------------

# Recipe name -> options; trained with the same data, seed, epochs and learning rate.
RECIPE_OPTIONS = {
    "pgd-at": dict(steps=5, warmup_epochs=2),
    "fast-at": dict(warmup_epochs=2),
    "trades": dict(steps=5, warmup_epochs=2),
    "grad-reg": dict(lam=0.1),
}


@pytest.fixture(scope="module")
def digits_recipes(digits_train):
    """Every recipe (and standard training) on digits: (clean, PGD-20 robust) on the test split."""
    x, y = digits_train
    opts = dict(epochs=12, batch_size=64, lr=3e-3, generator=0, progress=False)
    model = RECIPES.get("standard")(_mlp(), x, y, **opts)
    x_test, y_test = data.load("digits", "test")
    out = {"standard": robustness_metrics(model, x_test, y_test, Threat("linf", DIGITS_EPS),
                                          samples=None)}
    for name, options in RECIPE_OPTIONS.items():
        _, out[name] = RECIPES.get(name)(_mlp(), x, y, norm="linf", eps=DIGITS_EPS,
                                         eval_dataset="digits", eval_samples=None,
                                         eval_other_eps=(DIGITS_EPS / 2,), **opts, **options)
    return out


@pytest.mark.parametrize("name", sorted(RECIPE_OPTIONS))
def test_recipe_beats_standard_training_under_pgd(digits_recipes, name):
    standard, robust = digits_recipes["standard"], digits_recipes[name]
    assert robust["clean_accuracy"] > 0.85
    # Measured: standard 0.59, adversarial training 0.74-0.77, grad-reg 0.71.
    assert robust["robust_accuracy"] >= standard["robust_accuracy"] + 0.08, (standard, robust)


@pytest.mark.parametrize("name", sorted(RECIPE_OPTIONS))
def test_recipe_metrics_for_the_card(digits_recipes, name):
    metrics = digits_recipes[name]
    for key in ("clean_accuracy", "robust_accuracy", "fgsm_robust_accuracy", "train_seconds",
                "eval_seconds"):
        assert isinstance(metrics[key], float)
    assert 0 <= metrics["robust_accuracy"] <= metrics["clean_accuracy"] <= 1
    assert metrics["fgsm_robust_accuracy"] <= metrics["clean_accuracy"]
    assert metrics["attack"] == "pgd-20" and metrics["eps"] == DIGITS_EPS
    assert metrics["eval_samples"] == 360
    (smaller,) = metrics["robust_accuracy_by_eps"]
    assert smaller["eps"] == DIGITS_EPS / 2
    assert smaller["robust_accuracy"] >= metrics["robust_accuracy"]
    assert metrics["method"] == {"pgd-at": "pgd", "fast-at": "fast"}.get(name, name)


def test_every_defense_recipe_is_registered():
    for name in RECIPE_OPTIONS:
        assert name in RECIPES


@pytest.mark.parametrize("loss_cls", [PGDAdversarialLoss, FastAdversarialLoss, TradesLoss])
@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_inner_attack_stays_in_the_ball_and_raises_the_loss(digits_train, loss_cls, norm, eps):
    x, y = digits_train[0][:64], digits_train[1][:64]
    model = _mlp()
    threat = Threat(norm, eps)
    loss = loss_cls(threat)
    x_adv = loss.perturb(model, x, y, _gen())
    assert not x_adv.requires_grad
    assert bool(threat.contains(x_adv, x).all())
    assert float((x_adv - x).abs().max()) > eps / 4
    with torch.no_grad():
        if loss_cls is TradesLoss:  # it maximises the KL divergence from the clean output
            p_clean = F.softmax(model(x), dim=1)

            def kl(z):
                return F.kl_div(F.log_softmax(model(z), dim=1), p_clean, reduction="batchmean")

            assert kl(x_adv) > kl(threat.random_point(x, _gen(1)))
        else:
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_inner_attack_runs_in_eval_mode_and_restores_the_model(digits_train):
    x, y = digits_train[0][:16], digits_train[1][:16]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32),
                                torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    model.train()
    stats = model[2].running_mean.clone()
    loss = PGDAdversarialLoss(Threat("linf", 0.1), steps=3)
    x_adv = loss.perturb(model, x, y, _gen())
    # Seven forward passes in eval mode: the BatchNorm statistics did not move.
    assert torch.equal(model[2].running_mean, stats)
    assert model.training and all(p.requires_grad for p in model.parameters())
    value = loss(model, x, y, _gen())
    value.backward()
    assert model[1].weight.grad is not None
    assert bool(Threat("linf", 0.1).contains(x_adv, x).all())


def test_eps_warmup_is_linear_in_the_progress(digits_train):
    x, y = digits_train[0][:32], digits_train[1][:32]
    model = _mlp()
    loss = PGDAdversarialLoss(Threat("linf", 0.2), steps=3, warmup_epochs=4)
    assert loss.current_threat.eps == pytest.approx(0.2)  # no schedule told: full eps
    loss.set_progress(0.0)
    assert torch.equal(loss.perturb(model, x, y, _gen()), x)
    loss.set_progress(1.0)
    assert loss.current_threat.eps == pytest.approx(0.05)
    assert bool(Threat("linf", 0.05).contains(loss.perturb(model, x, y, _gen()), x).all())
    loss.set_progress(9.0)
    assert loss.current_threat.eps == pytest.approx(0.2)


class _Interrupt(Exception):
    pass


class _InterruptAfter:
    """Wraps a scheduled loss and raises after ``calls`` batches (a killed run)."""

    def __init__(self, loss: AdversarialLoss, calls: int) -> None:
        self.loss, self.calls, self.desc = loss, calls, "interrupted"
        self.progress: list[float] = []

    def set_progress(self, epochs: float) -> None:
        self.progress.append(epochs)
        self.loss.set_progress(epochs)

    def __call__(self, model, x, y, generator):
        if len(self.progress) > self.calls:
            raise _Interrupt
        return self.loss(model, x, y, generator)


def test_adversarial_training_resumes_with_the_eps_schedule(digits_train, tmp_path):
    x, y = digits_train[0][:256], digits_train[1][:256]
    threat = Threat("linf", 0.1)
    opts = dict(epochs=3, batch_size=64, lr=3e-3, generator=0, progress=False)
    straight = adversarial_training(_mlp(), x, y, threat=threat, warmup_epochs=2, steps=2,
                                    **opts)
    interrupted = _InterruptAfter(PGDAdversarialLoss(threat, steps=2, warmup_epochs=2), calls=6)
    with pytest.raises(_Interrupt):
        train_with_loss(_mlp(), x, y, interrupted, checkpoint_dir=tmp_path, **opts)
    resumed = _InterruptAfter(PGDAdversarialLoss(threat, steps=2, warmup_epochs=2), calls=99)
    model = train_with_loss(_mlp(), x, y, resumed, checkpoint_dir=tmp_path, **opts)
    # The second run started at epoch 1 (one finished epoch of four batches), warm-up included.
    assert resumed.progress[0] == pytest.approx(1.0)
    for a, b in zip(straight.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_adversarial_training_validates_its_arguments(digits_train):
    x, y = digits_train
    with pytest.raises(ValueError, match="method"):
        adversarial_training(_mlp(), x, y, threat=Threat("linf", 0.1), method="free", epochs=1)
    with pytest.raises(TypeError, match="Threat"):
        PGDAdversarialLoss(0.3)
    with pytest.raises(ValueError, match="steps"):
        PGDAdversarialLoss(Threat("linf", 0.1), steps=0)
    with pytest.raises(ValueError, match="one step"):
        adversarial_training(_mlp(), x, y, threat=Threat("linf", 0.1), method="fast", steps=3)
    with pytest.raises(ValueError, match="beta"):
        TradesLoss(Threat("linf", 0.1), beta=-1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adversarial_training(_mlp(), x * 2, y, threat=Threat("linf", 0.1), epochs=1)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradient_penalty_is_trained_by_double_backprop(digits_train, norm):
    x, y = digits_train[0][:64], digits_train[1][:64]
    model = _mlp()
    params = [p for p in model.parameters() if p.requires_grad]
    ce, penalty = GradientPenaltyLoss(1.0, norm).terms(model, x, y)
    assert float(penalty.detach()) > 0
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)

    def param_grads(lam):
        model.zero_grad(set_to_none=True)
        GradientPenaltyLoss(lam, norm)(model, x, y).backward()
        return [p.grad.clone() for p in params]

    plain, penalised = param_grads(0.0), param_grads(1.0)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, penalised))
    with pytest.raises(ValueError, match="penalty norm"):
        GradientPenaltyLoss(1.0, "linf")


# --- inference-time defenses ----------------------------------------------------------------

DEFENSES = {
    "quantized": lambda m: InputQuantization(m, bits=2),
    "jpeg": lambda m: JPEGCompression(m, quality=25),
    "lowtemp": lambda m: LowTemperature(m, temperature=0.01),
    "probs": lambda m: ProbabilityOutput(m),
    "noise": lambda m: RandomNoise(m, std=0.3, seed=0),
}


@pytest.fixture(scope="module")
def mnist_batch(mnist_test):
    x, y = mnist_test
    idx = torch.linspace(0, len(y) - 1, 64).round().long()  # the split is sorted by class
    return x[idx], y[idx]


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_defense_wraps_any_model(mnist_cnn, mnist_batch, name):
    x, y = mnist_batch
    defended = DEFENSES[name](mnist_cnn).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbabilityOutputWarning)
        out = defended(x)
        check_logits(out, len(x), probabilities="ignore")
    assert out.shape == (len(x), 10) and bool(torch.isfinite(out).all())
    agreement = float((out.argmax(1) == predict(mnist_cnn, x)).float().mean())
    assert agreement >= (0.8 if name == "noise" else 0.95)
    hooked = find_preprocessing(defended)
    assert len(hooked) == 1 and callable(hooked[0][2])
    assert set(defended.state_dict()) == {f"model.{k}" for k in mnist_cnn.state_dict()}


def test_quantization_has_zero_gradient_and_bpda_breaks_it(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    q = Quantize(2)
    out = q(x)
    grid = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    assert bool(torch.isclose(out.flatten()[:, None], grid).any(1).all())
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(q(xg).sum(), xg)
    assert not bool(grad.any())
    defended = InputQuantization(mnist_cnn, bits=2)
    threat = Threat("linf", 0.3)
    plain = PGD(threat, steps=10)(defended, x, y, generator=_gen()).robust_accuracy
    bpda = BPDA(PGD(threat, steps=10))(defended, x, y, generator=_gen()).robust_accuracy
    # Measured on 200 test images with 20 steps: plain 0.94, BPDA 0.00.
    assert plain >= 0.75 and bpda <= 0.1, (plain, bpda)


def test_jpeg_is_real_compression_without_a_gradient(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    jpeg = JPEG(25)
    xg = x.clone().requires_grad_(True)
    out = jpeg(xg)
    assert out.shape == x.shape and out.dtype == x.dtype
    (grad,) = torch.autograd.grad(out.sum(), xg)
    assert not bool(grad.any())
    out = out.detach()
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - x).abs().mean()) > 0.01  # it changes the image
    assert float((JPEG(95)(x) - x).abs().mean()) < float((out - x).abs().mean())
    defended = JPEGCompression(mnist_cnn, quality=25)
    threat = Threat("linf", 0.3)
    plain = PGD(threat, steps=10)(defended, x, y, generator=_gen()).robust_accuracy
    bpda = BPDA(PGD(threat, steps=10))(defended, x, y, generator=_gen()).robust_accuracy
    # Measured on 200 test images with 20 steps: plain 0.95, BPDA 0.00.
    assert plain >= 0.75 and bpda <= 0.1, (plain, bpda)


def test_low_temperature_hides_the_ce_gradient_only(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    defended = LowTemperature(mnist_cnn, temperature=0.01)
    with torch.no_grad():
        assert torch.equal(defended(x).argmax(1), mnist_cnn(x).argmax(1))
    xg = x.clone().requires_grad_(True)
    ce = F.cross_entropy(defended(xg), y, reduction="sum")
    (grad,) = torch.autograd.grad(ce, xg)
    zero = (grad.flatten(1).abs().amax(1) == 0).float().mean()
    assert float(zero) >= 0.8  # exactly zero on most samples: the softmax saturated
    threat = Threat("linf", 0.3)
    plain = PGD(threat, steps=10)(defended, x, y, generator=_gen()).robust_accuracy
    adaptive = PGD(threat, steps=10, loss="margin")(defended, x, y,
                                                     generator=_gen()).robust_accuracy
    assert plain >= 0.75 and adaptive <= 0.1, (plain, adaptive)


def test_probability_output_is_flagged_by_the_input_checks(mnist_cnn, mnist_batch):
    x, _ = mnist_batch
    defended = ProbabilityOutput(mnist_cnn)
    with torch.no_grad():
        out = defended(x)
    torch.testing.assert_close(out.sum(1), torch.ones(len(x)))
    with pytest.warns(ProbabilityOutputWarning):
        check_logits(out, len(x))


def test_noise_is_random_reproducible_and_leaves_the_global_rng_alone(mnist_cnn, mnist_batch):
    x, _ = mnist_batch
    state = torch.random.get_rng_state()
    a, b = RandomNoise(mnist_cnn, std=0.3, seed=1), RandomNoise(mnist_cnn, std=0.3, seed=1)
    with torch.no_grad():
        first, again = a(x), a(x)
        assert not torch.equal(first, again)  # fresh noise at every forward pass
        assert torch.equal(first, b(x))  # the same seed, the same sequence
        assert torch.equal(copy.deepcopy(a)(x), a(x))
    assert torch.equal(torch.random.get_rng_state(), state)
    unseeded = RandomNoise(mnist_cnn, std=0.3, seed=None)
    with torch.no_grad():
        unseeded(x)
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_eot_beats_plain_pgd_on_the_noise_defense(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    defended = RandomNoise(mnist_cnn, std=0.3, seed=0)
    threat = Threat("linf", 0.3)
    plain = PGD(threat, steps=20)(defended, x, y, generator=_gen())
    # Success in expectation over fresh noise draws, for both attacks alike (a single noisy
    # forward pass that happens to misclassify is no success).
    plain_rate = success_rate(defended, plain.x_adv, y, draws=16, generator=_gen(1))
    eot = EOT(PGD(threat, steps=20), samples=8, eval_draws=16)(defended, x, y, generator=_gen())
    plain_robust = float((plain_rate < 0.5).float().mean())
    # Measured on these 64 images: plain 0.375, EOT 0.094.
    assert eot.robust_accuracy <= plain_robust - 0.15, (plain_robust, eot.robust_accuracy)


@pytest.mark.parametrize("make, bad", [
    (lambda: Quantize(0), "bits"), (lambda: JPEG(0), "quality"),
    (lambda: LowTemperature(SmallCNN(), temperature=0.0), "temperature"),
    (lambda: RandomNoise(SmallCNN(), std=-1.0), "std"),
    (lambda: RandomNoise(SmallCNN(), seed=-1), "seed"),
])
def test_defense_arguments_are_validated(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()


def test_jpeg_rejects_images_it_cannot_encode():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        JPEG(50)(torch.rand(2, 2, 8, 8))


# --- zoo entries ----------------------------------------------------------------------------

CONTROLS = {"mnist-cnn-quantized": InputQuantization, "mnist-cnn-jpeg": JPEGCompression,
            "mnist-cnn-lowtemp": LowTemperature, "mnist-cnn-noise": RandomNoise,
            "mnist-cnn-probs": ProbabilityOutput}
TRAINED = {"mnist-cnn-pgdat": "pgd-at", "mnist-cnn-fastat": "fast-at",
           "mnist-cnn-trades": "trades", "mnist-cnn-gradreg": "grad-reg"}


def test_masking_controls_are_registered_on_mnist_cnn():
    assert set(zoo.list(tag="masking-control")) >= set(CONTROLS)
    for name in CONTROLS:
        entry = zoo.get(name)
        assert entry.base == "mnist-cnn" and entry.recipe == "none"
        assert entry.dataset == zoo.get("mnist-cnn").dataset


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_masking_control_loads_from_the_cache(mnist_cnn, mnist_batch, name):
    x, _ = mnist_batch
    model, card = zoo.load_with_card(name, device="cpu", progress=False)
    assert isinstance(model, CONTROLS[name])
    for a, b in zip(model.model.state_dict().values(), mnist_cnn.state_dict().values()):
        assert torch.equal(a, b)
    assert card["clean_accuracy"] > (0.8 if name == "mnist-cnn-noise" else 0.9)
    again = zoo.load(name, device="cpu", progress=False)  # a cache hit
    if name != "mnist-cnn-noise":
        with torch.no_grad():
            assert torch.equal(model(x), again(x))


def test_trained_defense_entries_are_configured():
    """Registration and configuration only: each trains for minutes (numbers on the cards)."""
    reference = zoo.get("mnist-cnn")
    for name, recipe in TRAINED.items():
        entry = zoo.get(name)
        assert entry.recipe == recipe and recipe in RECIPES
        assert entry.dataset == reference.dataset and entry.seed == reference.seed
        opts = entry.recipe_options
        assert opts["norm"] == "linf" and opts["eps"] == 0.3
        assert opts["eval_dataset"] == "mnist5k" and opts["eval_samples"] == 500
        assert opts["eval_steps"] == 20
        with seeded_init(0):
            assert isinstance(entry.builder(), SmallCNN)
    assert zoo.get("mnist-cnn-trades").recipe_options["beta"] == 6.0


def test_every_training_method_builds_its_own_loss():
    """adversarial_training(method=...) builds its loss through the LOSSES registry, which
    TRADES fills from its own module: each method gets its class, and no method is missing."""
    from unmask.defenses.adversarial import LOSSES, TrainingMethod, _make_loss

    assert set(LOSSES.names()) == {m.value for m in TrainingMethod}
    expected = {TrainingMethod.PGD: PGDAdversarialLoss, TrainingMethod.FAST: FastAdversarialLoss,
                TrainingMethod.TRADES: TradesLoss}
    for method, cls in expected.items():
        loss = _make_loss(method, Threat("linf", 0.1), steps=None, step_size=None, beta=6.0,
                          warmup_epochs=0.0)
        assert type(loss) is cls
    trades = _make_loss(TrainingMethod.TRADES, Threat("linf", 0.1), steps=None, step_size=None,
                        beta=3.0, warmup_epochs=0.0)
    assert trades.beta == 3.0 and trades.steps == 10
    with pytest.raises(ValueError, match="one step"):
        _make_loss(TrainingMethod.FAST, Threat("linf", 0.1), steps=5, step_size=None, beta=6.0,
                   warmup_epochs=0.0)
