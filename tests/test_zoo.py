"""The model zoo: trained accuracy, the verified cache (hits, corruption, concurrent writers),
user checkpoints, wrapping, registry isolation, recipes and resumable training."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from torch import nn

from unmask.bench import data, zoo
from unmask.bench.core import Normalize, fileio, training
from unmask.bench.core.registry import Registry
from unmask.bench.core.training import cross_entropy_loss, fit, seeded_init
from unmask.bench.zoo import registry as zoo_registry
from unmask.bench.zoo.archs import MLP
from unmask.bench.zoo.registry import CacheCorruptionWarning


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _files(name):
    d = zoo.cache_dir()
    return d / f"{name}.safetensors", d / f"{name}.json"


@pytest.fixture
def count_training(monkeypatch):
    """Records the name of every entry zoo trains (a cache hit trains nothing)."""
    calls: list[str] = []
    real = zoo_registry._train

    def spy(entry, *args, **kwargs):
        calls.append(entry.name)
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(zoo_registry, "_train", spy)
    return calls


@pytest.fixture
def no_training(monkeypatch):
    def refuse(entry, *args, **kwargs):
        raise AssertionError(f"{entry.name} was trained; a cache hit was expected")

    monkeypatch.setattr(zoo_registry, "_train", refuse)


def _tiny_mlp() -> nn.Module:
    """Test-only MLP with 8 hidden units."""
    return MLP(in_features=64, hidden=8)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A test-only zoo entry that trains in a fraction of a second, in a private cache."""
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path))
    with zoo.isolated():
        zoo.register_model("test-tiny", dataset="digits", epochs=2, batch_size=256, lr=1e-2)(
            _tiny_mlp
        )
        yield "test-tiny"


# --- the standard entries --------------------------------------------------------------------


