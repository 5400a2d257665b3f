"""Contract tests generated from every registry, so an entry added tomorrow is tested the day it
is added.

One section per registry. Each contract is a function (``*_contract``) that raises
``AssertionError`` naming the broken promise; a test parametrised over ``REGISTRY.names()``
calls it for every registered entry, and a break-it test registers a deliberately broken dummy
inside ``REGISTRY.isolated()`` and shows the same function rejects it. Nothing is skipped: an
entry the contract cannot exercise (an attack without a factory below) fails.

Registries: attacks (``unmask.attacks.ATTACKS``), ensemble presets (``PRESETS``), backdoor
triggers (``TRIGGERS``), masking checks (``unmask.defenses.masking.CHECKS``), datasets
(``unmask.bench.data.DATASETS``), attribution methods (``unmask.explain.METHODS``), explanation
metrics (``unmask.explain.METRICS``), zoo entries (``unmask.bench.zoo.MODELS``), training recipes
(``unmask.bench.core.training.RECIPES``). The architectures are generated in ``test_archs.py``.
"""

from __future__ import annotations

import ast
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from unmask.attacks import (
    APGD,
    APGDT,
    ATTACKS,
    BPDA,
    EOT,
    FGSM,
    PGD,
    PRESETS,
    AdaptiveSquare,
    APGDTMalt,
    BadNets,
    BranchPGD,
    Brightness,
    Compose,
    Ensemble,
    RandomAffine,
    Square,
    Transfer,
)
from unmask.attacks.backdoor_triggers import TRIGGERS, Trigger, make_trigger, register_trigger
from unmask.attacks.base import Attack
from unmask.bench import Threat, data, zoo
from unmask.bench.cli import build_parser
from unmask.bench.cli.attack import attack_choices
from unmask.bench.core import AttackResult
from unmask.bench.core.fileio import write_between_markers
from unmask.bench.core.registry import Registry, UnknownNameError
from unmask.bench.core.training import RECIPES, register_recipe, seeded_init
from unmask.bench.suite.spec import SuiteError, parse_suite
from unmask.bench.zoo import MODELS
from unmask.bench.zoo.archs import ARCHS
from unmask.defenses import masking
from unmask.defenses.masking import CHECKS, CheckResult, MaskingKind, Outcome, Verdict
from unmask.explain import METHODS, METRICS, attribute
from unmask.explain.attribution import register_method
from unmask.explain.metrics import MetricInputs, MetricScore, ScoreInfo, register_metric

ROOT = Path(__file__).resolve().parents[1]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits_model(digits_mlp):
    # An identity first module gives BPDA a module to approximate.
    return nn.Sequential(nn.Identity(), digits_mlp).eval()


@pytest.fixture(scope="module")
def digits_batch(digits_test):
    x, y = digits_test
    return x[:24], y[:24]


# --- the registry base ------------------------------------------------------------------------


def test_registry_base_aliases_order_and_errors():
    reg: Registry[int] = Registry("thing", order=lambda v: -v)
    reg.add("one", 1, aliases=("uno",))
    reg.add("two", 2)
    assert reg.names() == ["two", "one"] and list(reg) == reg.names()
    assert reg.get("uno") == 1 and reg["one"] == 1 and reg.resolve("uno") == "one"
    assert "uno" not in reg and "one" in reg and reg.aliases() == {"uno": "one"}
    assert reg.items() == [("two", 2), ("one", 1)] and reg.values() == [2, 1]
    with pytest.raises(ValueError, match="alias 'uno' is already taken"):
        reg.add("three", 3, aliases=("uno",))
    with pytest.raises(UnknownNameError, match=r"unknown thing 'four'; known: two, one"):
        reg.get("four")
    # Bad user input and a failed lookup at once: both except clauses catch it.
    assert issubclass(UnknownNameError, KeyError) and issubclass(UnknownNameError, ValueError)
    with reg.isolated():
        reg.remove("one")
        assert reg.names() == ["two"] and reg.aliases() == {}
    assert reg.get("uno") == 1
    reg.clear()
    assert len(reg) == 0


