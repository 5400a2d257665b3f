"""The model zoo: registered entries, trained on first use and cached as safetensors + a card.

``zoo.load("mnist-cnn")`` returns the trained model (eval mode, inputs in [0, 1]); the first
call trains it deterministically from the entry's seed, later calls are cache hits that verify
the weights' sha256 before use. A corrupt or truncated cache file is reported and retrained,
never used. Writes are atomic (temp file + rename) and a file lock serialises processes that
train the same entry, so concurrent runs neither corrupt the cache nor train twice.

Entries are registered timm-style::

    @register_model("mnist-cnn", dataset="mnist5k", recipe="standard", epochs=8, seed=0)
    def mnist_cnn():
        return SmallCNN()

A derived entry (``base="mnist-cnn"``) receives the trained base model and wraps it (an input
transform, a temperature), with ``recipe="none"`` when nothing more is trained. Defense and
backdoor entries live in their own modules of this package (``standard``, ``defended``,
``literature``, ``backdoored``, ``certified``), imported by ``unmask.bench.zoo``; a third-party
package adds entries through the ``unmask.zoo`` entry-point group. Adding one never touches
this file.

The cache lives in ``$UNMASK_CACHE`` (default ``~/.cache/unmask``) under ``models/``.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save
from torch import nn

from .. import data as data_mod
from ..core import Normalize, select_device
from ..core.fileio import atomic_write, cache_root, read_state_dict
from ..core.registry import Registry
from ..core.training import RECIPES, accuracy, seeded_init
from .archs import build as build_arch

__all__ = ["ModelEntry", "MODELS", "register_model", "list", "entries", "get", "load",
           "load_with_card", "card", "cache_dir", "wrap", "from_checkpoint", "read_state_dict",
           "CacheCorruptionWarning", "ThreadCountWarning", "versions", "isolated",
           "fingerprint"]

log = logging.getLogger(__name__)

CARD_SCHEMA = 1
# Third-party packages register zoo entries through this entry-point group; loaded on first
# registry access.
ENTRY_POINT_GROUP = "unmask.zoo"


class CacheCorruptionWarning(UserWarning):
    """A cached model failed verification and is being retrained."""


class ThreadCountWarning(UserWarning):
    """A zoo model was trained on the CPU with another thread count than this process uses:
    CPU training is reproducible only at the same count (1 and 2 threads give different
    weights), so a retrain here gives another model than the card's."""


