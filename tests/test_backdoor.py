"""Backdoor poisoning: the pure pipeline, the triggers, the zoo entries and the defenses.

The "Done when" of the backdoor issue is asserted on the session-trained zoo entries
``mnist-cnn-badnets`` and ``mnist-cnn-blend`` (each trains once per test run).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from unmask.attacks import (
    Backdoor,
    BadNets,
    Blend,
    PoisonedSet,
    WaNet,
    attack_success_rate,
    backdoor_labels,
    make_trigger,
    poison,
    triggered_test_set,
)
from unmask.bench.core.training import accuracy, seeded_init
from unmask.defenses import (
    activation_clustering,
    evaluate_backdoor,
    fine_pruning,
    spectral_signatures,
    strip,
)
from unmask.defenses.backdoor import _auroc, detection_metrics, features

# --- the pure pipeline -------------------------------------------------------------------------


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 12, 12, generator=g) * 0.5  # never 1.0: the patch is visible
    y = torch.arange(200) % 5
    return x, y


def test_poison_counts_labels_and_trigger_pixels(toy):
    x, y = toy
    x0, y0 = x.clone(), y.clone()
    trig = BadNets()
    res = poison(x, y, trig, rate=0.1, target=2, generator=0)
    assert isinstance(res, PoisonedSet)
    assert len(res.indices) == 20 and res.rate == pytest.approx(0.1)
    assert torch.equal(res.indices, res.indices.sort().values)
    assert len(res.indices.unique()) == 20
    # inputs untouched (pure function)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    # labels flipped to the target, from a different class
    assert (res.y[res.indices] == 2).all()
    assert torch.equal(res.original_labels, y[res.indices])
    assert (res.original_labels != 2).all()
    # trigger pixels: a 3x3 white patch one pixel in from the bottom-right corner
    rows, cols = trig.region(12, 12)
    assert (rows, cols) == (slice(8, 11), slice(8, 11))
    assert (res.x[res.indices][..., 8:11, 8:11] == 1.0).all()
    outside = torch.ones(12, 12, dtype=torch.bool)
    outside[8:11, 8:11] = False
    assert torch.equal(res.x[res.indices][..., outside], x[res.indices][..., outside])
    # the rest of the set is untouched
    clean = ~res.mask
    assert int(clean.sum()) == 180
    assert torch.equal(res.x[clean], x[clean]) and torch.equal(res.y[clean], y[clean])


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (0.004, 1), (0.05, 10), (0.8, 160)])
def test_poison_count_is_round_rate_times_n(toy, rate, expected):
    x, y = toy
    assert len(poison(x, y, BadNets(), rate=rate, target=0, generator=1).indices) == expected


def test_poison_is_deterministic_per_seed(toy):
    x, y = toy
    a = poison(x, y, Blend(), rate=0.2, generator=torch.Generator().manual_seed(3))
    b = poison(x, y, Blend(), rate=0.2, generator=3)
    c = poison(x, y, Blend(), rate=0.2, generator=4)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.indices, c.indices)


def test_poison_leaves_global_rng_alone(toy):
    x, y = toy
    state = torch.get_rng_state()
    poison(x, y, WaNet(), rate=0.1, generator=0)
    assert torch.equal(state, torch.get_rng_state())


def test_all_to_all_labels(toy):
    x, y = toy
    res = poison(x, y, BadNets(), rate=0.5, mode="all-to-all", generator=0)
    assert len(res.indices) == 100
    assert torch.equal(res.y[res.indices], (y[res.indices] + 1) % 5)
    assert torch.equal(backdoor_labels(torch.tensor([0, 4, 9]), mode="all-to-all",
                                       num_classes=10), torch.tensor([1, 5, 0]))
    assert torch.equal(backdoor_labels(torch.tensor([0, 4]), target=3), torch.tensor([3, 3]))


def test_poison_rejects_bad_settings(toy):
    x, y = toy
    with pytest.raises(ValueError, match="rate"):
        poison(x, y, BadNets(), rate=1.5)
    with pytest.raises(ValueError, match="target"):
        poison(x, y, BadNets(), rate=0.1, target=7)
    with pytest.raises(ValueError, match="'all-to-one', 'all-to-all'"):
        poison(x, y, BadNets(), rate=0.1, mode="one-to-one")
    with pytest.raises(ValueError, match="eligible"):
        poison(x, y, BadNets(), rate=0.9, target=0)  # only 160 samples outside class 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        poison(x * 4, y, BadNets(), rate=0.1)


# --- triggers ----------------------------------------------------------------------------------


def test_badnets_positions_and_validation():
    x = torch.zeros(2, 3, 10, 10)
    out = BadNets(size=2, position="top-left", margin=0, value=0.5)(x)
    assert (out[..., :2, :2] == 0.5).all() and float(out.sum()) == 2 * 3 * 4 * 0.5
    assert (BadNets(position=(4, 5))(x)[..., 4:7, 5:8] == 1).all()
    assert float(x.sum()) == 0
    with pytest.raises(ValueError, match="bottom-right"):
        BadNets(position="middle")
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(size=12)(x)


def test_blend_is_alpha_blend_of_a_seeded_pattern(toy):
    x, _ = toy
    trig = Blend(alpha=0.2, seed=5)
    p = trig.pattern((1, 12, 12))
    assert torch.allclose(trig(x), 0.8 * x + 0.2 * p)
    assert torch.equal(p, Blend(seed=5).pattern((1, 12, 12)))
    assert not torch.equal(p, Blend(seed=6).pattern((1, 12, 12)))
    given = torch.full((12, 12), 0.5)
    assert torch.allclose(Blend(alpha=0.5, pattern=given)(x), 0.5 * x + 0.25)
    with pytest.raises(ValueError, match="alpha"):
        Blend(alpha=0.0)


def test_wanet_is_a_small_deterministic_warp(toy):
    x, _ = toy
    out = WaNet(seed=1)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, WaNet(seed=1)(x))
    assert not torch.equal(out, WaNet(seed=2)(x))
    diff = (out - x).abs().mean()
    assert 0 < float(diff) < float(x.abs().mean())
    # a vanishing strength is (almost) the identity
    assert torch.allclose(WaNet(strength=1e-6)(x), x, atol=1e-4)


def test_make_trigger_by_name():
    assert isinstance(make_trigger("badnets", size=4), BadNets)
    assert make_trigger("Blend").config() == {"alpha": 0.2, "seed": 0}
    with pytest.raises(ValueError, match="'badnets', 'blend', 'wanet'"):
        make_trigger("sig")
    with pytest.raises(ValueError, match="bad options"):
        make_trigger("wanet", alpha=0.1)


def test_asr_counts_only_non_target_images(toy):
    x, y = toy

    class Constant(nn.Module):
        def __init__(self, label):
            super().__init__()
            self.label = label
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, inp):
            out = torch.zeros(len(inp), 5) + self.w
            out[:, self.label] = 1
            return out

    trig = BadNets()
    assert attack_success_rate(Constant(1), x, y, trig, target=1) == 1.0
    assert attack_success_rate(Constant(2), x, y, trig, target=1) == 0.0
    x_t, y_t = triggered_test_set(x, y, trig, target=1)
    assert len(x_t) == 160 and (y_t == 1).all()
    # all-to-all: 1/5 of images have true label 0, whose backdoor label is 1
    assert attack_success_rate(Constant(1), x, y, trig, mode="all-to-all") == pytest.approx(0.2)


# --- zoo entries -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist-cnn-badnets", "mnist-cnn-blend"])
def test_backdoor_entries_mirror_mnist_cnn(name):
    from unmask.bench import zoo

    entry, ref = zoo.get(name), zoo.get("mnist-cnn")
    for key in ("dataset", "epochs", "seed", "batch_size", "lr"):
        assert getattr(entry, key) == getattr(ref, key), key
    assert type(entry.builder()) is type(ref.builder())
    assert entry.recipe == "backdoor" and "backdoor" in entry.tags
    assert entry.recipe_options["poison_rate"] <= 0.05
    assert entry.recipe_options["clean_reference"] == "mnist-cnn"
    assert name in zoo.list(tag="backdoor")


@pytest.fixture(scope="session")
def mnist_train():
    from unmask.bench import data

    return data.load("mnist5k", "train")


def _load_backdoored(name, mnist_train):
    from unmask.bench import zoo

    model, card = zoo.load_with_card(name, device="cpu", progress=False)
    entry = zoo.get(name)
    backdoor = Backdoor.from_options(**entry.recipe_options)
    poisoned = backdoor.poison(*mnist_train, generator=entry.seed)
    return model, card, backdoor, poisoned


@pytest.fixture(scope="session")
def badnets(zoo_cache, mnist_train):
    return _load_backdoored("mnist-cnn-badnets", mnist_train)


@pytest.fixture(scope="session")
def blend(zoo_cache, mnist_train):
    return _load_backdoored("mnist-cnn-blend", mnist_train)


@pytest.mark.slow
def test_badnets_done_when(badnets, mnist_cnn, mnist_test):
    model, card, backdoor, poisoned = badnets
    x, y = mnist_test
    asr = backdoor.attack_success_rate(model, x, y)
    assert asr >= 0.95
    assert card["metrics"]["attack_success_rate"] == pytest.approx(asr)
    assert card["metrics"]["poisoned"] == len(poisoned.indices) == 200  # 5% of 4,000
    assert abs(accuracy(model, x, y) - accuracy(mnist_cnn, x, y)) <= 0.02


@pytest.mark.slow
def test_blend_done_when(blend, mnist_test):
    model, _, backdoor, _ = blend
    assert backdoor.attack_success_rate(model, *mnist_test) >= 0.90


@pytest.fixture(scope="session")
def badnets_report(badnets, mnist_test, mnist_cnn):
    model, _, backdoor, poisoned = badnets
    return evaluate_backdoor(model, backdoor, poisoned, *mnist_test,
                             reference_accuracy=accuracy(mnist_cnn, *mnist_test),
                             strip_samples=200, overlay_samples=300, n_overlays=8, generator=0)


@pytest.mark.slow
def test_badnets_poison_is_detected(badnets_report):
    hits = [d for d in (badnets_report.spectral, badnets_report.clustering)
            if d.recall >= 0.8 and d.precision >= 0.5]
    assert hits, (badnets_report.spectral, badnets_report.clustering)
    assert badnets_report.clustering.auroc >= 0.9


@pytest.mark.slow
def test_fine_pruning_removes_badnets(badnets_report):
    r = badnets_report
    assert r.attack_success_rate_after_fine_pruning < 0.20
    assert r.clean_accuracy - r.clean_accuracy_after_fine_pruning <= 0.05
    assert 0 < r.fine_pruning.prune_ratio < 1 and r.fine_pruning.layer == "features.3"


@pytest.mark.slow
def test_strip_separates_triggered_inputs(badnets_report):
    s = badnets_report.strip
    assert s.frr <= 0.05 and s.far <= 0.2
    assert s.entropy_triggered.mean() < s.entropy_clean.mean()


@pytest.mark.slow
def test_report_metrics_are_numbers(badnets_report):
    m = badnets_report.metrics()
    assert json.loads(json.dumps(m)) == m
    for key in ("clean_accuracy", "attack_success_rate", "clean_accuracy_cost", "spectral_auroc",
                "clustering_recall", "strip_frr", "strip_far", "fine_pruning_attack_success_rate"):
        assert isinstance(m[key], float) and -1 <= m[key] <= 1, key


@pytest.mark.slow
def test_cli_backdoor_table(badnets, mnist_cnn, capsys):
    from unmask.bench.cli.main import main

    assert main(["backdoor", "mnist-cnn-badnets", "--no-defenses", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attack_success_rate"] >= 0.95 and out["reference"] == "mnist-cnn"
    assert main(["backdoor", "mnist-cnn-badnets", "--no-defenses"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("metric") and "attack_success_rate" in table
    assert main(["backdoor", "mnist-cnn"]) == 2
    assert "not a backdoored zoo entry" in capsys.readouterr().err


# --- defenses on hand-built models -------------------------------------------------------------


def _planted(n_per_class=60, n_poison=20, dim=16, seed=0):
    """Gaussian blobs per class in [0, 1]; a distinct blob planted into class 0 as 'poison'."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(4, dim, generator=g) * 0.6 + 0.2
    xs, ys = [], []
    for c in range(4):
        xs.append(centers[c] + 0.03 * torch.randn(n_per_class, dim, generator=g))
        ys.append(torch.full((n_per_class,), c))
    xs.append(centers[3] + 0.03 * torch.randn(n_poison, dim, generator=g))
    ys.append(torch.zeros(n_poison, dtype=torch.long))
    x = torch.cat(xs).clamp(0, 1).view(-1, 1, 4, 4)
    poisoned = torch.arange(4 * n_per_class, 4 * n_per_class + n_poison)
    return x, torch.cat(ys), poisoned


