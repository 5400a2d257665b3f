"""The budget-adaptive preset: MALT's target ranking, exact per-sample costs, the Square
stage that grows only on evidence, the budget in passes per sample, and the preset's
guarantees (in the ball, best iterate, same seed same result)."""

import pytest
import tomllib
import torch
from torch import nn

from unmask.attacks import PRESETS, AdaptiveSquare, APGDTMalt, Ensemble, adaptive_attacks
from unmask.attacks.adaptive import (
    DEFAULT_PROBE,
    MIN_STEPS,
    malt_order,
    nominal_passes,
)
from unmask.bench import Threat
from unmask.bench.core import Norm, margin
from unmask.bench.core.counting import CountingModel
from unmask.bench.suite.spec import SuiteError, parse_suite


def _linear(weight, bias):
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model.eval()


def _tiny(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = model(x).argmax(1)
    return model.eval(), x, y


# --- MALT's ranking --------------------------------------------------------------------------


def test_malt_ranks_by_the_linear_distance_to_each_boundary_not_by_logit():
    """On a linear model the estimate is exact: class t's boundary is (z_y - z_t) / ||w_y -
    w_t||_1 away in Linf. Class 1 has the higher logit but a far boundary (a small weight
    difference); class 2 the lower logit and the nearest boundary."""
    w = torch.tensor([[1.0, 0, 0, 0],       # z_0 = 0.5
                      [0.9, 0, 0, 0],       # z_1 = 0.45: close logit, ||w_0 - w_1||_1 = 0.1
                      [0.0, -1, -1, -1],    # z_2 = 0.2: lower logit, ||w_0 - w_2||_1 = 4
                      [0.0, 0, 0, 0]])      # z_3 = -5
    b = torch.tensor([0.0, 0.0, 1.7, -5.0])
    model = _linear(w, b)
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])
    z = model(x)[0]
    assert z[1] > z[2]  # by logit, class 1 comes first
    order, backwards = malt_order(model, x, y, Norm.LINF, candidates=3)
    dist = [(z[0] - z[t]) / (w[0] - w[t]).abs().sum() for t in (1, 2, 3)]
    expected = [0] + [t for _, t in sorted(zip(dist, (1, 2, 3)))]
    assert order[0].tolist() == expected and expected[1] == 2
    assert backwards == 3


def test_malt_ranks_a_class_without_gradient_last():
    w = torch.tensor([[1.0, 0], [1.0, 0], [0.0, 1.0]])  # class 1 has no direction to class 0
    model = _linear(w, torch.tensor([0.0, -0.01, -0.2]))
    order, _ = malt_order(model, torch.full((1, 1, 1, 2), 0.5), torch.tensor([0]), Norm.LINF, 2)
    assert order[0].tolist() == [0, 2, 1]


def test_malt_ranking_uses_the_l2_dual_for_l2():
    w = torch.tensor([[0.0, 0, 0, 0], [1.0, 1, 1, 1], [3.0, 0, 0, 0]])
    model = _linear(w, torch.tensor([1.0, 0.0, 0.0]))
    x = torch.zeros(1, 1, 2, 2)
    z = model(x)[0]
    l1 = [(z[0] - z[t]) / (w[0] - w[t]).abs().sum() for t in (1, 2)]
    l2 = [(z[0] - z[t]) / (w[0] - w[t]).norm() for t in (1, 2)]
    assert (l1[0] < l1[1]) != (l2[0] < l2[1])  # the two norms disagree on this model
    o_inf, _ = malt_order(model, x, torch.tensor([0]), Norm.LINF, 2)
    o_2, _ = malt_order(model, x, torch.tensor([0]), Norm.L2, 2)
    assert o_inf[0, 1].item() == (1 if l1[0] < l1[1] else 2)
    assert o_2[0, 1].item() == (1 if l2[0] < l2[1] else 2)


# --- exact costs -----------------------------------------------------------------------------