@dataclass(frozen=True)
class ModelEntry:
    """A zoo entry: how to build, train and describe one model."""

    name: str
    builder: Callable[..., nn.Module] = field(repr=False, compare=False)
    dataset: str
    recipe: str = "standard"
    epochs: int = 0
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    base: str | None = None
    recipe_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    tags: tuple[str, ...] = ()

    def config(self) -> dict[str, Any]:
        """The entry's configuration as a dict: its fields, tags, a digest of the builder's
        source and the dataset version (a change of any retrains the cached model).
        """
        cfg = asdict(self)
        cfg.pop("builder")
        cfg["tags"] = [*self.tags]
        cfg["builder_source"] = _source_digest(self.builder)
        # A change of the data (split, order) must retrain cached models too.
        cfg["dataset_version"] = (data_mod.DATASETS.get(self.dataset).version
                                  if self.dataset in data_mod.DATASETS else "1")
        return cfg

    def fingerprint(self) -> str:
        """Changes whenever the entry's configuration (or its base's) changes: a stale cache
        entry is retrained rather than used."""
        cfg = self.config()
        if self.base is not None:
            cfg["base_fingerprint"] = get(self.base).fingerprint()
        blob = json.dumps(cfg, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _source_digest(fn: Callable) -> str:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(src.encode()).hexdigest()[:12]


MODELS: Registry[ModelEntry] = Registry("model")
_plugins_loaded = False


def register_model(name: str, *, dataset: str, recipe: str = "standard", epochs: int = 0,
                   seed: int = 0, batch_size: int = 128, lr: float = 1e-3,
                   base: str | None = None, description: str = "", tags=(),
                   replace: bool = False, **recipe_options) -> Callable:
    """Decorator registering a builder function as zoo entry ``name``.

    The builder takes no arguments (or the trained base model when ``base`` is given) and
    returns an untrained ``nn.Module`` following the input convention. Extra keyword arguments
    are passed to the recipe.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        entry = ModelEntry(name=name, builder=fn, dataset=dataset, recipe=recipe, epochs=epochs,
                           seed=seed, batch_size=batch_size, lr=lr, base=base,
                           recipe_options=dict(recipe_options),
                           description=description or (fn.__doc__ or "").strip().split("\n")[0],
                           tags=tuple(tags))
        MODELS.add(name, entry, replace=replace)
        return fn

    return deco


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    try:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()
    except Exception as err:  # a broken third-party plugin must not break the zoo
        warnings.warn(f"failed to load a third-party unmask.zoo plugin: {err}", stacklevel=2)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Zoo entries and recipes registered inside the block are gone after it (for tests).

    Plugins are loaded first, so their entries are not lost with the block's additions.
    """
    _load_plugins()
    with MODELS.isolated(), RECIPES.isolated():
        yield


def entries() -> list[ModelEntry]:
    """Every registered zoo entry, by name."""
    _load_plugins()
    return [MODELS.get(n) for n in MODELS.names()]


def list(tag: str | None = None) -> list[str]:  # noqa: A001 - timm-style name
    """Names of registered zoo entries (optionally only those with ``tag``)."""
    return [e.name for e in entries() if tag is None or tag in e.tags]


def get(name: str) -> ModelEntry:
    """The zoo entry ``name``; ``ValueError`` listing the known names."""
    _load_plugins()
    try:
        return MODELS.get(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def cache_dir() -> Path:
    """``$UNMASK_CACHE/models`` (default ``~/.cache/unmask/models``): the trained entries."""
    return cache_root() / "models"


def _paths(name: str) -> tuple[Path, Path, Path]:
    d = cache_dir()
    return d / f"{name}.safetensors", d / f"{name}.json", d / f"{name}.lock"


def versions() -> dict[str, str]:
    """Library versions recorded with every trained model and result."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "captum", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # pragma: no cover - optional at runtime
            pass
    try:
        out["unmask"] = version("unmask")
    except Exception:  # pragma: no cover - running from a source tree
        out["unmask"] = "unknown"
    return out


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Deferred: POSIX only; Windows has no fcntl.
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic renames still prevent corruption
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _state_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save(state)


FINGERPRINT_VERSION = 1
# What every nn.Module carries for torch's own bookkeeping (parameter/buffer/submodule dicts,
# hooks, the train flag): not attributes of the model. Hooks are fingerprinted separately.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def fingerprint(model: nn.Module) -> str:
    """The sha256 (hex) of everything that decides ``model``'s forward pass.

    Covers, module by module in registration order: the qualified name and class (plus a
    digest of the source of every class in its MRO defined outside torch, so an edited
    ``forward`` changes it), every parameter and buffer (name, dtype, shape, bytes; persistent
    or not), every other attribute set on the module (a temperature, quantisation levels, a
    noise std, a JPEG quality, a flag: numbers, strings, enums, tensors, containers and plain
    objects by value, functions by qualified name) and the forward hooks. Wrappers in another
    order, or one network behind a rounding, a contrast change or a softmax, therefore get
    different fingerprints, where a hash of the weights alone is the same.

    Not covered: the train/eval flag (attacks always run in eval mode), the device, a
    generator's state (a seeded randomised model keeps its fingerprint as it draws), and
    globals the forward reads. Compute it before the model is used when a module counts its
    own calls in an attribute: such a counter is an attribute like any other.

    Used for the zoo card (``model_fingerprint``), the suite's rows (``checkpoint_sha256``),
    ``unmask attack`` and the regression baselines (:mod:`unmask.bench.report.check`).

    Usage::

        zoo.fingerprint(model)[:12]  # as the leaderboard shows it
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    h = hashlib.sha256(f"unmask-fingerprint:{FINGERPRINT_VERSION}\n".encode())
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        h.update(f"module {name!r} {_qualname(cls)} {_class_source_digest(cls)}\n".encode())
        tensors = [("param", k, v) for k, v in module._parameters.items()] + \
            [("buffer", k, v) for k, v in module._buffers.items()]
        for kind, key, value in tensors:
            h.update(f"{kind} {key!r} ".encode())
            _hash_value(h, value)
        for key in sorted(k for k in vars(module) if k not in _MODULE_INTERNALS):
            h.update(f"attr {key!r} ".encode())
            _hash_value(h, vars(module)[key])
        for hooks in _HOOK_DICTS:
            for fn in getattr(module, hooks, {}).values():
                h.update(f"{hooks} {_qualname(fn)}\n".encode())
    return h.hexdigest()


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


_SOURCE_DIGESTS: dict[type, str] = {}


def _class_source_digest(cls: type) -> str:
    """A digest of the source of ``cls`` and its bases outside torch and the standard library
    (a class whose source cannot be read, e.g. defined in a REPL, counts by name only)."""
    if cls not in _SOURCE_DIGESTS:
        parts = []
        for klass in cls.__mro__:
            module = getattr(klass, "__module__", "") or ""
            if module.split(".")[0] in ("torch", "builtins", "abc", "typing"):
                continue
            try:
                parts.append(inspect.getsource(klass))
            except (OSError, TypeError):
                parts.append(_qualname(klass))
        _SOURCE_DIGESTS[cls] = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return _SOURCE_DIGESTS[cls]


def _hash_value(h: Any, value: Any, depth: int = 0) -> None:
    """Feed a canonical, address-free encoding of ``value`` into ``h``."""

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)} ".encode())
        h.update(hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).digest())
        h.update(b"\n")
    elif value is None or isinstance(value, bool | int | float | complex | str | bytes):
        h.update(f"{type(value).__name__} {value!r}\n".encode())
    elif isinstance(value, enum.Enum):
        h.update(f"enum {_qualname(type(value))} {value.value!r}\n".encode())
    elif isinstance(value, torch.dtype | torch.Size):
        h.update(f"{value}\n".encode())
    elif isinstance(value, torch.device | torch.Generator):
        h.update(f"{type(value).__name__}\n".encode())  # placement and RNG state: not identity
    elif depth > 4:
        h.update(f"deep {_qualname(type(value))}\n".encode())
    elif isinstance(value, builtins.list | tuple):  # zoo.list shadows the builtin
        h.update(f"{type(value).__name__} {len(value)}\n".encode())
        for v in value:
            _hash_value(h, v, depth + 1)
    elif isinstance(value, set | frozenset):
        items = []
        for v in value:
            sub = hashlib.sha256()
            _hash_value(sub, v, depth + 1)
            items.append(sub.hexdigest())
        h.update(f"set {' '.join(sorted(items))}\n".encode())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}\n".encode())
        for k in sorted(value, key=repr):
            _hash_value(h, k, depth + 1)
            _hash_value(h, value[k], depth + 1)
    elif isinstance(value, nn.Module):  # a module kept outside _modules (maybe its parent)
        h.update(f"module-ref {_qualname(type(value))}\n".encode())
    elif isinstance(value, functools.partial):
        h.update(b"partial ")
        _hash_value(h, (value.func, value.args, value.keywords), depth + 1)
    elif callable(value) and hasattr(value, "__qualname__"):
        h.update(f"callable {_qualname(value)}\n".encode())
    elif hasattr(value, "__dict__"):
        h.update(f"object {_qualname(type(value))}\n".encode())
        _hash_value(h, {k: v for k, v in vars(value).items()}, depth + 1)
    else:
        h.update(f"opaque {_qualname(type(value))}\n".encode())