# --- attacks ----------------------------------------------------------------------------------

# Every registered attack name -> factory(threat, model) building a small configured instance
# (the wrappers need an inner attack, transfer a surrogate, branch-pgd its branches).
ATTACK_FACTORIES = {
    "fgsm": lambda t, m: FGSM(t),
    "pgd": lambda t, m: PGD(t, steps=10),
    "apgd": lambda t, m: APGD(t, steps=10),
    "apgd-t": lambda t, m: APGDT(t, steps=10, n_targets=3),
    "square": lambda t, m: Square(t, queries=60),
    "apgd-t-malt": lambda t, m: APGDTMalt(t, steps=10, n_targets=2, candidates=4),
    "square-adaptive": lambda t, m: AdaptiveSquare(t, probe=20, queries=60),
    "eot": lambda t, m: EOT(PGD(t, steps=5), transform=Compose([RandomAffine(10), Brightness(0.05)]),
                            samples=3, eval_draws=4),
    "bpda": lambda t, m: BPDA(PGD(t, steps=5), approximations=["0"]),
    "transfer": lambda t, m: Transfer(PGD(t, steps=5), surrogate=m),
    "branch-pgd": lambda t, m: BranchPGD(t, branch="0", branches=["0"], steps=5),
}
ATTACK_THREATS = [Threat("linf", 0.1), Threat("l2", 0.8)]


def attack_factory(name: str):
    """The factory of a registered attack; an attack registered without one fails here."""
    assert name in ATTACK_FACTORIES, (
        f"attack {name!r} is registered but has no factory in tests/test_registries.py "
        "ATTACK_FACTORIES: add one so its contract is tested")
    return ATTACK_FACTORIES[name]


def attack_contract(attack: Attack, model: nn.Module, x: Tensor, y: Tensor,
                    threat: Threat) -> None:
    """DESIGN.md's guarantees of every attack: ``x_adv`` in the threat ball and [0, 1]; the
    best iterate (success means ``model(x_adv)`` is fooled); per-sample costs; a misclassified
    clean sample costs one forward pass; same seed, same result."""
    r1 = attack(model, x, y, generator=_gen(1))
    r2 = attack(model, x, y, generator=_gen(1))
    assert isinstance(r1, AttackResult), f"{attack!r} returned {type(r1).__name__}"
    assert r1.x_adv.shape == x.shape, f"x_adv has shape {tuple(r1.x_adv.shape)}"
    assert bool(threat.contains(r1.x_adv, x, atol=1e-5).all()), "x_adv outside the threat ball"
    assert float(r1.x_adv.min()) >= 0 and float(r1.x_adv.max()) <= 1, "x_adv outside [0, 1]"
    assert torch.equal(r1.x_adv, r2.x_adv) and torch.equal(r1.success, r2.success), (
        "same seed, different result")
    with torch.no_grad():
        fooled = model(r1.x_adv).argmax(1) != y
    if r1.expected_success is None:  # EOT judges success in expectation over fresh draws
        assert torch.equal(fooled, r1.success), "success is not the model fooled by x_adv"
        assert torch.equal(r1.success, r1.margin < 0), "success disagrees with the margin"
    assert r1.forwards.shape == y.shape and bool((r1.forwards >= 1).all()), "per-sample costs"
    clean_wrong = model(x).argmax(1) != y
    if clean_wrong.any() and r1.expected_success is None:
        assert bool((r1.forwards[clean_wrong] == 1).all()), "misclassified samples cost more"
        assert bool((r1.backwards[clean_wrong] == 0).all()), "misclassified samples cost more"
    assert r1.config["eps"] == threat.eps and r1.name


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("threat", ATTACK_THREATS, ids=str)
def test_every_attack_keeps_the_contract(name, threat, digits_model, digits_batch):
    attack = attack_factory(name)(threat, digits_model)
    assert isinstance(attack, ATTACKS.get(name)), f"the factory of {name!r} builds another class"
    attack_contract(attack, digits_model, *digits_batch, threat)