def test_malt_apgdt_costs_exactly_what_its_stages_spend():
    """Nothing breaks at eps 1e-4: every sample pays the clean pass, the ranking (1 forward,
    ``candidates`` backwards), one run per target (steps + 1 each way), and the lowest-margin
    ``refine_share`` get ``refine_restarts`` more runs."""
    model, x, y = _tiny()
    steps, targets, cand, share, restarts = 6, 2, 3, 0.25, 2
    attack = APGDTMalt(Threat("linf", 1e-4), steps=steps, n_targets=targets, candidates=cand,
                       refine_share=share, refine_restarts=restarts)
    counted = CountingModel(model)
    res = attack(counted, x, y, generator=0)
    assert not bool(res.success.any())
    run = steps + 1
    base_f, base_b = 1 + 1 + targets * run, cand + targets * run
    extra = (res.forwards - base_f)
    refined = extra > 0
    assert int(refined.sum()) == 3  # ceil(0.25 * 12)
    assert bool((extra[refined] == restarts * run).all())
    assert bool((res.backwards[~refined] == base_b).all())
    assert bool((res.backwards[refined] == base_b + restarts * run).all())
    # The refined samples are the survivors closest to the boundary.
    with torch.no_grad():
        clean = margin(model(x), y)
    assert set(clean.argsort()[:3].tolist()) == set(refined.nonzero().flatten().tolist())
    assert counted.forwards == int(res.forwards.sum())
    assert counted.backwards == int(res.backwards.sum())


def test_adaptive_square_without_evidence_stops_at_the_probe():
    model, x, y = _tiny()
    counted = CountingModel(model)
    res = AdaptiveSquare(Threat("linf", 1e-4), probe=30, queries=400)(counted, x, y,
                                                                       generator=0)
    assert res.config["escalated"] is False and res.config["reasons"] == []
    # clean 1 + randomness check 2 + probe 30 forwards; 1 backward of the gradient check
    assert res.forwards.tolist() == [33] * len(y)
    assert res.backwards.tolist() == [1] * len(y)
    assert counted.forwards == int(res.forwards.sum())
    assert counted.backwards == int(res.backwards.sum())