def _linear_model(dim=16, k=4):
    with seeded_init(0):
        return nn.Sequential(nn.Flatten(), nn.Linear(dim, k))


def test_features_default_is_input_of_last_linear():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(5, 1, 4, 4)
    expected = torch.relu(model[1](x.flatten(1)))
    assert torch.allclose(features(model, x), expected, atol=1e-6)
    assert torch.allclose(features(model, x, layer="1"), model[1](x.flatten(1)), atol=1e-6)
    assert torch.allclose(features(model, x, layer=model[2]), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown layer 'head'"):
        features(model, x, layer="head")
    with pytest.raises(ValueError, match="not a sub-module"):
        features(model, x, layer=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Linear"):
        features(nn.Sequential(nn.Flatten()), x)


def test_auroc_and_detection_metrics():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (50,), generator=g).float()  # many ties
    truth = torch.rand(50, generator=g) < 0.3
    assert _auroc(scores, truth) == pytest.approx(roc_auc_score(truth.numpy(), scores.numpy()))
    flags = torch.tensor([True, True, False, False])
    p, r, a = detection_metrics(flags, torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([0, 2]))
    assert (p, r, a) == (0.5, 0.5, 0.75)
    assert detection_metrics(flags, torch.zeros(4), torch.tensor([], dtype=torch.long))[2] is None


def test_activation_clustering_finds_a_planted_cluster():
    x, y, poisoned = _planted()
    res = activation_clustering(_linear_model(), x, y, poisoned=poisoned, generator=0)
    assert res.recall == 1.0 and res.precision == 1.0 and res.auroc == pytest.approx(1.0)
    assert res.suspicious.shape == (len(y),) and res.suspicious.dtype == torch.bool
    assert res.scores.shape == (len(y),)
    assert res.per_class[0]["separation"] > 10 > max(res.per_class[c]["separation"]
                                                     for c in (1, 2, 3))
    again = activation_clustering(_linear_model(), x, y, generator=0)
    assert torch.equal(res.suspicious, again.suspicious) and again.precision is None


def test_spectral_signatures_flags_per_label_budget():
    x, y, poisoned = _planted(n_poison=6)
    res = spectral_signatures(_linear_model(), x, y, poisoned=poisoned, epsilon=0.1)
    # ceil(1.5 * 0.1 * n_c) per label: 10 of label 0 (66), 9 of each other (60)
    assert int(res.suspicious[y == 0].sum()) == 10 and int(res.suspicious[y == 1].sum()) == 9
    assert res.recall == 1.0 and res.auroc > 0.95
    with pytest.raises(ValueError, match="epsilon"):
        spectral_signatures(_linear_model(), x, y, epsilon=0)


def test_strip_on_a_model_that_ignores_all_but_one_pixel():
    # A "backdoored" toy model: a bright top-left pixel forces class 0; otherwise the class
    # follows the image mean, which an overlay changes.
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, inp):
            mean = inp.flatten(1).mean(1, keepdim=True)
            logits = torch.cat([-(mean - c / 4) ** 2 * 400 for c in range(4)], 1) * self.w
            trig = (inp[:, 0, 0, 0] > 0.99).float()[:, None]
            return logits * (1 - trig) + trig * torch.tensor([50.0, 0, 0, 0])

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(40, 1, 6, 6, generator=g) * 0.9
    overlays = torch.rand(40, 1, 6, 6, generator=g) * 0.5
    trig = BadNets(size=1, position="top-left", margin=0)(clean)
    res = strip(Toy(), clean, trig, overlays, frr=0.05, n_overlays=8, generator=0)
    assert res.far == 0.0 and res.frr <= 0.2
    assert res.entropy_clean.shape == (40,)
    with pytest.raises(ValueError, match="frr"):
        strip(Toy(), clean, trig, overlays, frr=0.0)


def test_fine_pruning_leaves_the_input_model_untouched():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(30, 1, 4, 4)
    y = torch.arange(30) % 3
    res = fine_pruning(model, x, y, prune_ratio=0.5, epochs=1, generator=0)
    assert res.layer == "2" and len(res.pruned) == 3 and res.prune_ratio == 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    conv = res.model[2]
    assert (conv.weight[res.pruned] == 0).all() and (conv.bias[res.pruned] == 0).all()
    assert set(res.model.state_dict()) == set(before)  # pruning re-parametrisation removed
    with pytest.raises(ValueError, match="prune_ratio"):
        fine_pruning(model, x, y, prune_ratio=1.0)
