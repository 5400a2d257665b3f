"""One way to name a model, on every command: a zoo name, ``module:function``, or a checkpoint.

* ``mnist-cnn``: a zoo entry (trained on first use, cached; ``unmask zoo list``);
* ``mypkg.models:build``: a user's builder, imported with the working directory on
  ``sys.path`` (as ``python -m`` does) and called with ``kwargs``; it returns an ``nn.Module``
  taking ``[0, 1]`` inputs and returning logits;
* ``robustbench:<dataset>/<threat>/<name>``: a RobustBench-style local checkpoint
  (``<model_dir>/<dataset>/<threat>/<name>.pt``; ``kwargs`` ``model_dir``, ``arch_kwargs``;
  :func:`unmask.bench.zoo.robustbench.load_spec`), never downloaded;
* ``path/to/weights.pt`` (or ``.pth``, ``.ckpt``, ``.bin``, ``.safetensors``): a state dict
  loaded into ``arch`` (a registered architecture such as ``small-cnn``, ``tv:resnet18``, or a
  ``module:function`` builder), never unpickling arbitrary objects; a TorchScript archive
  (``torch.jit.save``) needs no ``arch``. (``torch.export`` programs cannot switch to eval
  mode, which every attack does; load them in a ``module:function`` builder of yours.)

:func:`load_model` returns a :class:`LoadedModel`; the suite runner, the CLI commands and the
pytest helper all name models this way.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data, zoo
from ..core import select_device
from . import archs
from .robustbench import load_spec, parse_robustbench_spec

ROBUSTBENCH_PREFIX = "robustbench:"

__all__ = ["LoadedModel", "ModelSourceError", "CHECKPOINT_SUFFIXES", "DEFAULT_DATASET",
           "is_user_builder", "is_checkpoint", "import_callable", "build_user_model",
           "load_model"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
# The dataset a model that is not a zoo entry is evaluated on when none is named: the one
# embedded offline (a user model of other inputs names its dataset: --dataset cifar10).
DEFAULT_DATASET = "mnist5k"


class ModelSourceError(ValueError):
    """A model name that names no model: unknown zoo entry, bad ``module:function``, a
    checkpoint that does not load. The message says which form was tried and what to fix."""


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with where it came from.

    ``source`` is ``zoo``, ``user`` (``module:function``) or ``checkpoint``; ``dataset`` is the
    zoo entry's dataset, else the one asked for (default :data:`DEFAULT_DATASET`); ``card``
    the zoo entry's card (None otherwise).
    """

    model: nn.Module
    name: str
    source: str
    dataset: str
    card: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (CPU for a model without parameters)."""
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")


def is_user_builder(name: str) -> bool:
    """``package.module:function``: a user's model builder (not a path, not a zoo name)."""
    module, sep, func = name.partition(":")
    return bool(sep) and bool(module) and bool(func) and "/" not in name and "\\" not in name \
        and all(part.isidentifier() for part in module.split(".")) and func.isidentifier()


def is_checkpoint(name: str) -> bool:
    """A path to a checkpoint file: an existing file, or a name with a checkpoint suffix."""
    return Path(name).suffix.lower() in CHECKPOINT_SUFFIXES or Path(name).is_file()


def _cwd_on_path() -> None:
    # `python -m` puts the working directory on sys.path; a console script does not. Appended,
    # not prepended: a folder of the working directory never shadows an installed package.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def import_callable(name: str, what: str = "model") -> Callable[..., Any]:
    """Import ``package.module:function`` (the working directory on ``sys.path``)."""
    if not is_user_builder(name):
        raise ModelSourceError(f"{name!r} is not 'package.module:function'")
    module_name, _, func_name = name.partition(":")
    _cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSourceError(
            f"cannot import {module_name!r} for {what} {name!r}: {err} (the working directory "
            f"{os.getcwd()} is on sys.path; run from the folder that holds the package or "
            "install it)") from err
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise ModelSourceError(f"{module_name} has no callable {func_name!r} ({what} {name!r})")
    return fn


