"""Models from a RobustBench-style local checkpoint directory, never downloaded.

RobustBench (Croce et al., NeurIPS 2021 Datasets and Benchmarks) keeps its checkpoints as
``<model_dir>/<dataset>/<threat_model>/<model_name>.pt`` (``models/cifar10/Linf/Standard.pt``)
and builds each entry's architecture from its model zoo. :func:`load_robustbench` reads the same
layout:

* the architecture is unmask's own when ``arch`` names one (``"wide-resnet-28-10"``,
  ``"preact-resnet18"``, ``"small-cnn"``, ``tv:NAME``, see :mod:`unmask.bench.zoo.archs`) or is a
  module instance; otherwise the ``robustbench`` package's own model-zoo entry
  (``pip install 'unmask[robustbench]'``), found by dataset, threat model and name;
* the checkpoint is read with ``torch.load(weights_only=True)`` (or safetensors), unwrapping
  ``{"state_dict": ...}`` and stripping the ``module.`` prefix of DataParallel, as RobustBench's
  loader does (and its ``model.`` prefix when only that makes the keys match);
* nothing is ever downloaded: a missing file is a ``FileNotFoundError`` naming the path.

RobustBench models take ``[0, 1]`` inputs and hold their normalisation inside, as unmask's do.
(``robustbench`` 1.1.1 from PyPI imports ``pkg_resources``, gone from setuptools >= 81, and the
git-only ``autoattack`` package when imported; where that fails the error says so and asks for
``arch=``.)

In a suite, the model spec string ``robustbench:<dataset>/<threat_model>/<model_name>`` with
``kwargs = { model_dir = "models", arch = "..." }`` loads the same way::

    [[models]]
    name = "robustbench:cifar10/Linf/Standard"
    kwargs = { model_dir = "/data/robustbench-models" }

Usage::

    model = load_robustbench("Standard", "models", "cifar10", "Linf")
    model = load_robustbench("mine", "ckpts", "mnist", "Linf", arch="small-cnn")
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import select_device
from .archs import build
from .registry import read_state_dict

__all__ = ["load_robustbench", "checkpoint_path", "parse_robustbench_spec", "PREFIX",
           "THREAT_MODELS", "ROBUSTBENCH_DATASETS", "SPEC_OPTIONS", "robustbench_architecture",
           "load_spec"]

PREFIX = "robustbench:"
# RobustBench's ThreatModel and BenchmarkDataset values (robustbench.model_zoo.enums).
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
# The keyword arguments a ``robustbench:`` suite model takes.
SPEC_OPTIONS = ("model_dir", "arch", "arch_kwargs", "strict")
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _threat_model(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"threat_model must be a string, got {type(value).__name__}")
    for t in THREAT_MODELS:
        if value.lower() == t.lower():
            return t
    raise ValueError(f"unknown threat model {value!r}; expected one of {', '.join(THREAT_MODELS)}")


def _component(value: str, what: str) -> str:
    if not isinstance(value, str) or not _COMPONENT.match(value) or value in (".", ".."):
        raise ValueError(f"{what} must be a plain file name (letters, digits, . _ + -), got "
                         f"{value!r}")
    return value


def checkpoint_path(model_name: str, model_dir: str | os.PathLike = "models",
                    dataset: str = "cifar10", threat_model: str = "Linf") -> Path:
    """``<model_dir>/<dataset>/<threat_model>/<model_name>.pt``, RobustBench's layout
    (the threat model spelled as RobustBench does: ``Linf``, ``L2``, ``corruptions``)."""
    return (Path(model_dir) / _component(dataset, "dataset") / _threat_model(threat_model)
            / f"{_component(model_name, 'model_name')}.pt")


def parse_robustbench_spec(spec: str) -> tuple[str, str, str]:
    """``"robustbench:cifar10/Linf/Standard"`` -> ``("cifar10", "Linf", "Standard")``.

    Raises ValueError naming the expected form."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        raise ValueError(f"expected '{PREFIX}<dataset>/<threat_model>/<model_name>', got "
                         f"{spec!r}")
    parts = spec[len(PREFIX):].split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"expected '{PREFIX}<dataset>/<threat_model>/<model_name>' "
                         f"(e.g. {PREFIX}cifar10/Linf/Standard), got {spec!r}")
    dataset, threat, name = parts
    return _component(dataset, "dataset"), _threat_model(threat), _component(name, "model_name")