def test_attack_factories_name_only_registered_attacks():
    assert set(ATTACK_FACTORIES) <= set(ATTACKS.names()), set(ATTACK_FACTORIES) - set(ATTACKS)


class _OutsideTheBall(Attack):
    """Broken on purpose: steps 2 eps along the sign of the input, ignoring the threat."""

    def __call__(self, model, x, y, *, targets=None, generator=None):
        x_adv = (x + 2 * self.threat.eps * torch.where(x > 0.5, -1.0, 1.0)).clamp(0, 1)
        with torch.no_grad():
            logits = model(x_adv)
        m = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(
            1, y[:, None], -math.inf).amax(1)
        ones = torch.ones_like(y)
        return AttackResult(x_adv=x_adv, success=m < 0, margin=m, forwards=ones,
                            backwards=0 * ones, config={"eps": self.threat.eps}, name="broken")


def test_break_it_an_attack_leaving_the_ball_fails_the_contract(digits_model, digits_batch):
    threat = ATTACK_THREATS[0]
    with ATTACKS.isolated():
        ATTACKS.add("_outside-the-ball", _OutsideTheBall)
        with pytest.raises(AssertionError, match="no factory"):
            attack_factory("_outside-the-ball")
        with pytest.raises(AssertionError, match="outside the threat ball"):
            attack_contract(ATTACKS.get("_outside-the-ball")(threat), digits_model,
                            *digits_batch, threat)
    assert "_outside-the-ball" not in ATTACKS


# --- ensemble presets --------------------------------------------------------------------------