def test_mnist_cnn_accuracy_and_card(mnist_cnn, mnist_test):
    x, y = mnist_test
    acc = training.accuracy(mnist_cnn, x, y)
    assert acc >= 0.95
    card = zoo.card("mnist-cnn")
    assert card is not None
    assert card["clean_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert card["test_samples"] == 1000
    assert card["name"] == "mnist-cnn" and card["schema"] == zoo_registry.CARD_SCHEMA
    assert card["entry"]["recipe"] == "standard" and card["entry"]["seed"] == 0
    assert card["entry"]["dataset"] == "mnist5k"
    assert card["fingerprint"] == zoo.get("mnist-cnn").fingerprint()
    assert card["versions"]["torch"] == torch.__version__
    assert card["train_seconds"] > 0
    weights, _ = _files("mnist-cnn")
    assert card["sha256"] == _sha256(weights)
    # The convention: eval mode, logits N x K for [0, 1] inputs, normalisation inside.
    assert not mnist_cnn.training
    assert any(isinstance(m, Normalize) for m in mnist_cnn.modules())
    out = mnist_cnn(x[:4])
    assert out.shape == (4, 10) and not torch.allclose(out.softmax(1).sum(1), out.sum(1))


def test_second_load_is_a_cache_hit(mnist_cnn, mnist_test, no_training):
    weights, card_path = _files("mnist-cnn")
    card_text, mtime = card_path.read_text(), weights.stat().st_mtime_ns
    start = time.perf_counter()
    model, card = zoo.load_with_card("mnist-cnn", device="cpu", progress=False)
    took = time.perf_counter() - start
    assert took < 1.0, f"a cache hit took {took:.2f}s"
    assert card == json.loads(card_text)
    assert card_path.read_text() == card_text and weights.stat().st_mtime_ns == mtime
    x = mnist_test[0][:16]
    with torch.no_grad():
        assert torch.equal(model(x), mnist_cnn(x))


def test_digits_mlp(digits_mlp, digits_test):
    assert training.accuracy(digits_mlp, *digits_test) >= 0.9
    assert "digits-mlp" in zoo.list() and "mnist-cnn" in zoo.list()
    assert "digits-mlp" in zoo.list(tag="tiny") and "mnist-cnn" not in zoo.list(tag="tiny")


def test_unknown_entry_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        zoo.load("mnist-cnnn")
    assert "mnist-cnn" in str(err.value) and "digits-mlp" in str(err.value)


def test_card_of_untrained_entry_is_none(tiny):
    assert zoo.card(tiny) is None


# --- the cache -------------------------------------------------------------------------------


def _flip_middle(p):
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    p.write_bytes(bytes(blob))


def _flip_header(p):
    blob = bytearray(p.read_bytes())
    blob[12] ^= 0x01
    p.write_bytes(bytes(blob))


CORRUPTIONS = {
    "weights-flipped-byte": lambda w, c: _flip_middle(w),
    "weights-flipped-header": lambda w, c: _flip_header(w),
    "weights-truncated": lambda w, c: w.write_bytes(w.read_bytes()[: w.stat().st_size // 2]),
    "weights-empty": lambda w, c: w.write_bytes(b""),
    "weights-missing": lambda w, c: w.unlink(),
    "card-garbage": lambda w, c: c.write_text("{not json"),
    "card-truncated": lambda w, c: c.write_text(c.read_text()[: len(c.read_text()) // 2]),
    "card-binary": lambda w, c: c.write_bytes(b"\xff\xfe\x00garbage"),
    "card-not-a-dict": lambda w, c: c.write_text("[]"),
    "card-without-hash": lambda w, c: c.write_text(
        json.dumps({k: v for k, v in json.loads(c.read_text()).items() if k != "sha256"})),
    "card-wrong-hash": lambda w, c: c.write_text(
        json.dumps({**json.loads(c.read_text()), "sha256": "0" * 64})),
    "card-missing": lambda w, c: c.unlink(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_cache_is_reported_and_retrained(tiny, corruption, count_training):
    _, card = zoo.load_with_card(tiny, device="cpu", progress=False)
    assert count_training == [tiny]
    weights, card_path = _files(tiny)
    CORRUPTIONS[corruption](weights, card_path)

    with pytest.warns(CacheCorruptionWarning, match="corrupt") as record:
        model, card2 = zoo.load_with_card(tiny, device="cpu", progress=False)
    assert len([w for w in record if w.category is CacheCorruptionWarning]) == 1
    assert tiny in str(record[0].message)
    assert count_training == [tiny, tiny]
    # Retrained deterministically: the same weights as the first time, and a valid cache.
    assert card2["sha256"] == card["sha256"] == _sha256(weights)
    assert json.loads(card_path.read_text())["sha256"] == card["sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptionWarning)
        zoo.load(tiny, device="cpu", progress=False)
    assert count_training == [tiny, tiny]


def test_corrupt_zoo_entry_is_retrained_identically(digits_mlp, monkeypatch, tmp_path,
                                                    count_training):
    # A real zoo entry: copy its trained cache, flip a weight byte, and check the retrained
    # file is byte-identical to the original (training is deterministic from the seed).
    src_weights, src_card = _files("digits-mlp")
    original = _sha256(src_weights)
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path))
    weights, card_path = _files("digits-mlp")
    weights.parent.mkdir(parents=True)
    weights.write_bytes(src_weights.read_bytes())
    card_path.write_text(src_card.read_text())
    zoo.load("digits-mlp", device="cpu", progress=False)
    assert count_training == []
    _flip_middle(weights)
    with pytest.warns(CacheCorruptionWarning, match="sha256 mismatch"):
        model = zoo.load("digits-mlp", device="cpu", progress=False)
    assert count_training == ["digits-mlp"]
    assert _sha256(weights) == original
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), digits_mlp(x))


def test_changed_entry_is_retrained_without_a_corruption_warning(tiny, count_training):
    zoo.load(tiny, device="cpu", progress=False)
    zoo.register_model(tiny, dataset="digits", epochs=3, batch_size=256, lr=1e-2,
                       replace=True)(_tiny_mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptionWarning)
        _, card = zoo.load_with_card(tiny, device="cpu", progress=False)
    assert count_training == [tiny, tiny]
    assert card["entry"]["epochs"] == 3


def test_retrain_flag_trains_again(tiny, count_training):
    zoo.load(tiny, device="cpu", progress=False)
    zoo.load(tiny, device="cpu", progress=False)
    zoo.load(tiny, device="cpu", progress=False, retrain=True)
    assert count_training == [tiny, tiny]


def test_cache_files_are_complete_and_no_temporaries_remain(tiny):
    zoo.load(tiny, device="cpu", progress=False)
    names = sorted(p.name for p in zoo.cache_dir().iterdir())
    assert names == [f"{tiny}.json", f"{tiny}.lock", f"{tiny}.safetensors"]


def test_atomic_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(target, b"new contents", fsync=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from unmask.bench import zoo
    from unmask.bench.zoo import registry as zoo_registry

    trained = []
    real = zoo_registry._train
    def spy(entry, *a, **k):
        trained.append(entry.name)
        return real(entry, *a, **k)
    zoo_registry._train = spy
    zoo.get("digits-mlp")  # imports done before the start line
    ready, me, other = sys.argv[1], sys.argv[2], sys.argv[3]
    open(os.path.join(ready, me), "w").close()
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(ready, other)) and time.time() < deadline:
        time.sleep(0.005)
    model, card = zoo.load_with_card("digits-mlp", device="cpu", progress=False)
    x = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    print(json.dumps({"sha256": card["sha256"], "created": card["created"],
                      "trained": trained, "logits": model(x).tolist()}))
    """
)


def test_concurrent_writers_share_one_valid_cache(tmp_path, no_training, monkeypatch):
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "UNMASK_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(ready), me, other], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me, other in (("a", "b"), ("b", "a"))
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        assert "CacheCorruptionWarning" not in stderr, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    # Exactly one process trained; the other waited for the lock and got its result.
    assert sorted(len(o["trained"]) for o in outs) == [0, 1]
    assert outs[0]["sha256"] == outs[1]["sha256"] and outs[0]["created"] == outs[1]["created"]
    assert outs[0]["logits"] == outs[1]["logits"]
    # The cache is complete and valid. (Its weights are not compared with the session's:
    # float reductions, hence trained weights, depend on the number of threads.)
    weights = cache / "models" / "digits-mlp.safetensors"
    card = json.loads((cache / "models" / "digits-mlp.json").read_text())
    assert card["sha256"] == _sha256(weights) == outs[0]["sha256"]
    assert card["threads"] == 1
    assert sorted(p.name for p in (cache / "models").iterdir()) == [
        "digits-mlp.json", "digits-mlp.lock", "digits-mlp.safetensors"]
    monkeypatch.setenv("UNMASK_CACHE", str(cache))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptionWarning)
        zoo.load("digits-mlp", device="cpu", progress=False)


# --- user checkpoints and wrapping -----------------------------------------------------------


def _mlp_outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_from_checkpoint_state_dict(digits_mlp, digits_test, tmp_path):
    x = digits_test[0][:32]
    path = tmp_path / "mlp.pt"
    torch.save(digits_mlp.state_dict(), path)
    model = zoo.from_checkpoint(path, "mlp", device="cpu", in_features=64, hidden=64)
    assert not model.training
    assert torch.equal(_mlp_outputs(model, x), _mlp_outputs(digits_mlp, x))


def test_from_checkpoint_safetensors(digits_mlp, digits_test, tmp_path):
    from safetensors.torch import save_file

    x = digits_test[0][:32]
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in digits_mlp.state_dict().items()}, str(path))
    model = zoo.from_checkpoint(path, MLP(in_features=64, hidden=64), device="cpu")
    assert torch.equal(_mlp_outputs(model, x), _mlp_outputs(digits_mlp, x))


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict"])
def test_from_checkpoint_strips_data_parallel_prefix(digits_mlp, digits_test, tmp_path, wrapper):
    x = digits_test[0][:32]
    state = {f"module.{k}": v for k, v in digits_mlp.state_dict().items()}
    payload = state if wrapper is None else {wrapper: state, "epoch": 3}
    path = tmp_path / "ddp.pth"
    torch.save(payload, path)
    model = zoo.from_checkpoint(path, "mlp", device="cpu", in_features=64, hidden=64)
    assert torch.equal(_mlp_outputs(model, x), _mlp_outputs(digits_mlp, x))


class _Payload:
    """Unpickling this would create a file: the classic pickle code-execution exploit."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_from_checkpoint_refuses_arbitrary_pickles(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="weights_only") as err:
        zoo.from_checkpoint(path, "mlp", in_features=64, hidden=64)
    assert "state_dict" in str(err.value)
    assert not marker.exists()


def test_from_checkpoint_refuses_a_pickled_module(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(MLP(in_features=64, hidden=8), path)
    with pytest.raises(ValueError, match="never unpickles arbitrary objects"):
        zoo.read_state_dict(path)


def test_from_checkpoint_errors(tmp_path, digits_mlp):
    with pytest.raises(FileNotFoundError, match="not found"):
        zoo.from_checkpoint(tmp_path / "missing.pt", "mlp")
    path = tmp_path / "mlp.pt"
    torch.save(digits_mlp.state_dict(), path)
    with pytest.raises(ValueError, match="does not match architecture"):
        zoo.from_checkpoint(path, "mlp", in_features=64, hidden=32)
    with pytest.raises(ValueError, match="small-cnn"):
        zoo.from_checkpoint(path, "no-such-arch")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        zoo.from_checkpoint(tmp_path / "tensor.pt", "mlp")


def test_from_checkpoint_with_normalisation(tmp_path):
    inner = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    path = tmp_path / "inner.pt"
    torch.save(inner.state_dict(), path)
    target = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model = zoo.from_checkpoint(path, target, mean=(0.5,), std=(0.25,), device="cpu")
    x = torch.rand(2, 1, 2, 2)
    with torch.no_grad():
        assert torch.allclose(model(x), inner((x - 0.5) / 0.25))


def test_wrap():
    inner = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert zoo.wrap(inner) is inner
    wrapped = zoo.wrap(inner, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    x = torch.rand(2, 3, 2, 2)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), inner((x - mean) / 0.5))
    assert isinstance(wrapped[0], Normalize)
    with pytest.raises(ValueError, match="both mean and std"):
        zoo.wrap(inner, mean=(0.5,))
    with pytest.raises(TypeError, match="nn.Module"):
        zoo.wrap(lambda t: t, mean=(0.5,), std=(0.5,))


# --- registries and recipes ------------------------------------------------------------------


def test_registry_isolated_undoes_additions_and_removals():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with reg.isolated() as inner:
        inner.add("b", 2)
        inner.remove("a")
        assert reg.names() == ["b"]
    assert reg.names() == ["a"] and reg.get("a") == 1
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    reg.add("a", 3, replace=True)
    assert reg.get("a") == 3
    with pytest.raises(KeyError, match="known: a"):
        reg.get("c")
    with pytest.raises(ValueError, match="non-empty"):
        reg.add("", 1)


def test_custom_recipe_plugs_into_the_zoo(monkeypatch, tmp_path):
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path))
    before = zoo.list()
    seen: dict = {}
    with zoo.isolated():

        @training.register_recipe("test-recipe")
        def test_recipe(model, x, y, *, epochs, batch_size, lr, generator, progress, **options):
            seen.update(options, epochs=epochs, generator=generator, n=len(x))
            model = training.standard(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                                      generator=generator, progress=progress)
            return model, {"extra_metric": 0.25}

        @zoo.register_model("test-custom", dataset="digits", recipe="test-recipe", epochs=1,
                            seed=3, batch_size=256, alpha=0.5, tags=("test",))
        def test_custom():
            return MLP(in_features=64, hidden=8)

        assert "test-custom" in zoo.list() and zoo.list(tag="test") == ["test-custom"]
        _, card = zoo.load_with_card("test-custom", device="cpu", progress=False)
        assert seen == {"alpha": 0.5, "epochs": 1, "generator": 3, "n": 1437}
        assert card["metrics"] == {"extra_metric": 0.25}
        assert card["entry"]["recipe"] == "test-recipe"
        assert card["entry"]["recipe_options"] == {"alpha": 0.5}
        assert 0.0 <= card["clean_accuracy"] <= 1.0

        @zoo.register_model("test-derived", dataset="digits", recipe="none",
                            base="test-custom")
        def test_derived(base):
            """A temperature on top of the trained base."""
            return nn.Sequential(base, nn.Identity())

        _, derived = zoo.load_with_card("test-derived", device="cpu", progress=False)
        assert derived["clean_accuracy"] == card["clean_accuracy"]
        assert zoo.get("test-derived").description == "A temperature on top of the trained base."

        @zoo.register_model("test-bad-recipe", dataset="digits", recipe="no-such-recipe")
        def test_bad():
            return MLP(in_features=64, hidden=8)

        with pytest.raises(ValueError, match="no-such-recipe.*standard"):
            zoo.load("test-bad-recipe", device="cpu")
    assert zoo.list() == before
    assert "test-recipe" not in training.RECIPES and "standard" in training.RECIPES


# --- training --------------------------------------------------------------------------------


def _noisy_loss(model, xb, yb, generator):
    # Uses the generator, so a resume must restore its state too.
    noise = torch.randn(xb.shape, generator=generator) * 0.05
    return cross_entropy_loss(model, (xb + noise).clamp(0, 1), yb, generator)


class _Interrupted(Exception):
    pass


def _build_mlp(seed):
    with seeded_init(seed):
        return MLP(in_features=64, hidden=16)


def test_fit_resumes_from_a_checkpoint_identically(tmp_path):
    x, y = data.load("digits", "train", n=256)
    kwargs = dict(epochs=4, batch_size=64, lr=1e-2, generator=5, progress=False)
    reference = fit(_build_mlp(0), x, y, _noisy_loss, **kwargs)

    calls = {"n": 0}

    def interrupted_after_two_epochs(model, xb, yb, generator):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 2:  # the second batch of the third epoch
            raise _Interrupted
        return _noisy_loss(model, xb, yb, generator)

    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(_Interrupted):
        fit(_build_mlp(0), x, y, interrupted_after_two_epochs, checkpoint_dir=ckpt_dir, **kwargs)
    state = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 2
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.pt"]

    resumed_batches = []

    def counting(model, xb, yb, generator):
        resumed_batches.append(len(xb))
        return _noisy_loss(model, xb, yb, generator)

    # A differently initialised model: the checkpoint's weights must win.
    resumed = fit(_build_mlp(1), x, y, counting, checkpoint_dir=ckpt_dir, **kwargs)
    assert len(resumed_batches) == 2 * 4
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert not resumed.training


def test_fit_is_deterministic_and_leaves_global_rng_alone():
    x, y = data.load("digits", "train", n=128)
    state = torch.get_rng_state()
    a = fit(_build_mlp(0), x, y, _noisy_loss, epochs=1, batch_size=32, generator=1, progress=False)
    b = fit(_build_mlp(0), x, y, _noisy_loss, epochs=1, batch_size=32, generator=1, progress=False)
    c = fit(_build_mlp(0), x, y, _noisy_loss, epochs=1, batch_size=32, generator=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_fit_rejects_bad_settings():
    x, y = data.load("digits", "train", n=16)
    with pytest.raises(ValueError, match="epochs"):
        fit(_build_mlp(0), x, y, _noisy_loss, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(_build_mlp(0), x, y, _noisy_loss, epochs=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="'adam' or 'sgd'"):
        fit(_build_mlp(0), x, y, _noisy_loss, epochs=1, optimizer="lbfgs", progress=False)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = _build_mlp(0), _build_mlp(0), _build_mlp(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.net[1].weight, b.net[1].weight)
    assert not torch.equal(a.net[1].weight, c.net[1].weight)


# --- the model's fingerprint and the training thread count (issue 18) -------------------------


CONTROLS = ("mnist-cnn-quantized", "mnist-cnn-jpeg", "mnist-cnn-lowtemp", "mnist-cnn-noise",
            "mnist-cnn-probs")


def test_fingerprint_tells_the_wrappers_of_one_network_apart(mnist_cnn):
    """The five masking controls wrap mnist-cnn's weights: a hash of the weights alone is the
    same for all five; their fingerprints differ from each other and from mnist-cnn."""
    from unmask.bench.zoo.registry import _state_bytes

    models = {name: zoo.load(name, device="cpu", progress=False) for name in CONTROLS}
    assert len({hashlib.sha256(_state_bytes(m)).hexdigest() for m in models.values()}) == 1
    prints = {name: zoo.fingerprint(m) for name, m in models.items()}
    assert len(set(prints.values()) | {zoo.fingerprint(mnist_cnn)}) == len(CONTROLS) + 1
    # Stable: a fresh load, the train flag, and the randomised control after drawing noise.
    for name in CONTROLS:
        assert zoo.fingerprint(zoo.load(name, device="cpu", progress=False)) == prints[name]
    noisy = models["mnist-cnn-noise"]
    with torch.no_grad():
        noisy(torch.rand(2, 1, 28, 28))
    noisy.train()
    assert zoo.fingerprint(noisy) == prints["mnist-cnn-noise"]
    noisy.eval()


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class _Shift(nn.Module):
    def __init__(self, by: float) -> None:
        super().__init__()
        self.register_buffer("by", torch.tensor(by), persistent=False)

    def forward(self, x):
        return x + self.by


def test_fingerprint_covers_attributes_order_buffers_hooks_and_weights():
    from unmask.defenses.inference import InputQuantization, LowTemperature, RandomNoise

    with seeded_init(0):
        net = _tiny_mlp()

    def build(*front):
        return nn.Sequential(*front, net)

    base = zoo.fingerprint(build(_Scale(0.5), _Shift(0.1)))
    assert zoo.fingerprint(build(_Scale(0.5), _Shift(0.1))) == base  # a new instance, same
    different = {
        "attribute": build(_Scale(0.6), _Shift(0.1)),
        "non-persistent buffer": build(_Scale(0.5), _Shift(0.2)),
        "wrapper order": build(_Shift(0.1), _Scale(0.5)),
        "one wrapper less": build(_Scale(0.5)),
    }
    for what, model in different.items():
        assert zoo.fingerprint(model) != base, what
    hooked = build(_Scale(0.5), _Shift(0.1))
    hooked[0].register_forward_hook(lambda module, args, out: out.clamp(0, 1))
    assert zoo.fingerprint(hooked) != base
    for a, b in ((InputQuantization(net, bits=2), InputQuantization(net, bits=3)),
                 (LowTemperature(net, temperature=0.01), LowTemperature(net, temperature=0.02)),
                 (RandomNoise(net, std=0.3, seed=0), RandomNoise(net, std=0.4, seed=0))):
        assert zoo.fingerprint(a) != zoo.fingerprint(b), type(a).__name__
    before = zoo.fingerprint(net)
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] += 1e-6
    assert zoo.fingerprint(net) != before
    with pytest.raises(TypeError, match="torch.nn.Module"):
        zoo.fingerprint({"weight": torch.zeros(2)})


def test_training_records_its_thread_count_and_a_different_count_warns(tiny, monkeypatch):
    """CPU training is reproducible only at the same thread count: the card records it and
    the model's fingerprint; loading or retraining with another count warns."""
    from unmask.bench.zoo.registry import ThreadCountWarning

    monkeypatch.setattr(zoo_registry, "_THREADS_WARNED", set())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model, card = zoo.load_with_card(tiny, device="cpu", progress=False)
        assert card["threads"] == 1 and card["model_fingerprint"] == zoo.fingerprint(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ThreadCountWarning)
            zoo.load(tiny, device="cpu", progress=False)  # the same count: silent
        torch.set_num_threads(2)
        with pytest.warns(ThreadCountWarning, match="trained with 1 CPU threads, this process "
                                                    "uses 2"):
            zoo.load(tiny, device="cpu", progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ThreadCountWarning)
            zoo.load(tiny, device="cpu", progress=False)  # once per entry and process
        with pytest.warns(ThreadCountWarning, match="retraining zoo model 'test-tiny' with 2 CPU threads; "
                                                    "its card was trained with 1"):
            _, retrained = zoo.load_with_card(tiny, device="cpu", progress=False, retrain=True)
        assert retrained["threads"] == 2
    finally:
        torch.set_num_threads(threads)