def build_user_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Import ``module:function``, call it with ``kwargs``; an ``nn.Module`` in eval mode."""
    fn = import_callable(name)
    try:
        model = fn(**(kwargs or {}))
    except TypeError as err:
        raise ModelSourceError(f"calling {name}(**{kwargs or {}}) failed: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{name} returned {type(model).__name__}, expected a "
                               "torch.nn.Module taking [0, 1] inputs and returning logits")
    return model.eval()


def _is_torchscript(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:  # a TorchScript archive holds its code, a state dict not
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def _from_checkpoint(path: Path, arch: str | None, kwargs: dict[str, Any] | None,
                     device: torch.device) -> tuple[nn.Module, dict[str, Any]]:

    if not path.is_file():
        raise ModelSourceError(f"checkpoint not found: {path}")
    if arch is None:
        if _is_torchscript(path):
            return torch.jit.load(str(path), map_location=device).eval(), {"format": "torchscript"}
        raise ModelSourceError(
            f"{path} holds weights: name the architecture they belong to with --arch "
            f"(a registered one: {', '.join(archs.ARCHS.names())}; tv:NAME for torchvision; or "
            "module:function, a builder of yours), or save a TorchScript archive "
            "(torch.jit.save(torch.jit.script(model), path))")
    if is_user_builder(arch):
        model = build_user_model(arch, kwargs)
        try:
            model.load_state_dict(zoo.read_state_dict(path))
        except RuntimeError as err:
            raise ModelSourceError(f"checkpoint {path} does not match {arch}: {err}") from None
    else:
        try:
            model = zoo.from_checkpoint(path, arch, device=device, **(kwargs or {}))
        except ValueError as err:
            raise ModelSourceError(str(err)) from None
    return model.to(device).eval(), {"format": "state_dict", "arch": arch}


def load_model(name: str, *, arch: str | None = None, kwargs: dict[str, Any] | None = None,
               dataset: str | None = None, device: str | torch.device | None = None,
               progress: bool = False) -> LoadedModel:
    """The model ``name`` names (see the module docstring), in eval mode on ``device``.

    Args:
        name: a zoo name, ``module:function``, or a checkpoint path.
        arch: for a checkpoint of weights, the architecture (registered name, ``tv:NAME`` or
            ``module:function``); refused for the other forms.
        kwargs: keyword arguments of a ``module:function`` builder or of ``arch``.
        dataset: the dataset a non-zoo model is evaluated on (default :data:`DEFAULT_DATASET`);
            for a zoo entry it must be the entry's own, or None.
        device: ``cpu``, ``cuda``, ... (default: best available).

    Raises :class:`ModelSourceError` with what to fix.

    Usage: ``m = load_model("mypkg.models:build", kwargs={"width": 32}); m.model(x)``
    """

    if not isinstance(name, str) or not name:
        raise ModelSourceError(f"a model name is a non-empty string, got {name!r}")
    if dataset is not None and dataset not in data.names():
        raise ModelSourceError(f"unknown dataset {dataset!r}; registered: "
                               f"{', '.join(data.names())}")
    dev = select_device(device)
    if name in zoo.list():
        if arch is not None or kwargs:
            raise ModelSourceError(f"{name!r} is a zoo entry: it takes no --arch or kwargs")
        entry = zoo.get(name)
        if dataset is not None and dataset != entry.dataset:
            raise ModelSourceError(f"zoo entry {name!r} is a {entry.dataset} model, not "
                                   f"{dataset}")
        model, card = zoo.load_with_card(name, device=dev, progress=progress)
        return LoadedModel(model.eval(), name, "zoo", entry.dataset, card)
    if name.startswith(ROBUSTBENCH_PREFIX):

        options = dict(kwargs or {}, **({"arch": arch} if arch is not None else {}))
        try:
            rb_dataset = parse_robustbench_spec(name)[0]
            model = load_spec(name, options, device=dev)
        except (ValueError, FileNotFoundError) as err:
            raise ModelSourceError(str(err)) from err
        dataset = dataset or (rb_dataset if rb_dataset in data.names() else DEFAULT_DATASET)
        return LoadedModel(model.eval(), name, "robustbench", dataset, details=options)
    dataset = dataset or DEFAULT_DATASET
    if is_user_builder(name):
        if arch is not None:
            raise ModelSourceError("--arch names the architecture of a checkpoint file; "
                                   f"{name!r} builds its own model")
        return LoadedModel(build_user_model(name, kwargs).to(dev), name, "user", dataset,
                           details={"kwargs": dict(kwargs or {})})
    if is_checkpoint(name):
        model, details = _from_checkpoint(Path(name), arch, kwargs, dev)
        return LoadedModel(model, name, "checkpoint", dataset, details=details)
    near = _near(name, zoo.list())
    raise ModelSourceError(
        f"unknown model {name!r}{near} Give a zoo name (unmask zoo list), "
        "package.module:function (a builder of yours), or a checkpoint file "
        f"({', '.join(CHECKPOINT_SUFFIXES)}) with --arch")


def _near(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f". Did you mean {', '.join(close)}?" if close else "."
