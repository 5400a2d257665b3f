"""The literature masking benchmark (issue 16, point 7): every positive is flagged and its
follow-up comes within 5 points of the entry's reference adaptive attack; the standard model
is never "masked"; every new wrapper keeps the model contract, is reproducible under a seed,
and masks (its reference attack beats plain PGD on it)."""

from __future__ import annotations

import copy

import pytest
import torch

from unmask.attacks import Attack
from unmask.bench import zoo
from unmask.bench.core import Threat
from unmask.bench.perf import masking_benchmark as mb
from unmask.defenses import literature as lit
from unmask.defenses.masking import Verdict, diagnose

THREAT = Threat("linf", 0.3)
N = 32
POSITIVES = [e for e in mb.ENTRIES if e.masks]
BY_NAME = {e.name: e for e in mb.ENTRIES}
# The wrappers of defenses/literature.py, built the way their zoo entries build them.
NEW = {
    "mnist-cnn-thermometer": lambda m: lit.ThermometerEncoding(m, levels=16),
    "mnist-cnn-resizepad": lambda m: lit.RandomResizePadding(m, min_scale=0.85, seed=0),
    "mnist-cnn-sap": lambda m: lit.StochasticActivationPruning(m, share=1.0, seed=0),
    "mnist-cnn-kwta": lambda m: lit.KWinnersTakeAll(m, ratio=0.1),
    "mnist-cnn-purifier": lambda m: lit.EntropyPurification(m, steps=3, step_size=0.1),
    "mnist-cnn-tvm": lambda m: lit.TVMinimization(m),
    "mnist-cnn-detector": lambda m: lit.SqueezingDetector(m),
}
RANDOMISED = ("mnist-cnn-resizepad", "mnist-cnn-sap")
# The follow-up gaps the diagnosis does not close yet (issue 16, point 10): name -> reason.
KNOWN_GAPS: dict[str, str] = {
    "mnist-cnn-kwta": (
        "diagnosis gap: on these 32 samples in fast mode no check fires (unstable loss 0.49 "
        "against its 0.5 threshold; black-box beats white-box 1 of 30, not significant), so "
        "k-WTA is called clean, while BPDA(ReLU)-PGD-100 breaks clearly more than plain PGD "
        "(test_reference_attack_beats_plain_pgd). At n=100 it is 'suspicious'. Needs a "
        "discontinuity check (gradients at nearby points disagree) or BPDA on activations"),
}


@pytest.fixture(scope="module")
def batch(mnist_test):
    x, y = mnist_test
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def models(mnist_cnn):
    """Zoo entry name -> model, built over the session's trained mnist-cnn."""
    out = {}
    for entry in mb.ENTRIES:
        if entry.name == "mnist-cnn":
            out[entry.name] = mnist_cnn
        elif entry.masks:
            out[entry.name] = zoo.load(entry.name, device="cpu", progress=False).eval()
    return out


_REFERENCE: dict[str, torch.Tensor] = {}


def _reference(name, model, x, y):
    """Per-sample broken by the entry's reference attack or plain PGD (cached per session)."""
    if name not in _REFERENCE:
        entry = BY_NAME[name]
        plain = mb.plain_pgd_broken(model, x, y, THREAT, randomised=entry.randomised)
        _REFERENCE[name] = mb.reference_broken(model, x, y, THREAT, entry) | plain
    return _REFERENCE[name]


# --- the benchmark's registry -----------------------------------------------------------------


def test_every_masking_zoo_entry_is_in_the_benchmark_with_a_reference():
    names = [e.name for e in mb.ENTRIES]
    assert len(names) == len(set(names))
    tagged = set(zoo.list(tag="masking-benchmark")) | set(zoo.list(tag="masking-control"))
    assert tagged <= {e.name for e in POSITIVES}, tagged - {e.name for e in POSITIVES}
    assert len(POSITIVES) >= 8 and set(NEW) <= tagged
    assert {"mnist-cnn", "mnist-cnn-pgdat", "mnist-cnn-trades"} <= {
        e.name for e in mb.ENTRIES if not e.masks}
    for entry in mb.ENTRIES:
        assert isinstance(entry.reference(THREAT), Attack), entry.name
        assert entry.reference_label and entry.paper and entry.mechanism
        assert bool(entry.broken_by) == entry.masks, entry.name


