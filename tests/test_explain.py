"""Tests of unmask.explain: attribution axioms on hand-built models, the issue's "Done when" on
mnist-cnn, metric properties, plots and the ``explain`` CLI. CPU only, small batches."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from unmask.bench.cli import explain as cli_explain
from unmask.explain import attribution as attr_mod
from unmask.explain.attribution import (
    METHODS,
    attribute,
    blur,
    input_x_gradient,
    integrated_gradients,
    method_options,
    saliency,
    smoothgrad,
)
from unmask.explain.metrics import (
    attribution_change,
    completeness,
    deletion_insertion,
    max_sensitivity,
    model_randomisation,
    spearman,
    topk_intersection,
    trigger_localisation,
)

ALL_METHODS = METHODS.names()


def spread(x, y, n):
    """``n`` samples evenly spaced over a split (mnist5k's test split is sorted by class)."""
    idx = torch.linspace(0, len(y) - 1, n).round().long()
    return x[idx], y[idx]


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 50, generator=g))
        model[1].bias.copy_(torch.randn(4, generator=g))
    x = torch.rand(6, 2, 5, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    return model, x, y


@pytest.fixture(scope="module")
def mnist_batch(mnist_test):
    return spread(*mnist_test, 24)


# --- attribution axioms on a linear model ------------------------------------------------------


def test_linear_saliency_is_the_weight_row(linear):
    model, x, y = linear
    w = model[1].weight.detach()
    signed = saliency(model, x, y, abs=False)
    assert signed.shape == x.shape
    assert torch.equal(signed.flatten(1), w[y])
    assert torch.equal(saliency(model, x, y).flatten(1), w[y].abs())


@pytest.mark.parametrize("baseline", ["zeros", 0.5, "blur", "uniform"])
def test_linear_ig_is_input_minus_baseline_times_weight(linear, baseline):
    model, x, y = linear
    w = model[1].weight.detach()[y].view_as(x)
    res = integrated_gradients(model, x, y, baseline=baseline, n_steps=7, generator=3)
    b = attr_mod.make_baseline(x, baseline, 3)
    torch.testing.assert_close(res.attributions, (x - b) * w, rtol=1e-5, atol=1e-6)
    assert res.delta.abs().max() < 1e-4
    torch.testing.assert_close(input_x_gradient(model, x, y), x * w)


def test_ig_tensor_baseline_broadcasts_and_is_validated(linear):
    model, x, y = linear
    w = model[1].weight.detach()[y].view_as(x)
    base = torch.full((1, 2, 1, 1), 0.25)
    res = integrated_gradients(model, x, y, baseline=base, n_steps=3)
    torch.testing.assert_close(res.attributions, (x - 0.25) * w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="broadcast"):
        integrated_gradients(model, x, y, baseline=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="expected one of 'zeros', 'uniform', 'blur'"):
        integrated_gradients(model, x, y, baseline="black")


# --- one signature, contracts ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_same_signature_shape_and_restores_model(method, linear):
    model, x, y = linear
    model.train()
    before = [p.requires_grad for p in model.parameters()]
    out = attribute(model, x, y, method)
    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
    assert torch.isfinite(out).all()
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_internal_batch_size_does_not_change_the_result(method, mnist_cnn, mnist_batch):
    x, y = mnist_batch[0][:6], mnist_batch[1][:6]
    opts = {"n_steps": 8} if method == "integrated_gradients" else {}
    if method == "smoothgrad":
        opts = {"samples": 4, "generator": 5}
        # the noise is drawn per chunk of inputs, so compare settings that keep the chunks
        small = attribute(mnist_cnn, x, y, method, internal_batch_size=4, **opts)
        big = attribute(mnist_cnn, x, y, method, internal_batch_size=7, **opts)
    else:
        small = attribute(mnist_cnn, x, y, method, internal_batch_size=3, **opts)
        big = attribute(mnist_cnn, x, y, method, internal_batch_size=512, **opts)
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-6)


