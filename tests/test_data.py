"""Datasets: the embedded sets, and the CIFAR-10 and ImageFolder loaders on generated files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from unmask.bench import data

# --- embedded datasets -----------------------------------------------------------------------


def test_registry_lists_the_foundation_datasets():
    assert {"mnist5k", "digits", "cifar10", "imagefolder"} <= set(data.names())
    for name in data.names():
        entry = data.info(name)
        assert entry.name == name and len(entry.shape) == 3 and entry.description


def test_mnist5k_shapes_range_and_stratification(mnist_test):
    x_train, y_train = data.load("mnist5k", "train")
    x_test, y_test = mnist_test
    assert x_train.shape == (4000, 1, 28, 28) and y_train.shape == (4000,)
    assert x_test.shape == (1000, 1, 28, 28) and y_test.shape == (1000,)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert x.is_contiguous()
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    # The two splits are disjoint.
    train_rows = {bytes(r.numpy()) for r in (x_train * 255).round().to(torch.uint8).flatten(1)}
    test_rows = {bytes(r.numpy()) for r in (x_test * 255).round().to(torch.uint8).flatten(1)}
    assert not train_rows & test_rows


def test_mnist5k_is_deterministic_and_copies():
    x1, y1 = data.load("mnist5k", "test")
    x1[:] = 0  # mutating a returned tensor must not leak into the next load
    x2, y2 = data.load("mnist5k", "test")
    x3, y3 = data.load("mnist5k", "test")
    assert torch.equal(x2, x3) and torch.equal(y1, y2) and torch.equal(y2, y3)
    assert float(x2.max()) == 1.0


def test_digits():
    x_train, y_train = data.load("digits", "train")
    x_test, y_test = data.load("digits", "test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert len(y_train) == 1437 and len(y_test) == 360
    assert float(x_test.min()) == 0.0 and float(x_test.max()) == 1.0
    assert set(y_test.tolist()) == set(range(10))
    assert torch.equal(data.load("digits", "test")[0], x_test)


def test_load_n_keeps_the_first_samples(digits_test):
    x, y = data.load("digits", "test", n=7)
    assert torch.equal(x, digits_test[0][:7]) and torch.equal(y, digits_test[1][:7])
    with pytest.raises(ValueError, match="positive"):
        data.load("digits", "test", n=0)


def test_unknown_dataset_and_split_name_the_known_ones():
    with pytest.raises(ValueError) as err:
        data.load("mnist", "test")
    assert "mnist5k" in str(err.value) and "digits" in str(err.value)
    with pytest.raises(ValueError) as err:
        data.load("digits", "validation")
    assert "train" in str(err.value) and "test" in str(err.value)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="does not take option.*root.*its options: none"):
        data.load("digits", "test", root="/data")
    with pytest.raises(ValueError, match="its options: root, download, verify"):
        data.load("cifar10", "test", image_size=32)


def test_loader_batches_and_seeded_shuffle(digits_test):
    x, y = digits_test
    batches = list(data.loader(x, y, batch_size=100))
    assert [len(b[0]) for b in batches] == [100, 100, 100, 60]
    assert torch.equal(batches[0][1], y[:100])

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([b[1] for b in data.loader(x, y, batch_size=64, shuffle=True, generator=g)])

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


# --- CIFAR-10 in its real on-disk format -----------------------------------------------------


class _Py2Str(bytes):
    """A Python 2 ``str``, as in the CIFAR-10 pickles: read back as ``str`` with
    ``encoding="latin1"`` (torchvision) and as ``bytes`` with ``encoding="bytes"``."""


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))

    dispatch[_Py2Str] = _save_py2_str


def _dump_py2(obj, path):
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(obj)


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar10(root, per_batch=4, n_test=6, seed=0):
    """CIFAR-10's python version, in miniature: ``cifar-10-batches-py/data_batch_1..5``,
    ``test_batch`` and ``batches.meta``, each a protocol-2 pickle of a dict with Python 2
    string keys, ``data`` uint8 N x 3072 (1024 red, then green, then blue values, row-major)
    and ``labels`` a list of ints. Returns the train and test arrays written."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {"train": ([], []), "test": ([], [])}
    files = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)]
    files.append(("test_batch", "test", n_test))
    for fname, split, n in files:
        arr = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        _dump_py2({
            _Py2Str(b"batch_label"): _Py2Str(f"{fname} of 5".encode()),
            _Py2Str(b"labels"): labels,
            _Py2Str(b"data"): arr,
            _Py2Str(b"filenames"): [_Py2Str(f"img_{i}.png".encode()) for i in range(n)],
        }, base / fname)
        written[split][0].append(arr)
        written[split][1].extend(labels)
    _dump_py2({
        _Py2Str(b"num_cases_per_batch"): per_batch,
        _Py2Str(b"label_names"): [_Py2Str(c.encode()) for c in CLASSES],
        _Py2Str(b"num_vis"): 3072,
    }, base / "batches.meta")
    return {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in written.items()}