# --- the claims on each positive --------------------------------------------------------------


def _positive_params():
    for entry in POSITIVES:
        marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[entry.name])]
                 if entry.name in KNOWN_GAPS else [])
        yield pytest.param(entry.name, marks=marks, id=entry.name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_positive_params()))
def test_positive_is_flagged_and_follow_up_reaches_the_reference(name, models, batch, mnist_cnn):
    x, y = batch
    model = models[name]
    report = diagnose(model, x, y, THREAT, follow_up=True, fast=True, surrogate=mnist_cnn)
    assert report.verdict is not Verdict.CLEAN, [c.name for c in report.checks]
    reference = 1 - _reference(name, model, x, y).float().mean().item()
    after = report.follow_up["after"]
    assert after <= reference + mb.GAP_TOLERANCE, (
        f"{name}: follow-up {report.follow_up['attack']} leaves {after:.3f}, the reference "
        f"{BY_NAME[name].reference_label} {reference:.3f}")
    # The merged number is never above the follow-up's (it includes it).
    assert report.outcomes.robust_accuracy <= after + 1e-9


@pytest.mark.slow
def test_standard_model_is_not_masked(mnist_cnn, batch):
    x, y = batch
    report = diagnose(mnist_cnn, x, y, THREAT, follow_up=True, fast=True, surrogate=mnist_cnn)
    assert report.verdict is not Verdict.MASKED, [c.name for c in report.failed]


# --- each new wrapper -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NEW))
def test_wrapper_keeps_the_model_contract(name, mnist_cnn, batch):
    x, y = batch
    model = NEW[name](copy.deepcopy(mnist_cnn)).eval()
    xin = x[:8].clone().requires_grad_(True)
    out = model(xin)
    assert out.shape == (8, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()  # attached to the input's graph (possibly with a zero derivative)
    assert xin.grad is not None and xin.grad.shape == xin.shape
    assert torch.equal(xin.detach(), x[:8])  # the input is not modified
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        base = (mnist_cnn(x).argmax(1) == y).float().mean().item()
    assert accuracy >= base - 0.15, (accuracy, base)
    # The weights are the classifier's: same state-dict keys under .model.
    keys = {k.removeprefix("model.") for k in model.state_dict()}
    assert keys == set(mnist_cnn.state_dict())


@pytest.mark.parametrize("name", RANDOMISED)
def test_randomised_wrapper_is_reproducible_under_a_seed(name, mnist_cnn, batch):
    x, _ = batch
    a = NEW[name](copy.deepcopy(mnist_cnn)).eval()
    b = NEW[name](copy.deepcopy(mnist_cnn)).eval()
    with torch.no_grad():
        first = a(x[:4])
        assert torch.equal(first, b(x[:4]))  # same seed, same draws
        second = a(x[:4])
        assert not torch.equal(first, second)  # fresh draws at every pass
        a.reseed(0)
        assert torch.equal(a(x[:4]), first)  # reseed restarts the sequence
        a.reseed(1)
        assert not torch.equal(a(x[:4]), first)
        # Per-sample randomness: copies of one image in a batch get different draws (EOT's
        # stacked copies need it).
        copies = a(x[:1].repeat(4, 1, 1, 1))
        assert not torch.equal(copies[0], copies[1])
    state = torch.random.get_rng_state()
    with torch.no_grad():
        a(x[:4])
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    with pytest.raises(ValueError, match="seed"):
        a.reseed(-1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEW))
def test_reference_attack_beats_plain_pgd(name, models, batch):
    """The defense masks: its reference attack breaks clearly more than plain PGD-40."""
    x, y = batch
    model, entry = models[name], BY_NAME[name]
    plain = mb.plain_pgd_broken(model, x, y, THREAT, randomised=entry.randomised)
    reference = _reference(name, model, x, y)
    # At least 4 of 32 samples (12.5 points) more: far outside what a second seed changes.
    assert int(reference.sum()) - int(plain.sum()) >= 4, (int(plain.sum()), int(reference.sum()))