def _build(entry: ModelEntry, device: torch.device) -> nn.Module:
    with seeded_init(entry.seed):
        if entry.base is not None:
            model = entry.builder(load(entry.base, device=device))
        else:
            model = entry.builder()
    return model.to(device)


class _BadCard(Exception):
    pass


def _read_cached(entry: ModelEntry, device: torch.device, *,
                 report: bool = True) -> tuple[nn.Module, dict] | None:
    """The cached model if present, current and intact; None when it must be (re)trained.

    With ``report`` a corrupt cache raises a :class:`CacheCorruptionWarning`. The unlocked
    first look passes ``report=False``: another process may be between its two renames, and
    the look under the lock decides.
    """
    weights, card_path, _ = _paths(entry.name)
    if not weights.exists() and not card_path.exists():
        return None
    problem = None
    try:
        card_data = json.loads(card_path.read_text())
        if not isinstance(card_data, dict) or not isinstance(card_data.get("fingerprint"), str) \
                or not isinstance(card_data.get("sha256"), str):
            raise _BadCard("it lacks its fingerprint or sha256")
        if card_data["fingerprint"] != entry.fingerprint():
            log.info("cached %s was trained with another configuration; retraining", entry.name)
            return None
        blob = weights.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != card_data["sha256"]:
            problem = f"sha256 mismatch (file {digest[:12]}, card {card_data['sha256'][:12]})"
        else:
            model = _build(entry, device)
            model.load_state_dict(load_bytes(blob))
            model.eval()
            return model, card_data
    except FileNotFoundError as err:
        problem = f"missing file {err.filename}"
    except (json.JSONDecodeError, UnicodeDecodeError, _BadCard) as err:
        problem = f"unreadable card ({err})"
    except Exception as err:  # safetensors header errors, shape mismatches
        problem = f"unreadable weights ({type(err).__name__}: {err})"
    if report:
        warnings.warn(f"cached model {entry.name!r} in {weights.parent} is corrupt: {problem}; "
                      "retraining it", CacheCorruptionWarning, stacklevel=4)
    return None