def test_fake_cifar10_matches_the_documented_format(tmp_path):
    write_fake_cifar10(tmp_path)
    # The CIFAR-10 page documents reading a batch with encoding="bytes": keys b"data", b"labels".
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (4, 3072)
    assert isinstance(batch[b"labels"], list)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_loads_the_real_format(tmp_path, split):
    written = write_fake_cifar10(tmp_path)
    x, y = data.load("cifar10", split, root=tmp_path, verify=False)
    arr, labels = written[split]
    assert x.shape == (len(arr), 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Channel-major layout: the first 1024 values are the red plane, row by row.
    expected = torch.from_numpy(arr.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    assert torch.equal(x, expected)
    assert x.is_contiguous()


def test_cifar10_pixel_layout(tmp_path):
    written = write_fake_cifar10(tmp_path, n_test=1)
    # Rewrite the test batch with one recognisable image: red plane 255, a bright pixel at
    # row 0, column 1 of the blue plane.
    arr = np.zeros((1, 3072), dtype=np.uint8)
    arr[0, :1024] = 255
    arr[0, 2048 + 1] = 255
    _dump_py2({_Py2Str(b"data"): arr, _Py2Str(b"labels"): [7]},
              tmp_path / "cifar-10-batches-py" / "test_batch")
    x, y = data.load("cifar10", "test", root=tmp_path, verify=False)
    assert y.tolist() == [7] and written
    assert bool((x[0, 0] == 1).all()) and float(x[0, 1].max()) == 0.0
    assert float(x[0, 2, 0, 1]) == 1.0 and float(x[0, 2].sum()) == 1.0


def test_cifar10_default_root_from_environment(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path / "cifar10")
    monkeypatch.setenv("UNMASK_DATA", str(tmp_path))
    x, _ = data.load("cifar10", "test", verify=False)
    assert x.shape == (6, 3, 32, 32)


def test_cifar10_verify_rejects_files_with_wrong_checksums(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", "test", root=tmp_path)
    msg = str(err.value)
    assert "checksum" in msg and str(tmp_path) in msg and "cifar-10-batches-py" in msg


@pytest.mark.parametrize("verify", [True, False])
def test_cifar10_missing_root_says_where_and_how(tmp_path, verify):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", "train", root=missing, verify=verify)
    msg = str(err.value)
    assert str(missing) in msg and "download" in msg and "root" in msg
    assert not missing.exists()  # nothing is downloaded or created without being asked


def test_cifar10_missing_batch_file(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_1..5"):
        data.load("cifar10", "train", root=tmp_path, verify=False)


def test_cifar10_wrong_format_is_a_clear_error(tmp_path):
    write_fake_cifar10(tmp_path)
    # Re-packed with Python 3 bytes keys under other names: not the CIFAR-10 format.
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({"images": np.zeros((1, 3072), np.uint8)}, fh)
    with pytest.raises(ValueError, match="not CIFAR-10 python batches"):
        data.load("cifar10", "test", root=tmp_path, verify=False)


# --- ImageFolder -----------------------------------------------------------------------------


def _write_images(folder, color, sizes, mode="RGB"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        value = color if mode == "RGB" else color[0]
        Image.new(mode, (w, h), value).save(folder / f"img_{i}.png")


def _split_tree(root):
    for split, n in (("train", 3), ("test", 2)):
        _write_images(root / split / "cat", (255, 0, 0), [(20, 30)] * n)
        _write_images(root / split / "dog", (0, 0, 255), [(41, 23)] * n)
        _write_images(root / split / "emu", (128, 0, 0), [(17, 17)], mode="L")


def test_imagefolder_with_split_folders_and_resizing(tmp_path):
    _split_tree(tmp_path)
    x, y = data.load("imagefolder", "train", root=tmp_path, image_size=16)
    assert x.shape == (7, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2]  # classes in sorted order: cat, dog, emu
    cat, dog, emu = x[0], x[3], x[6]
    assert torch.allclose(cat[0], torch.ones(16, 16)) and float(cat[1:].abs().max()) == 0.0
    assert torch.allclose(dog[2], torch.ones(16, 16)) and float(dog[:2].abs().max()) == 0.0
    # A grayscale image becomes three equal channels.
    assert torch.allclose(emu[0], emu[1]) and torch.allclose(emu[1], emu[2])
    assert abs(float(emu.mean()) - 128 / 255) < 1e-3
    x_test, y_test = data.load("imagefolder", "test", root=tmp_path, image_size=8)
    assert x_test.shape == (5, 3, 8, 8) and y_test.tolist() == [0, 0, 1, 1, 2]


def test_imagefolder_val_folder_and_max_samples(tmp_path):
    _write_images(tmp_path / "val" / "a", (0, 255, 0), [(10, 10)] * 3)
    _write_images(tmp_path / "val" / "b", (0, 0, 0), [(10, 12)] * 3)
    x, y = data.load("imagefolder", "test", root=tmp_path, image_size=4, max_samples=4)
    assert x.shape == (4, 3, 4, 4) and y.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="max_samples"):
        data.load("imagefolder", "test", root=tmp_path, image_size=4, max_samples=0)


def test_imagefolder_without_split_folders(tmp_path):
    _write_images(tmp_path / "x", (10, 20, 30), [(9, 9)])
    _write_images(tmp_path / "y", (30, 20, 10), [(9, 9)])
    for split in ("train", "test"):
        x, y = data.load("imagefolder", split, root=tmp_path, image_size=5, resize=5)
        assert x.shape == (2, 3, 5, 5) and y.tolist() == [0, 1]


def test_imagefolder_missing_split_is_not_read_as_a_class(tmp_path):
    _write_images(tmp_path / "train" / "cat", (255, 0, 0), [(8, 8)])
    with pytest.raises(FileNotFoundError, match="no 'test' split") as err:
        data.load("imagefolder", "test", root=tmp_path, image_size=8)
    assert "train" in str(err.value)


def test_imagefolder_missing_folder_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="root="):
        data.load("imagefolder", "test")
    with pytest.raises(FileNotFoundError, match="not found") as err:
        data.load("imagefolder", "test", root=tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        data.load("imagefolder", "test", root=tmp_path / "empty")