def test_wrapper_validation(mnist_cnn):
    with pytest.raises(ValueError, match="levels"):
        lit.ThermometerEncoding(copy.deepcopy(mnist_cnn), levels=1)
    with pytest.raises(ValueError, match="min_scale"):
        lit.RandomResizePadding(copy.deepcopy(mnist_cnn), min_scale=1.5)
    with pytest.raises(ValueError, match="ratio"):
        lit.KWinnersTakeAll(copy.deepcopy(mnist_cnn), ratio=0.0)
    with pytest.raises(ValueError, match="nn.ReLU"):
        lit.StochasticActivationPruning(torch.nn.Sequential(torch.nn.Flatten(),
                                                            torch.nn.Linear(784, 10)))
    with pytest.raises(TypeError, match="nn.Module"):
        lit.SqueezingDetector("mnist-cnn")


def test_thermometer_code_and_soft_relaxation():
    therm = lit.Thermometer(levels=4)
    x = torch.tensor([0.0, 0.3, 0.5, 1.0]).view(1, 1, 1, 4)
    code = therm.encode(x)
    assert code.shape == (1, 4, 1, 4)
    assert code[0, :, 0, 1].tolist() == [1.0, 0.0, 0.0, 0.0]  # 0.3 * 4 = 1.2: one level
    assert torch.allclose(therm(x), torch.floor(x * 4) / 4)
    assert torch.allclose(therm.bpda_approximation(x), x)  # the soft code decodes to x


def test_detector_answers_flagged_inputs_with_the_model_prediction(mnist_cnn, batch):
    x, _ = batch
    det = lit.SqueezingDetector(copy.deepcopy(mnist_cnn), threshold=0.0).eval()
    with torch.no_grad():
        flags = det.detect(x)
        assert flags.any()
        assert torch.equal(det(x).argmax(1), mnist_cnn(x).argmax(1))
    xin = x.clone().requires_grad_(True)
    det(xin)[flags].sum().backward()
    assert (xin.grad[flags] == 0).all()  # no gradient on a flagged input


# --- the table --------------------------------------------------------------------------------


def _row(**kw):
    base = dict(name="m", paper="p", mechanism="k", masks=True, verdict="masked",
                failed_checks=["zero gradients"], robust_accuracy=0.1, follow_up_attack="BPDA",
                follow_up_after=0.12, reference_attack="BPDA-PGD", reference_robust_accuracy=0.1,
                plain_pgd_robust_accuracy=0.9, n=10, seconds=1.0)
    base.update(kw)
    return mb.BenchmarkRow(**base)


def test_row_properties():
    assert all(_row().properties.values())
    assert not _row(verdict="clean").properties["verdict"]
    assert _row(masks=False, verdict="suspicious").properties["verdict"]
    assert not _row(masks=False, verdict="masked").properties["verdict"]
    assert not _row(follow_up_after=0.16).properties["follow_up_within_tolerance"]
    assert not _row(follow_up_after=None).properties["follow_up_within_tolerance"]
    assert _row().to_dict()["gap"] == pytest.approx(0.02)


def test_write_table_replaces_only_between_the_markers(tmp_path):
    doc = tmp_path / "masking.md"
    start, end = mb.MARKERS
    doc.write_text(f"# title\n\n{start}\nold\n{end}\n\nafter\n")
    table = mb.markdown_table([_row(), _row(name="n", verdict="clean")], threat=THREAT,
                              fast=True, seconds=60.0)
    mb.write_table(doc, table)
    text = doc.read_text()
    assert "\nold\n" not in text and text.startswith("# title") and text.endswith("after\n")
    assert "| m |" in text and "| NO |" in text and "1.0 min" in text
    mb.write_table(doc, table)  # idempotent
    assert doc.read_text() == text
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        mb.write_table(doc, table)