def _cpu_threads(device: torch.device | str) -> int | None:
    """The thread count that decides CPU training (None on an accelerator)."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else None


def _warn_threads(entry: ModelEntry, card_data: dict | None, device: torch.device, *,
                  retraining: bool) -> None:
    """Warn when ``card_data`` was trained on the CPU with another thread count than this
    process uses: on a load once per entry and process, on every retrain."""
    if not isinstance(card_data, dict) or card_data.get("fingerprint") != entry.fingerprint():
        return  # another configuration: its weights differ anyway
    trained, now = card_data.get("threads"), _cpu_threads(device)
    if not str(card_data.get("device", "")).startswith("cpu") or not isinstance(trained, int) \
            or now is None or trained == now:
        return
    if retraining:
        message = (f"retraining zoo model {entry.name!r} with {now} CPU threads; its card was "
                   f"trained with {trained}: CPU training with another thread count gives other "
                   f"weights (torch.set_num_threads({trained}) reproduces the card's)")
    elif entry.name in _THREADS_WARNED:
        return
    else:
        _THREADS_WARNED.add(entry.name)
        message = (f"zoo model {entry.name!r} was trained with {trained} CPU threads, this "
                   f"process uses {now}: the cached weights are used as they are, but a retrain "
                   f"here would give other weights (torch.set_num_threads({trained}) "
                   "reproduces them)")
    warnings.warn(message, ThreadCountWarning, stacklevel=4)


_THREADS_WARNED: set[str] = set()


def _train(entry: ModelEntry, device: torch.device, progress: bool) -> tuple[nn.Module, dict]:
    try:  # the card being replaced, if readable (it may be the corrupt file)
        previous = json.loads(_paths(entry.name)[1].read_text())
    except (OSError, ValueError):
        previous = None
    _warn_threads(entry, previous, device, retraining=True)
    model = _build(entry, device)
    try:
        recipe = RECIPES.get(entry.recipe) if entry.recipe != "none" else None
    except KeyError as err:
        raise ValueError(f"zoo entry {entry.name!r}: {err.args[0]}") from None
    x_test, y_test = data_mod.load(entry.dataset, "test")
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if recipe is not None:
        x_train, y_train = data_mod.load(entry.dataset, "train")
        log.info("training %s (%s, %d epochs, seed %d)", entry.name, entry.recipe, entry.epochs,
                 entry.seed)
        out = recipe(model, x_train, y_train, epochs=entry.epochs, batch_size=entry.batch_size,
                     lr=entry.lr, generator=entry.seed, progress=progress,
                     **entry.recipe_options)
        # A recipe returns the model, or (model, metrics) to store extra numbers on the card.
        if isinstance(out, tuple):
            model, extra = out
        else:
            model = out
    seconds = time.perf_counter() - start
    model.eval()
    blob = _state_bytes(model)
    card_data = {
        "schema": CARD_SCHEMA,
        "name": entry.name,
        "fingerprint": entry.fingerprint(),
        "entry": entry.config(),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "clean_accuracy": accuracy(model, x_test, y_test),
        "test_samples": len(y_test),
        "train_seconds": round(seconds, 3),
        "device": str(device),
        # CPU training is reproducible only at the same thread count (see ThreadCountWarning).
        "threads": torch.get_num_threads(),
        "model_fingerprint": fingerprint(model),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"metrics": extra} if extra else {}),
    }
    weights, card_path, _ = _paths(entry.name)
    # Weights first, card last: the card is the commit marker, and it names the hash.
    atomic_write(weights, blob, fsync=True)
    atomic_write(card_path, json.dumps(card_data, indent=2, sort_keys=True).encode(), fsync=True)
    return model, card_data


def load_with_card(name: str, *, device: str | torch.device | None = None,
                   retrain: bool = False, progress: bool = True) -> tuple[nn.Module, dict]:
    """The trained model ``name`` and its card (training provenance and clean accuracy).

    The card records the CPU thread count of the training run and the model's
    :func:`fingerprint`; a :class:`ThreadCountWarning` says when this process would train
    with another count (CPU training is reproducible only at the same count)."""
    entry = get(name)
    dev = select_device(device)
    _, _, lock = _paths(name)
    if not retrain:
        hit = _read_cached(entry, dev, report=False)
        if hit is not None:
            _warn_threads(entry, hit[1], dev, retraining=False)
            return hit
    with _file_lock(lock):
        # Another process may have trained it while we waited for the lock.
        if not retrain:
            hit = _read_cached(entry, dev, report=True)
            if hit is not None:
                _warn_threads(entry, hit[1], dev, retraining=False)
                return hit
        return _train(entry, dev, progress)


def load(name: str, *, device: str | torch.device | None = None, retrain: bool = False,
         progress: bool = True) -> nn.Module:
    """The trained model ``name`` in eval mode on ``device``; trains and caches it on first use."""
    return load_with_card(name, device=device, retrain=retrain, progress=progress)[0]


def card(name: str) -> dict | None:
    """The cached card of ``name``, or None when it has not been trained yet."""
    _, card_path, _ = _paths(get(name).name)
    try:
        return json.loads(card_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wrap(model: nn.Module, mean=None, std=None) -> nn.Module:
    """Put a user model behind the input convention: ``Normalize(mean, std)`` then ``model``.

    Use it for models trained on normalised inputs; with ``mean``/``std`` None the model is
    returned unchanged (it already takes [0, 1] inputs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mean is None and std is None:
        return model
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither")
    return nn.Sequential(Normalize(mean, std), model)


def from_checkpoint(path: str | os.PathLike, arch: str | nn.Module, *, mean=None, std=None,
                    device: str | torch.device | None = None, strict: bool = True,
                    **arch_kwargs) -> nn.Module:
    """Load a user checkpoint into ``arch`` (a registered architecture name, ``tv:NAME``, or a
    module instance), optionally behind ``Normalize(mean, std)``; eval mode."""
    state = read_state_dict(path)
    model = build_arch(arch, **arch_kwargs) if isinstance(arch, str) else arch
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not match architecture {arch!r}: {err}") from None
    model = wrap(model, mean, std)
    return model.to(select_device(device)).eval()