class _Quantized(nn.Module):
    """Rounds its input to 4 levels: the gradient is zero everywhere (shattered)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x * 3).round() / 3)


def test_adaptive_square_escalates_on_a_zero_gradient():
    model, x, y = _tiny()
    masked = _Quantized(model).eval()
    y = masked(x).argmax(1)
    counted = CountingModel(masked)
    res = AdaptiveSquare(Threat("linf", 1e-4), probe=30, queries=200)(counted, x, y,
                                                                        generator=0)
    assert res.config["escalated"] is True
    assert any("zero or non-finite gradient" in r for r in res.config["reasons"])
    robust = ~res.success
    assert bool((res.forwards[robust] == 3 + 30 + 200).all())  # the probe, then 200 queries
    assert counted.forwards == int(res.forwards.sum())


def test_adaptive_square_escalates_when_the_probe_breaks_a_sample():
    """Run directly, the probe breaks samples nothing else was asked to: black-box beats
    white-box, so the budget grows to the full queries on the rest."""
    model, x, y = _tiny(n=24)
    res = AdaptiveSquare(Threat("linf", 0.1), probe=50, queries=300)(model, x, y, generator=0)
    assert res.config["escalated"] is True
    assert any("probe broke" in r for r in res.config["reasons"])
    still = ~res.success
    assert bool(still.any()), "pick an eps where some samples survive the probe"
    assert bool((res.forwards[still] == 3 + 50 + 300).all())


class _Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1e-3 * torch.randn(x.shape[0], 5)


def test_adaptive_square_escalates_on_a_randomised_model():
    model, x, y = _tiny()
    res = AdaptiveSquare(Threat("linf", 1e-4), probe=10, queries=40)(_Noisy(model).eval(), x, y,
                                                                       generator=0)
    assert res.config["escalated"] is True and "randomised model" in res.config["reasons"]


def test_break_it_adaptive_square_that_never_distrusts_stops_escalating(monkeypatch):
    """The escalation tests above fail when the evidence is ignored."""
    model, x, y = _tiny()
    masked = _Quantized(model).eval()
    y = masked(x).argmax(1)
    monkeypatch.setattr(AdaptiveSquare, "_distrust", lambda *a, **k: [])
    res = AdaptiveSquare(Threat("linf", 1e-4), probe=30, queries=200)(masked, x, y,
                                                                        generator=0)
    assert res.config["escalated"] is False


def test_adaptive_ensemble_cost_is_exact():
    model, x, y = _tiny(n=16)
    counted = CountingModel(model)
    threat = Threat("linf", 0.1)
    res = Ensemble(adaptive_attacks(threat, budget=nominal_passes(MIN_STEPS, probe=50)))(
        counted, x, y, generator=0)
    assert counted.forwards == sum(c.forwards for c in res.costs.values()) + 2 * len(y)
    assert counted.backwards == sum(c.backwards for c in res.costs.values())


# --- the preset's guarantees -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(digits_mlp, digits_test):
    return digits_mlp.eval(), digits_test[0][:60], digits_test[1][:60]


def test_adaptive_preset_guarantees(digits):
    """In the ball and [0, 1]; the best iterate (the reported margin is the model's on
    ``x_adv`` and robust means correctly classified there); same seed, same result."""
    model, x, y = digits
    threat = Threat("linf", 0.05)
    ens = Ensemble.preset("adaptive", threat, budget=400)
    r1 = ens(model, x, y, generator=3)
    r2 = ens(model, x, y, generator=3)
    assert bool(threat.contains(r1.x_adv, x).all())
    assert float(r1.x_adv.min()) >= 0 and float(r1.x_adv.max()) <= 1
    with torch.no_grad():
        m = margin(model(r1.x_adv), y)
    assert torch.allclose(m, r1.margin, atol=1e-5)
    assert torch.equal(r1.robust, m >= 0)
    assert torch.equal(r1.x_adv, r2.x_adv) and r1.broken_by == r2.broken_by
    assert 0 < r1.robust_accuracy < r1.clean_accuracy  # the eps leaves something to measure


def test_adaptive_is_no_weaker_than_standard_at_equal_steps_here(digits):
    """On the digits model the adaptive cascade at a tenth of the steps ends no higher than
    the standard one at the same steps (its refinement buys back the dropped targets)."""
    model, x, y = digits
    threat = Threat("linf", 0.05)
    budget = nominal_passes(20, probe=DEFAULT_PROBE)
    ours = Ensemble.preset("adaptive", threat, budget=budget)(model, x, y, generator=0)
    from unmask.attacks import APGD, APGDT, Square
    std = Ensemble([APGD(threat, steps=20), APGDT(threat, steps=20, n_targets=9),
                    Square(threat, queries=DEFAULT_PROBE)])(model, x, y, generator=0)
    assert ours.robust_accuracy <= std.robust_accuracy + 1 / len(y)


# --- the budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [nominal_passes(MIN_STEPS, probe=50), 400, 700, 1000])
def test_budget_in_passes_per_sample_is_respected(budget):
    attacks = adaptive_attacks(Threat("linf", 0.3), budget=budget)
    apgd, malt, square = attacks
    assert apgd.steps == malt.steps >= MIN_STEPS
    assert nominal_passes(malt.steps, probe=square.probe) <= budget
    # and it spends the budget: one more step would not fit
    assert nominal_passes(malt.steps + 1, probe=square.probe) > budget


def test_budget_at_or_above_the_default_keeps_the_default():
    for budget in (nominal_passes(), 10 * nominal_passes()):
        _, malt, square = adaptive_attacks(Threat("linf", 0.3), budget=budget)
        assert malt.steps == 100 and square.probe == DEFAULT_PROBE


def test_budget_errors():
    with pytest.raises(ValueError, match="at least"):
        adaptive_attacks(Threat("linf", 0.3), budget=50)
    with pytest.raises(ValueError, match="fixed budget.*adaptive"):
        Ensemble.preset("standard", Threat("linf", 0.3), budget=500)
    assert "adaptive" in PRESETS


def _suite(attacks: str) -> dict:
    return tomllib.loads('name = "t"\nseed = 0\nn = 10\ndataset = "digits"\n'
                         '[[models]]\nname = "digits-mlp"\n'
                         '[[threats]]\nnorm = "linf"\neps = [0.1]\n'
                         f'[attacks]\n{attacks}\n')


def test_suite_budget_is_parsed_validated_and_used():
    spec = parse_suite(_suite('preset = "adaptive"\nbudget = 600'))
    assert spec.attacks.budget == 600
    ens = spec.build_attacks("linf", 0.1)
    steps = ens.attacks[1].steps
    assert nominal_passes(steps, probe=ens.attacks[2].probe) <= 600 and steps < 100
    assert spec.to_dict()["attacks"]["budget"] == 600
    assert parse_suite(spec.to_dict()).attacks.budget == 600
    with pytest.raises(SuiteError, match="fixed budget"):
        parse_suite(_suite('preset = "standard"\nbudget = 600'))
    with pytest.raises(SuiteError, match="at least"):
        parse_suite(_suite('preset = "adaptive"\nbudget = 20'))
    with pytest.raises(SuiteError, match="not to 'list'"):
        parse_suite(_suite('list = ["fgsm"]\nbudget = 600'))
    assert "budget" not in parse_suite(_suite('preset = "adaptive"')).to_dict()["attacks"]


# --- the presets side by side (bench/perf/presets.py) -----------------------------------------


def test_presets_side_by_side_and_the_violation_check(digits_mlp):
    from unmask.bench.perf.presets import markdown_table, run_presets, violations

    rows = run_presets(["digits-mlp"], ["quick", "adaptive"], Threat("linf", 0.1), n=16)
    assert [r["model"] for r in rows] == ["digits-mlp"]
    row = rows[0]
    assert set(row["adaptive"]["costs"]) == {"apgd-ce", "apgd-t-malt", "square-adaptive"}
    assert row["adaptive"]["passes_per_sample"] > row["quick"]["passes_per_sample"] > 0
    assert "| digits-mlp |" in markdown_table(rows, ["quick", "adaptive"])
    # The check fires exactly when the candidate reports more than the reference.
    fake = [{"model": "a", "ref": {"robust_accuracy": 0.5}, "new": {"robust_accuracy": 0.5}},
            {"model": "b", "ref": {"robust_accuracy": 0.5}, "new": {"robust_accuracy": 0.52}}]
    assert violations(fake, "ref", "new") == ["b"]
    assert violations(fake, "ref", "new", tolerance=0.05) == []
    with pytest.raises(ValueError, match="unknown preset"):
        run_presets(["digits-mlp"], ["nope"], Threat("linf", 0.1), n=4)


def test_hopeless_evidence_reports_where_the_targeted_breaks_were(digits, tmp_path):
    from unmask.bench.perf.presets import hopeless_evidence, main

    model, x, y = digits
    ev = hopeless_evidence(model, x, y, Threat("linf", 0.05))
    assert ev["n"] == len(y) and ev["survivors"] >= ev["broken_by_targeted"]
    assert len(ev["percentiles_of_broken"]) == ev["broken_by_targeted"]
    assert all(0 <= p <= 1 for p in ev["percentiles_of_broken"])
    assert ev["percentiles_of_broken"] == sorted(ev["percentiles_of_broken"])
    path = tmp_path / "h.json"
    assert main(["--hopeless", "--models", "digits-mlp", "--n", "20", "--eps", "0.05",
                 "--json", str(path)]) == 0
    assert "digits-mlp" in path.read_text()


def test_the_documented_default_budget_is_the_computed_one():
    assert f"{nominal_passes():,} by default" in adaptive_attacks.__doc__