class _RowCounter(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.max_rows = model, 0

    def forward(self, x):
        self.max_rows = max(self.max_rows, x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("method,opts", [("saliency", {}), ("input_x_gradient", {}),
                                         ("smoothgrad", {"samples": 9}),
                                         ("integrated_gradients", {"n_steps": 5}),
                                         ("integrated_gradients", {"n_steps": 40})])
def test_internal_batch_size_bounds_the_rows_per_pass(method, opts, linear):
    model, x, y = linear
    counter = _RowCounter(model)
    x = x.repeat(3, 1, 1, 1)
    y = y.repeat(3)
    attribute(counter, x, y, method, internal_batch_size=16, **opts)
    assert 1 < counter.max_rows <= 16


def test_smoothgrad_is_seeded_and_leaves_the_global_rng_alone(mnist_cnn, mnist_batch):
    x, y = mnist_batch[0][:4], mnist_batch[1][:4]
    state = torch.get_rng_state()
    a = smoothgrad(mnist_cnn, x, y, samples=6, generator=7)
    b = smoothgrad(mnist_cnn, x, y, samples=6, generator=torch.Generator().manual_seed(7))
    c = smoothgrad(mnist_cnn, x, y, samples=6, generator=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # no noise, one sample: plain saliency
    torch.testing.assert_close(smoothgrad(mnist_cnn, x, y, samples=1, noise_level=0.0),
                               saliency(mnist_cnn, x, y))


def test_target_none_is_the_predicted_class_and_int_target_broadcasts(linear):
    model, x, _ = linear
    pred = model(x).argmax(1)
    torch.testing.assert_close(attribute(model, x, None), attribute(model, x, pred))
    torch.testing.assert_close(attribute(model, x, 2), attribute(model, x, torch.full((6,), 2)))


def test_bad_inputs_fail_early_with_what_was_expected(linear):
    model, x, y = linear
    with pytest.raises(ValueError, match="expected one of 'saliency'.*aliases: .*ig"):
        attribute(model, x, y, "gradcam")
    with pytest.raises(ValueError, match="saliency does not take option.*n_steps.*valid options"):
        attribute(model, x, y, "saliency", n_steps=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attribute(model, x * 2, y)
    with pytest.raises(ValueError, match="class index 7 but the model has 4 classes"):
        attribute(model, x, torch.full((6,), 7))
    with pytest.raises(ValueError, match="shape"):
        attribute(model, x, y[:2])
    with pytest.raises(ValueError, match="expected one of 'logit'"):
        attribute(model, x, y, output="softmax")
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        integrated_gradients(model, x, y, n_steps=0)
    with pytest.raises(ValueError, match="noise_level"):
        smoothgrad(model, x, y, noise_level=-1.0)
    with pytest.raises(ValueError, match="integration"):
        integrated_gradients(model, x, y, integration="simpson")
    assert "n_steps" in method_options("ig") and "generator" in method_options("smoothgrad")


def test_blur_keeps_constants_and_smooths(linear):
    _, x, _ = linear
    flat = torch.full_like(x, 0.3)
    torch.testing.assert_close(blur(flat, 1.0), flat)
    assert blur(x, 1.0).shape == x.shape
    assert blur(x, 1.0).var() < x.var()


# --- the "Done when" on mnist-cnn -----------------------------------------------------------


def test_ig_completeness_error_below_one_percent_at_64_steps(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    ig = integrated_gradients(mnist_cnn, x, y, n_steps=64)
    assert ig.relative_error.max() < 0.01, ig.to_dict()
    torch.testing.assert_close(ig.attributions.flatten(1).sum(1) - ig.output_change, ig.delta)
    with torch.no_grad():
        f_x = mnist_cnn(x).gather(1, y[:, None]).squeeze(1)
        f_0 = mnist_cnn(torch.zeros_like(x)).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(ig.output_change, f_x - f_0)
    res = completeness(mnist_cnn, x[:4], y[:4], n_steps=64)
    assert res.passed(0.01) and res.to_dict()["baseline"] == "zeros"


@pytest.mark.parametrize("method,opts", [("integrated_gradients", {"n_steps": 32}),
                                         ("smoothgrad", {"samples": 16, "generator": 0})])
def test_deletion_auc_beats_the_random_baseline(method, opts, mnist_cnn, mnist_batch):
    x, y = mnist_batch
    maps = attribute(mnist_cnn, x, y, method, **opts)
    res = deletion_insertion(mnist_cnn, x, maps, y, steps=14, generator=0)
    d = res.to_dict()
    assert d["deletion_auc"] < d["random_deletion_auc"] - 0.1, d
    assert d["insertion_auc"] > d["random_insertion_auc"] + 0.1, d
    assert res.deletion.shape == (len(y), 15)
    # the curves start at the clean input and end at the substrate
    p_clean = torch.softmax(mnist_cnn(x), 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(res.deletion[:, 0], p_clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.insertion[:, -1], p_clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.random_deletion[:, -1], res.insertion[:, 0])
    json.dumps(d)


def test_randomisation_sanity_check_decorrelates(mnist_cnn, mnist_batch):
    x, y = mnist_batch[0][:12], mnist_batch[1][:12]
    before = {k: v.clone() for k, v in mnist_cnn.state_dict().items()}
    res = model_randomisation(mnist_cnn, x, y, "saliency", generator=0)
    assert res.layers[0] == "classifier.3" and res.layers[-1] == "features.0"
    assert res.correlation.shape == (4, 12)
    assert res.final_correlation < 0.5, res.to_dict()
    assert res.decorrelated(0.5)
    json.dumps(res.to_dict())
    # the model itself is untouched
    assert all(torch.equal(before[k], v) for k, v in mnist_cnn.state_dict().items())
    again = model_randomisation(mnist_cnn, x, y, "saliency", generator=0)
    torch.testing.assert_close(again.correlation, res.correlation)


class _LogitScale(nn.Module):
    """Logits times ``t``: with a large ``t`` the softmax saturates, so the cross-entropy
    (log-probability) gradient underflows to exactly 0 on confidently classified inputs: the
    loss surface is flat while the model's decision is unchanged (gradient masking)."""

    def __init__(self, model: nn.Module, t: float) -> None:
        super().__init__()
        self.model, self.t = model, t

    def forward(self, x):
        return self.model(x) * self.t


def test_logit_temperature_masking_zeroes_the_loss_saliency(mnist_cnn, mnist_batch):
    x, y = mnist_batch
    correct = mnist_cnn(x).argmax(1) == y
    masked = _LogitScale(mnist_cnn, 1000.0)
    plain = saliency(mnist_cnn, x, y, output="log_probability").flatten(1).amax(1)
    flat = saliency(masked, x, y, output="log_probability").flatten(1).amax(1)
    assert (plain[correct] > 0).all()
    assert (flat[correct] == 0).float().mean() >= 0.9
    assert flat[correct].median() == 0
    # The logit map is intact (scaled by t): the model still depends on its input, only the
    # loss gradient is gone, which is what the masking diagnosis flags.
    torch.testing.assert_close(saliency(masked, x, y), 1000.0 * saliency(mnist_cnn, x, y),
                               rtol=1e-4, atol=1e-3)


# --- other metrics ------------------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).float()
    b = a + torch.randint(0, 3, (3, 40), generator=g).float()
    ours = spearman(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(stats.spearmanr(a[i], b[i]).statistic, abs=1e-6)
    assert spearman(torch.zeros(1, 5), torch.arange(5.0)[None]).item() == 0.0
    assert spearman(a, -a).allclose(torch.full((3,), -1.0))


def test_topk_intersection():
    a = torch.tensor([[5.0, 4, 3, 2, 1, 0]])
    assert topk_intersection(a, a, 2).item() == 1.0
    assert topk_intersection(a, -a, 3).item() == 0.0
    assert topk_intersection(a, torch.tensor([[5.0, 0, 3, 2, 1, 0]]), 2).item() == 0.5
    assert topk_intersection(a, a, 0.5).item() == 1.0
    with pytest.raises(ValueError, match="k must be"):
        topk_intersection(a, a, 0)


def test_max_sensitivity_is_seeded_and_zero_without_perturbation(mnist_cnn, mnist_batch):
    x, y = mnist_batch[0][:4], mnist_batch[1][:4]
    res = max_sensitivity(mnist_cnn, x, y, "saliency", samples=3, generator=1)
    again = max_sensitivity(mnist_cnn, x, y, "saliency", samples=3, generator=1)
    assert res.sensitivity.shape == (4,) and (res.sensitivity > 0).all()
    torch.testing.assert_close(res.sensitivity, again.sensitivity)
    none = max_sensitivity(mnist_cnn, x, y, "ig", radius=0.0, samples=2, n_steps=4)
    assert none.sensitivity.abs().max() < 1e-5
    json.dumps(res.to_dict())


def test_attribution_change_clean_vs_adversarial(mnist_cnn, mnist_batch):
    x, y = mnist_batch[0][:6], mnist_batch[1][:6]
    same = attribution_change(mnist_cnn, x, x, y, "smoothgrad", samples=4)
    assert torch.allclose(same.topk_intersection, torch.ones(6))
    assert torch.allclose(same.rank_correlation, torch.ones(6))
    g = torch.Generator().manual_seed(0)
    x_adv = (x + 0.3 * (torch.rand(x.shape, generator=g) * 2 - 1)).clamp(0, 1)
    moved = attribution_change(mnist_cnn, x, x_adv, y, "saliency", k=50)
    assert moved.k == 50
    assert (moved.topk_intersection < 1).all() and (moved.rank_correlation < 1).all()
    with pytest.raises(ValueError, match="x_adv must have the shape"):
        attribution_change(mnist_cnn, x, x_adv[:2], y)


def test_trigger_localisation():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[4:, 4:] = True
    inside = torch.zeros(2, 1, 6, 6)
    inside[:, :, 4:, 4:] = torch.randn(2, 1, 2, 2)
    res = trigger_localisation(inside, mask)
    assert torch.allclose(res.mass_in_trigger, torch.ones(2))
    assert res.trigger_area == pytest.approx(4 / 36)
    uniform = trigger_localisation(torch.ones(2, 3, 6, 6), mask[None].expand(3, 6, 6))
    assert uniform.lift == pytest.approx(1.0)
    assert trigger_localisation(torch.zeros(1, 1, 6, 6), mask).mass_in_trigger.item() == 0.0
    with pytest.raises(ValueError, match="trigger_mask must have shape"):
        trigger_localisation(inside, torch.ones(5, 5))
    json.dumps(res.to_dict())


def test_metrics_validate_their_arguments(mnist_cnn, mnist_batch):
    x, y = mnist_batch[0][:2], mnist_batch[1][:2]
    with pytest.raises(ValueError, match="attributions must have the shape of x"):
        deletion_insertion(mnist_cnn, x, torch.zeros(2, 1, 5, 5), y)
    with pytest.raises(ValueError, match="substrate"):
        deletion_insertion(mnist_cnn, x, x, y, substrate="noise")
    with pytest.raises(ValueError, match="unknown layer.*parameterised layers: classifier"):
        model_randomisation(mnist_cnn, x, y, layers=["fc9"])
    blurred = deletion_insertion(mnist_cnn, x, x, y, steps=2, substrate="blur")
    p_blur = torch.softmax(mnist_cnn(blur(x)), 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(blurred.deletion[:, -1], p_blur)
    assert blurred.to_dict()["substrate"] == "blur"


def test_explain_perf_script_smoke(capsys, mnist_cnn):
    from unmask.bench.perf import explain as explain_perf

    assert explain_perf.main(["--n", "3", "--n-steps", "2", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["images"] == 3 and row["peak_rss_mib"] > 0 and row["cpu_seconds"] >= 0


# --- plots and CLI -----------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_attributions_and_curves_write_pngs(tmp_path, mnist_cnn, mnist_batch):
    from unmask.explain import plot_attributions, plot_curves

    x, y = mnist_batch[0][:3], mnist_batch[1][:3]
    maps = {"saliency": saliency(mnist_cnn, x, y), "ig": attribute(mnist_cnn, x, y, "ig", n_steps=4)}
    x_adv = (x + 0.1).clamp(0, 1)
    adv = {k: attribute(mnist_cnn, x_adv, y, "saliency") for k in maps}
    out = plot_attributions(x, maps, tmp_path / "figs" / "maps.png", x_adv=x_adv, adv_maps=adv,
                            labels=y, preds=y, adv_preds=y, title="t")
    assert out.read_bytes().startswith(PNG)
    rgb = torch.rand(2, 3, 8, 8)
    assert plot_attributions(rgb, {"m": rgb - 0.5}, tmp_path / "rgb.png").read_bytes()[:8] == PNG
    res = {k: deletion_insertion(mnist_cnn, x, v, y, steps=4) for k, v in maps.items()}
    assert plot_curves(res, tmp_path / "curves.png").read_bytes().startswith(PNG)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["curves.png", "figs", "maps.png",
                                                            "rgb.png"]
    with pytest.raises(ValueError, match="adv_maps were given without x_adv"):
        plot_attributions(x, maps, tmp_path / "bad.png", adv_maps=adv)
    with pytest.raises(ValueError, match="maps"):
        plot_attributions(x, {"m": torch.zeros(2, 1, 28, 28)}, tmp_path / "bad.png")
    with pytest.raises(TypeError, match="DeletionInsertionResult"):
        plot_curves({"m": maps["ig"]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _run_cli(argv):
    from unmask.bench.cli.main import main

    return main(argv)


def test_cli_explain_without_adversarial_draws_clean_columns(tmp_path, capsys, mnist_cnn):
    out = tmp_path / "fig.png"
    rc = _run_cli(["explain", "mnist-cnn", "--method", "saliency", "--method", "ig", "--n", "2",
                   "--n-steps", "4", "--out", str(out), "--curves", str(tmp_path / "c.png"),
                   "--device", "cpu", "--no-adversarial"])
    text = capsys.readouterr().out
    assert rc == 0
    assert out.read_bytes().startswith(PNG) and (tmp_path / "c.png").exists()
    assert "rank_corr_adv" not in text and "integrated_gradients" in text
    assert "IG completeness at n_steps=4" in text


def test_cli_explain_with_an_attack_adds_adversarial_columns(tmp_path, monkeypatch, capsys,
                                                              mnist_cnn):
    calls = {}

    class FakePGD:
        def __init__(self, threat, steps):
            calls["threat"], calls["steps"] = str(threat), steps

        def __call__(self, model, x, y, generator=None):
            return types.SimpleNamespace(x_adv=(1 - x))

    monkeypatch.setattr(cli_explain, "PGD", FakePGD)
    out = tmp_path / "fig.png"
    rc = _run_cli(["explain", "mnist-cnn", "--method", "sg", "--samples", "2", "--n", "2",
                   "--attack-steps", "3", "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and out.read_bytes().startswith(PNG)
    assert calls == {"threat": "linf:0.3", "steps": 3}
    assert "rank_corr_adv" in text


def test_cli_explain_rejects_bad_names(tmp_path, capsys, mnist_cnn):
    assert _run_cli(["explain", "mnist-cnn", "--method", "gradcam", "--out",
                     str(tmp_path / "f.png")]) == 2
    assert "unknown attribution method 'gradcam'" in capsys.readouterr().err
    assert _run_cli(["explain", "mnist-cnm", "--out", str(tmp_path / "f.png")]) == 2
    assert "Did you mean mnist-cnn" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()