def robustbench_architecture(model_name: str, dataset: str, threat_model: str) -> nn.Module:
    """The untrained architecture of a RobustBench model-zoo entry, from the installed
    ``robustbench`` package (no download: only the entry's constructor is called).

    Raises ImportError when ``robustbench`` cannot be imported, ValueError for an unknown
    entry or an ensemble entry (several checkpoints)."""
    try:
        # Deferred: optional dependency (the `robustbench` extra).
        from robustbench.model_zoo import model_dicts

        # Deferred: optional dependency (the `robustbench` extra).
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except Exception as err:  # not installed, or installed without its own dependencies
        raise ImportError(f"the robustbench package cannot be imported ({type(err).__name__}: "
                          f"{err}); install it (pip install 'unmask[robustbench]') or pass arch="
                          "an unmask architecture") from err
    try:
        entries = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (KeyError, ValueError):
        raise ValueError(f"RobustBench has no {dataset}/{threat_model} model zoo") from None
    if model_name not in entries:

        close = difflib.get_close_matches(model_name, list(entries), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"RobustBench has no model {model_name!r} under {dataset}/"
                         f"{threat_model}.{hint}")
    entry = entries[model_name]
    if isinstance(entry.get("gdrive_id"), list):
        raise ValueError(f"RobustBench model {model_name!r} is an ensemble of several "
                         "checkpoints; load it with robustbench itself and pass the module")
    return entry["model"]()


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_robustbench(model_name: str, model_dir: str | os.PathLike = "models",
                     dataset: str = "cifar10", threat_model: str = "Linf", *,
                     arch: str | nn.Module | None = None,
                     arch_kwargs: Mapping[str, Any] | None = None,
                     device: str | torch.device | None = None,
                     strict: bool = True) -> nn.Module:
    """Load ``<model_dir>/<dataset>/<threat_model>/<model_name>.pt`` (RobustBench's layout)
    into its architecture, in eval mode; never downloads.

    Args:
        model_name: the file's stem (a RobustBench model-zoo name when ``arch`` is None).
        model_dir: the root of the layout (RobustBench's default is ``./models``).
        dataset: ``cifar10``, ``cifar100``, ``imagenet`` (any plain name with ``arch``).
        threat_model: ``Linf``, ``L2``, ``corruptions`` (case-insensitive).
        arch: an unmask architecture name (:func:`unmask.bench.zoo.archs.build`) or a module;
            None: the ``robustbench`` package's own architecture of the entry.
        arch_kwargs: keyword arguments of the unmask architecture (``num_classes=100``).
        device: where the model goes (default: the best available).
        strict: the state dict must match the architecture's keys exactly.

    Returns: the model (``[0, 1]`` inputs, logits).

    Raises:
        FileNotFoundError: no checkpoint at the path (nothing is downloaded).
        ImportError: ``arch`` is None and ``robustbench`` cannot be imported.
        ValueError: a bad name, an unknown entry, or a checkpoint that does not fit.
    """

    if arch is None and dataset not in ROBUSTBENCH_DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of RobustBench's "
                         f"({', '.join(ROBUSTBENCH_DATASETS)}); pass arch= an unmask "
                         "architecture for other datasets")
    path = checkpoint_path(model_name, model_dir, dataset, threat_model)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (the RobustBench layout <model_dir>/<dataset>/"
            "<threat_model>/<model_name>.pt); unmask never downloads: fetch it once with "
            "robustbench (robustbench.utils.load_model) or copy it there")
    if arch is None:
        model = robustbench_architecture(model_name, dataset, _threat_model(threat_model))
    elif isinstance(arch, nn.Module):
        model = arch
    elif isinstance(arch, str):
        model = build(arch, **dict(arch_kwargs or {}))
    else:
        raise TypeError(f"arch must be an unmask architecture name, a torch.nn.Module or None, "
                        f"got {type(arch).__name__}")
    state = read_state_dict(path)  # weights_only=True; module. stripped, wrappers unwrapped
    expected = set(model.state_dict())
    if set(state) != expected and set(_strip(state, "model.")) == expected:
        state = _strip(state, "model.")  # RobustBench's Chen2020Efficient-style checkpoints
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        what = arch if arch is not None else f"RobustBench's {model_name}"
        raise ValueError(f"checkpoint {path} does not match the architecture {what!r}: "
                         f"{err}") from None
    return model.to(select_device(device)).eval()


def load_spec(spec: str, options: Mapping[str, Any] | None = None, *,
              device: str | torch.device | None = None) -> nn.Module:
    """The model of a ``robustbench:<dataset>/<threat_model>/<model_name>`` spec string with
    its options (:data:`SPEC_OPTIONS`; ``model_dir`` defaults to ``$UNMASK_ROBUSTBENCH_DIR``
    or ``models``)."""
    dataset, threat, name = parse_robustbench_spec(spec)
    options = dict(options or {})
    unknown = sorted(set(options) - set(SPEC_OPTIONS))
    if unknown:
        raise ValueError(f"{spec}: unknown option {unknown[0]!r}; a robustbench model takes "
                         f"{', '.join(SPEC_OPTIONS)}")
    model_dir = options.pop("model_dir", None) or os.environ.get("UNMASK_ROBUSTBENCH_DIR",
                                                                 "models")
    return load_robustbench(name, model_dir, dataset, threat, device=device, **options)