def preset_contract(name: str, model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> None:
    """A preset builds a non-empty cascade of attacks on exactly the requested threat, and its
    ensemble's result stays in the ball and [0, 1], with robust samples among the clean-correct
    ones and every break credited to one of its attacks."""
    attacks = PRESETS.get(name)(threat)
    assert attacks and all(isinstance(a, Attack) for a in attacks), (
        f"preset {name!r} must give a non-empty list of attacks, got {attacks!r}")
    assert all(a.threat == threat for a in attacks), (
        f"preset {name!r} ignores the requested threat {threat}: "
        f"{sorted({str(a.threat) for a in attacks})}")
    ens = Ensemble.preset(name, threat)
    result = ens(model, x, y, generator=0)
    assert bool(threat.contains(result.x_adv, x, atol=1e-5).all()), "x_adv outside the ball"
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    assert bool((result.robust <= result.clean_correct).all())
    assert set(result.broken_by) <= {None, "clean", *ens.labels}
    assert 0.0 <= result.robust_accuracy <= result.clean_accuracy <= 1.0


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_builds_and_runs_on_a_tiny_model(name, digits_model, digits_batch):
    x, y = digits_batch
    # At Linf 0.3 the tiny MLP breaks within the first attack's steps: the cascade's early
    # exit keeps the standard preset (100-step APGDs, Square-5000) to a second.
    preset_contract(name, digits_model, x[:8], y[:8], Threat("linf", 0.3))


def test_break_it_a_preset_ignoring_the_threat_fails_the_contract(digits_model, digits_batch):
    x, y = digits_batch
    with PRESETS.isolated():
        PRESETS.add("_wrong-threat", lambda threat: [FGSM(Threat(threat.norm, 2 * threat.eps))])
        with pytest.raises(AssertionError, match="ignores the requested threat"):
            preset_contract("_wrong-threat", digits_model, x[:8], y[:8], Threat("linf", 0.05))
    assert "_wrong-threat" not in PRESETS


def test_preset_names_come_from_the_registry_in_the_cli_and_the_suite():
    assert set(PRESETS.names()) <= set(attack_choices())
    doc = {"name": "s", "dataset": "digits", "models": ["digits-mlp"],
           "threats": [{"norm": "linf", "eps": 0.1}], "attacks": {"preset": "_mine"}}
    with pytest.raises(SuiteError, match="'quick'"):
        parse_suite(doc)
    with PRESETS.isolated():  # a preset registered today is a valid suite value today
        PRESETS.add("_mine", lambda threat: [FGSM(threat)])
        assert parse_suite(doc).attacks.preset == "_mine"
        assert "_mine" in attack_choices()


def test_cli_help_lists_names_from_the_registries(capsys, monkeypatch):
    """``--help`` of attack and explain is built from the registries at parse time: an entry
    registered now is listed now (and one removed is gone)."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside hyphenated names
    with PRESETS.isolated(), METHODS.isolated(), ARCHS.isolated():
        PRESETS.add("_fast-preset", lambda threat: [FGSM(threat)])
        register_method("_my-map", title="mine", short="mine", aliases=("_mm",))(
            lambda model, x, target: x)
        ARCHS.add("_my-arch", nn.Identity)
        for argv in (["attack"], ["explain"]):
            with pytest.raises(SystemExit):
                build_parser().parse_args([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "_fast-preset" in text and "_my-map (_mm)" in text and "_my-arch" in text
    for argv in (["attack"], ["explain"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--help"])
    text = capsys.readouterr().out
    assert "_fast-preset" not in text and "_my-map" not in text
    assert all(n in " ".join(text.split()) for n in [*PRESETS, *METHODS, *ARCHS])


# --- masking checks ----------------------------------------------------------------------------


def masking_check_contract(check: masking.Check, ctx: masking.Context) -> CheckResult:
    """A check runs on a tiny model and returns a :class:`CheckResult` with a valid status: its
    own name and metadata, a bool verdict, a finite value (or None), the declared evidence when
    it fires, a reason when skipped, and its cost in forward/backward passes."""
    r = check.run(ctx)
    assert isinstance(r, CheckResult), f"{check.name}: returned {type(r).__name__}"
    assert r.name == check.name and isinstance(r.passed, bool)
    assert isinstance(r.severity, Verdict) and isinstance(r.kind, MaskingKind)
    assert r.value is None or math.isfinite(r.value), f"{check.name}: value {r.value}"
    if r.skipped is not None:
        assert isinstance(r.skipped, str) and r.skipped, f"{check.name}: skipped without reason"
    elif not r.passed:
        missing = set(check.evidence) - set(r.evidence or {})
        assert not missing, f"{check.name}: fired without the declared evidence {missing}"
    if r.cost is not None:
        assert set(r.cost) == {"forward", "backward"} and min(r.cost.values()) >= 0
    return r


@pytest.fixture(scope="module")
def masking_context(digits_model, digits_batch):
    return masking.Context(digits_model, *digits_batch, Threat("linf", 0.1),
                           budget=masking.Budget.for_mode(True), generator=0,
                           surrogate=digits_model)


@pytest.mark.parametrize("name", CHECKS.names())
def test_every_masking_check_runs_and_returns_a_valid_result(name, masking_context):
    masking_check_contract(CHECKS.get(name), masking_context)


def test_break_it_a_check_with_a_nan_value_and_no_evidence_fails_the_contract(masking_context):
    with CHECKS.isolated():
        masking.check("_broken", family="outputs", kind=MaskingKind.STOCHASTIC,
                      severity=Verdict.MASKED, source="none", rule="never", cost="nothing",
                      evidence=("samples",))(lambda ctx: Outcome(float("nan"), False))
        with pytest.raises(AssertionError, match="_broken: value nan"):
            masking_check_contract(CHECKS.get("_broken"), masking_context)
        masking.check("_no-evidence", family="outputs", kind=MaskingKind.STOCHASTIC,
                      severity=Verdict.MASKED, source="none", rule="never", cost="nothing",
                      evidence=("samples",))(lambda ctx: Outcome(1.0, False))
        with pytest.raises(AssertionError, match="without the declared evidence"):
            masking_check_contract(CHECKS.get("_no-evidence"), masking_context)
    assert "_broken" not in CHECKS


# --- datasets -----------------------------------------------------------------------------------


def dataset_contract(name: str, missing_dir: Path) -> None:
    """An embedded (offline) dataset loads both splits as float32 ``N x C x H x W`` in [0, 1]
    with its registered shape and int64 labels in ``[0, num_classes)``. A directory-based one
    given an empty directory raises ``FileNotFoundError`` whose message names that directory
    (what the user has to provide)."""
    info = data.info(name)
    if not info.offline:
        with pytest.raises(FileNotFoundError) as err:
            data.load(name, "test", root=missing_dir)
        assert str(missing_dir) in str(err.value), (
            f"{name}: the missing-data error does not name the directory: {err.value}")
        return
    for split in ("train", "test"):
        x, y = data.load(name, split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64, f"{name}/{split}: dtypes"
        assert x.dim() == 4 and tuple(x.shape[1:]) == info.shape and len(y) == len(x) > 0, (
            f"{name}/{split}: shape {tuple(x.shape)}, registered {info.shape}")
        assert float(x.min()) >= 0 and float(x.max()) <= 1, f"{name}/{split}: outside [0, 1]"
        assert int(y.min()) >= 0 and int(y.max()) < info.num_classes, f"{name}/{split}: labels"


@pytest.mark.parametrize("name", data.DATASETS.names())
def test_every_dataset_loads_or_says_what_to_provide(name, tmp_path):
    dataset_contract(name, tmp_path / "nothing-here")


def test_break_it_broken_datasets_fail_the_contract(tmp_path):
    with data.DATASETS.isolated():
        @data.register_dataset("_wrong-range", shape=(1, 2, 2), num_classes=2, offline=True,
                               description="pixels in [0, 255]")
        def _wrong_range(split):
            return torch.full((3, 1, 2, 2), 255.0), torch.zeros(3, dtype=torch.int64)

        @data.register_dataset("_silent-dir", shape=(1, 2, 2), num_classes=2, offline=False,
                               description="an error that does not say what is missing")
        def _silent_dir(split, root=None):
            raise FileNotFoundError("no data")

        with pytest.raises(AssertionError, match="outside"):
            dataset_contract("_wrong-range", tmp_path)
        with pytest.raises(AssertionError, match="does not name the directory"):
            dataset_contract("_silent-dir", tmp_path / "nothing-here")
    assert "_wrong-range" not in data.DATASETS


# --- attribution methods ------------------------------------------------------------------------


def method_contract(name: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``attribute(model, x, y, name)`` has ``x``'s shape and is finite; so does each alias."""
    a = attribute(model, x, y, name)
    assert isinstance(a, Tensor) and a.shape == x.shape, (
        f"{name}: attribution of shape {tuple(getattr(a, 'shape', ()))}, input {tuple(x.shape)}")
    assert bool(torch.isfinite(a).all()), f"{name}: non-finite attributions"
    for alias in (a for a, n in METHODS.aliases().items() if n == name):
        assert torch.equal(attribute(model, x, y, alias), a), f"alias {alias} is not {name}"
    return a


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_gives_finite_maps_of_the_input_shape(name, digits_model, digits_batch):
    x, y = digits_batch
    method_contract(name, digits_model, x[:4], y[:4])


def test_break_it_broken_methods_fail_the_contract(digits_model, digits_batch):
    x, y = digits_batch
    with METHODS.isolated():
        register_method("_pixel-sum", title="flat", short="flat")(
            lambda model, x, target: x.flatten(1))
        register_method("_nan", title="NaN", short="nan")(
            lambda model, x, target: torch.full_like(x, float("nan")))
        with pytest.raises(AssertionError, match="_pixel-sum: attribution of shape"):
            method_contract("_pixel-sum", digits_model, x[:4], y[:4])
        with pytest.raises(AssertionError, match="_nan: non-finite"):
            method_contract("_nan", digits_model, x[:4], y[:4])
    assert "_nan" not in METHODS


def test_method_names_come_from_the_registry_in_the_suite():
    doc = {"name": "s", "dataset": "digits", "models": ["digits-mlp"],
           "threats": [{"norm": "linf", "eps": 0.1}], "explain": {"methods": ["_mine"]}}
    with pytest.raises(SuiteError, match="'saliency'"):
        parse_suite(doc)
    with METHODS.isolated():
        register_method("_mine", title="mine", short="mine")(lambda model, x, target: x)
        assert parse_suite(doc).explain.methods == ("_mine",)


# --- explanation metrics ------------------------------------------------------------------------


SHARE = ScoreInfo(0.0, 1.0, "higher", "share", "share", "[0, 1]", "a dummy's share")


def metric_inputs(model: nn.Module, x: Tensor, y: Tensor, method: str) -> MetricInputs:
    """Everything a registered metric may need, on a tiny model: the maps, adversarial
    examples (PGD-5) and a backdoor trigger (a 2-pixel BadNets patch) with its target."""
    opts = {"n_steps": 8} if method == "integrated_gradients" else {}
    x_adv = PGD(Threat("linf", 0.1), steps=5)(model, x, y, generator=0).x_adv
    return MetricInputs(model, x, y, method, attribute(model, x, y, method, **opts), opts,
                        seed=0, ig_steps=8, x_adv=x_adv, trigger=BadNets(size=2),
                        trigger_target=0)


def metric_contract(name: str, inputs: MetricInputs) -> list[MetricScore]:
    """A metric applies to complete inputs and gives at least one score, each a finite number
    under a declared key, inside that key's declared range."""
    metric = METRICS.get(name)
    assert metric.applies(inputs), f"{name}: does not apply to complete inputs"
    scores = metric(inputs)
    assert scores, f"{name}: no score"
    for s in scores:
        assert s.key in metric.ranges, f"{name}: undeclared key {s.key!r}"
        low, high = metric.ranges[s.key]
        assert isinstance(s.value, float) and math.isfinite(s.value), f"{name}: {s.key}={s.value}"
        assert low <= s.value <= high, f"{name}: {s.key}={s.value} outside [{low}, {high}]"
    return scores


@pytest.mark.parametrize("name", METRICS.names())
def test_every_metric_gives_finite_numbers_in_its_declared_range(name, digits_model,
                                                                 digits_batch):
    x, y = digits_batch
    methods = METRICS.get(name).methods or ("saliency",)
    metric_contract(name, metric_inputs(digits_model, x[:8], y[:8], methods[0]))


def test_break_it_broken_metrics_fail_the_contract(digits_model, digits_batch):
    x, y = digits_batch
    inputs = metric_inputs(digits_model, x[:8], y[:8], "saliency")
    with METRICS.isolated():
        register_metric("_above-range", scores={"share": SHARE})(
            lambda inp: [MetricScore("share", 1.5, {})])
        register_metric("_undeclared", scores={"share": SHARE})(
            lambda inp: [MetricScore("other", 0.5, {})])
        with pytest.raises(AssertionError, match=r"_above-range: share=1.5 outside \[0.0, 1.0\]"):
            metric_contract("_above-range", inputs)
        with pytest.raises(AssertionError, match="undeclared key 'other'"):
            metric_contract("_undeclared", inputs)
    assert "_above-range" not in METRICS


def test_metric_names_come_from_the_registry_in_the_suite():
    doc = {"name": "s", "dataset": "digits", "models": ["digits-mlp"],
           "threats": [{"norm": "linf", "eps": 0.1}], "explain": {"metrics": ["_mine"]}}
    with pytest.raises(SuiteError, match="deletion_insertion"):
        parse_suite(doc)
    with METRICS.isolated():
        register_metric("_mine", scores={"share": SHARE})(lambda inp: [])
        assert parse_suite(doc).explain.metrics == ("_mine",)


# --- backdoor triggers -------------------------------------------------------------------------


def trigger_contract(name: str, x: Tensor) -> None:
    """A trigger built by name with its defaults leaves its input untouched, returns a new batch
    of the same shape in [0, 1] that differs from it, the same one every call, and rebuilds
    from its own ``config()``."""
    trigger = make_trigger(name)
    before = x.clone()
    out = trigger(x)
    assert torch.equal(x, before), f"{name}: modified its input"
    assert out.shape == x.shape, f"{name}: shape {tuple(out.shape)}, input {tuple(x.shape)}"
    assert float(out.min()) >= 0 and float(out.max()) <= 1, f"{name}: outside [0, 1]"
    assert not torch.equal(out, x), f"{name}: changes nothing"
    assert torch.equal(trigger(x), out), f"{name}: not deterministic"
    assert torch.equal(make_trigger(name, **trigger.config())(x), out), (
        f"{name}: config() does not rebuild it")


@pytest.mark.parametrize("name", TRIGGERS.names())
def test_every_trigger_keeps_the_contract(name, digits_batch):
    trigger_contract(name, digits_batch[0][:6])


def test_break_it_a_trigger_changing_nothing_fails_the_contract(digits_batch):
    with TRIGGERS.isolated():
        @register_trigger
        class _Nothing(Trigger):
            name = "_nothing"

            def apply(self, x):
                return x.clone()

            def config(self):
                return {}

        with pytest.raises(AssertionError, match="_nothing: changes nothing"):
            trigger_contract("_nothing", digits_batch[0][:6])
    assert "_nothing" not in TRIGGERS


# --- training recipes --------------------------------------------------------------------------


def _tiny_mlp() -> nn.Module:
    with seeded_init(0):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def recipe_contract(name: str, x: Tensor, y: Tensor) -> nn.Module:
    """A recipe called the way the zoo calls it (defaults for every option) trains a tiny model
    and returns it (or ``(model, metrics)`` with a dict): finite ``N x K`` logits, weights that
    changed, and the same weights from the same seed."""
    opts = dict(epochs=1, batch_size=32, lr=1e-2, generator=0, progress=False)
    outs = [RECIPES.get(name)(_tiny_mlp(), x, y, **opts) for _ in range(2)]
    models = []
    for out in outs:
        model, metrics = out if isinstance(out, tuple) else (out, {})
        assert isinstance(model, nn.Module) and isinstance(metrics, dict), (
            f"{name}: returned {type(out).__name__}, not a model or (model, metrics)")
        models.append(model)
    with torch.no_grad():
        logits = models[0].eval()(x)
    assert logits.shape == (len(x), 10) and bool(torch.isfinite(logits).all()), (
        f"{name}: logits {tuple(logits.shape)}, finite {bool(torch.isfinite(logits).all())}")
    before, after = _tiny_mlp().state_dict(), models[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: trained nothing"
    second = models[1].state_dict()
    assert all(torch.equal(after[k], second[k]) for k in after), f"{name}: same seed, other weights"
    return models[0]


@pytest.mark.parametrize("name", RECIPES.names())
def test_every_recipe_trains_a_tiny_model(name, digits_train_small):
    recipe_contract(name, *digits_train_small)


@pytest.fixture(scope="module")
def digits_train_small():
    x, y = data.load("digits", "train", n=64)
    return x, y


def test_break_it_a_recipe_that_trains_nothing_fails_the_contract(digits_train_small):
    with RECIPES.isolated():
        register_recipe("_idle")(lambda model, x, y, **opts: model)
        with pytest.raises(AssertionError, match="_idle: trained nothing"):
            recipe_contract("_idle", *digits_train_small)
    assert "_idle" not in RECIPES


# --- zoo entries --------------------------------------------------------------------------------


def untrained(name: str) -> nn.Module:
    """Entry ``name``'s model as its builder makes it, without training (a derived entry wraps
    its untrained base)."""
    entry = zoo.get(name)
    return entry.builder(untrained(entry.base)) if entry.base else entry.builder()


def zoo_entry_contract(name: str) -> None:
    """An entry's builder returns an ``nn.Module`` mapping a batch of its dataset's inputs
    (``N x C x H x W`` in [0, 1]) to ``N x K`` logits, ``K`` the dataset's classes."""
    entry = zoo.get(name)
    assert entry.dataset in data.DATASETS, f"{name}: unknown dataset {entry.dataset!r}"
    info = data.info(entry.dataset)
    model = untrained(name)
    assert isinstance(model, nn.Module), f"{name}: builder returned {type(model).__name__}"
    x = torch.rand((3, *info.shape), generator=_gen())
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, Tensor) and tuple(out.shape) == (3, info.num_classes), (
        f"{name}: {tuple(x.shape)} -> {tuple(getattr(out, 'shape', ()))}, expected "
        f"(3, {info.num_classes}) logits")


@pytest.mark.parametrize("name", zoo.list())
def test_every_zoo_entry_builds_a_model_of_its_dataset(name):
    zoo_entry_contract(name)


def test_break_it_a_zoo_entry_with_the_wrong_output_fails_the_contract():
    with zoo.isolated():
        zoo.register_model("_flat", dataset="digits", epochs=0)(lambda: nn.Flatten())
        with pytest.raises(AssertionError, match=r"_flat: .* -> \(3, 64\), expected \(3, 10\)"):
            zoo_entry_contract("_flat")
    assert "_flat" not in MODELS


# --- the docs list the registries ---------------------------------------------------------------

DOC_REGISTRIES = [
    ("attacks", "unmask.attacks.ATTACKS", ATTACKS),
    ("ensemble presets", "unmask.attacks.PRESETS", PRESETS),
    ("masking checks", "unmask.defenses.masking.CHECKS", CHECKS),
    ("backdoor triggers", "unmask.attacks.TRIGGERS", TRIGGERS),
    ("zoo entries", "unmask.bench.zoo.MODELS", MODELS),
    ("architectures", "unmask.bench.zoo.archs.ARCHS", ARCHS),
    ("datasets", "unmask.bench.data.DATASETS", data.DATASETS),
    ("training recipes", "unmask.bench.core.training.RECIPES", RECIPES),
    ("attribution methods", "unmask.explain.METHODS", METHODS),
    ("explanation metrics", "unmask.explain.METRICS", METRICS),
]
README_MARKERS = ("<!-- registries:start -->", "<!-- registries:end -->")


def registries_table() -> str:
    """README's table of every registry and its names (aliases in parentheses)."""
    rows = ["| kind | registry | names |", "|---|---|---|"]
    for kind, where, registry in DOC_REGISTRIES:
        aliases = registry.aliases()
        names = [f"`{n}`" + "".join(f" (`{a}`)" for a, m in aliases.items() if m == n)
                 for n in registry.names()]
        rows.append(f"| {kind} | `{where}` | {', '.join(names)} |")
    return "\n".join(rows) + "\n"


def test_readme_table_lists_every_registry():
    """The README's table is the registries' own listing: a name registered, renamed or
    removed without regenerating it fails here (``UNMASK_UPDATE_DOCS=1`` rewrites it)."""
    zoo.entries()  # the plugin packages register their zoo entries and recipes on first use
    path = ROOT / "README.md"
    if os.environ.get("UNMASK_UPDATE_DOCS") == "1":
        write_between_markers(path, README_MARKERS, registries_table())
    start, end = README_MARKERS
    text = path.read_text()
    block = text[text.index(start) + len(start) + 1:text.index(end)]
    assert block == registries_table(), "README's table of registries is stale: run the tests " \
                                        "with UNMASK_UPDATE_DOCS=1 to regenerate it"


def test_break_it_a_new_name_makes_the_readme_table_stale():
    text = (ROOT / "README.md").read_text()
    with METRICS.isolated():
        register_metric("_new", scores={"share": SHARE})(lambda inp: [])
        assert "`_new`" in registries_table() and "`_new`" not in text


@pytest.mark.parametrize("registry, path", [
    (PRESETS, "attacks/ensemble.py"),
    (METHODS, "explain/attribution.py"),
    (data.DATASETS, "bench/data.py"),
], ids=["presets", "methods", "datasets"])
def test_module_docstring_lists_equal_the_registries(registry, path):
    """The bulleted ``* ``name`` ...`` list in the registry module's docstring names exactly
    the registered entries (a hand-written list, checked)."""
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text()))
    listed = re.findall(r"^\* ``([\w-]+)``", doc, flags=re.M)
    assert sorted(listed) == sorted(registry.names()), (path, listed, registry.names())
