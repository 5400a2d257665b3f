"""unmask.bench.core: the types and helpers every other module shares; it imports nothing of
unmask's outside this package.

* :mod:`.threat` -- ``Threat(norm, eps)`` and the one projection every attack uses;
* :mod:`.results` -- ``AttackResult``, ``SampleOutcomes``, the margin and the majority rule;
* :mod:`.validation` -- checks of images, labels and logits, with messages that say what to fix;
* :mod:`.seeding` -- generators and draws (randomness only from an explicit seed);
* :mod:`.modules` -- ``Normalize``, mixed precision, device selection, eval-mode context;
* :mod:`.enums` -- string-valued enums;
* :mod:`.registry` -- the one registry base (``Registry``) every kind of name uses;
* :mod:`.fileio` -- atomic writes, the cache root, JSON-safe values;
* :mod:`.training` -- the training loop and the recipe registry;
* :mod:`.counting` -- forward/backward pass counters around any model.

Conventions (see ``shared/DESIGN.md``): a model takes float inputs ``N x C x H x W`` in
``[0, 1]`` and returns logits ``N x K``; every stochastic function takes a ``torch.Generator``.
"""

from .enums import StrEnum, parse_enum
from .modules import Autocast, Normalize, Precision, model_mode, select_device
from .results import DRAWS, AttackResult, SampleOutcomes, check_schema, margin, robust_by_majority
from .seeding import make_generator, normal, uniform
from .threat import LargeEpsWarning, Norm, Threat, threat_key
from .validation import (
    NonFiniteOutputError,
    ProbabilityOutputWarning,
    check_images,
    check_inputs,
    check_labels,
    check_logits,
    looks_like_probabilities,
    model_dtype,
    warn_if_train_mode,
    warnings_once,
)

__all__ = [
    "Norm",
    "Threat",
    "threat_key",
    "AttackResult",
    "Normalize",
    "Precision",
    "Autocast",
    "ProbabilityOutputWarning",
    "NonFiniteOutputError",
    "LargeEpsWarning",
    "check_images",
    "check_labels",
    "check_inputs",
    "check_logits",
    "model_dtype",
    "warnings_once",
    "looks_like_probabilities",
    "warn_if_train_mode",
    "margin",
    "select_device",
    "make_generator",
    "uniform",
    "normal",
    "model_mode",
    "parse_enum",
    "StrEnum",
    "DRAWS",
    "robust_by_majority",
    "SampleOutcomes",
    "check_schema",
]
